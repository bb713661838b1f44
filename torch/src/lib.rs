//! # meduet-torch
//!
//! Everything in meduet that needs libtorch: the networks ([`models`]), training
//! utilities ([`train`]), and the implementations of the stage kinds that use tensors
//! ([`runners`]), which the `meduet-torch` worker binary registers over the declarations
//! in `meduet-stages`. The `meduet` binary itself never loads libtorch: it plans, caches
//! and schedules, and starts this worker only for stages that need it.

pub mod device;
pub mod diffusion;
pub mod inference;
pub mod models;
pub mod quality;
pub mod runners;
pub mod train;

/// The registry of the worker: every kind, with the tensor kinds implemented.
pub fn registry() -> meduet_engine::Registry {
    let mut r = meduet_stages::registry();
    runners::implement(&mut r);
    r
}
