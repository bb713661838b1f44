//! DDPM (the DiT side): linear betas, epsilon prediction, timestep respacing and ancestral
//! sampling, following OpenAI's `gaussian_diffusion.py` / `respace.py` as DiT vendors them.
//!
//! ```text
//! betas    = linspace(s * beta_start, s * beta_end, T),  s = 1000 / T      (f64)
//! q(x_t | x_0):  x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,   ab_t = prod_{k<=t} (1 - beta_k)
//! loss     = mean (eps_theta(x_t, t) - eps)^2        (L_simple, fixed variance)
//! x0_hat   = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps_theta
//! mean     = coef1_t x0_hat + coef2_t x_t            (posterior q(x_{t-1} | x_t, x0_hat))
//! x_{t-1}  = mean + [t > 0] exp(log_var_t / 2) z
//! ```
//!
//! Respacing keeps the steps `space_timesteps(T, [n])` and rebuilds betas from the kept
//! `ab` values (`beta'_i = 1 - ab_{k_i} / ab_{k_{i-1}}`); the network still receives the
//! original step index `k_i`. Without a learned variance the reverse variance is
//! `beta_t` (`Large`, improved-diffusion's FIXED_LARGE, with `beta~_1` at step 0) or the
//! posterior `beta~_t` (`Small`).

use std::collections::BTreeSet;

use tch::{Kind, Tensor};

pub use meduet_stages::kinds::diffusion::DdpmVariance;

/// A (possibly respaced) Gaussian diffusion process.
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    /// Betas of this process (respaced ones when respaced).
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    /// The model timestep of each step of this process (identity when not respaced).
    pub timestep_map: Vec<i64>,
    alphas_cumprod_prev: Vec<f64>,
    posterior_variance: Vec<f64>,
    posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
}

/// An invalid respacing request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot respace {timesteps} diffusion steps into {requested}")]
pub struct RespaceError {
    pub timesteps: usize,
    pub requested: usize,
}

/// `get_named_beta_schedule("linear", T)` with the given endpoints (DiT: 1e-4, 0.02).
pub fn linear_betas(timesteps: usize, beta_start: f64, beta_end: f64) -> Vec<f64> {
    let scale = 1000.0 / timesteps as f64;
    let (a, b) = (scale * beta_start, scale * beta_end);
    if timesteps == 1 {
        return vec![a];
    }
    (0..timesteps)
        .map(|i| a + (b - a) * i as f64 / (timesteps - 1) as f64)
        .collect()
}

