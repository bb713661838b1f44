//! The stage kinds.

/// Registers this crate's stage kinds.
pub fn register(_r: &mut meduet_engine::Registry) {}
