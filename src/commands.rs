//! What each subcommand does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::MultiProgress;
use meduet_cache::{Store, Versions};
use meduet_engine::plan::{load_history, plan, select, StageStatus};
use meduet_engine::progress::Reporter;
use meduet_engine::{ExecEnv, Outcome, Pipeline, Registry, RunOptions};

use crate::cli::{
    CacheArg, CancelArgs, Cli, Command, DoctorArgs, ExecStageArgs, ExportArgs, GcArgs, GraphArgs,
    GraphFormat, HashArgs, KindsArgs, PinArgs, PlanArgs, RunArgs, ShowArgs, StatusArgs, VerifyArgs,
};

/// Versions recorded in run records.
pub fn versions() -> Versions {
    let commit = env!("MEDUET_GIT_COMMIT");
    Versions {
        meduet: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: (!commit.is_empty()).then(|| commit.to_string()),
        torch: None,
    }
}

fn load(path: &Path, registry: &Registry) -> Result<Pipeline> {
    Ok(Pipeline::load(path, registry)?)
}

/// The cache folder of a pipeline, honouring --cache / MEDUET_CACHE.
fn cache_dir(p: &Pipeline, arg: &CacheArg) -> PathBuf {
    arg.cache.clone().unwrap_or_else(|| p.cache_dir.clone())
}

fn open_store(dir: &Path) -> Result<Store> {
    Store::open(dir).with_context(|| format!("cannot open the cache '{}'", dir.display()))
}

fn existing_store(
    pipeline: &Option<PathBuf>,
    cache: &CacheArg,
    registry: &Registry,
) -> Result<Store> {
    let dir = match (&cache.cache, pipeline) {
        (Some(c), _) => c.clone(),
        (None, Some(p)) => load(p, registry)?.cache_dir,
        (None, None) => bail!("give a pipeline file or --cache DIR (or set MEDUET_CACHE)"),
    };
    Store::open_existing(&dir).with_context(|| {
        format!(
            "'{}' is not a meduet cache (no objects/ folder)",
            dir.display()
        )
    })
}

fn env_for(store: Store, multi: &MultiProgress) -> ExecEnv {
    let mut env = ExecEnv::new(store);
    env.progress = Reporter::new(multi.clone());
    env.versions = versions();
    env
}

