//! Networks that only the worker needs.

pub mod discriminator;