/// `space_timesteps(num_timesteps, section_counts)` of `respace.py`: evenly strided steps
/// per section, with Python's round-half-to-even.
pub fn space_timesteps(
    num_timesteps: usize,
    section_counts: &[usize],
) -> Result<BTreeSet<usize>, RespaceError> {
    let n = section_counts.len().max(1);
    let size_per = num_timesteps / n;
    let extra = num_timesteps % n;
    let mut start = 0usize;
    let mut all = BTreeSet::new();
    for (i, &count) in section_counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count || count == 0 {
            return Err(RespaceError {
                timesteps: num_timesteps,
                requested: section_counts.iter().sum(),
            });
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            all.insert(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    Ok(all)
}

impl GaussianDiffusion {
    /// A process from its betas; `timestep_map[i]` is what the network receives at step `i`.
    pub fn from_betas(betas: Vec<f64>, timestep_map: Vec<i64>) -> Self {
        assert_eq!(betas.len(), timestep_map.len());
        let n = betas.len();
        let mut ac = Vec::with_capacity(n);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            ac.push(acc);
        }
        let ac_prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..n - 1].iter().copied())
            .collect();
        let post_var: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]))
            .collect();
        let post_log: Vec<f64> = (0..n)
            .map(|i| {
                if i == 0 {
                    post_var.get(1).copied().unwrap_or(post_var[0]).ln()
                } else {
                    post_var[i].ln()
                }
            })
            .collect();
        let c1 = (0..n)
            .map(|i| betas[i] * ac_prev[i].sqrt() / (1.0 - ac[i]))
            .collect();
        let c2 = (0..n)
            .map(|i| (1.0 - ac_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i]))
            .collect();
        Self {
            betas,
            alphas_cumprod: ac,
            timestep_map,
            alphas_cumprod_prev: ac_prev,
            posterior_variance: post_var,
            posterior_log_variance_clipped: post_log,
            posterior_mean_coef1: c1,
            posterior_mean_coef2: c2,
        }
    }

    /// The full linear-beta process of `T` steps.
    pub fn linear(timesteps: usize, beta_start: f64, beta_end: f64) -> Self {
        Self::from_betas(
            linear_betas(timesteps, beta_start, beta_end),
            (0..timesteps as i64).collect(),
        )
    }

    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// `SpacedDiffusion(space_timesteps(T, [steps]))` of this (full) process.
    pub fn respaced(&self, steps: usize) -> Result<Self, RespaceError> {
        let keep = space_timesteps(self.num_timesteps(), &[steps])?;
        let mut last = 1.0;
        let mut betas = Vec::with_capacity(keep.len());
        let mut map = Vec::with_capacity(keep.len());
        for (i, &ac) in self.alphas_cumprod.iter().enumerate() {
            if keep.contains(&i) {
                betas.push(1.0 - ac / last);
                last = ac;
                map.push(self.timestep_map[i]);
            }
        }
        Ok(Self::from_betas(betas, map))
    }

    /// The reverse-step variance of step `i`: `(variance, log variance)`.
    pub fn reverse_variance(&self, i: usize, kind: DdpmVariance) -> (f64, f64) {
        match kind {
            DdpmVariance::Large => {
                let v = if i == 0 {
                    self.posterior_variance
                        .get(1)
                        .copied()
                        .unwrap_or(self.betas[0])
                } else {
                    self.betas[i]
                };
                (v, v.ln())
            }
            DdpmVariance::Small => (
                self.posterior_variance[i],
                self.posterior_log_variance_clipped[i],
            ),
        }
    }

    /// `q_sample`: `sqrt(ab_t) x0 + sqrt(1 - ab_t) noise` for per-row steps `t` (int64 `[b]`).
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        let dev = x0.device();
        let ac = Tensor::from_slice(&self.alphas_cumprod).to_device(dev);
        let ab = ac.index_select(0, t).to_kind(x0.kind());
        let shape: Vec<i64> = std::iter::once(-1)
            .chain(std::iter::repeat_n(1, x0.dim() - 1))
            .collect();
        let ab = ab.view(shape.as_slice());
        x0 * ab.sqrt() + noise * (ab.g_mul_scalar(-1.0) + 1.0).sqrt()
    }

    /// The model timesteps (`timestep_map`) of per-row steps `t`, as float32 for the network.
    pub fn model_timesteps(&self, t: &Tensor) -> Tensor {
        Tensor::from_slice(&self.timestep_map)
            .to_device(t.device())
            .index_select(0, t)
            .to_kind(Kind::Float)
    }

    /// One ancestral step at step `i` given the predicted noise and fresh noise `z`.
    pub fn p_sample(
        &self,
        x: &Tensor,
        i: usize,
        eps: &Tensor,
        z: &Tensor,
        var: DdpmVariance,
    ) -> Tensor {
        let ac = self.alphas_cumprod[i];
        let x0 = x * (1.0 / ac).sqrt() - eps * (1.0 / ac - 1.0).sqrt();
        let mean = x0 * self.posterior_mean_coef1[i] + x * self.posterior_mean_coef2[i];
        if i == 0 {
            mean
        } else {
            let (_, log_var) = self.reverse_variance(i, var);
            mean + z * (0.5 * log_var).exp()
        }
    }

    /// Ancestral sampling from `x_T = init` down to `x_0`. `model(x, t)` returns the
    /// predicted noise for the batch at model timesteps `t` (float `[b]`); noise is drawn
    /// from libtorch's generator (seed it first). `on_step(done)` reports progress.
    pub fn sample_loop<E>(
        &self,
        init: &Tensor,
        var: DdpmVariance,
        mut model: impl FnMut(&Tensor, &Tensor) -> Result<Tensor, E>,
        mut on_step: impl FnMut(usize) -> Result<(), E>,
    ) -> Result<Tensor, E> {
        let b = init.size()[0];
        let mut x = init.shallow_clone();
        for (done, i) in (0..self.num_timesteps()).rev().enumerate() {
            let t = Tensor::full(
                [b],
                self.timestep_map[i] as f64,
                (Kind::Float, init.device()),
            );
            let eps = model(&x, &t)?;
            let z = if i > 0 {
                x.randn_like()
            } else {
                x.zeros_like()
            };
            x = self.p_sample(&x, i, &eps, &z, var);
            on_step(done + 1)?;
        }
        Ok(x)
    }

    /// `alphas_cumprod_prev` (exposed for tests).
    pub fn alphas_cumprod_prev(&self) -> &[f64] {
        &self.alphas_cumprod_prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respacing_matches_respace_py() {
        // space_timesteps(1000, [250]): stride 999/249; first and last kept, 250 steps.
        let s = space_timesteps(1000, &[250]).unwrap();
        assert_eq!(s.len(), 250);
        assert_eq!(*s.iter().next().unwrap(), 0);
        assert_eq!(*s.iter().last().unwrap(), 999);
        // Python: [round(i * 999 / 249) for i in range(5)] = [0, 4, 8, 12, 16]; i = 62 -> 249
        let v: Vec<usize> = s.iter().copied().collect();
        assert_eq!(&v[..5], &[0, 4, 8, 12, 16]);
        assert_eq!(v[62], (62.0f64 * 999.0 / 249.0).round_ties_even() as usize);
        // space_timesteps(10, [3]) = {0, 4, 9} (stride 4.5: round(4.5) = 4, round(9.0) = 9)
        assert_eq!(
            space_timesteps(10, &[3])
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![0, 4, 9]
        );
        assert!(space_timesteps(10, &[11]).is_err());
    }

    #[test]
    fn respaced_process_keeps_alphas_cumprod() {
        let full = GaussianDiffusion::linear(1000, 1e-4, 0.02);
        assert!((full.betas[0] - 1e-4).abs() < 1e-15 && (full.betas[999] - 0.02).abs() < 1e-15);
        let r = full.respaced(250).unwrap();
        assert_eq!(r.num_timesteps(), 250);
        for (i, &k) in r.timestep_map.iter().enumerate() {
            let a = r.alphas_cumprod[i];
            let b = full.alphas_cumprod[k as usize];
            assert!((a / b - 1.0).abs() < 1e-10, "{i}: {a} vs {b}");
        }
    }
}
