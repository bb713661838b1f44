//! The Slurm executor: stages as Slurm jobs running `meduet exec-stage`.
//!
//! `meduet run --executor slurm` keeps meduet the planner and the cache authority, and
//! hands each stage whose inputs exist to Slurm as `sbatch --parsable` of a one-line
//! batch script, `exec meduet exec-stage --spec SPEC`. `exec-stage` is idempotent and
//! leased, so a job that runs twice (a resubmission, a second driver, a requeue)
//! computes at most once and never commits a half object.
//!
//! - **Submission** ([`submit`]): CPUs, memory and time from the stage's resources and
//!   the pipeline's `[executor.slurm]` settings; GPU stages get the configured GPU
//!   request. A fan-out stage becomes one job array over its *missing* items
//!   (`--array=0-N%K`, task `i` computing `spec.items[i]`); the driver then commits the
//!   cohort object itself, which reads only the item manifests. Cached stages and items
//!   are never submitted.
//! - **Tracking** ([`driver`], [`state`]): the driver looks for manifests every 100 ms
//!   (the filesystem, not the scheduler) and asks Slurm once per `poll_interval` with
//!   a single `squeue --states=all -r` for all its jobs (`scontrol -o show job` only for
//!   a job that failed or that squeue forgot). The manifest is the only proof of
//!   success: a COMPLETED job without one is a failure. TIMEOUT, PREEMPTED, NODE_FAIL,
//!   BOOT_FAIL, a cancelled job and a job killed by a signal are resubmitted up to
//!   `retries` times; any other failure fails the stage with the tail of its log, and
//!   its dependents are never submitted.
//! - **Coordination** ([`ledger`]): one claim per key makes concurrent drivers on one
//!   cache submit each stage once; the ledger also tells `meduet status` the job ids
//!   and `meduet cancel` what to `scancel`.
//! - **Detached runs** ([`detach`]): the whole remaining graph is submitted at once,
//!   chained with `--dependency=afterok:`; stages whose key is not known yet run
//!   `exec-stage --pipeline FILE --stage NAME`, which plans them when they start.

pub mod cli;
pub mod detach;
pub mod driver;
pub mod ledger;
pub mod nodes;
pub mod state;
pub mod submit;

use std::path::{Path, PathBuf};

use meduet_cache::{StageKey, Store};

use crate::error::EngineError;
use crate::exec::Prepared;
use crate::executor::config::SlurmConfig;
use crate::pipeline::Pipeline;
use crate::resources::{DeviceRequest, Resources};
use crate::spec::ExecSpec;

pub use cli::{sbatch_on_path, SlurmCli, SlurmError};
pub use detach::submit_detached;
pub use driver::run_attached;

/// How a Slurm run is set up.
#[derive(Debug, Clone)]
pub struct SlurmRun {
    /// The meduet binary the jobs run (`meduet = ...` in `[executor.slurm]`, else this one).
    pub exe: PathBuf,
    pub cli: SlurmCli,
    pub run_id: String,
}

impl SlurmRun {
    /// A run of `pipeline`, with jobs running `current_exe` unless the pipeline names a
    /// binary.
    pub fn new(pipeline: &Pipeline, current_exe: PathBuf) -> Self {
        Self {
            exe: pipeline
                .executor_config
                .slurm
                .meduet
                .clone()
                .unwrap_or(current_exe),
            cli: SlurmCli::new(),
            run_id: ledger::new_run_id(),
        }
    }
}

/// Refuses a cache that the nodes of a cluster cannot see: one in a local temporary
/// folder or in memory, unless every node of the cluster is this machine.
pub fn check_cache(store: &Store, cli: &SlurmCli) -> Result<(), EngineError> {
    let Some(why) = crate::executor::shared_fs::local_only_reason(store.root()) else {
        return Ok(());
    };
    let hint = "(hint: with --executor slurm the cache must be on a filesystem every node mounts: set it with --cache DIR, MEDUET_CACHE or cache = \"...\" in the pipeline file)";
    match cli.nodes() {
        Ok(n) if nodes::all_on_this_machine(&n) => {
            let names: Vec<&str> = n.iter().map(|n| n.name.as_str()).collect();
            tracing::info!(
                "{why}, but every node of the cluster ({}) is this machine, so its jobs see it",
                names.join(", ")
            );
            Ok(())
        }
        Ok(n) => {
            let names: Vec<String> = n
                .iter()
                .map(|n| format!("{} ({})", n.name, n.addr))
                .collect();
            Err(EngineError::Other(format!(
                "{why}; the cluster's nodes are not all this machine: {} {hint}",
                names.join(", ")
            )))
        }
        Err(e) => Err(EngineError::Other(format!(
            "{why}; the cluster's nodes could not be listed ({e}) {hint}"
        ))),
    }
}

