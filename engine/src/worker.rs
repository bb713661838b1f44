//! Running a stage in a worker process.
//!
//! Kinds declared with [`crate::stage::Runtime::Worker`] (those that need libtorch) are
//! executed by a separate binary through the same entry point a cluster scheduler uses:
//! `<worker> exec-stage --spec <spec.json>`. The scheduler writes the spec (with the
//! device and threads it assigned), starts the worker, forwards cancellation as SIGINT,
//! and trusts only the object's manifest: the worker's exit status just says where to
//! look for the error. Loading libtorch costs about half a second per worker, paid only
//! by stages that use it, never by planning or cached reruns.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::StageError;
use crate::exec::{ExecEnv, Executed, Prepared};
use crate::resources::{Assignment, Device, Resources};
use crate::spec::ExecSpec;

/// The environment variable that overrides where worker `name` is (`meduet-torch` ->
/// `MEDUET_TORCH_BIN`).
pub fn worker_env_var(name: &str) -> String {
    format!(
        "MEDUET_{}_BIN",
        name.trim_start_matches("meduet-")
            .to_uppercase()
            .replace('-', "_")
    )
}

/// Finds worker binary `name`: the override variable, else next to this executable.
pub fn worker_binary(name: &str) -> Result<PathBuf, StageError> {
    let var = worker_env_var(name);
    if let Ok(p) = std::env::var(&var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()
        .map_err(|e| StageError::failed(format!("cannot find the running executable: {e}")))?;
    let dir = exe.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    // Test binaries live in target/<profile>/deps; the workers one folder up.
    for cand in [dir.join(name), dir.join("..").join(name)] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(StageError::failed(format!(
        "this stage runs in the worker '{name}', which is not next to '{}' (hint: build it with 'cargo build --release', or set {var})",
        exe.display()
    )))
}

/// Executes `p` in worker `worker` on the assigned device and threads.
#[allow(clippy::too_many_arguments)]
pub fn execute_in_worker(
    env: &ExecEnv,
    pipeline: &str,
    p: &Prepared,
    resources: &Resources,
    device: Device,
    threads: usize,
    force: bool,
    worker: &str,
) -> Result<Executed, StageError> {
    let t0 = Instant::now();
    let store = &env.store;
    if !force {
        if let Some(object) = store.load(&p.key)? {
            return Ok(Executed {
                object,
                computed: false,
                items_total: 0,
                items_computed: 0,
                wall_seconds: 0.0,
            });
        }
    }
    let mut spec = ExecSpec::from_prepared(
        pipeline,
        p,
        resources,
        force,
        p.locator_source_paths(),
        p.locator_object_keys(),
    );
    spec.assigned = Some(Assignment { device, threads });
    let spec_path = spec
        .write(store)
        .map_err(|e| StageError::failed(e.to_string()))?;
    let bin = worker_binary(worker)?;
    tracing::debug!("starting worker {} for stage '{}'", bin.display(), p.stage);
    let mut cmd = Command::new(&bin);
    // The worker dies with the thread that started it (a killed `meduet run` leaves no
    // orphan computing behind its back).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .arg("exec-stage")
        .arg("--spec")
        .arg(&spec_path)
        .arg("--cache")
        .arg(store.root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| StageError::failed(format!("cannot start worker '{}': {e}", bin.display())))?;
    let mut interrupted = false;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| StageError::failed(format!("waiting for worker: {e}")))?
        {
            break st;
        }
        if env.cancel.is_cancelled() && !interrupted {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            interrupted = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if env.cancel.is_cancelled() {
        return Err(StageError::Cancelled);
    }
    match store.load(&p.key)? {
        Some(object) if status.success() => {
            let metrics: serde_json::Value = std::fs::read(object.meta_path("metrics.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            Ok(Executed {
                computed: stdout.starts_with("computed"),
                items_total: metrics["items"].as_u64().unwrap_or(0) as usize,
                items_computed: metrics["items_computed"].as_u64().unwrap_or(0) as usize,
                object,
                wall_seconds: t0.elapsed().as_secs_f64(),
            })
        }
        _ => Err(StageError::failed(match last_error(env, p) {
            Some(e) => e,
            None => format!(
                "worker '{}' exited with {status} without committing the object",
                bin.display()
            ),
        })),
    }
}

/// The error of the newest failed run record of this key (written by the worker).
fn last_error(env: &ExecEnv, p: &Prepared) -> Option<String> {
    let short = p.key.short();
    let dir = env.store.root().join("runs");
    let mut recs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !name.starts_with('.') && name.ends_with(".json") && name.contains(&short)
        })
        .collect();
    recs.sort();
    for r in recs.iter().rev() {
        let Some(v) = std::fs::read(r)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            continue;
        };
        if v["status"] != "succeeded" {
            return v["error"].as_str().map(str::to_string);
        }
    }
    None
}
