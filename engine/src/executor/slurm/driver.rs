//! The attached Slurm driver: submits ready stages, tracks their jobs, resubmits what
//! Slurm lost, and stops at the first real failure.
//!
//! The loop runs every 100 ms and does, in order:
//!
//! 1. **Cancel**: on Ctrl-C (the run's cancel flag) or `meduet cancel` (a marker in the
//!    ledger), `scancel` every job of this run in one call, release the claims, stop.
//! 2. **Promote**: a stage whose upstream objects exist gets its key; if cached, it is
//!    done. A stage marked `executor = "local"` runs in a thread here. Otherwise the
//!    driver claims the key (see [`super::ledger`]): if another driver holds it, this
//!    one waits for the object; else it submits one job (or one array over the missing
//!    items of a fan-out stage), within `max_jobs` in flight.
//! 3. **Manifests**: a job's work is done when its object's manifest exists, whatever
//!    Slurm says; for arrays, when every item's manifest exists, the driver commits the
//!    cohort object (reading only item manifests).
//! 4. **Poll**: once per `poll_interval`, one `squeue --states=all -r` for every job
//!    still without a manifest. An ended job is judged ([`super::state::judge`]):
//!    retryable ends are resubmitted up to `retries` times; other failures fail the
//!    stage with the tail of its log; a COMPLETED job that committed nothing fails
//!    after a short grace period (shared filesystems can lag).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use meduet_cache::{Object, StageKey, Store};

use super::ledger::{now_unix, Claim, ClaimResult, Ledger, RunJobs, StageJobs};
use super::state::{judge, Verdict};
use super::submit::{log_dir, log_file, JobRequest, Work};
use super::{
    check_cache, discard_for_force, job_request, log_tail, submit_error, write_spec, SlurmRun,
};
use crate::error::{EngineError, StageError};
use crate::exec::{execute, item_key, mapped_items, prepare, ExecEnv, Executed, Prepared};
use crate::executor::config::ExecutorKind;
use crate::pipeline::Pipeline;
use crate::plan::{gather_inputs, select_for_run};
use crate::resources::{Device, DeviceRequest};
use crate::scheduler::{
    locator_for, locator_roots, record_history, Outcome, RunOptions, RunSummary,
};

const TICK: Duration = Duration::from_millis(100);
/// How long a COMPLETED job may lack its manifest before it counts as a failure.
const COMMIT_GRACE: Duration = Duration::from_secs(5);

/// One array task (or the single job of a whole stage).
#[derive(Debug, Clone)]
struct Task {
    /// Item id (arrays) or the stage name.
    label: String,
    key: StageKey,
    /// Index in the spec's item list (arrays).
    index: Option<usize>,
    /// The job running it now.
    job: String,
    attempts: u32,
    done: bool,
    /// When Slurm first said COMPLETED while no manifest existed.
    completed_at: Option<Instant>,
}

/// The jobs of one submitted stage.
struct Track {
    stage: usize,
    key: StageKey,
    req: JobRequest,
    log_dir: PathBuf,
    array: bool,
    tasks: Vec<Task>,
    jobs: Vec<String>,
    started: Instant,
}

