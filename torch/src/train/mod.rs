//! Training utilities: the shared training loop ([`trainer`]), AdamW with saveable state (and timm's weight-decay groups), mixed
//! precision, the EMA teacher update, resumable checkpoints, loss logs. Schedules are plain
//! numbers and live in `meduet_stages::schedule`.

pub mod amp;
pub mod checkpoint;
pub mod ema;
pub mod log;
pub mod optim;
pub mod seg_loss;
pub mod sgd;
pub mod trainer;
