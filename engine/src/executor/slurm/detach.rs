//! Detached runs: submit the whole remaining graph at once and exit.
//!
//! Stages are visited in topological order. A stage whose inputs are all cached has a
//! known key: it is skipped when cached, else submitted from its spec (a fan-out stage
//! as a job array over its missing items, followed by a one-CPU job that commits the
//! cohort). A stage downstream of submitted work has no key yet: its job runs
//! `meduet exec-stage --pipeline FILE --stage NAME`, which plans it from the cache when
//! it starts, and waits with `--dependency=afterok:` on its upstream stages' jobs (a
//! fan-out stage submitted this way computes its items in that one job). With
//! `kill_invalid_depend`, a failure cancels everything downstream of it.
//!
//! Claims and the ledger are written as for attached runs (with no driver pid), so a
//! later `meduet run` waits for these jobs instead of submitting the stages again, and
//! `meduet status` / `meduet cancel` find them.

use std::collections::HashMap;

use meduet_cache::Object;

use super::ledger::{now_unix, Claim, ClaimResult, Ledger, RunJobs, StageJobs};
use super::submit::{log_dir, stage_log_dir, Work};
use super::{check_cache, discard_for_force, job_request, submit_error, write_spec, SlurmRun};
use crate::error::EngineError;
use crate::exec::{item_key, mapped_items, prepare, ExecEnv, Prepared};
use crate::pipeline::Pipeline;
use crate::plan::{gather_inputs, select_for_run};
use crate::scheduler::{locator_for, locator_roots, RunOptions};

/// What a detached submission did.
#[derive(Debug, Default)]
pub struct Detached {
    pub run_id: String,
    /// Stage -> its job ids (an array, then its cohort job), in submission order.
    pub submitted: Vec<(String, Vec<String>)>,
    pub cached: Vec<String>,
    /// Stage -> the job of another run it waits for.
    pub reused: Vec<(String, String)>,
}