impl Track {
    fn open_jobs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .tasks
            .iter()
            .filter(|t| !t.done)
            .map(|t| t.job.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
    fn slots(&self) -> usize {
        let open = self.tasks.iter().filter(|t| !t.done).count();
        if self.array {
            open.min(self.req.array.as_ref().map(|a| a.1).unwrap_or(open))
        } else {
            open
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum St {
    Waiting,
    Local,
    Tracked,
    /// Another driver (or a detached run) submitted it: wait for its object.
    Adopted,
    Done,
    Failed,
    Skipped,
}

struct LocalDone {
    stage: usize,
    result: Result<Executed, StageError>,
}

/// What the driver did, for its closing line and the benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverStats {
    pub jobs_submitted: usize,
    pub array_tasks: usize,
    pub resubmitted: usize,
    pub scheduler_calls: u64,
}

/// Runs `pipeline` with its stages as Slurm jobs, waiting for them.
pub fn run_attached(
    pipeline: &Pipeline,
    env: &ExecEnv,
    opts: &RunOptions,
    run: &SlurmRun,
) -> Result<RunSummary, EngineError> {
    let store = &env.store;
    check_cache(store, &run.cli)?;
    crate::plan::check_name(store, pipeline)?;
    // The driver lives as long as the run: its live root keeps what the run uses (a
    // stage's scratch checkpoint between a TIMEOUT and its resubmission included) from a
    // concurrent `gc`.
    let env = &env.with_live_root(&format!("slurm run {}", pipeline.name))?;
    let mut d = Driver::new(pipeline, env, opts, run)?;
    let result = d.drive();
    d.finish();
    let stats = d.stats();
    tracing::info!(
        "slurm: {} job(s) submitted ({} array task(s)), {} resubmitted, {} scheduler call(s)",
        stats.jobs_submitted,
        stats.array_tasks,
        stats.resubmitted,
        stats.scheduler_calls
    );
    result?;
    d.summary()
}

struct Driver<'a> {
    pipeline: &'a Pipeline,
    env: &'a ExecEnv,
    opts: &'a RunOptions,
    run: &'a SlurmRun,
    store: &'a Store,
    ledger: Ledger,
    selected: Vec<usize>,
    state: Vec<St>,
    prepared: HashMap<usize, Prepared>,
    objects: HashMap<usize, Object>,
    outcomes: BTreeMap<usize, Outcome>,
    tracks: Vec<Track>,
    /// Adopted stage -> when its claim was last seen live.
    adopted: HashMap<usize, Instant>,
    stop: bool,
    tx: Sender<LocalDone>,
    rx: Receiver<LocalDone>,
    local_running: usize,
    last_poll: Option<Instant>,
    last_heartbeat: Instant,
    stats: DriverStats,
    run_jobs: Vec<String>,
    t0: Instant,
    cancelled: bool,
}

impl<'a> Driver<'a> {
    fn new(
        pipeline: &'a Pipeline,
        env: &'a ExecEnv,
        opts: &'a RunOptions,
        run: &'a SlurmRun,
    ) -> Result<Self, EngineError> {
        for f in &opts.force {
            if pipeline.index_of(f).is_none() {
                return Err(crate::error::PipelineError::NoSuchStage {
                    file: pipeline.file.clone(),
                    stage: f.clone(),
                    known: pipeline.stage_names(),
                }
                .into());
            }
        }
        let selected: Vec<usize> = select_for_run(pipeline, &opts.only)?;
        let (tx, rx) = unbounded();
        Ok(Self {
            pipeline,
            env,
            opts,
            run,
            store: &env.store,
            ledger: Ledger::new(&env.store),
            selected,
            state: vec![St::Waiting; pipeline.stages.len()],
            prepared: HashMap::new(),
            objects: HashMap::new(),
            outcomes: BTreeMap::new(),
            tracks: Vec::new(),
            adopted: HashMap::new(),
            stop: false,
            tx,
            rx,
            local_running: 0,
            last_poll: None,
            last_heartbeat: Instant::now(),
            stats: DriverStats::default(),
            run_jobs: Vec::new(),
            t0: Instant::now(),
            cancelled: false,
        })
    }

    fn stats(&self) -> DriverStats {
        DriverStats {
            scheduler_calls: self.run.cli.calls(),
            ..self.stats
        }
    }

    fn name(&self, i: usize) -> &str {
        &self.pipeline.stages[i].name
    }

    fn fail(&mut self, i: usize, message: String) {
        tracing::error!("✗ {}: {message}", self.name(i));
        self.state[i] = St::Failed;
        self.outcomes.insert(i, Outcome::Failed { message });
        self.stop |= !self.opts.keep_going;
    }

    fn in_flight(&self) -> usize {
        self.tracks.len() + self.adopted.len() + self.local_running
    }

    fn drive(&mut self) -> Result<(), EngineError> {
        loop {
            if self.env.cancel.is_cancelled() || self.ledger.cancel_requested(&self.run.run_id) {
                self.cancel_all();
                return Err(EngineError::Cancelled);
            }
            self.promote()?;
            self.collect_local();
            if self.check_manifests()? {
                // Dependents may be ready now: submit them without sleeping.
                continue;
            }
            self.check_adopted();
            let due = self
                .last_poll
                .is_none_or(|t| t.elapsed() >= self.pipeline.executor_config.slurm.poll_interval);
            if due && !self.tracks.is_empty() {
                self.poll()?;
                self.last_poll = Some(Instant::now());
            }
            self.heartbeat();
            if self.in_flight() == 0 && !self.any_promotable() {
                // Report what a failure left unsubmitted.
                self.promote()?;
                if self.in_flight() == 0 {
                    return Ok(());
                }
            }
            std::thread::sleep(TICK);
        }
    }

    fn any_promotable(&self) -> bool {
        !self.stop
            && self.selected.iter().any(|&i| {
                self.state[i] == St::Waiting
                    && self
                        .pipeline
                        .upstream_of(i)
                        .iter()
                        .all(|u| matches!(self.state[*u], St::Done | St::Failed | St::Skipped))
            })
    }

    fn promote(&mut self) -> Result<(), EngineError> {
        let mut progressed = true;
        while progressed {
            progressed = false;
            for idx in 0..self.selected.len() {
                let i = self.selected[idx];
                if self.state[i] != St::Waiting {
                    continue;
                }
                let ups = self.pipeline.upstream_of(i);
                if let Some(&bad) = ups
                    .iter()
                    .find(|&&u| matches!(self.state[u], St::Failed | St::Skipped))
                {
                    self.state[i] = St::Skipped;
                    let because = format!(
                        "upstream stage '{}' did not complete",
                        self.pipeline.stages[bad].name
                    );
                    tracing::info!("- {:<24} not submitted: {because}", self.name(i));
                    self.outcomes.insert(i, Outcome::Skipped { because });
                    progressed = true;
                    continue;
                }
                if self.stop || !ups.iter().all(|u| self.state[*u] == St::Done) {
                    continue;
                }
                if self.start(i)? {
                    progressed = true;
                }
            }
        }
        Ok(())
    }

    /// Starts stage `i` (its inputs exist). Returns whether its state changed.
    fn start(&mut self, i: usize) -> Result<bool, EngineError> {
        let def = &self.pipeline.stages[i];
        let forced = self.opts.force.contains(&def.name);
        if !self.prepared.contains_key(&i) {
            let inputs = gather_inputs(self.pipeline, self.store, i, &self.objects)?
                .expect("upstream objects exist");
            let cfg = &self.pipeline.executor_config.slurm;
            let cuda = |d: &crate::pipeline::StageDef| super::cuda_visible_for(d, cfg, self.opts);
            let prepared = prepare(def, self.store, inputs, &cuda);
            if let Ok(p) = &prepared {
                self.env.protect([p.key])?;
            }
            let mut p = match prepared {
                Ok(p) => p,
                Err(e) => {
                    self.fail(i, e.to_string());
                    return Ok(true);
                }
            };
            p.locator =
                std::sync::Arc::new(locator_for(self.pipeline, i, &self.prepared, &self.objects));
            p.locator_roots = locator_roots(self.pipeline, i, &self.prepared, &self.objects);
            if forced {
                let mut keys = vec![p.key];
                if let Some(m) = p.kind.map_over() {
                    keys.extend(mapped_items(&p, m).iter().map(|it| item_key(&p, m, it)));
                }
                discard_for_force(self.store, &keys)?;
            }
            self.prepared.insert(i, p);
        }
        let p = self.prepared[&i].clone();
        if let Some(obj) = self.store.load(&p.key)? {
            tracing::info!("· {:<24} cached   {}", def.name, p.key.short());
            self.outcomes.insert(i, Outcome::Cached { key: p.key });
            self.objects.insert(i, obj);
            self.state[i] = St::Done;
            return Ok(true);
        }
        if def.executor.run_on == Some(ExecutorKind::Local) {
            self.start_local(i, p)?;
            return Ok(true);
        }
        // Fan-out: the items still missing.
        let missing: Option<Vec<(String, StageKey)>> = p.kind.map_over().map(|m| {
            mapped_items(&p, m)
                .iter()
                .map(|it| (it.id.clone(), item_key(&p, m, it)))
                .filter(|(_, k)| !self.store.contains(k))
                .collect()
        });
        let cfg = &self.pipeline.executor_config.slurm;
        let need = match &missing {
            Some(m) => m.len().min(cfg.array_parallelism),
            None => 1,
        };
        let used: usize = self.tracks.iter().map(Track::slots).sum();
        if used > 0 && used + need > cfg.max_jobs {
            return Ok(false);
        }
        let claim = Claim {
            run_id: self.run.run_id.clone(),
            pipeline: self.pipeline.name.clone(),
            stage: def.name.clone(),
            host: meduet_cache::lease::host_name(),
            pid: Some(std::process::id()),
            jobs: Vec::new(),
            started_unix: now_unix(),
        };
        match self.ledger.try_claim(&p.key, &claim).map_err(|e| {
            EngineError::Other(format!(
                "cannot write a claim under '{}': {e}",
                self.store.root().join("slurm/claims").display()
            ))
        })? {
            ClaimResult::Claimed => {}
            ClaimResult::Held(other) => {
                if let Some(why) = self.claim_stale(&p.key) {
                    tracing::warn!(
                        "stage '{}': taking over the claim of run {} ({why})",
                        def.name,
                        other.run_id
                    );
                    self.ledger.release_claim(&p.key, None);
                    return Ok(false);
                }
                tracing::info!(
                    "· {:<24} submitted by run {} (job {}): waiting for its object",
                    def.name,
                    other.run_id,
                    other.jobs.last().map(String::as_str).unwrap_or("?")
                );
                self.state[i] = St::Adopted;
                self.adopted.insert(i, Instant::now());
                return Ok(true);
            }
        }
        // The object may have been committed between our check and our claim.
        if self.store.contains(&p.key) {
            self.ledger.release_claim(&p.key, Some(&self.run.run_id));
            return Ok(false);
        }
        if let Some(m) = &missing {
            if m.is_empty() {
                // Every item exists: commit the cohort here.
                let r = self.commit_cohort(i);
                self.ledger.release_claim(&p.key, Some(&self.run.run_id));
                r?;
                return Ok(true);
            }
        }
        match self.submit(i, &p, missing) {
            Ok(()) => {}
            Err(message) => {
                self.ledger.release_claim(&p.key, Some(&self.run.run_id));
                self.fail(i, message);
            }
        }
        Ok(true)
    }

    /// Why the claim of `key` may be broken, if it may.
    fn claim_stale(&self, key: &StageKey) -> Option<String> {
        let (c, age) = self.ledger.read_claim(key)?;
        let stale_after = self.env.lease.stale_after;
        match c.pid {
            Some(pid) if c.host == meduet_cache::lease::host_name() => {
                (!meduet_cache::lease::pid_alive(pid))
                    .then(|| format!("its driver, pid {pid}, is dead"))
            }
            Some(_) => (age > stale_after).then(|| {
                format!(
                    "no heartbeat from its driver on {} for {:.0}s",
                    c.host,
                    age.as_secs_f64()
                )
            }),
            None => {
                // Detached: live while one of its jobs is queued or running.
                let rows = self.run.cli.squeue(&c.jobs).ok()?;
                (!rows.iter().any(|r| r.state.is_active()))
                    .then(|| "none of its detached jobs is queued or running".to_string())
            }
        }
    }

    fn start_local(&mut self, i: usize, p: Prepared) -> Result<(), EngineError> {
        let def = &self.pipeline.stages[i];
        let device = match def.resources.device {
            DeviceRequest::Cpu => Device::Cpu,
            DeviceRequest::Cuda(n) => Device::Cuda(n),
            DeviceRequest::AnyCuda | DeviceRequest::Auto => {
                let found = self
                    .opts
                    .device_probe
                    .as_ref()
                    .map(|d| (d.0)())
                    .or_else(|| self.opts.cuda_devices.clone())
                    .unwrap_or_default();
                match found.first() {
                    Some(&d) => Device::Cuda(d),
                    None if def.resources.device == DeviceRequest::Auto => Device::Cpu,
                    None => {
                        self.fail(
                            i,
                            format!(
                                "stage '{}' runs locally (executor = \"local\") and asks for device 'cuda' but no CUDA device is available here",
                                def.name
                            ),
                        );
                        return Ok(());
                    }
                }
            }
        };
        let threads = def.resources.threads.max(1);
        tracing::info!(
            "▶ {:<24} {} here (executor = \"local\") on {device} x{threads}",
            def.name,
            def.kind.kind()
        );
        let env = self.env.clone();
        let tx = self.tx.clone();
        let pname = self.pipeline.name.clone();
        let resources = def.resources.clone();
        std::thread::Builder::new()
            .name(format!("stage-{}", def.name))
            .spawn(move || {
                let result = match p.kind.worker() {
                    None => execute(&env, &p, device, threads, false),
                    Some(w) => crate::worker::execute_in_worker(
                        &env, &pname, &p, &resources, device, threads, false, w,
                    ),
                };
                let _ = tx.send(LocalDone { stage: i, result });
            })
            .map_err(|e| EngineError::Other(format!("cannot spawn a stage thread: {e}")))?;
        self.state[i] = St::Local;
        self.local_running += 1;
        Ok(())
    }

    fn collect_local(&mut self) {
        while let Ok(LocalDone { stage: i, result }) = self.rx.try_recv() {
            self.local_running -= 1;
            match result {
                Ok(ex) => {
                    let key = ex.object.key();
                    tracing::info!("✓ {:<24} {:.2}s (here)", self.name(i), ex.wall_seconds);
                    self.outcomes.insert(
                        i,
                        if ex.computed {
                            Outcome::Computed {
                                key,
                                wall_seconds: ex.wall_seconds,
                                items: None,
                            }
                        } else {
                            Outcome::Reused { key }
                        },
                    );
                    self.objects.insert(i, ex.object);
                    self.state[i] = St::Done;
                }
                Err(e) => self.fail(i, e.to_string()),
            }
        }
    }

    /// Submits stage `i`: one job, or one array over `missing` items.
    fn submit(
        &mut self,
        i: usize,
        p: &Prepared,
        missing: Option<Vec<(String, StageKey)>>,
    ) -> Result<(), String> {
        let def = &self.pipeline.stages[i];
        let cfg = &self.pipeline.executor_config.slurm;
        let items = missing
            .as_ref()
            .map(|m| m.iter().map(|(id, _)| id.clone()).collect());
        let spec = write_spec(self.pipeline, self.store, i, p, items).map_err(|e| e.to_string())?;
        let dir = log_dir(self.store, &p.key);
        let array = missing.as_ref().map(|m| (0..m.len()).collect::<Vec<_>>());
        let work = Work::Spec {
            spec,
            array: array.is_some(),
        };
        let req = job_request(
            self.pipeline,
            cfg,
            self.store,
            self.run,
            i,
            &work,
            &dir,
            array,
            Vec::new(),
        )
        .map_err(|e| e.to_string())?;
        let job = self
            .run
            .cli
            .sbatch(&req.args())
            .map_err(|e| submit_error(&def.name, &req, e))?;
        let tasks: Vec<Task> = match &missing {
            Some(m) => m
                .iter()
                .enumerate()
                .map(|(n, (id, k))| Task {
                    label: id.clone(),
                    key: *k,
                    index: Some(n),
                    job: job.clone(),
                    attempts: 1,
                    done: false,
                    completed_at: None,
                })
                .collect(),
            None => vec![Task {
                label: def.name.clone(),
                key: p.key,
                index: None,
                job: job.clone(),
                attempts: 1,
                done: false,
                completed_at: None,
            }],
        };
        self.stats.jobs_submitted += 1;
        if missing.is_some() {
            self.stats.array_tasks += tasks.len();
            tracing::info!(
                "▶ {:<24} {} submitted as job array {job} ({} item(s), {} cached)",
                def.name,
                def.kind.kind(),
                tasks.len(),
                p.kind
                    .map_over()
                    .map(|m| mapped_items(p, m).len() - tasks.len())
                    .unwrap_or(0)
            );
        } else {
            tracing::info!(
                "▶ {:<24} {} submitted as job {job}",
                def.name,
                def.kind.kind()
            );
        }
        let track = Track {
            stage: i,
            key: p.key,
            array: missing.is_some(),
            req,
            log_dir: dir,
            tasks,
            jobs: vec![job.clone()],
            started: Instant::now(),
        };
        self.tracks.push(track);
        self.state[i] = St::Tracked;
        self.record_jobs(self.tracks.len() - 1, &job);
        Ok(())
    }

    /// Writes the ledger after a submission of track `t` as job `job`.
    fn record_jobs(&mut self, t: usize, job: &str) {
        let tr = &self.tracks[t];
        let def = &self.pipeline.stages[tr.stage];
        let claim = Claim {
            run_id: self.run.run_id.clone(),
            pipeline: self.pipeline.name.clone(),
            stage: def.name.clone(),
            host: meduet_cache::lease::host_name(),
            pid: Some(std::process::id()),
            jobs: tr.jobs.clone(),
            started_unix: now_unix(),
        };
        let attempt = tr.tasks.iter().map(|t| t.attempts).max().unwrap_or(1);
        let rec = StageJobs {
            run_id: self.run.run_id.clone(),
            key: Some(tr.key),
            jobs: tr.jobs.clone(),
            array_tasks: tr.array.then_some(tr.tasks.len()),
            attempt,
            detached: false,
            log_dir: tr.log_dir.clone(),
            submitted_unix: now_unix(),
        };
        self.run_jobs.push(job.to_string());
        let run = RunJobs {
            run_id: self.run.run_id.clone(),
            pipeline: self.pipeline.name.clone(),
            host: meduet_cache::lease::host_name(),
            pid: Some(std::process::id()),
            detached: false,
            jobs: self.run_jobs.clone(),
            started_unix: now_unix(),
        };
        for r in [
            self.ledger.update_claim(&tr.key, &claim),
            self.ledger
                .write_stage(&self.pipeline.name, &def.name, &rec),
            self.ledger.write_run(&run),
        ] {
            if let Err(e) = r {
                tracing::warn!("cannot update the Slurm ledger of the cache: {e}");
            }
        }
    }

    /// Marks tasks whose manifest exists; finishes tracks whose tasks are all done.
    /// Returns whether a stage finished.
    fn check_manifests(&mut self) -> Result<bool, EngineError> {
        let mut finished = Vec::new();
        for (n, tr) in self.tracks.iter_mut().enumerate() {
            for t in tr.tasks.iter_mut().filter(|t| !t.done) {
                if self.store.contains(&t.key) {
                    t.done = true;
                }
            }
            if tr.tasks.iter().all(|t| t.done) {
                finished.push(n);
            }
        }
        let any = !finished.is_empty();
        for n in finished.into_iter().rev() {
            let tr = self.tracks.remove(n);
            let i = tr.stage;
            self.ledger.touch_claim(&tr.key);
            if tr.array {
                let r = self.commit_cohort(i);
                if let Some(Outcome::Computed {
                    items: Some((_, computed)),
                    wall_seconds,
                    ..
                }) = self.outcomes.get_mut(&i)
                {
                    // The items were computed by the array's tasks.
                    *computed = tr.tasks.len();
                    *wall_seconds = tr.started.elapsed().as_secs_f64();
                }
                self.ledger.release_claim(&tr.key, Some(&self.run.run_id));
                r?;
            } else {
                let obj = self.store.load(&tr.key)?.expect("manifest exists");
                let secs = tr.started.elapsed().as_secs_f64();
                tracing::info!(
                    "✓ {:<24} {secs:.2}s (job {})",
                    self.name(i),
                    tr.tasks[0].job
                );
                self.outcomes.insert(
                    i,
                    Outcome::Computed {
                        key: tr.key,
                        wall_seconds: secs,
                        items: None,
                    },
                );
                self.objects.insert(i, obj);
                self.state[i] = St::Done;
                self.ledger.release_claim(&tr.key, Some(&self.run.run_id));
            }
        }
        Ok(any)
    }

    /// Commits the cohort object of fan-out stage `i` from its (existing) item objects.
    fn commit_cohort(&mut self, i: usize) -> Result<(), EngineError> {
        let p = self.prepared[&i].clone();
        let m = p.kind.map_over().expect("fan-out stage");
        if let Some(it) = mapped_items(&p, m)
            .iter()
            .find(|it| !self.store.contains(&item_key(&p, m, it)))
        {
            self.fail(
                i,
                format!("item '{}' has no object although its job ended", it.id),
            );
            return Ok(());
        }
        match execute(self.env, &p, Device::Cpu, 1, false) {
            Ok(ex) => {
                tracing::info!(
                    "✓ {:<24} {} item(s), cohort {}",
                    self.name(i),
                    ex.items_total,
                    ex.object.key().short()
                );
                self.outcomes.insert(
                    i,
                    Outcome::Computed {
                        key: ex.object.key(),
                        wall_seconds: ex.wall_seconds,
                        items: Some((ex.items_total, ex.items_computed)),
                    },
                );
                self.objects.insert(i, ex.object);
                self.state[i] = St::Done;
            }
            Err(StageError::Cancelled) => return Err(EngineError::Cancelled),
            Err(e) => self.fail(i, e.to_string()),
        }
        Ok(())
    }

    fn check_adopted(&mut self) {
        let ids: Vec<usize> = self.adopted.keys().copied().collect();
        for i in ids {
            let key = self.prepared[&i].key;
            if let Ok(Some(obj)) = self.store.load(&key) {
                tracing::info!(
                    "· {:<24} reused   {} (computed by another run's job)",
                    self.name(i),
                    key.short()
                );
                self.adopted.remove(&i);
                self.outcomes.insert(i, Outcome::Reused { key });
                self.objects.insert(i, obj);
                self.state[i] = St::Done;
                continue;
            }
            // Re-check the other run's claim now and then: gone or stale, take over.
            let last = self.adopted[&i];
            if last.elapsed() < self.pipeline.executor_config.slurm.poll_interval {
                continue;
            }
            self.adopted.insert(i, Instant::now());
            let gone = self.ledger.read_claim(&key).is_none();
            if gone || self.claim_stale(&key).is_some() {
                if !gone {
                    self.ledger.release_claim(&key, None);
                }
                tracing::info!(
                    "stage '{}': the run that submitted it stopped without its object; submitting it here",
                    self.name(i)
                );
                self.adopted.remove(&i);
                self.state[i] = St::Waiting;
            }
        }
    }

    /// One squeue for every open job; judges ended jobs.
    fn poll(&mut self) -> Result<(), EngineError> {
        let mut jobs: Vec<String> = self.tracks.iter().flat_map(Track::open_jobs).collect();
        jobs.sort();
        jobs.dedup();
        let rows = match self.run.cli.squeue(&jobs) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot query Slurm (will retry): {e}");
                return Ok(());
            }
        };
        let cfg = &self.pipeline.executor_config.slurm;
        let mut failures: Vec<(usize, String)> = Vec::new();
        let mut resubmit: Vec<(usize, Vec<usize>)> = Vec::new();
        for (n, tr) in self.tracks.iter_mut().enumerate() {
            let mut retry_tasks = Vec::new();
            for (ti, t) in tr.tasks.iter_mut().enumerate() {
                if t.done {
                    continue;
                }
                let row = rows
                    .iter()
                    .find(|r| r.job == t.job && r.task == t.index.filter(|_| tr.array));
                let (state, exit) = match row {
                    Some(r)
                        if !r.state.is_active()
                            && matches!(r.state, super::state::JobState::Failed) =>
                    {
                        // Exit code and signal tell a crash from a kill.
                        let id = match t.index {
                            Some(x) if tr.array => format!("{}_{x}", t.job),
                            _ => t.job.clone(),
                        };
                        let info = self.run.cli.show_job(&id).ok().flatten();
                        (r.state.clone(), info.and_then(|i| i.exit))
                    }
                    Some(r) => (r.state.clone(), None),
                    None => {
                        let id = match t.index {
                            Some(x) if tr.array => format!("{}_{x}", t.job),
                            _ => t.job.clone(),
                        };
                        match self.run.cli.show_job(&id).ok().flatten() {
                            Some(info) => (info.state, info.exit),
                            None => {
                                if self.store.contains(&t.key) {
                                    continue;
                                }
                                retry_tasks.push((ti, "vanished from Slurm's queue".to_string()));
                                continue;
                            }
                        }
                    }
                };
                match judge(&state, exit) {
                    Verdict::Active => {}
                    Verdict::Completed => {
                        if self.store.contains(&t.key) {
                            continue;
                        }
                        let since = *t.completed_at.get_or_insert_with(Instant::now);
                        if since.elapsed() >= COMMIT_GRACE {
                            let log = log_file(&tr.log_dir, &t.job, t.index);
                            failures.push((
                                n,
                                format!(
                                    "job {} of '{}' COMPLETED but committed no object{}",
                                    t.job,
                                    t.label,
                                    log_tail(&log, 15)
                                ),
                            ));
                        }
                    }
                    Verdict::Retry(why) => retry_tasks.push((ti, why)),
                    Verdict::Failed(why) => {
                        let log = log_file(&tr.log_dir, &t.job, t.index);
                        let what = if tr.array {
                            format!(
                                "job {}_{} (item '{}')",
                                t.job,
                                t.index.unwrap_or(0),
                                t.label
                            )
                        } else {
                            format!("job {}", t.job)
                        };
                        failures.push((n, format!("{what} {why}{}", log_tail(&log, 15))));
                    }
                }
            }
            let mut again = Vec::new();
            for (ti, why) in retry_tasks {
                let t = &mut tr.tasks[ti];
                if self.stop || t.attempts > cfg.retries {
                    let log = log_file(&tr.log_dir, &t.job, t.index);
                    failures.push((
                        n,
                        format!(
                            "job {} of '{}' {why}; gave up after {} attempt(s) (retries = {}){}",
                            t.job,
                            t.label,
                            t.attempts,
                            cfg.retries,
                            log_tail(&log, 15)
                        ),
                    ));
                } else {
                    tracing::warn!(
                        "stage '{}': job {} of '{}' {why}; resubmitting (attempt {} of {})",
                        self.pipeline.stages[tr.stage].name,
                        t.job,
                        t.label,
                        t.attempts + 1,
                        cfg.retries + 1
                    );
                    again.push(ti);
                }
            }
            if !again.is_empty() {
                resubmit.push((n, again));
            }
        }
        for (n, tasks) in resubmit {
            if let Err(m) = self.resubmit(n, &tasks) {
                failures.push((n, m));
            }
        }
        // Fail stages (once each), dropping their tracks; remaining jobs are cancelled.
        let mut failed_tracks: Vec<usize> = Vec::new();
        for (n, m) in failures {
            if failed_tracks.contains(&n) {
                continue;
            }
            failed_tracks.push(n);
            let i = self.tracks[n].stage;
            self.fail(i, m);
        }
        failed_tracks.sort_unstable();
        for n in failed_tracks.into_iter().rev() {
            let tr = self.tracks.remove(n);
            let open = tr.open_jobs();
            if !open.is_empty() {
                let _ = self.run.cli.scancel(&open);
            }
            self.ledger.release_claim(&tr.key, Some(&self.run.run_id));
        }
        Ok(())
    }

