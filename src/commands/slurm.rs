//! The Slurm side of the command line: `run --executor slurm [--detach]`, `cancel`,
//! the job column of `status`, and `exec-stage --pipeline FILE --stage NAME` (what the
//! jobs of a detached chain run). The `run`, `status` and `exec-stage` modules call it;
//! it uses only the helper modules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use meduet_cache::Store;
use meduet_engine::executor::slurm::ledger::{Ledger, StageJobs};
use meduet_engine::executor::slurm::state::{JobState, QueueRow};
use meduet_engine::executor::slurm::{self, SlurmCli, SlurmRun};
use meduet_engine::executor::ExecutorKind;
use meduet_engine::plan::{PlannedStage, StageStatus};
use meduet_engine::{ExecEnv, Pipeline, Registry, RunOptions};

use super::common::{cache_dir, load};
use super::devices::cuda_visible;
use super::output::print_summary;
use crate::cli::{CancelArgs, ExecutorArg};

/// Whether this run uses Slurm: `--executor`, else the pipeline's `[executor] default`.
pub(super) fn wants_slurm(
    p: &Pipeline,
    executor: Option<ExecutorArg>,
    detach: bool,
) -> Result<bool> {
    let kind = match executor {
        Some(ExecutorArg::Local) => ExecutorKind::Local,
        Some(ExecutorArg::Slurm) => ExecutorKind::Slurm,
        None => p.executor_config.default.unwrap_or_default(),
    };
    if detach && kind != ExecutorKind::Slurm {
        bail!("--detach needs --executor slurm (a detached run is a chain of Slurm jobs)");
    }
    Ok(kind == ExecutorKind::Slurm)
}

/// `meduet run --executor slurm [--detach]`.
pub(super) fn run(
    p: &Pipeline,
    store: &Store,
    env: &ExecEnv,
    opts: &RunOptions,
    detach: bool,
) -> Result<i32> {
    if !slurm::sbatch_on_path() {
        bail!("--executor slurm: 'sbatch' is not on PATH (hint: run meduet on a Slurm login node, or start a local cluster with scripts/slurm-local start)");
    }
    let exe = std::env::current_exe().context("cannot find the meduet executable")?;
    let run = SlurmRun::new(p, exe);
    if detach {
        let d = slurm::submit_detached(p, env, opts, &run)?;
        for (stage, jobs) in &d.submitted {
            println!("{stage}\t{}", jobs.join(","));
        }
        for (stage, job) in &d.reused {
            println!("{stage}\t{job}\t(submitted earlier)");
        }
        eprintln!(
            "submitted {} stage(s) as Slurm jobs ({} cached, {} already submitted); follow them with 'meduet status {}', stop them with 'meduet cancel {}'",
            d.submitted.len(),
            d.cached.len(),
            d.reused.len(),
            p.file.display(),
            p.file.display()
        );
        return Ok(0);
    }
    let summary = slurm::run_attached(p, env, opts, &run)?;
    print_summary(p, store, &summary);
    Ok(0)
}

/// Slurm jobs of the stages that are not cached: stage -> (status, details).
pub(super) fn status_jobs(
    p: &Pipeline,
    store: &Store,
    planned: &[PlannedStage],
) -> HashMap<String, (String, String)> {
    let ledger = Ledger::new(store);
    let mut recs = Vec::new();
    for s in planned {
        let key = match &s.status {
            StageStatus::Cached { .. } => continue,
            StageStatus::WillRun { key, .. } => *key,
        };
        let Some(rec) = ledger.read_stage(&p.name, &s.name) else {
            continue;
        };
        // A record of an older key is history, not this stage's job.
        if let (Some(k), Some(rk)) = (key, rec.key) {
            if k != rk {
                continue;
            }
        }
        recs.push((s.name.clone(), rec));
    }
    if recs.is_empty() {
        return HashMap::new();
    }
    let jobs: Vec<String> = recs.iter().flat_map(|(_, r)| r.jobs.clone()).collect();
    let rows = if slurm::sbatch_on_path() {
        SlurmCli::new().squeue(&jobs).ok()
    } else {
        None
    };
    recs.into_iter()
        .map(|(stage, rec)| (stage, describe_jobs(&rec, rows.as_deref())))
        .collect()
}

