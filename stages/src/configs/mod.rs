//! Network configurations as plain data (serde): what pipeline files set and what the
//! `meduet-torch` worker builds networks from.

pub mod dit;
pub mod meduet;
pub mod vae;
