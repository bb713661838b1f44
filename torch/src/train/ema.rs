//! Exponential moving averages of a network's variables (EMA teachers, DiT's EMA model).
//!
//! `theta_T <- m theta_T + (1 - m) theta_S` for every named variable of the target store,
//! computed in place as `lerp(theta_T, theta_S, 1 - m)` without gradients.

use std::collections::HashMap;

use tch::{nn::VarStore, Tensor};

/// An EMA update that cannot be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmaError {
    /// The source store lacks a variable of the target.
    #[error("ema: variable '{0}' of the averaged store is missing in the source store")]
    Missing(String),
    /// Shapes differ.
    #[error("ema: variable '{name}' has shape {target:?} but the source has {found:?}")]
    Shape {
        /// Variable name.
        name: String,
        /// Shape in the averaged store.
        target: Vec<i64>,
        /// Shape in the source store.
        found: Vec<i64>,
    },
    /// A momentum outside [0, 1].
    #[error("ema: momentum {0} is outside [0, 1]")]
    Momentum(f64),
}

/// Moves every variable of `target` towards the same-named variable of `source`:
/// `t <- m t + (1 - m) s`. Variables only in `source` are ignored.
pub fn ema_update(target: &VarStore, source: &VarStore, momentum: f64) -> Result<(), EmaError> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(EmaError::Momentum(momentum));
    }
    let src: HashMap<String, Tensor> = source.variables();
    let dst = target.variables();
    for (name, t) in &dst {
        let s = src
            .get(name)
            .ok_or_else(|| EmaError::Missing(name.clone()))?;
        if s.size() != t.size() {
            return Err(EmaError::Shape {
                name: name.clone(),
                target: t.size(),
                found: s.size(),
            });
        }
    }
    tch::no_grad(|| {
        for (name, t) in dst {
            let s = &src[&name];
            let mut t = t;
            let _ = t.lerp_(&s.to_device(t.device()).to_kind(t.kind()), 1.0 - momentum);
        }
    });
    Ok(())
}
