//! Mixed precision: fp16 autocast on CUDA with dynamic loss scaling (PyTorch's
//! `GradScaler` defaults: initial scale 2^16, halved on overflow, doubled after 2000
//! clean steps). On the CPU everything runs in float32 and the scaler is the identity.

use tch::Tensor;

use crate::train::trainer::Optimizer;

/// Loss scaling for fp16 training.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GradScaler {
    pub enabled: bool,
    pub scale: f64,
    pub growth_interval: u64,
    pub clean_steps: u64,
}

impl GradScaler {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            scale: if enabled { 65536.0 } else { 1.0 },
            growth_interval: 2000,
            clean_steps: 0,
        }
    }

    /// Back-propagates `loss` (scaled when enabled).
    pub fn backward(&self, loss: &Tensor) {
        if self.enabled {
            (loss * self.scale).backward();
        } else {
            loss.backward();
        }
    }

    /// Unscales the gradients, clips them to `max_norm` (when positive) and steps the
    /// optimiser unless they overflowed. Returns the gradient norm before clipping and
    /// whether the step was taken.
    pub fn step(&mut self, opt: &mut dyn Optimizer, lr: f64, max_norm: f64) -> (f64, bool) {
        if self.enabled {
            opt.scale_grads(1.0 / self.scale);
        }
        let norm = opt.clip_grad_norm(if max_norm > 0.0 {
            max_norm
        } else {
            f64::INFINITY
        });
        if !norm.is_finite() {
            if self.enabled {
                self.scale /= 2.0;
                self.clean_steps = 0;
                tracing::debug!(
                    "fp16 gradient overflow: step skipped, loss scale now {}",
                    self.scale
                );
                return (norm, false);
            }
            return (norm, false);
        }
        opt.step(lr);
        if self.enabled {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        }
        (norm, true)
    }
}