    /// Resubmits tasks `tasks` of track `n` (one job, or one array over those tasks).
    fn resubmit(&mut self, n: usize, tasks: &[usize]) -> Result<(), String> {
        let tr = &mut self.tracks[n];
        let mut req = tr.req.clone();
        if tr.array {
            let idx: Vec<usize> = tasks.iter().filter_map(|&t| tr.tasks[t].index).collect();
            req.array = req.array.map(|(_, k)| (idx, k));
        }
        let stage = self.pipeline.stages[tr.stage].name.clone();
        let job = self
            .run
            .cli
            .sbatch(&req.args())
            .map_err(|e| submit_error(&stage, &req, e))?;
        for &t in tasks {
            let task = &mut tr.tasks[t];
            task.job = job.clone();
            task.attempts += 1;
            task.completed_at = None;
        }
        tr.jobs.push(job.clone());
        self.stats.jobs_submitted += 1;
        self.stats.resubmitted += tasks.len();
        tracing::info!("▶ {:<24} resubmitted as job {job}", stage);
        self.record_jobs(n, &job);
        Ok(())
    }

    fn heartbeat(&mut self) {
        let every = self.env.lease.heartbeat;
        if self.last_heartbeat.elapsed() < every {
            return;
        }
        self.last_heartbeat = Instant::now();
        for tr in &self.tracks {
            self.ledger.touch_claim(&tr.key);
        }
    }

