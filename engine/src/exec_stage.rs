//! `exec-stage`: run one stage from its spec (what cluster jobs and worker processes run).

use std::path::{Path, PathBuf};

use meduet_cache::Store;

use crate::error::EngineError;
use crate::exec::{execute, ExecEnv, Executed};
use crate::registry::Registry;
use crate::resources::{Device, DeviceRequest};
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

/// Executes the spec at `spec_path` here, or says which worker must. `cuda_devices` is
/// asked only when the spec's device needs it.
pub fn exec_stage(
    spec_path: &Path,
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
    let prepared = spec.to_prepared(&store, registry)?;
    let device = match spec.resources.device {
        DeviceRequest::Cpu => Device::Cpu,
        DeviceRequest::Cuda(i) => Device::Cuda(i),
        DeviceRequest::AnyCuda => {
            let d = cuda_devices();
            Device::Cuda(*d.first().ok_or_else(|| {
                EngineError::Other(format!(
                    "stage '{}' asks for a CUDA device but none is visible",
                    spec.stage
                ))
            })?)
        }
        DeviceRequest::Auto => cuda_devices()
            .first()
            .map(|&d| Device::Cuda(d))
            .unwrap_or(Device::Cpu),
    };
    let threads = if spec.resources.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        spec.resources.threads
    };
    let ex = execute(env, &prepared, device, threads, spec.force).map_err(|e| match e {
        crate::error::StageError::Cancelled => EngineError::Cancelled,
        e => EngineError::StageFailed {
            stage: spec.stage.clone(),
            message: e.to_string(),
        },
    })?;
    Ok(ExecStage::Done(ex))
}

/// Replaces this process with `worker exec-stage --spec ... --cache ...` (never returns
/// on success).
pub fn delegate(worker: &str, spec_path: &Path, cache: &Path) -> EngineError {
    use std::os::unix::process::CommandExt;
    match crate::worker::worker_binary(worker) {
        Ok(bin) => {
            let e = std::process::Command::new(&bin)
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