/// Submits every stage of `pipeline` that is not cached, chained by dependencies.
pub fn submit_detached(
    pipeline: &Pipeline,
    env: &ExecEnv,
    opts: &RunOptions,
    run: &SlurmRun,
) -> Result<Detached, EngineError> {
    let store = &env.store;
    check_cache(store, &run.cli)?;
    crate::plan::check_name(store, pipeline)?;
    let selected: Vec<usize> = select_for_run(pipeline, &opts.only)?;
    let ledger = Ledger::new(store);
    let cfg = &pipeline.executor_config.slurm;
    let host = meduet_cache::lease::host_name();
    let mut out = Detached {
        run_id: run.run_id.clone(),
        ..Default::default()
    };
    let mut objects: HashMap<usize, Object> = HashMap::new();
    let mut prepared: HashMap<usize, Prepared> = HashMap::new();
    // Stage -> the job its dependents wait for.
    let mut job_of: HashMap<usize, String> = HashMap::new();
    let mut all_jobs: Vec<String> = Vec::new();

    let result = (|| -> Result<(), EngineError> {
        for &i in &selected {
            let def = &pipeline.stages[i];
            let forced = opts.force.contains(&def.name);
            let record = |jobs: Vec<String>, key, array_tasks, dir: std::path::PathBuf| {
                let rec = StageJobs {
                    run_id: run.run_id.clone(),
                    key,
                    jobs: jobs.clone(),
                    array_tasks,
                    attempt: 1,
                    detached: true,
                    log_dir: dir,
                    submitted_unix: now_unix(),
                };
                if let Err(e) = ledger.write_stage(&pipeline.name, &def.name, &rec) {
                    tracing::warn!("cannot update the Slurm ledger of the cache: {e}");
                }
            };
            match gather_inputs(pipeline, store, i, &objects)? {
                Some(inputs) => {
                    let mut p = prepare(def, store, inputs, &|d| {
                        super::cuda_visible_for(d, cfg, opts)
                    })?;
                    p.locator = std::sync::Arc::new(locator_for(pipeline, i, &prepared, &objects));
                    p.locator_roots = locator_roots(pipeline, i, &prepared, &objects);
                    if forced {
                        let mut keys = vec![p.key];
                        if let Some(m) = p.kind.map_over() {
                            keys.extend(mapped_items(&p, m).iter().map(|it| item_key(&p, m, it)));
                        }
                        discard_for_force(store, &keys)?;
                    }
                    if let Some(obj) = store.load(&p.key)? {
                        out.cached.push(def.name.clone());
                        objects.insert(i, obj);
                        prepared.insert(i, p);
                        continue;
                    }
                    let claim = Claim {
                        run_id: run.run_id.clone(),
                        pipeline: pipeline.name.clone(),
                        stage: def.name.clone(),
                        host: host.clone(),
                        pid: None,
                        jobs: Vec::new(),
                        started_unix: now_unix(),
                    };
                    if let ClaimResult::Held(other) = ledger
                        .try_claim(&p.key, &claim)
                        .map_err(|e| EngineError::Other(format!("cannot write a claim: {e}")))?
                    {
                        if let Some(job) = other.jobs.last() {
                            let live = run
                                .cli
                                .squeue(std::slice::from_ref(job))
                                .map(|rows| rows.iter().any(|r| r.state.is_active()))
                                .unwrap_or(false);
                            if live {
                                out.reused.push((def.name.clone(), job.clone()));
                                job_of.insert(i, job.clone());
                                prepared.insert(i, p);
                                continue;
                            }
                        }
                        // A stale claim (its jobs ended without the object): take it over.
                        ledger.release_claim(&p.key, None);
                        if let ClaimResult::Held(_) = ledger
                            .try_claim(&p.key, &claim)
                            .map_err(|e| EngineError::Other(format!("cannot write a claim: {e}")))?
                        {
                            return Err(EngineError::Other(format!(
                                "stage '{}' is being submitted by another run at this moment; try again",
                                def.name
                            )));
                        }
                    }
                    let missing: Option<Vec<String>> = p.kind.map_over().map(|m| {
                        mapped_items(&p, m)
                            .iter()
                            .filter(|it| !store.contains(&item_key(&p, m, it)))
                            .map(|it| it.id.clone())
                            .collect()
                    });
                    let dir = log_dir(store, &p.key);
                    let mut jobs = Vec::new();
                    let mut last_dep = Vec::new();
                    if let Some(items) = missing.clone().filter(|m| !m.is_empty()) {
                        let spec = write_spec(pipeline, store, i, &p, Some(items.clone()))?;
                        let req = job_request(
                            pipeline,
                            cfg,
                            store,
                            run,
                            i,
                            &Work::Spec { spec, array: true },
                            &dir,
                            Some((0..items.len()).collect()),
                            Vec::new(),
                        )?;
                        let job = run
                            .cli
                            .sbatch(&req.args())
                            .map_err(|e| EngineError::Other(submit_error(&def.name, &req, e)))?;
                        all_jobs.push(job.clone());
                        jobs.push(job.clone());
                        last_dep.push(job);
                    }
                    let spec = write_spec(pipeline, store, i, &p, None)?;
                    let mut req = job_request(
                        pipeline,
                        cfg,
                        store,
                        run,
                        i,
                        &Work::Spec { spec, array: false },
                        &dir,
                        None,
                        last_dep,
                    )?;
                    if missing.is_some() {
                        // The cohort job only reads item manifests.
                        req.cpus = 1;
                        req.mem_gb = None;
                        req.slurm.gpus = 0;
                    }
                    let job = run
                        .cli
                        .sbatch(&req.args())
                        .map_err(|e| EngineError::Other(submit_error(&def.name, &req, e)))?;
                    all_jobs.push(job.clone());
                    jobs.push(job.clone());
                    job_of.insert(i, job);
                    let claim = Claim {
                        jobs: jobs.clone(),
                        ..claim
                    };
                    if let Err(e) = ledger.update_claim(&p.key, &claim) {
                        tracing::warn!("cannot update the Slurm ledger of the cache: {e}");
                    }
                    record(
                        jobs.clone(),
                        Some(p.key),
                        missing.as_ref().map(Vec::len),
                        dir,
                    );
                    out.submitted.push((def.name.clone(), jobs));
                    prepared.insert(i, p);
                }
                None => {
                    // The key is not known yet: plan the stage when its job starts.
                    if let Some(prev) = ledger.read_stage(&pipeline.name, &def.name) {
                        if let Some(job) = prev.jobs.last() {
                            let live = run
                                .cli
                                .squeue(std::slice::from_ref(job))
                                .map(|rows| rows.iter().any(|r| r.state.is_active()))
                                .unwrap_or(false);
                            if live {
                                out.reused.push((def.name.clone(), job.clone()));
                                job_of.insert(i, job.clone());
                                continue;
                            }
                        }
                    }
                    let deps: Vec<String> = pipeline
                        .upstream_of(i)
                        .iter()
                        .filter_map(|u| job_of.get(u).cloned())
                        .collect();
                    let dir = stage_log_dir(store, &pipeline.name, &def.name);
                    let req = job_request(
                        pipeline,
                        cfg,
                        store,
                        run,
                        i,
                        &Work::Stage {
                            pipeline: pipeline.file.clone(),
                            stage: def.name.clone(),
                        },
                        &dir,
                        None,
                        deps,
                    )?;
                    let job = run
                        .cli
                        .sbatch(&req.args())
                        .map_err(|e| EngineError::Other(submit_error(&def.name, &req, e)))?;
                    all_jobs.push(job.clone());
                    job_of.insert(i, job.clone());
                    record(vec![job.clone()], None, None, dir);
                    out.submitted.push((def.name.clone(), vec![job]));
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        // All or nothing: a chain with a hole would wait forever or fail later.
        if !all_jobs.is_empty() {
            tracing::error!(
                "submission failed: cancelling the {} job(s) already submitted",
                all_jobs.len()
            );
            let _ = run.cli.scancel(&all_jobs);
        }
        for p in prepared.values() {
            ledger.release_claim(&p.key, Some(&run.run_id));
        }
        return Err(e);
    }
    if !all_jobs.is_empty() {
        let rec = RunJobs {
            run_id: run.run_id.clone(),
            pipeline: pipeline.name.clone(),
            host,
            pid: None,
            detached: true,
            jobs: all_jobs,
            started_unix: now_unix(),
        };
        if let Err(e) = ledger.write_run(&rec) {
            tracing::warn!("cannot update the Slurm ledger of the cache: {e}");
        }
    }
    Ok(out)
}
