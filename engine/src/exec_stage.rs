//! `exec-stage`: run one stage from its spec (what cluster jobs and worker processes run).
//!
//! With an item index (`--item-index N`, or [`ITEM_INDEX_ENV`] as a Slurm array task
//! sets it from `SLURM_ARRAY_TASK_ID`), a fan-out stage computes one item object only:
//! item `spec.items[N]` when the spec lists the array's items, else the `N`-th item of
//! its input. The cohort object is committed by a later whole-stage `exec-stage` (or by
//! the driver) once every item exists.

use std::path::{Path, PathBuf};

use meduet_cache::Store;

use crate::error::EngineError;
use crate::exec::{execute, execute_item, mapped_items, ExecEnv, Executed};
use crate::registry::Registry;
use crate::resources::Assignment;
use crate::spec::ExecSpec;

/// The cache of a spec: `--cache`, else the folder holding `specs/`.
pub fn spec_cache(spec_path: &Path, cache: Option<PathBuf>) -> PathBuf {
    cache.unwrap_or_else(|| {
        spec_path
            .parent()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default()
    })
}

/// What `exec-stage` does with a spec in this process.
pub enum ExecStage {
    /// The kind runs in another binary: run `worker exec-stage` instead.
    Delegate(&'static str),
    Done(Executed),
}

/// The environment variable holding the item index of an array task (read by
/// [`exec_stage`], so worker binaries need no flag of their own).
pub const ITEM_INDEX_ENV: &str = "MEDUET_ITEM_INDEX";

/// The item index of this process, from [`ITEM_INDEX_ENV`] (unset or empty: none).
pub fn item_index_from_env() -> Result<Option<usize>, EngineError> {
    match std::env::var(ITEM_INDEX_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some).map_err(|_| {
            EngineError::Other(format!(
                "{ITEM_INDEX_ENV}='{v}' is not an item index (expected a non-negative integer)"
            ))
        }),
        _ => Ok(None),
    }
}

/// Executes the spec at `spec_path` here, or says which worker must. `cuda_devices` is
/// asked only when the spec's device needs it. The item index, if any, comes from
/// [`ITEM_INDEX_ENV`].
pub fn exec_stage(
    spec_path: &Path,
    store: Store,
    registry: &Registry,
    env: &ExecEnv,
    cuda_devices: &dyn Fn() -> Vec<usize>,
) -> Result<ExecStage, EngineError> {
    let item = item_index_from_env()?;
    exec_stage_item(spec_path, item, store, registry, env, cuda_devices)
}

/// [`exec_stage`] with an explicit item index (`None`: the whole stage).
pub fn exec_stage_item(
    spec_path: &Path,
    item_index: Option<usize>,
    store: Store,
    registry: &Registry,
    env: &ExecEnv,
    cuda_devices: &dyn Fn() -> Vec<usize>,
) -> Result<ExecStage, EngineError> {
    let spec = ExecSpec::read(spec_path)?;
    let kind = registry.get(&spec.kind).ok_or_else(|| {
        EngineError::Other(format!("spec names unknown stage kind '{}'", spec.kind))
    })?;
    if let Some(w) = kind.worker() {
        return Ok(ExecStage::Delegate(w));
    }
    // A process that executes holds its own live root (its parent's, if any, is another
    // process's): `gc` keeps the stage's object and item objects while it runs.
    let env = &env.with_live_root(&format!("exec-stage {}", spec.stage))?;
    env.protect([spec.key])?;
    let prepared = spec.to_prepared(&store, registry)?;
    let Assignment { device, threads } = match spec.assigned {
        Some(a) => a,
        None => spec
            .resources
            .assign_here(cuda_devices)
            .map_err(|m| EngineError::Other(format!("stage '{}' {m}", spec.stage)))?,
    };
    if let Some(class) = prepared.fingerprint.device_class {
        if device.class() != class {
            return Err(EngineError::Other(format!(
                "stage '{}' was planned for a {class} device (its output depends on the device class: fp16 autocast runs only on CUDA) but would run on {device} here; plan it where it runs, or set its device explicitly",
                spec.stage
            )));
        }
    }
    let result = match item_index {
        None => execute(env, &prepared, device, threads, spec.force),
        Some(n) => {
            let id = item_id_at(&spec, &prepared, n)?;
            tracing::info!("stage '{}': item {n} of the array is '{id}'", spec.stage);
            execute_item(env, &prepared, &id, device, threads, spec.force)
        }
    };
    let ex = result.map_err(|e| match e {
        crate::error::StageError::Cancelled => EngineError::Cancelled,
        e => EngineError::StageFailed {
            stage: spec.stage.clone(),
            message: e.to_string(),
        },
    })?;
    Ok(ExecStage::Done(ex))
}

/// The id of item `n` of a spec: `spec.items[n]`, else the `n`-th input item.
fn item_id_at(spec: &ExecSpec, p: &crate::exec::Prepared, n: usize) -> Result<String, EngineError> {
    let Some(map_input) = p.kind.map_over() else {
        return Err(EngineError::Other(format!(
            "an item index was given but stage '{}' ({}) is not a fan-out stage",
            spec.stage, spec.kind
        )));
    };
    let ids: Vec<String> = match &spec.items {
        Some(ids) => ids.clone(),
        None => mapped_items(p, map_input)
            .into_iter()
            .map(|i| i.id)
            .collect(),
    };
    ids.get(n).cloned().ok_or_else(|| {
        EngineError::Other(format!(
            "item index {n} is out of range: stage '{}' has {} item(s) to compute",
            spec.stage,
            ids.len()
        ))
    })
}

/// Replaces this process with `worker exec-stage --spec ... --cache ...` (never returns
/// on success).
pub fn delegate(worker: &str, spec_path: &Path, cache: &Path) -> EngineError {
    delegate_item(worker, spec_path, cache, None)
}

/// [`delegate`], passing an item index to the worker through [`ITEM_INDEX_ENV`].
pub fn delegate_item(
    worker: &str,
    spec_path: &Path,
    cache: &Path,
    item_index: Option<usize>,
) -> EngineError {
    use std::os::unix::process::CommandExt;
    match crate::worker::worker_binary(worker) {
        Ok(bin) => {
            let mut cmd = std::process::Command::new(&bin);
            if let Some(n) = item_index {
                cmd.env(ITEM_INDEX_ENV, n.to_string());
            }
            let e = cmd
                .arg("exec-stage")
                .arg("--spec")
                .arg(spec_path)
                .arg("--cache")
                .arg(cache)
                .exec();
            EngineError::Other(format!("cannot run worker '{}': {e}", bin.display()))
        }
        Err(e) => EngineError::Other(e.to_string()),
    }
}
