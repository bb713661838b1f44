//! What this cache knows about Slurm jobs, under `<cache>/slurm/`.
//!
//! ```text
//! slurm/claims/<key>.json            one submitter per key (O_EXCL, heartbeat = mtime)
//! slurm/stages/<pipeline>/<stage>.json  the stage's latest jobs (for `meduet status`)
//! slurm/runs/<run>.json              every job a run submitted (for `meduet cancel`)
//! slurm/cancel/<run>                 asks the run's driver to stop (written by `meduet cancel`)
//! slurm/scripts/<blake3>.sh          batch scripts (content-addressed)
//! ```
//!
//! A claim makes two drivers on one cache submit each stage once: the second finds the
//! first's claim and waits for the object instead. A claim is stale when its driver is
//! dead (same host), its heartbeat is older than the lease staleness (other hosts), or,
//! for a detached run (no driver), when none of its jobs is still queued or running.
//! None of this is proof of anything: only manifests are.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meduet_cache::{StageKey, Store};
use serde::{Deserialize, Serialize};

/// Who submits (or submitted) the jobs of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub run_id: String,
    pub pipeline: String,
    pub stage: String,
    pub host: String,
    /// The driver's pid; `None` for a detached run (no driver is waiting).
    pub pid: Option<u32>,
    /// Job ids of the stage (array job ids for arrays), newest last.
    #[serde(default)]
    pub jobs: Vec<String>,
    pub started_unix: u64,
}

/// The latest jobs of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageJobs {
    pub run_id: String,
    /// Unknown for a detached stage whose inputs were not computed at submission.
    pub key: Option<StageKey>,
    /// Job ids, newest last (one per attempt; the cohort job of a detached array last).
    pub jobs: Vec<String>,
    /// Tasks of the array, for fan-out stages.
    pub array_tasks: Option<usize>,
    pub attempt: u32,
    pub detached: bool,
    pub log_dir: PathBuf,
    pub submitted_unix: u64,
}

/// A run that submitted jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunJobs {
    pub run_id: String,
    pub pipeline: String,
    pub host: String,
    pub pid: Option<u32>,
    pub detached: bool,
    pub jobs: Vec<String>,
    pub started_unix: u64,
}

/// The outcome of [`Ledger::try_claim`].
pub enum ClaimResult {
    Claimed,
    /// Someone else holds it: their claim.
    Held(Claim),
}

/// The `slurm/` folder of a cache.
#[derive(Debug, Clone)]
pub struct Ledger {
    root: PathBuf,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A run id: time, host and pid.
pub fn new_run_id() -> String {
    meduet_cache::store::sanitize(&format!(
        "{}-{}-{}",
        now_unix(),
        meduet_cache::lease::host_name(),
        std::process::id()
    ))
}

fn write_json(path: &Path, v: &impl Serialize) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    meduet_cache::hashing::write_atomic(
        path,
        &serde_json::to_vec_pretty(v).expect("serializable"),
        false,
    )
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

impl Ledger {
    pub fn new(store: &Store) -> Self {
        Self {
            root: store.root().join("slurm"),
        }
    }

    fn claim_path(&self, key: &StageKey) -> PathBuf {
        self.root
            .join("claims")
            .join(format!("{}.json", key.to_hex()))
    }

    /// Claims `key` for `claim`'s run, unless someone holds it.
    pub fn try_claim(&self, key: &StageKey, claim: &Claim) -> std::io::Result<ClaimResult> {
        let path = self.claim_path(key);
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(&serde_json::to_vec_pretty(claim).expect("serializable"))?;
                f.sync_all()?;
                Ok(ClaimResult::Claimed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                match read_json::<Claim>(&path) {
                    Some(c) => Ok(ClaimResult::Held(c)),
                    // Torn write right after create: treat as held until it ages out.
                    None => Ok(ClaimResult::Held(Claim {
                        run_id: String::new(),
                        pipeline: String::new(),
                        stage: String::new(),
                        host: String::new(),
                        pid: None,
                        jobs: Vec::new(),
                        started_unix: 0,
                    })),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The claim of `key` and the age of its heartbeat.
    pub fn read_claim(&self, key: &StageKey) -> Option<(Claim, Duration)> {
        let path = self.claim_path(key);
        let c = read_json(&path)?;
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        Some((c, age))
    }

    /// Rewrites our claim (after a submission), which also refreshes its heartbeat.
    pub fn update_claim(&self, key: &StageKey, claim: &Claim) -> std::io::Result<()> {
        write_json(&self.claim_path(key), claim)
    }

    /// Refreshes the heartbeat of our claim.
    pub fn touch_claim(&self, key: &StageKey) {
        if let Ok(f) = std::fs::File::options()
            .write(true)
            .open(self.claim_path(key))
        {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Removes the claim of `key` if it belongs to `run_id` (or if `run_id` is None).
    pub fn release_claim(&self, key: &StageKey, run_id: Option<&str>) {
        let path = self.claim_path(key);
        let ours = match (run_id, read_json::<Claim>(&path)) {
            (None, _) => true,
            (Some(r), Some(c)) => c.run_id == r,
            (Some(_), None) => false,
        };
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }

    fn stage_path(&self, pipeline: &str, stage: &str) -> PathBuf {
        self.root
            .join("stages")
            .join(meduet_cache::store::sanitize(pipeline))
            .join(format!("{stage}.json"))
    }

    pub fn write_stage(&self, pipeline: &str, stage: &str, r: &StageJobs) -> std::io::Result<()> {
        write_json(&self.stage_path(pipeline, stage), r)
    }

    pub fn read_stage(&self, pipeline: &str, stage: &str) -> Option<StageJobs> {
        read_json(&self.stage_path(pipeline, stage))
    }

    fn run_path(&self, run_id: &str) -> PathBuf {
        self.root.join("runs").join(format!("{run_id}.json"))
    }

    pub fn write_run(&self, r: &RunJobs) -> std::io::Result<()> {
        write_json(&self.run_path(&r.run_id), r)
    }

    /// Every recorded run of `pipeline`.
    pub fn runs_of(&self, pipeline: &str) -> Vec<RunJobs> {
        let mut v: Vec<RunJobs> = std::fs::read_dir(self.root.join("runs"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| read_json::<RunJobs>(&e.path()))
                    .filter(|r| r.pipeline == pipeline)
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        v
    }

    fn cancel_path(&self, run_id: &str) -> PathBuf {
        self.root.join("cancel").join(run_id)
    }

    /// Asks the driver of `run_id` to stop (it scancels its jobs and exits).
    pub fn request_cancel(&self, run_id: &str) -> std::io::Result<()> {
        let p = self.cancel_path(run_id);
        std::fs::create_dir_all(p.parent().expect("has parent"))?;
        std::fs::write(p, b"")
    }

    pub fn cancel_requested(&self, run_id: &str) -> bool {
        self.cancel_path(run_id).exists()
    }

    /// Forgets run `run_id` (its record and any cancel request).
    pub fn remove_run(&self, run_id: &str) {
        let _ = std::fs::remove_file(self.run_path(run_id));
        let _ = std::fs::remove_file(self.cancel_path(run_id));
    }
}