pub fn dispatch(args: Cli, multi: MultiProgress) -> Result<i32> {
    let registry = meduet_stages::registry();
    match args.command {
        Command::Run(RunArgs {
            pipeline,
            only,
            force,
            keep_going,
            threads,
            executor,
            detach,
            cache,
        }) => {
            let p = load(&pipeline, &registry)?;
            let slurm = crate::slurm_cmds::wants_slurm(&p, executor, detach)?;
            let store = open_store(&cache_dir(&p, &cache))?;
            let env = env_for(store.clone(), &multi);
            let cancel = env.cancel.clone();
            let _ = ctrlc::set_handler(move || {
                if cancel.is_cancelled() {
                    eprintln!("interrupted twice: exiting now (leases of this process will be broken by the next run)");
                    std::process::exit(130);
                }
                eprintln!("interrupt: cancelling running stages (nothing partial is committed); press Ctrl-C again to exit at once");
                cancel.cancel();
            });
            let opts = RunOptions {
                only,
                force,
                keep_going,
                threads,
                cuda_devices: None,
                device_probe: Some(meduet_engine::scheduler::DeviceProbe(std::sync::Arc::new(
                    cuda_devices,
                ))),
            };
            tracing::info!(
                "pipeline '{}' ({} stages), cache {}",
                p.name,
                p.stages.len(),
                store.root().display()
            );
            if slurm {
                return crate::slurm_cmds::run(&p, &store, &env, &opts, detach);
            }
            let result = meduet_engine::run(&p, &env, &opts);
            match &result {
                Ok(summary) => print_summary(&p, &store, summary),
                Err(_) => {}
            }
            result?;
            Ok(0)
        }
        Command::Plan(PlanArgs {
            pipeline,
            only,
            force,
            json,
            specs,
            cache,
        }) => {
            let p = load(&pipeline, &registry)?;
            let dir = cache_dir(&p, &cache);
            let sel = select(&p, &only)?;
            if specs {
                let store = open_store(&dir)?;
                for (stage, path) in
                    meduet_engine::plan::write_ready_specs(&p, &store, &sel, &force, &cuda_visible)?
                {
                    println!("{stage}\t{}", path.display());
                }
                return Ok(report_missing_files(&p, &sel, true));
            }
            // Planning never creates a cache: an absent one means nothing is cached.
            let (store, _cleanup) = match Store::open_existing(&dir) {
                Some(s) => (s, None),
                None => {
                    let tmp = std::env::temp_dir()
                        .join(format!("meduet-empty-plan-{}", std::process::id()));
                    (Store::open(&tmp)?, Some(TempDirGuard(tmp)))
                }
            };
            let planned = plan(&p, &store, &sel, &force, &cuda_visible)?;
            print_plan(&planned, json);
            Ok(report_missing_files(&p, &sel, json))
        }
        Command::Graph(GraphArgs { pipeline, format }) => {
            let p = load(&pipeline, &registry)?;
            match format {
                GraphFormat::Dot => print!("{}", meduet_engine::graph::to_dot(&p)),
                GraphFormat::Mermaid => print!("{}", meduet_engine::graph::to_mermaid(&p)),
            }
            Ok(0)
        }
        Command::Status(StatusArgs { pipeline, cache }) => {
            let p = load(&pipeline, &registry)?;
            let dir = cache_dir(&p, &cache);
            let Some(store) = Store::open_existing(&dir) else {
                println!("no cache at {} yet: nothing has run", dir.display());
                return Ok(0);
            };
            let planned = plan(&p, &store, &[], &[], &cuda_visible)?;
            let history = load_history(&store, &p);
            let jobs = crate::slurm_cmds::status_jobs(&p, &store, &planned);
            println!("{:<24} {:<14} {:<14} details", "stage", "kind", "status");
            for s in planned {
                let (status, details) = match &s.status {
                    StageStatus::Cached { key } => {
                        ("cached".to_string(), format!("{}", key.short()))
                    }
                    StageStatus::WillRun {
                        key: Some(key),
                        items,
                        ..
                    } => match store.lease_info(key) {
                        Some((info, age)) => match store.lease_stale_reason(key) {
                            Some(why) => (
                                "stale".to_string(),
                                format!(
                                    "a lease of pid {} on {} that nothing holds: {why} (the next run breaks it)",
                                    info.pid, info.host
                                ),
                            ),
                            None => (
                                "running".to_string(),
                                format!(
                                    "by {} pid {} on {} (heartbeat {:.0}s ago)",
                                    if info.holder.is_empty() {
                                        "?"
                                    } else {
                                        &info.holder
                                    },
                                    info.pid,
                                    info.host,
                                    age.as_secs_f64()
                                ),
                            ),
                        },
                        None => (
                            "missing".to_string(),
                            items
                                .map(|(t, c)| format!("{c}/{t} items cached"))
                                .unwrap_or_default(),
                        ),
                    },
                    StageStatus::WillRun { key: None, .. } => {
                        ("pending".to_string(), "upstream not computed".to_string())
                    }
                };
                let (status, details) = match jobs.get(&s.name) {
                    Some((st, d)) if status != "cached" => (st.clone(), format!("{d} {details}")),
                    _ => (status, details),
                };
                let last = history
                    .stages
                    .get(&s.name)
                    .map(|h| format!(" last key {}", h.key.short()))
                    .unwrap_or_default();
                println!(
                    "{:<24} {:<14} {:<14} {details}{}",
                    s.name,
                    s.kind,
                    status,
                    if status == "cached" {
                        String::new()
                    } else {
                        last
                    }
                );
            }
            Ok(0)
        }
        Command::Show(ShowArgs {
            pipeline,
            stage,
            log,
            cache,
        }) => {
            let p = load(&pipeline, &registry)?;
            let store = existing_store(
                &Some(pipeline.clone()),
                &CacheArg {
                    cache: Some(cache_dir(&p, &cache)),
                },
                &registry,
            )?;
            let obj = stage_object(&p, &store, &stage)?;
            println!("stage    {stage} ({})", obj.manifest.provenance.kind);
            println!("key      {}", obj.key());
            println!("object   {}", obj.dir.display());
            println!("size     {}", human_bytes(obj.manifest.total_bytes()));
            println!("outputs");
            for (name, out) in &obj.manifest.outputs {
                let bytes: u64 = out.files.values().map(|f| f.size).sum();
                println!(
                    "  {name:<16} {} files, {}, digest {}  {}",
                    out.files.len(),
                    human_bytes(bytes),
                    out.digest.short(),
                    obj.output_dir(name).display()
                );
            }
            if let Ok(m) = std::fs::read_to_string(obj.meta_path("metrics.json")) {
                let v: serde_json::Value = serde_json::from_str(&m).unwrap_or_default();
                if v.as_object().is_some_and(|o| !o.is_empty()) {
                    println!("metrics");
                    for (k, v) in v.as_object().unwrap() {
                        println!("  {k:<24} {v}");
                    }
                }
            }
            if let Ok(r) = std::fs::read_to_string(obj.meta_path("record.json")) {
                let v: serde_json::Value = serde_json::from_str(&r).unwrap_or_default();
                println!(
                    "run      {} on {} ({}), {:.2}s, peak RSS {}",
                    v["started"].as_str().unwrap_or("?"),
                    v["host"].as_str().unwrap_or("?"),
                    v["device"].as_str().unwrap_or("?"),
                    v["wall_seconds"].as_f64().unwrap_or(0.0),
                    human_bytes(v["peak_rss_bytes"].as_u64().unwrap_or(0))
                );
            }
            let log_path = obj.meta_path("log.txt");
            println!("log      {}", log_path.display());
            if log {
                print!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            Ok(0)
        }
        Command::Export(ExportArgs {
            pipeline,
            stage,
            to,
            cache,
        }) => {
            let p = load(&pipeline, &registry)?;
            let store = existing_store(
                &Some(pipeline.clone()),
                &CacheArg {
                    cache: Some(cache_dir(&p, &cache)),
                },
                &registry,
            )?;
            let obj = stage_object(&p, &store, &stage)?;
            let def = p.stage(&stage).expect("stage exists");
            let mut written = 0;
            for out in def.kind.outputs() {
                let dirs: Vec<(String, PathBuf)> = if out.ty.collection {
                    meduet_engine::collection::read_items(&store, &obj.dir, out.name)
                        .map_err(anyhow::Error::msg)?
                        .into_iter()
                        .map(|it| (it.id, it.dir))
                        .collect()
                } else {
                    vec![(out.name.to_string(), obj.output_dir(out.name))]
                };
                for (name, dir) in dirs {
                    let has_volume = std::fs::read_dir(&dir)
                        .map(|d| {
                            d.filter_map(|e| e.ok())
                                .any(|e| e.path().extension().is_some_and(|x| x == "zarr"))
                        })
                        .unwrap_or(false);
                    if !has_volume {
                        continue;
                    }
                    match meduet_stages::data::export::export_volume_item(&dir, &to.join(&name)) {
                        Ok(files) => written += files.len(),
                        Err(e) => bail!("cannot export '{name}' of stage '{stage}': {e}"),
                    }
                }
            }
            if written == 0 {
                bail!(
                    "stage '{stage}' ({}) has no volume or label outputs to export",
                    def.kind.kind()
                );
            }
            println!("wrote {written} NIfTI file(s) under {}", to.display());
            Ok(0)
        }
        Command::Gc(GcArgs {
            pipeline,
            dry_run,
            cache,
        }) => {
            let store = existing_store(&pipeline, &cache, &registry)?;
            let r = store.gc(dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            println!("{} rooted objects kept; {verb} {} object(s), {} scratch, {} temporary and {} job log folder(s): {}", r.kept_objects, r.removed_objects.len(), r.removed_scratch.len(), r.removed_tmp.len(), r.removed_logs.len(), human_bytes(r.bytes));
            for (stage, (n, bytes)) in &r.removed_by_stage {
                println!("  {stage:<24} {n:>6} object(s) {:>12}", human_bytes(*bytes));
            }
            Ok(0)
        }
        Command::Verify(VerifyArgs {
            pipeline,
            dry_run,
            cache,
        }) => {
            let store = existing_store(&pipeline, &cache, &registry)?;
            let r = store.verify(dry_run)?;
            println!(
                "verified {} object(s), {} file(s), {}",
                r.objects,
                r.files,
                human_bytes(r.bytes)
            );
            for c in &r.corrupt {
                println!("CORRUPT {} (stage '{}'):", c.key.short(), c.stage);
                for p in &c.problems {
                    println!("  {p}");
                }
                if let Some(q) = &c.quarantined_to {
                    println!(
                        "  quarantined to {} (the next run recomputes it)",
                        q.display()
                    );
                }
            }
            Ok(if r.corrupt.is_empty() { 0 } else { 1 })
        }
        Command::Pin(PinArgs {
            pipeline,
            name,
            cache,
        }) => {
            let p = load(&pipeline, &registry)?;
            let store = existing_store(
                &Some(pipeline.clone()),
                &CacheArg {
                    cache: Some(cache_dir(&p, &cache)),
                },
                &registry,
            )?;
            let h = load_history(&store, &p);
            let name = name.unwrap_or_else(|| p.name.clone());
            if name.trim().is_empty() {
                bail!(
                    "--name must not be empty: it names the pin (a file under '{}')",
                    store.root().join("pins").display()
                );
            }
            store.pin(&name, &h.keys)?;
            println!("pinned {} object(s) as '{name}'", h.keys.len());
            Ok(0)
        }
        Command::Doctor(DoctorArgs { pipeline, cache }) => {
            doctor(&pipeline, &cache, &registry)?;
            Ok(0)
        }
        Command::Hash(HashArgs { paths, cache }) => {
            let memo = match &cache.cache {
                Some(c) => Some(open_store(c)?.memo()),
                None => None,
            };
            for path in paths {
                let t0 = std::time::Instant::now();
                let digest = if path.is_dir() {
                    meduet_cache::hash_tree(&path, memo.as_ref())
                        .with_context(|| format!("cannot hash '{}'", path.display()))?
                        .1
                } else {
                    match &memo {
                        Some(m) => {
                            m.digest(&path)
                                .with_context(|| format!("cannot hash '{}'", path.display()))?
                                .0
                        }
                        None => meduet_cache::hash_file(&path)
                            .with_context(|| format!("cannot hash '{}'", path.display()))?,
                    }
                };
                tracing::debug!(
                    "hashed '{}' in {:.3} ms",
                    path.display(),
                    t0.elapsed().as_secs_f64() * 1e3
                );
                println!("{digest}  {}", path.display());
            }
            Ok(0)
        }
        Command::Kinds(KindsArgs { kind }) => {
            kinds(&registry, kind.as_deref())?;
            Ok(0)
        }
        Command::Cancel(CancelArgs { pipeline, cache }) => {
            let p = load(&pipeline, &registry)?;
            crate::slurm_cmds::cancel(&p, &cache_dir(&p, &cache))
        }
        Command::ExecStage(ExecStageArgs {
            spec,
            cache,
            item_index,
            pipeline,
            stage,
        }) => {
            let spec = match (spec, pipeline, stage) {
                (Some(s), _, _) => s,
                (None, Some(pf), Some(stage)) => {
                    let p = load(&pf, &registry)?;
                    let dir = cache.clone().unwrap_or_else(|| p.cache_dir.clone());
                    match crate::slurm_cmds::plan_stage_spec(&p, &dir, &stage)? {
                        Some(s) => s,
                        None => return Ok(0),
                    }
                }
                _ => bail!("give --spec SPEC, or --pipeline FILE --stage NAME"),
            };
            let spec_path = spec
                .canonicalize()
                .with_context(|| format!("spec '{}' not found", spec.display()))?;
            let dir = meduet_engine::exec_stage::spec_cache(&spec_path, cache);
            let store = Store::open_existing(&dir)
                .with_context(|| format!("'{}' is not a meduet cache", dir.display()))?;
            let env = env_for(store.clone(), &multi);
            let cancel = env.cancel.clone();
            let _ = ctrlc::set_handler(move || cancel.cancel());
            match meduet_engine::exec_stage::exec_stage_item(
                &spec_path,
                item_index,
                store,
                &registry,
                &env,
                &cuda_devices,
            )? {
                meduet_engine::exec_stage::ExecStage::Delegate(worker) => Err(
                    meduet_engine::exec_stage::delegate_item(worker, &spec_path, &dir, item_index)
                        .into(),
                ),
                meduet_engine::exec_stage::ExecStage::Done(ex) => {
                    println!(
                        "{} {}",
                        if ex.computed { "computed" } else { "cached" },
                        ex.object.dir.display()
                    );
                    Ok(0)
                }
            }
        }
    }
}

struct TempDirGuard(PathBuf);
impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stage_object(p: &Pipeline, store: &Store, stage: &str) -> Result<meduet_cache::Object> {
    let i = p
        .index_of(stage)
        .with_context(|| format!("no stage named '{stage}' (stages: {})", p.stage_names()))?;
    let planned = plan(p, store, &p.ancestors_of(i), &[], &cuda_visible)?;
    match planned.iter().find(|s| s.name == stage).map(|s| &s.status) {
        Some(StageStatus::Cached { key }) => Ok(store.load(key)?.expect("cached object exists")),
        _ => bail!("stage '{stage}' has no object for the current pipeline yet (run 'meduet run {} --only {stage}')", p.file.display()),
    }
}

/// Exit status of `plan` when the plan is complete but some input files are missing
/// (a validation error exits with 2).
pub const EXIT_MISSING_FILES: i32 = 3;

/// After a plan: the list of missing input files of the selected stages (on stdout below
/// the plan, on stderr when stdout is machine-readable), and the exit status.
fn report_missing_files(p: &Pipeline, selected: &[usize], to_stderr: bool) -> i32 {
    let missing: Vec<_> = p.missing_files_of(selected).into_iter().cloned().collect();
    if missing.is_empty() {
        return 0;
    }
    let report = meduet_engine::pipeline::missing_files_report(&missing);
    if to_stderr {
        eprintln!("{report}");
    } else {
        println!("\n{report}");
    }
    EXIT_MISSING_FILES
}

fn print_plan(planned: &[meduet_engine::plan::PlannedStage], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(planned).expect("plan serializes")
        );
        return;
    }
    let cached = planned.iter().filter(|s| s.status.is_cached()).count();
    for s in planned {
        match &s.status {
            StageStatus::Cached { key } => {
                println!("  cached    {:<24} {:<16} {}", s.name, s.kind, key.short())
            }
            StageStatus::WillRun {
                key,
                reasons,
                items,
            } => {
                let k = key.map(|k| k.short()).unwrap_or_else(|| "?".repeat(12));
                let it = items
                    .map(|(t, c)| format!(" ({c} of {t} items cached)"))
                    .unwrap_or_default();
                println!("  will run  {:<24} {:<16} {k}{it}", s.name, s.kind);
                for r in reasons {
                    println!("              because {r}");
                }
            }
        }
    }
    println!("{cached} of {} stage(s) cached", planned.len());
}

