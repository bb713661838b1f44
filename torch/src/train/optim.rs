//! AdamW with its state in plain tensors, so checkpoints hold the whole optimiser.
//!
//! libtorch's C++ optimisers (what `tch::nn::Optimizer` wraps) do not expose their moment
//! buffers, which makes an exact resume impossible. This is PyTorch's `torch.optim.AdamW`
//! (decoupled weight decay, bias-corrected moments, `eps` added after the square root),
//! with parameter groups in timm's `param_groups_weight_decay` style: parameters with at
//! most one dimension and names ending in `.bias` get no weight decay.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn::VarStore, Kind, Tensor};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Whether timm's rule exempts a parameter from weight decay.
pub fn no_weight_decay(name: &str, t: &Tensor) -> bool {
    t.dim() <= 1 || name.ends_with(".bias")
}

struct Param {
    name: String,
    var: Tensor,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over the trainable variables of a [`VarStore`].
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    step: i64,
}

impl AdamW {
    /// All trainable variables of `vs` (sorted by name), grouped by the no-decay rule.
    pub fn new(vs: &VarStore, cfg: AdamWConfig) -> Self {
        let vars = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let params = names
            .into_iter()
            .filter(|n| vars[*n].requires_grad())
            .map(|n| {
                let var = vars[n].shallow_clone();
                Param {
                    name: n.clone(),
                    decay: !no_weight_decay(n, &var),
                    m: var.zeros_like().detach(),
                    v: var.zeros_like().detach(),
                    var,
                }
            })
            .collect();
        Self {
            cfg,
            params,
            step: 0,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// Names of the parameters with and without weight decay.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let d = self
            .params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
            .collect();
        let n = self
            .params
            .iter()
            .filter(|p| !p.decay)
            .map(|p| p.name.as_str())
            .collect();
        (d, n)
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.var.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Multiplies every gradient by `factor` (loss-scale removal).
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            for p in &self.params {
                let mut g = p.var.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        });
    }

