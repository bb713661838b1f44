//! # meduet-stages
//!
//! The stage kinds of meduet and the plain-Rust code they run on: volumes, NIfTI and Zarr
//! I/O, phantoms and resampling ([`data`]), network configurations ([`configs`]), training
//! crops ([`sampling`]), schedules ([`schedule`]), statistics ([`analysis`]) and plots
//! ([`plot`]). Every kind is declared here ([`kinds`], registered by [`registry`]); the
//! kinds that need libtorch run in the `meduet-torch` worker (crate `meduet-torch`), so this
//! crate, and the `meduet` binary built on it, never link libtorch.

pub mod analysis;
pub mod configs;
pub mod data;
pub mod kinds;
pub mod plot;
pub mod sampling;
pub mod schedule;
pub mod segmentation;
pub mod testing;
pub mod training;

/// Every stage kind meduet knows: the utility kinds of the engine plus this crate's.
pub fn registry() -> meduet_engine::Registry {
    let mut r = meduet_engine::Registry::new();
    meduet_engine::utility::register(&mut r);
    kinds::register(&mut r);
    r
}