/// Whether stage `def` gets a CUDA device where it runs (for the device class of its key):
/// a stage kept local asks this machine (`opts`); a Slurm job has one when it asks for GPUs.
pub(crate) fn cuda_visible_for(
    def: &crate::pipeline::StageDef,
    cfg: &SlurmConfig,
    opts: &crate::scheduler::RunOptions,
) -> bool {
    if def.executor.run_on == Some(crate::executor::config::ExecutorKind::Local) {
        !opts
            .cuda_devices
            .clone()
            .or_else(|| opts.device_probe.as_ref().map(|p| (p.0)()))
            .unwrap_or_default()
            .is_empty()
    } else {
        cfg.for_stage(def.kind.kind(), def.resources.device, &def.executor.slurm)
            .gpus
            > 0
    }
}

/// The resources written into a job's spec: a specific GPU index means nothing on a
/// node (Slurm assigns the GPU), so `cuda:N` becomes `cuda`.
pub(crate) fn job_resources(r: &Resources) -> Resources {
    let mut r = r.clone();
    if let DeviceRequest::Cuda(_) = r.device {
        r.device = DeviceRequest::AnyCuda;
    }
    r
}

/// Writes the spec of stage `i` (`items`: the ids of an array's tasks).
pub(crate) fn write_spec(
    pipeline: &Pipeline,
    store: &Store,
    i: usize,
    p: &Prepared,
    items: Option<Vec<String>>,
) -> Result<PathBuf, EngineError> {
    let def = &pipeline.stages[i];
    let mut spec = ExecSpec::from_prepared(
        &pipeline.name,
        p,
        &job_resources(&def.resources),
        false,
        p.locator_source_paths(),
        p.locator_object_keys(),
    );
    spec.items = items;
    spec.write(store)
}

/// The sbatch request of stage `i` running `work`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn job_request(
    pipeline: &Pipeline,
    cfg: &SlurmConfig,
    store: &Store,
    run: &SlurmRun,
    i: usize,
    work: &submit::Work,
    log_dir: &Path,
    array: Option<Vec<usize>>,
    after_ok: Vec<String>,
) -> Result<submit::JobRequest, EngineError> {
    let def = &pipeline.stages[i];
    let comment = match work {
        submit::Work::Spec { .. } => {
            format!("stage '{}' of pipeline '{}'", def.name, pipeline.name)
        }
        submit::Work::Stage { .. } => format!(
            "stage '{}' of pipeline '{}' (planned when the job starts)",
            def.name, pipeline.name
        ),
    };
    let text = submit::script_text(&run.exe, store.root(), work, &comment);
    let script = submit::write_script(store, &text).map_err(|e| {
        EngineError::Other(format!(
            "cannot write a batch script under '{}': {e}",
            store.root().join("slurm/scripts").display()
        ))
    })?;
    std::fs::create_dir_all(log_dir).map_err(|e| {
        EngineError::Other(format!(
            "cannot create the log folder '{}': {e}",
            log_dir.display()
        ))
    })?;
    Ok(submit::JobRequest {
        name: format!("meduet:{}:{}", pipeline.name, def.name),
        script,
        log_dir: log_dir.to_path_buf(),
        cpus: def.resources.threads,
        mem_gb: def.resources.memory_gb,
        slurm: cfg.for_stage(def.kind.kind(), def.resources.device, &def.executor.slurm),
        gpu_request: cfg.gpu_request.clone(),
        array: array.map(|a| (a, cfg.array_parallelism)),
        after_ok,
    })
}

/// Turns an sbatch refusal into the stage's error, explaining GPU requests.
pub(crate) fn submit_error(stage: &str, req: &submit::JobRequest, e: SlurmError) -> String {
    let gpu = if req.slurm.gpus > 0 {
        format!(
            " (the stage asks for {} GPU(s) as '{}'; hint: if the cluster names GPUs differently, set gpu_request in [executor.slurm], e.g. \"--gpus={{n}}\" or \"--gres=gpu:a100:{{n}}\"; on a cluster without GPUs use device = \"cpu\" or \"auto\")",
            req.slurm.gpus,
            req.gpu_request.replace("{n}", &req.slurm.gpus.to_string())
        )
    } else {
        String::new()
    };
    format!("Slurm refused the job of stage '{stage}': {e}{gpu}")
}

/// The last `n` lines of a log file, indented, or why there are none.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            let lines: Vec<&str> = t.lines().collect();
            let start = lines.len().saturating_sub(n);
            let mut s = format!("\n  last lines of {}:", path.display());
            for l in &lines[start..] {
                s.push_str("\n    ");
                s.push_str(l);
            }
            s
        }
        Ok(_) => format!(" (its log {} is empty)", path.display()),
        Err(_) => format!(" (no log at {})", path.display()),
    }
}

/// Quarantines the objects a forced stage would otherwise reuse (its own and, for a
/// fan-out stage, its items'), so that jobs recompute them.
pub(crate) fn discard_for_force(store: &Store, keys: &[StageKey]) -> Result<(), EngineError> {
    for k in keys {
        if store.contains(k) {
            let q = store.quarantine(k)?;
            let _ = std::fs::remove_dir_all(q);
        }
    }
    Ok(())
}
