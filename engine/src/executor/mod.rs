//! Executors: where the stages of a run execute.
//!
//! `meduet` stays the planner and the cache authority whatever the executor: it walks
//! the stage graph, computes each stage's key once its inputs exist, skips cached
//! stages, and trusts only an object's manifest as proof that a stage succeeded. An
//! executor only decides *where* the idempotent, leased unit of work runs:
//!
//! | executor | a ready stage becomes | module |
//! |----------|-----------------------|--------|
//! | `local`  | a thread (or a `meduet-torch` worker) within the run's thread and GPU budget | [`crate::scheduler`] |
//! | `slurm`  | `sbatch` of `meduet exec-stage --spec SPEC`; a fan-out stage one job array | [`slurm`] |
//!
//! The executor never enters a cache key: an object computed by a Slurm job is the same
//! object, byte for byte, as the one the local scheduler computes.
//!
//! - [`config`]: `[executor]`, `[executor.slurm]` and per-stage `executor` settings.
//! - [`shared_fs`]: the check that a cluster can see the cache.
//! - [`slurm`]: the Slurm executor (submission, tracking, resubmission, detached runs).

pub mod config;
pub mod shared_fs;
pub mod slurm;

pub use config::{ExecutorConfig, ExecutorKind, SlurmConfig, StageExecutor};
