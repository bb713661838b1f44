//! Training utilities: AdamW with saveable state, resumable checkpoints, loss logs.

pub mod amp;
pub mod checkpoint;
pub mod log;
pub mod optim;
