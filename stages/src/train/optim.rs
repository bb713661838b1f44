//! Optimiser construction with timm's weight-decay parameter groups.
//!
//! timm `param_groups_weight_decay(model, wd)`: variables with at most one dimension or whose
//! name ends in `.bias` get no weight decay; everything else (including 3-D tokens such as
//! MeDUET's `cls_token` / `mask_token`) does. tch assigns optimiser groups when variables are
//! created, so [`assign_weight_decay_groups`] moves the no-decay variables of an existing var
//! store into [`NO_DECAY_GROUP`] before the optimiser is built.

use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig, VarStore};

/// Optimiser group of the variables that get weight decay.
pub const DECAY_GROUP: usize = 0;
/// Optimiser group of the variables without weight decay.
pub const NO_DECAY_GROUP: usize = 1;

/// Whether timm exempts a variable from weight decay.
pub fn is_no_decay(name: &str, ndim: usize) -> bool {
    ndim <= 1 || name.ends_with(".bias")
}

/// Puts every trainable variable of `vs` into [`DECAY_GROUP`] or [`NO_DECAY_GROUP`] (timm's
/// rule); returns the number of variables in each `(decay, no_decay)`.
pub fn assign_weight_decay_groups(vs: &VarStore) -> (usize, usize) {
    let mut vars = vs.variables_.lock().expect("var store lock");
    let no_decay_ptrs: Vec<usize> = vars
        .named_variables
        .iter()
        .filter(|(name, t)| is_no_decay(name, t.dim()))
        .map(|(_, t)| t.data_ptr() as usize)
        .collect();
    let (mut decay, mut no_decay) = (0, 0);
    for v in vars.trainable_variables.iter_mut() {
        if no_decay_ptrs.contains(&(v.tensor.data_ptr() as usize)) {
            v.group = NO_DECAY_GROUP;
            no_decay += 1;
        } else {
            v.group = DECAY_GROUP;
            decay += 1;
        }
    }
    (decay, no_decay)
}

/// AdamW hyperparameters (MeDUET pretraining defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate (1e-4).
    pub lr: f64,
    /// First-moment decay (0.9).
    pub beta1: f64,
    /// Second-moment decay (0.95).
    pub beta2: f64,
    /// Denominator epsilon (1e-8).
    pub eps: f64,
    /// Decoupled weight decay of the decay group (1e-2).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Builds libtorch's AdamW over the trainable variables of `vs`, with weight decay only on
/// timm's decay group.
pub fn adamw(vs: &VarStore, cfg: &AdamWConfig) -> Result<nn::Optimizer, tch::TchError> {
    let (decay, no_decay) = assign_weight_decay_groups(vs);
    let mut opt = nn::AdamW {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        wd: cfg.weight_decay,
        eps: cfg.eps,
        amsgrad: false,
    }
    .build(vs, cfg.lr)?;
    if decay > 0 {
        opt.set_weight_decay_group(DECAY_GROUP, cfg.weight_decay);
    }
    if no_decay > 0 {
        opt.set_weight_decay_group(NO_DECAY_GROUP, 0.0);
    }
    Ok(opt)
}