    /// Ctrl-C or `meduet cancel`: scancel everything this run submitted.
    fn cancel_all(&mut self) {
        self.cancelled = true;
        let jobs: Vec<String> = self.tracks.iter().flat_map(Track::open_jobs).collect();
        if !jobs.is_empty() {
            eprintln!("cancelling Slurm job(s) {}", jobs.join(", "));
            if let Err(e) = self.run.cli.scancel(&jobs) {
                tracing::error!("scancel failed: {e}");
            }
        }
        for tr in std::mem::take(&mut self.tracks) {
            self.ledger.release_claim(&tr.key, Some(&self.run.run_id));
            self.state[tr.stage] = St::Failed;
            self.outcomes.insert(
                tr.stage,
                Outcome::Failed {
                    message: "cancelled".into(),
                },
            );
        }
        // Local stages see the run's cancel flag.
        self.env.cancel.cancel();
        while self.local_running > 0 {
            if self.rx.recv_timeout(Duration::from_secs(30)).is_err() {
                break;
            }
            self.local_running -= 1;
        }
    }

    fn finish(&mut self) {
        for i in 0..self.pipeline.stages.len() {
            if self.selected.contains(&i) && !self.outcomes.contains_key(&i) {
                self.outcomes.insert(
                    i,
                    Outcome::Skipped {
                        because: "the run stopped before it".into(),
                    },
                );
            }
        }
        self.ledger.remove_run(&self.run.run_id);
        if let Err(e) = record_history(self.pipeline, self.store, &self.prepared, &self.objects) {
            tracing::warn!("cannot record the run's history: {e}");
        }
    }

    fn summary(&self) -> Result<RunSummary, EngineError> {
        let summary = RunSummary {
            stages: self
                .outcomes
                .iter()
                .map(|(i, o)| (self.pipeline.stages[*i].name.clone(), o.clone()))
                .collect(),
            wall_seconds: self.t0.elapsed().as_secs_f64(),
        };
        if self.cancelled {
            return Err(EngineError::Cancelled);
        }
        let failures = summary.failures();
        if failures.len() == 1 {
            let (stage, message) = failures.into_iter().next().unwrap();
            return Err(EngineError::StageFailed { stage, message });
        }
        if !failures.is_empty() {
            return Err(EngineError::StagesFailed { failures });
        }
        Ok(summary)
    }
}