    /// Clips the global gradient norm to `max_norm`; returns the norm before clipping
    /// (as `torch.nn.utils.clip_grad_norm_`).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.var.grad())
                .filter(|g| g.defined())
                .collect();
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
                    let _ = g.f_mul_(&Tensor::from(coef)).expect("scale gradient");
                }
            }
            total
        })
    }

    /// One AdamW update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.var.grad();
                if !g.defined() {
                    continue;
                }
                if p.decay && self.cfg.weight_decay != 0.0 {
                    let _ = p.var.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                }
                // In place, as PyTorch's single-tensor AdamW (two temporaries per parameter):
                // m <- lerp(m, g, 1 - b1); v <- lerp(v, g^2, 1 - b2);
                // w <- w - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps).
                let _ = p.m.lerp_(&g, 1.0 - b1);
                let _ = p.v.lerp_(&g.square(), 1.0 - b2);
                if lr == 0.0 {
                    continue;
                }
                let mut denom = p.v.sqrt();
                let _ = denom.g_div_scalar_(bc2.sqrt());
                let _ = denom.g_add_scalar_(self.cfg.eps);
                // addcdiv_ has no `value` in tch: fold -lr/bc1 into the divisor.
                let _ = denom.g_mul_scalar_(-bc1 / lr);
                let _ = p.var.addcdiv_(&p.m, &denom);
            }
        });
    }

    /// The optimiser state as named tensors (`m.<name>`, `v.<name>`, `step`).
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut s = BTreeMap::new();
        for p in &self.params {
            s.insert(format!("m.{}", p.name), p.m.shallow_clone());
            s.insert(format!("v.{}", p.name), p.v.shallow_clone());
        }
        s.insert("step".into(), Tensor::from(self.step));
        s
    }

    /// Saves the state as safetensors.
    pub fn save(&self, path: &Path) -> Result<(), tch::TchError> {
        let st = self.state();
        let named: Vec<(&str, Tensor)> = st
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_device(tch::Device::Cpu)))
            .collect();
        Tensor::write_safetensors(&named, path)
    }

    /// Restores a state saved by [`AdamW::save`]; every parameter must be present.
    pub fn load(&mut self, path: &Path) -> Result<(), String> {
        let loaded: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| format!("cannot read optimiser state '{}': {e}", path.display()))?
            .into_iter()
            .collect();
        tch::no_grad(|| -> Result<(), String> {
            for p in &mut self.params {
                for (prefix, dst) in [("m", &mut p.m), ("v", &mut p.v)] {
                    let key = format!("{prefix}.{}", p.name);
                    let src = loaded.get(&key).ok_or_else(|| {
                        format!("optimiser state '{}' has no '{key}'", path.display())
                    })?;
                    if src.size() != dst.size() {
                        return Err(format!(
                            "optimiser state '{key}' has shape {:?}, expected {:?}",
                            src.size(),
                            dst.size()
                        ));
                    }
                    dst.copy_(src);
                }
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
    use tch::nn::{self, Module};

    #[test]
    fn matches_pytorch_adamw_on_a_quadratic() {
        // Reference values from torch.optim.AdamW(lr=0.1, betas=(0.9,0.999), eps=1e-8,
        // weight_decay=0.01) minimising sum((w - 3)^2) from w = [1, -2], 3 steps:
        //   import torch; w=torch.tensor([1.,-2.],requires_grad=True)
        //   o=torch.optim.AdamW([w],lr=0.1,weight_decay=0.01)
        //   for _ in range(3): o.zero_grad(); ((w-3)**2).sum().backward(); o.step()
        //   print(w.tolist())
        let vs = VarStore::new(tch::Device::Cpu);
        let w = vs
            .root()
            .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]));
        let mut o = AdamW::new(
            &vs,
            AdamWConfig {
                weight_decay: 0.01,
                ..Default::default()
            },
        );
        for _ in 0..3 {
            o.zero_grad();
            let loss = (&w - 3.0).pow_tensor_scalar(2).sum(Kind::Float);
            loss.backward();
            o.step(0.1);
        }
        let got = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
        let want = [1.296_088_f32, -1.694_523_8];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        // A step at lr 0 (the first warm-up step) moves no weight but counts and updates the
        // moments, as PyTorch's.
        let m_before = Vec::<f32>::try_from(o.state()["m.w"].flatten(0, -1)).unwrap();
        o.zero_grad();
        (&w - 3.0).pow_tensor_scalar(2).sum(Kind::Float).backward();
        o.step(0.0);
        assert_eq!(Vec::<f32>::try_from(w.flatten(0, -1)).unwrap(), got);
        assert_ne!(
            Vec::<f32>::try_from(o.state()["m.w"].flatten(0, -1)).unwrap(),
            m_before
        );
        assert_eq!(o.steps(), 4);
    }

    #[test]
    fn groups_and_state_round_trip() {
        let vs = VarStore::new(tch::Device::Cpu);
        let lin = nn::linear(vs.root() / "fc", 3, 2, Default::default());
        let mut o = AdamW::new(&vs, AdamWConfig::default());
        let (d, n) = o.groups();
        assert_eq!(d, ["fc.weight"]);
        assert_eq!(n, ["fc.bias"]);
        let x = Tensor::ones([4, 3], (Kind::Float, tch::Device::Cpu));
        lin.forward(&x).sum(Kind::Float).backward();
        let norm = o.clip_grad_norm(0.5);
        assert!(norm > 0.5);
        let after: f64 = o
            .params
            .iter()
            .map(|p| {
                p.var
                    .grad()
                    .pow_tensor_scalar(2)
                    .sum(Kind::Float)
                    .double_value(&[])
            })
            .sum::<f64>()
            .sqrt();
        assert!((after - 0.5).abs() < 1e-4, "{after}");
        o.step(1e-2);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("opt.safetensors");
        o.save(&p).unwrap();
        let mut o2 = AdamW::new(&vs, AdamWConfig::default());
        o2.load(&p).unwrap();
        assert_eq!(o2.steps(), 1);
        assert!(o2.params[0].m.allclose(&o.params[0].m, 0.0, 0.0, false));
    }
}
