//! Training schedules: the EMA-teacher momentum and timm's `CosineLRScheduler`.
//!
//! # EMA momentum (`util/utils.py::cosine_scheduler`, no warmup)
//!
//! ```text
//! m(it) = final + 0.5 (base - final) (1 + cos(pi it / N)),   it = 0..N-1
//! ```
//!
//! MeDUET: base 0.997, final 0.9997, N = epochs x iterations per epoch, updated every step.
//!
//! # Learning rate (timm `CosineLRScheduler`, `cycle_limit = 1`, `warmup_prefix = False`)
//!
//! ```text
//! t <  warmup_t : lr = warmup_lr_init + t (base - warmup_lr_init) / warmup_t
//! t <  t_initial: lr = lr_min + 0.5 (base - lr_min) (1 + cos(pi t / t_initial))
//! t >= t_initial: lr = lr_min
//! ```
//!
//! With `warmup_prefix = true`, the cosine runs on `t - warmup_t`. MeDUET: base 1e-4, warmup 50
//! epochs from 1e-6, t_initial 5000, lr_min 2e-5, stepped per epoch. The per-step variant
//! ([`CosineLrScheduler::lr_at_step`]) is timm's `t_in_epochs = False` with the epoch lengths
//! converted to steps.

use serde::{Deserialize, Serialize};

/// `final + 0.5 (base - final) (1 + cos(pi it / total))`.
pub fn cosine_momentum(it: u64, total: u64, base: f64, final_value: f64) -> f64 {
    let frac = if total == 0 {
        0.0
    } else {
        it as f64 / total as f64
    };
    final_value + 0.5 * (base - final_value) * (1.0 + (std::f64::consts::PI * frac).cos())
}

/// The EMA-teacher momentum schedule over a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaSchedule {
    /// Momentum at step 0 (0.997).
    pub base: f64,
    /// Momentum approached at the last step (0.9997).
    pub final_value: f64,
    /// Steps in the run, N.
    pub total_steps: u64,
}

impl EmaSchedule {
    /// MeDUET's schedule (0.997 -> 0.9997) over `total_steps`.
    pub fn meduet(total_steps: u64) -> Self {
        Self {
            base: 0.997,
            final_value: 0.9997,
            total_steps,
        }
    }

    /// The momentum for the update after step `it`.
    pub fn momentum(&self, it: u64) -> f64 {
        cosine_momentum(it, self.total_steps, self.base, self.final_value)
    }
}

/// timm's `CosineLRScheduler` with one cycle.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CosineLrScheduler {
    /// Peak learning rate (the optimizer's lr).
    pub base_lr: f64,
    /// Warmup length (epochs, or steps for the per-step use of [`CosineLrScheduler::lr`]).
    pub warmup_t: u64,
    /// Learning rate at t = 0 of the warmup.
    pub warmup_lr_init: f64,
    /// Cosine length.
    pub t_initial: u64,
    /// Floor of the cosine and the value after it.
    pub lr_min: f64,
    /// Start the cosine after the warmup instead of at t = 0 (timm default false).
    pub warmup_prefix: bool,
}

impl CosineLrScheduler {
    /// MeDUET pretraining: lr 1e-4, 50 warmup epochs from 1e-6, 5000 epochs, lr_min 2e-5.
    pub fn meduet_pretrain() -> Self {
        Self {
            base_lr: 1e-4,
            warmup_t: 50,
            warmup_lr_init: 1e-6,
            t_initial: 5000,
            lr_min: 2e-5,
            warmup_prefix: false,
        }
    }

    /// The learning rate at `t`, in the unit of `warmup_t` and `t_initial` (timm `_get_lr`).
    pub fn lr(&self, t: u64) -> f64 {
        if t < self.warmup_t {
            let slope = (self.base_lr - self.warmup_lr_init) / self.warmup_t as f64;
            return self.warmup_lr_init + t as f64 * slope;
        }
        let t = if self.warmup_prefix {
            t - self.warmup_t
        } else {
            t
        };
        if t >= self.t_initial {
            return self.lr_min;
        }
        let frac = t as f64 / self.t_initial as f64;
        self.lr_min
            + 0.5 * (self.base_lr - self.lr_min) * (1.0 + (std::f64::consts::PI * frac).cos())
    }

    /// The per-epoch schedule evaluated at epoch `epoch` (`scheduler.step(epoch)`).
    pub fn lr_at_epoch(&self, epoch: u64) -> f64 {
        self.lr(epoch)
    }

    /// The learning rate in effect *during* epoch `epoch` in the authors' loop, which calls
    /// `lr_scheduler.step(epoch)` after each epoch: epoch 0 runs at `lr(0)`, epoch e >= 1 at
    /// `lr(e - 1)`.
    pub fn lr_during_epoch_authors(&self, epoch: u64) -> f64 {
        self.lr(epoch.saturating_sub(1))
    }

    /// The per-step variant: the same curve with `warmup_t` and `t_initial` (epochs) converted
    /// to steps, evaluated at optimizer step `step` (timm `step_update`, `t_in_epochs=False`).
    pub fn lr_at_step(&self, step: u64, steps_per_epoch: u64) -> f64 {
        let spe = steps_per_epoch.max(1);
        Self {
            warmup_t: self.warmup_t * spe,
            t_initial: self.t_initial * spe,
            ..*self
        }
        .lr(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_curve_points() {
        let s = CosineLrScheduler::meduet_pretrain();
        assert!((s.lr(0) - 1e-6).abs() < 1e-18);
        assert!((s.lr(25) - (1e-6 + 25.0 * (1e-4 - 1e-6) / 50.0)).abs() < 1e-15);
        // t = 50 is on the cosine (no warmup prefix): 2e-5 + 0.5*8e-5*(1+cos(pi/100))
        let expect = 2e-5 + 0.5 * 8e-5 * (1.0 + (std::f64::consts::PI * 50.0 / 5000.0).cos());
        assert!((s.lr(50) - expect).abs() < 1e-15);
        assert!((s.lr(2500) - 6e-5).abs() < 1e-12);
        assert_eq!(s.lr(5000), 2e-5);
        assert_eq!(s.lr_during_epoch_authors(0), s.lr(0));
        assert_eq!(s.lr_during_epoch_authors(51), s.lr(50));
        assert!((s.lr_at_step(250, 10) - s.lr(25)).abs() < 1e-18);
    }
}
