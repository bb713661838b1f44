//! # meduet-engine
//!
//! Pipelines as content-addressed stage graphs. This crate knows nothing of tensors
//! (libtorch stays in `meduet-stages`), so it builds and tests in seconds.
//!
//! - [`pipeline`]: TOML pipeline files (includes, `extends`) validated into a DAG.
//! - [`stage`] / [`registry`]: the [`Stage`] trait stage kinds implement.
//! - [`params`]: typed parameters, canonical form, source paths hashed by content.
//! - [`fingerprint`]: cache keys and why a stage reruns.
//! - [`collection`]: per-subject items (one subject = one object).
//! - [`exec`]: one stage execution (lease, run, atomic commit, run record).
//! - [`plan`] / [`scheduler`]: `meduet plan` and `meduet run`.
//! - [`spec`]: self-contained execution specs for `meduet exec-stage`.
//! - [`executor`]: where stages run: the local scheduler or Slurm jobs.
//! - [`graph`], [`logging`], [`progress`], [`utility`].

pub mod cli_logging;
pub mod collection;
pub mod error;
pub mod exec;
pub mod exec_stage;
pub mod executor;
pub mod fingerprint;
pub mod graph;
pub mod locator;
pub mod logging;
pub mod params;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod registry;
pub mod resources;
pub mod scheduler;
pub mod spec;
pub mod stage;
pub mod utility;
pub mod worker;

pub use collection::Item;
pub use error::{EngineError, PipelineError, StageError};
pub use exec::{ExecEnv, Prepared};
pub use params::{SourcePath, SourceTree};
pub use pipeline::{Pipeline, StageDef};
pub use registry::{DynStage, Implementation, Registry};
pub use resources::{Device, DeviceRequest, Resources};
pub use scheduler::{run, Outcome, RunOptions, RunSummary};
pub use stage::{
    Arity, ArtifactType, CancelFlag, InputArtifact, InputSpec, OutputSpec, Runtime, Stage,
    StageContext,
};
