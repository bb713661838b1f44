//! SGD with (Nesterov) momentum and its state in plain tensors, PyTorch's `torch.optim.SGD`
//! (`dampening = 0`): `g += wd * p; buf = mu * buf + g; g = g + mu * buf` (Nesterov) or
//! `g = buf`; `p -= lr * g`. nnU-Net trains with `momentum = 0.99, nesterov = True,
//! weight_decay = 3e-5`. The buffer starts at zero, which equals PyTorch's first-step
//! `buf = g.clone()`.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn::VarStore, Kind, Tensor};

/// SGD hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

struct Param {
    name: String,
    var: Tensor,
    buf: Tensor,
}

/// SGD over the trainable variables of a [`VarStore`].
pub struct Sgd {
    cfg: SgdConfig,
    params: Vec<Param>,
    step: i64,
}

impl Sgd {
    pub fn new(vs: &VarStore, cfg: SgdConfig) -> Self {
        let vars = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let params = names
            .into_iter()
            .filter(|n| vars[*n].requires_grad())
            .map(|n| Param {
                name: n.clone(),
                var: vars[n].shallow_clone(),
                buf: vars[n].zeros_like().detach(),
            })
            .collect();
        Self {
            cfg,
            params,
            step: 0,
        }
    }

    pub fn steps(&self) -> i64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.var.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.var.grad())
            .filter(|g| g.defined())
            .collect()
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            for mut g in self.grads() {
                let _ = g.g_mul_scalar_(factor);
            }
        });
    }

    /// Clips the global gradient norm; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads = self.grads();
            if grads.is_empty() {
                return 0.0;
            }
            let norms: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_kind(Kind::Float).norm())
                .collect();
            let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
            total
        })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let SgdConfig {
            momentum,
            nesterov,
            weight_decay,
        } = self.cfg;
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.var.grad();
                if !g.defined() {
                    continue;
                }
                let mut d = if weight_decay != 0.0 {
                    &g + &p.var * weight_decay
                } else {
                    g.shallow_clone()
                };
                if momentum != 0.0 {
                    let _ = p.buf.g_mul_scalar_(momentum).g_add_(&d);
                    d = if nesterov {
                        d + &p.buf * momentum
                    } else {
                        p.buf.shallow_clone()
                    };
                }
                let _ = p.var.g_sub_(&(d * lr));
            }
        });
    }

    /// Saves the momentum buffers (`buf.<name>`) and the step count as safetensors.
    pub fn save(&self, path: &Path) -> Result<(), tch::TchError> {
        let mut named: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|p| (format!("buf.{}", p.name), p.buf.to_device(tch::Device::Cpu)))
            .collect();
        named.push(("step".into(), Tensor::from(self.step)));
        let refs: Vec<(&str, Tensor)> = named
            .iter()
            .map(|(k, v)| (k.as_str(), v.shallow_clone()))
            .collect();
        Tensor::write_safetensors(&refs, path)
    }

    /// Restores a state saved by [`Sgd::save`].
    pub fn load(&mut self, path: &Path) -> Result<(), String> {
        let loaded: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| format!("cannot read optimiser state '{}': {e}", path.display()))?
            .into_iter()
            .collect();
        tch::no_grad(|| -> Result<(), String> {
            for p in &mut self.params {
                let key = format!("buf.{}", p.name);
                let src = loaded.get(&key).ok_or_else(|| {
                    format!("optimiser state '{}' has no '{key}'", path.display())
                })?;
                if src.size() != p.buf.size() {
                    return Err(format!(
                        "optimiser state '{key}' has shape {:?}, expected {:?}",
                        src.size(),
                        p.buf.size()
                    ));
                }
                p.buf.copy_(src);
            }
            Ok(())
        })?;
        self.step = loaded
            .get("step")
            .map(|t| t.int64_value(&[]))
            .ok_or_else(|| format!("optimiser state '{}' has no step", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pytorch_nesterov_sgd_on_a_quadratic() {
        // torch: w=torch.tensor([1.,-2.],requires_grad=True)
        //   o=torch.optim.SGD([w],lr=0.1,momentum=0.9,nesterov=True,weight_decay=0.01)
        //   for _ in range(3): o.zero_grad(); ((w-3)**2).sum().backward(); o.step()
        // Step 1: g = 2(w-3) + 0.01 w = [-3.99, -10.02]; buf = g; d = g + 0.9 g = 1.9 g;
        //   w = [1.7581, -0.0962].
        let vs = VarStore::new(tch::Device::Cpu);
        let w = vs
            .root()
            .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0]));
        let mut o = Sgd::new(
            &vs,
            SgdConfig {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.01,
            },
        );
        o.zero_grad();
        (&w - 3.0).pow_tensor_scalar(2).sum(Kind::Float).backward();
        o.step(0.1);
        let got = Vec::<f32>::try_from(&w).unwrap();
        assert!(
            (got[0] - 1.7581).abs() < 1e-5 && (got[1] + 0.0962).abs() < 1e-5,
            "{got:?}"
        );
        // Step 2 by hand: g2 = 2(w-3) + 0.01 w; buf2 = 0.9 g1 + g2; w -= 0.1 (g2 + 0.9 buf2).
        let (g1, w1) = ([-3.99f64, -10.02], [1.7581f64, -0.0962]);
        let g2: Vec<f64> = w1.iter().map(|w| 2.0 * (w - 3.0) + 0.01 * w).collect();
        let want: Vec<f64> = (0..2)
            .map(|i| {
                let b = 0.9 * g1[i] + g2[i];
                w1[i] - 0.1 * (g2[i] + 0.9 * b)
            })
            .collect();
        o.zero_grad();
        (&w - 3.0).pow_tensor_scalar(2).sum(Kind::Float).backward();
        o.step(0.1);
        let got = Vec::<f32>::try_from(&w).unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-4,
                "{got:?} vs {want:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sgd.safetensors");
        o.save(&p).unwrap();
        let mut o2 = Sgd::new(&vs, o.cfg);
        o2.load(&p).unwrap();
        assert_eq!(o2.steps(), 2);
        assert!(o2.params[0].buf.allclose(&o.params[0].buf, 0.0, 0.0, false));
    }
}
