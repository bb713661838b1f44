//! Training utilities: optimiser groups, schedules, EMA, checkpoints.
pub mod ema;
pub mod optim;
pub mod schedule;