pub(crate) fn print_summary(p: &Pipeline, store: &Store, summary: &meduet_engine::RunSummary) {
    let computed = summary.computed().len();
    let cached = summary.cached().len();
    // Time saved: what the cached objects took when they were computed.
    let mut saved = 0.0;
    let mut by_stage: HashMap<&str, &Outcome> = HashMap::new();
    for (n, o) in &summary.stages {
        by_stage.insert(n.as_str(), o);
        if let Outcome::Cached { key } | Outcome::Reused { key } = o {
            if let Ok(text) = std::fs::read_to_string(store.object_dir(key).join("record.json")) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                saved += v["wall_seconds"].as_f64().unwrap_or(0.0);
            }
        }
    }
    eprintln!(
        "done in {:.1}s: {computed} stage(s) computed, {cached} cached (saving about {:.1}s)",
        summary.wall_seconds, saved
    );
    // Where the final results are: outputs of stages nothing else consumes.
    let consumed: std::collections::HashSet<&str> = p
        .stages
        .iter()
        .flat_map(|s| s.inputs.values().flatten().map(|r| r.stage.as_str()))
        .collect();
    for s in &p.stages {
        if consumed.contains(s.name.as_str()) {
            continue;
        }
        if let Some(
            Outcome::Cached { key } | Outcome::Computed { key, .. } | Outcome::Reused { key },
        ) = by_stage.get(s.name.as_str())
        {
            for out in s.kind.outputs() {
                println!(
                    "{}.{}: {}",
                    s.name,
                    out.name,
                    store.object_dir(key).join("out").join(out.name).display()
                );
            }
        }
    }
}

