//! # meduet-stages
//!
//! The stage kinds of meduet and the code they run on: volumes and NIfTI/Zarr I/O
//! ([`data`]), networks in tch ([`models`]), training utilities ([`train`]), and the
//! kinds themselves ([`kinds`]), registered by [`registry`].

pub mod analysis;
pub mod data;
pub mod kinds;
pub mod models;
pub mod plot;
pub mod sampling;
pub mod testing;
pub mod torch;
pub mod train;

/// Every stage kind meduet knows: the utility kinds of the engine plus this crate's.
pub fn registry() -> meduet_engine::Registry {
    let mut r = meduet_engine::Registry::new();
    meduet_engine::utility::register(&mut r);
    kinds::register(&mut r);
    r
}