/// The status column and the details of a stage's latest jobs, from the queue's rows
/// (`None` when squeue could not be asked).
fn describe_jobs(rec: &StageJobs, rows: Option<&[QueueRow]>) -> (String, String) {
    let mut parts = Vec::new();
    let mut active = false;
    let mut running = false;
    let mut ended = false;
    for job in &rec.jobs {
        let mine: Vec<_> = rows
            .unwrap_or_default()
            .iter()
            .filter(|r| &r.job == job)
            .collect();
        if mine.is_empty() {
            parts.push(format!("{job} (not in the queue)"));
            ended = true;
            continue;
        }
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for r in &mine {
            active |= r.state.is_active();
            running |= r.state == JobState::Running;
            ended |= !r.state.is_active();
            *counts.entry(r.state.to_string()).or_default() += 1;
        }
        let reason = mine
            .iter()
            .find(|r| r.state == JobState::Pending && r.reason != "None")
            .map(|r| format!(" ({})", r.reason))
            .unwrap_or_default();
        if mine.len() == 1 && mine[0].task.is_none() {
            parts.push(format!("{job} {}{reason}", mine[0].state));
        } else {
            let c: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
            parts.push(format!("{job} [{}]{reason}", c.join(", ")));
        }
    }
    let status = if running {
        "running"
    } else if active {
        "queued"
    } else if ended {
        "missing"
    } else {
        "submitted"
    };
    let mut details = format!(
        "slurm job {}{}",
        parts.join(", "),
        if rec.attempt > 1 {
            format!(" attempt {}", rec.attempt)
        } else {
            String::new()
        }
    );
    if rec.detached {
        details.push_str(" (detached)");
    }
    if !active {
        details.push_str(&format!(" logs {}", rec.log_dir.display()));
    }
    (status.to_string(), details)
}

/// `meduet cancel PIPELINE`.
pub(super) fn cancel(args: CancelArgs, registry: &Registry) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    cancel_jobs(&p, &cache_dir(&p, &args.cache))
}

/// Asks the attached runs of `p` on the cache `cache` to stop and scancels the queued or
/// running jobs of its runs.
fn cancel_jobs(p: &Pipeline, cache: &Path) -> Result<i32> {
    let Some(store) = Store::open_existing(cache) else {
        println!("no cache at {}: nothing to cancel", cache.display());
        return Ok(0);
    };
    let ledger = Ledger::new(&store);
    let runs = ledger.runs_of(&p.name);
    let mut jobs: Vec<String> = Vec::new();
    for r in &runs {
        if !r.detached {
            // The driver sees this, scancels its own jobs and exits.
            ledger
                .request_cancel(&r.run_id)
                .with_context(|| format!("cannot ask run {} to stop", r.run_id))?;
        }
        jobs.extend(r.jobs.iter().cloned());
    }
    jobs.sort();
    jobs.dedup();
    if jobs.is_empty() {
        println!("no Slurm job of pipeline '{}' to cancel", p.name);
        return Ok(0);
    }
    let cli = SlurmCli::new();
    let active: Vec<String> = {
        let rows = cli.squeue(&jobs)?;
        let mut v: Vec<String> = rows
            .into_iter()
            .filter(|r| r.state.is_active())
            .map(|r| r.job)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    if !active.is_empty() {
        cli.scancel(&active)?;
    }
    for r in runs.iter().filter(|r| r.detached) {
        ledger.remove_run(&r.run_id);
    }
    if active.is_empty() {
        println!("no Slurm job of pipeline '{}' is queued or running", p.name);
    } else {
        println!(
            "cancelled {} Slurm job(s) of pipeline '{}': {}",
            active.len(),
            p.name,
            active.join(", ")
        );
    }
    Ok(0)
}

/// Plans stage `stage` of `p` on the cache `dir` now and returns its spec; `None`
/// (after printing where it is) when the stage is cached.
pub(super) fn plan_stage_spec(p: &Pipeline, dir: &Path, stage: &str) -> Result<Option<PathBuf>> {
    let store = Store::open_existing(dir)
        .with_context(|| format!("'{}' is not a meduet cache", dir.display()))?;
    let i = p
        .index_of(stage)
        .with_context(|| format!("no stage named '{stage}' (stages: {})", p.stage_names()))?;
    let sel = p.ancestors_of(i);
    let specs = meduet_engine::plan::write_ready_specs(p, &store, &sel, &[], &cuda_visible)?;
    if let Some((_, spec)) = specs.into_iter().find(|(s, _)| s == stage) {
        return Ok(Some(spec));
    }
    let planned = meduet_engine::plan::plan(p, &store, &sel, &[], &cuda_visible)?;
    match planned.iter().find(|s| s.name == stage).map(|s| &s.status) {
        Some(StageStatus::Cached { key }) => {
            println!("cached {}", store.object_dir(key).display());
            Ok(None)
        }
        _ => {
            let missing: Vec<&str> = planned
                .iter()
                .filter(|s| s.name != stage && !s.status.is_cached())
                .map(|s| s.name.as_str())
                .collect();
            bail!(
                "stage '{stage}' cannot run yet: its upstream stage(s) {} have no object in '{}'",
                missing.join(", "),
                dir.display()
            )
        }
    }
}