/// The CUDA devices of this machine: `MEDUET_CUDA_DEVICES` (comma-separated indices, empty
/// for none) when set, else asked from the libtorch worker once per process (one worker
/// start; only when a stage that may use a GPU has to run or be keyed).
pub(crate) fn cuda_devices() -> Vec<usize> {
    static DEVICES: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    DEVICES
        .get_or_init(|| match std::env::var("MEDUET_CUDA_DEVICES") {
            Ok(list) => list
                .split(',')
                .filter_map(|d| d.trim().parse().ok())
                .collect(),
            Err(_) => worker_cuda_devices(),
        })
        .clone()
}

/// Whether a stage planned here would get a CUDA device (for the keys of stages whose
/// bytes depend on the device class).
pub(crate) fn cuda_visible(_: &meduet_engine::StageDef) -> bool {
    !cuda_devices().is_empty()
}

fn worker_cuda_devices() -> Vec<usize> {
    let Ok(bin) = meduet_engine::worker::worker_binary("meduet-torch") else {
        return Vec::new();
    };
    match std::process::Command::new(bin).arg("devices").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
        _ => Vec::new(),
    }
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn free_disk(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(p.to_string_lossy().as_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct for a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}

fn doctor(pipeline: &Option<PathBuf>, cache: &CacheArg, registry: &Registry) -> Result<()> {
    let v = versions();
    println!(
        "meduet        {} (commit {})",
        v.meduet,
        v.git_commit.as_deref().unwrap_or("unknown")
    );
    println!(
        "cores         {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    match meduet_engine::worker::worker_binary("meduet-torch") {
        Ok(bin) => match std::process::Command::new(&bin).arg("doctor").output() {
            Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Ok(o) => println!(
                "torch         worker '{}' failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => println!("torch         cannot run worker '{}': {e}", bin.display()),
        },
        Err(e) => println!("torch         {e}"),
    }
    let dir = match (&cache.cache, pipeline) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(p)) => Some(load(p, registry)?.cache_dir),
        (None, None) => None,
    };
    match dir {
        Some(d) => {
            let exists = Store::open_existing(&d).is_some();
            println!(
                "cache         {}{}",
                d.display(),
                if exists { "" } else { " (not created yet)" }
            );
            if let Some(free) = free_disk(&d) {
                println!("free disk     {}", human_bytes(free));
            }
        }
        None => {
            println!("cache         (give a pipeline file or --cache to check one; default: .meduet/ beside the pipeline file)");
            if let Some(free) = free_disk(&std::env::current_dir()?) {
                println!("free disk     {} (current folder)", human_bytes(free));
            }
        }
    }
    println!("stage kinds   {}", registry.names().join(", "));
    Ok(())
}

fn kinds(registry: &Registry, kind: Option<&str>) -> Result<()> {
    match kind {
        None => {
            for k in registry.iter() {
                let fanout = if k.map_over().is_some() {
                    " [per item]"
                } else {
                    ""
                };
                println!("{:<18} v{:<3} {}{fanout}", k.kind(), k.version(), k.about());
            }
        }
        Some(name) => {
            let k = registry.get(name).with_context(|| {
                format!(
                    "unknown stage kind '{name}' (known kinds: {})",
                    registry.names().join(", ")
                )
            })?;
            println!("{} (version {}): {}", k.kind(), k.version(), k.about());
            println!("inputs:");
            for i in k.inputs() {
                println!("  {:<16} {} ({:?}) {}", i.name, i.ty, i.arity, i.doc);
            }
            println!("outputs:");
            for o in k.outputs() {
                println!("  {:<16} {} {}", o.name, o.ty, o.doc);
            }
            let r = k.default_resources();
            println!(
                "default resources: threads = {}, device = \"{}\"",
                r.threads, r.device
            );
            match k.resolve_params(toml::Table::new()) {
                Ok(v) => println!("default parameters:\n{}", serde_json::to_string_pretty(&v)?),
                Err((p, m)) => {
                    println!("parameters: required parameter(s) without default ({p}: {m})")
                }
            }
        }
    }
    Ok(())
}
