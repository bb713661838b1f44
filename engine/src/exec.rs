//! Executing one stage: prepare its key, take its lease, run it, commit atomically.
//!
//! This is the single code path behind the local scheduler and `meduet exec-stage`
//! (which cluster schedulers call). It is idempotent: if the object exists it returns at
//! once; if another process holds the lease it waits and reuses the result. A stage that
//! fails, is cancelled, or finds that a source file changed while it ran commits nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use meduet_cache::{
    Acquired, ContentDigest, LeaseOptions, LiveRoot, Object, Provenance, RunRecord, RunStatus,
    StageKey, Store, Versions,
};
use rayon::prelude::*;

use crate::collection::{self, Item, ItemEntry, ItemLocation, Refs};
use crate::error::{EngineError, StageError};
use crate::fingerprint::{Fingerprint, KEY_SCHEMA_VERSION};
use crate::locator::Locator;
use crate::logging::{enter_sink, LogSink};
use crate::params::{
    map_sources, resolve_source, source_key_value, source_runtime_value, SourceTree,
};
use crate::pipeline::StageDef;
use crate::progress::Reporter;
use crate::registry::DynStage;
use crate::resources::Device;
use crate::stage::{CancelFlag, InputArtifact, StageContext};

/// Called on every thread that runs stage code, with the stage's thread count (the
/// binary uses it to set libtorch's intra-op threads).
pub type ThreadHook = Arc<dyn Fn(usize) + Send + Sync>;

/// What every execution needs from its surroundings.
#[derive(Clone)]
pub struct ExecEnv {
    pub store: Store,
    pub cancel: CancelFlag,
    pub progress: Reporter,
    pub versions: Versions,
    pub lease: LeaseOptions,
    pub thread_hook: Option<ThreadHook>,
    /// This process's live root: keys are recorded in it before their objects are looked
    /// up, so `gc` keeps what a running pipeline uses ([`meduet_cache::live`]).
    pub live: Option<Arc<LiveRoot>>,
}

impl ExecEnv {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cancel: CancelFlag::new(),
            progress: Reporter::hidden(),
            versions: Versions::default(),
            lease: LeaseOptions::default(),
            thread_hook: None,
            live: None,
        }
    }

    /// With a live root of its own (unless it has one): what a process that runs stages
    /// holds for as long as it runs them.
    pub fn with_live_root(&self, holder: &str) -> Result<Self, EngineError> {
        let mut env = self.clone();
        if env.live.is_none() {
            env.live = Some(Arc::new(self.store.start_live_root(holder)?));
        }
        Ok(env)
    }

    /// Records `keys` in the live root (if any) before their objects are looked up.
    pub fn protect(&self, keys: impl IntoIterator<Item = StageKey>) -> meduet_cache::Result<()> {
        if let Some(l) = &self.live {
            l.protect(keys)?;
        }
        Ok(())
    }
}

/// A stage ready to execute: its key is known.
#[derive(Clone)]
pub struct Prepared {
    pub stage: String,
    pub kind: Arc<dyn DynStage>,
    pub fingerprint: Fingerprint,
    pub key: StageKey,
    /// Parameters as the stage sees them (sources as absolute paths).
    pub runtime_params: serde_json::Value,
    /// Resolved sources, by their runtime path.
    pub sources: BTreeMap<PathBuf, SourceTree>,
    pub inputs: BTreeMap<String, Vec<InputArtifact>>,
    /// Content digest -> path of every file the stage's ancestors saw: their source
    /// files and the files of their objects (see [`StageContext::locate`]).
    pub locator: Arc<Locator>,
    /// What the locator was built from (ancestor source paths, ancestor object keys), so
    /// an exec spec can rebuild it.
    pub locator_roots: (Vec<PathBuf>, Vec<StageKey>),
}

impl Prepared {
    pub fn locator_source_paths(&self) -> Vec<PathBuf> {
        self.locator_roots.0.clone()
    }
    pub fn locator_object_keys(&self) -> Vec<StageKey> {
        self.locator_roots.1.clone()
    }
}

/// Resolves a stage's source paths (hashing through the memo). Returns the runtime
/// parameters, the key parameters and the trees.
pub fn resolve_stage_sources(
    def: &StageDef,
    store: &Store,
) -> Result<
    (
        serde_json::Value,
        serde_json::Value,
        BTreeMap<PathBuf, SourceTree>,
    ),
    EngineError,
> {
    let memo = store.memo();
    let mut trees: BTreeMap<String, SourceTree> = BTreeMap::new();
    let mut runtime_of: BTreeMap<String, PathBuf> = BTreeMap::new();
    for s in &def.sources {
        let tree = resolve_source(&s.raw, &s.base, &memo).map_err(|m| {
            crate::error::PipelineError::Param {
                at: def.at.clone(),
                stage: def.name.clone(),
                param: s.param.clone(),
                message: m,
            }
        })?;
        let runtime = if s.raw.contains(['*', '?', '[']) {
            let p = std::path::Path::new(&s.raw);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                s.base.join(p)
            }
        } else {
            tree.root.clone()
        };
        runtime_of.insert(s.raw.clone(), runtime);
        trees.insert(s.raw.clone(), tree);
    }
    let runtime = map_sources(&def.params, &|raw| source_runtime_value(&runtime_of[raw]));
    let key = map_sources(&def.params, &|raw| source_key_value(&trees[raw]));
    let by_runtime = trees
        .into_iter()
        .map(|(raw, t)| (runtime_of[&raw].clone(), t))
        .collect();
    Ok((runtime, key, by_runtime))
}

/// Builds the input artifact for output `output` of `object`.
pub fn input_artifact(
    store: &Store,
    stage: &str,
    output: &str,
    ty: crate::stage::ArtifactType,
    object: &Object,
) -> Result<InputArtifact, EngineError> {
    let entry = object.manifest.outputs.get(output).ok_or_else(|| {
        EngineError::Other(format!(
            "object {} of stage '{stage}' has no output '{output}'",
            object.key().short()
        ))
    })?;
    let items = if ty.collection {
        collection::read_items(store, &object.dir, output).map_err(EngineError::Other)?
    } else {
        Vec::new()
    };
    Ok(InputArtifact {
        stage: stage.to_string(),
        output: output.to_string(),
        ty,
        key: object.key(),
        digest: entry.digest,
        dir: object.output_dir(output),
        items,
    })
}

/// Computes the fingerprint and key of a stage from its resolved inputs. `cuda_visible`
/// says whether a stage would get a CUDA device where it runs; it is asked only for a
/// stage with `device = "auto"` whose bytes depend on the device class.
pub fn prepare(
    def: &StageDef,
    store: &Store,
    inputs: BTreeMap<String, Vec<InputArtifact>>,
    cuda_visible: &dyn Fn(&StageDef) -> bool,
) -> Result<Prepared, EngineError> {
    let (runtime_params, key_params, sources) = resolve_stage_sources(def, store)?;
    let fingerprint = Fingerprint {
        schema: KEY_SCHEMA_VERSION,
        kind: def.kind.kind().to_string(),
        kind_version: def.kind.version(),
        params: key_params,
        resolved: def.kind.resolved(&def.params),
        code: def
            .kind
            .code_versions()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().map(|a| a.digest).collect()))
            .collect(),
        device_class: def
            .kind
            .device_dependent(&def.params)
            .then(|| def.resources.device.class(&|| cuda_visible(def))),
        item: None,
    };
    let key = fingerprint.key();
    Ok(Prepared {
        stage: def.name.clone(),
        kind: def.kind.clone(),
        fingerprint,
        key,
        runtime_params,
        sources,
        inputs,
        locator: Arc::new(Locator::new()),
        locator_roots: Default::default(),
    })
}

/// What an execution did.
#[derive(Debug)]
pub struct Executed {
    pub object: Object,
    /// False when the object already existed or another process computed it.
    pub computed: bool,
    pub items_total: usize,
    pub items_computed: usize,
    pub wall_seconds: f64,
}

struct Common<'a> {
    env: &'a ExecEnv,
    p: &'a Prepared,
    device: Device,
    threads: usize,
    /// The log of the whole stage, shared by every thread of its pool.
    stage_sink: Arc<LogSink>,
}

fn new_context(
    c: &Common,
    object_dir: PathBuf,
    scratch: PathBuf,
    item: Option<Item>,
) -> StageContext {
    let item_attrs = item.as_ref().map(|i| i.attrs.clone()).unwrap_or_default();
    StageContext {
        stage: c.p.stage.clone(),
        kind: c.p.kind.kind(),
        inputs: c.p.inputs.clone(),
        sources: c.p.sources.clone(),
        locator: c.p.locator.clone(),
        object_dir,
        scratch,
        device: c.device,
        threads: c.threads,
        cancel: c.env.cancel.clone(),
        progress: c.env.progress.clone(),
        metrics: serde_json::Map::new(),
        item,
        item_attrs,
        emitted: BTreeMap::new(),
        outputs: c.p.kind.outputs(),
    }
}

fn record(
    c: &Common,
    key: StageKey,
    item: Option<&str>,
    started: u64,
    t0: Instant,
    status: RunStatus,
    error: Option<String>,
    outputs: BTreeMap<String, ContentDigest>,
    metrics: serde_json::Value,
) -> RunRecord {
    RunRecord {
        stage: c.p.stage.clone(),
        kind: c.p.kind.kind().to_string(),
        kind_version: c.p.kind.version(),
        key,
        item: item.map(str::to_string),
        params: c.p.fingerprint.params.clone(),
        inputs: c.p.fingerprint.inputs.clone(),
        outputs,
        versions: c.env.versions.clone(),
        host: meduet_cache::lease::host_name(),
        pid: std::process::id(),
        device: c.device.to_string(),
        threads: c.threads,
        seed: c.p.kind.seed(&c.p.runtime_params),
        started: meduet_cache::records::rfc3339_utc(started),
        wall_seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: meduet_cache::records::peak_rss_bytes(),
        status,
        error,
        metrics,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_json(path: &std::path::Path, v: &impl serde::Serialize) -> Result<(), StageError> {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("serializable"))
        .map_err(|e| StageError::io(path, e))
}

/// Runs `body` under a lease and commits what it writes; shared by whole stages and items.
fn compute_object(
    c: &Common,
    key: StageKey,
    item: Option<Item>,
    body: &dyn Fn(&mut StageContext) -> Result<(), StageError>,
    finish: &dyn Fn(&mut StageContext, &std::path::Path) -> Result<(), StageError>,
) -> Result<(Object, bool), StageError> {
    let store = &c.env.store;
    let holder = match &item {
        Some(i) => format!("{}[{}]", c.p.stage, i.id),
        None => c.p.stage.clone(),
    };
    let _lease =
        match store.acquire_or_wait(&key, &holder, c.env.lease, &|| c.env.cancel.is_cancelled())? {
            Acquired::ObjectReady => {
                return Ok((
                    store
                        .load(&key)?
                        .ok_or_else(|| StageError::failed("object vanished after commit"))?,
                    false,
                ))
            }
            Acquired::Lease(g) => g,
        };
    let started = now_unix();
    let t0 = Instant::now();
    // Room for the run record, so that a failure on a full disk is still recorded.
    let mut reserve = store.reserve_run_record(&key);
    let staging = store.stage(key)?;
    let log_path = staging.dir().join("log.txt");
    let sink = match &item {
        None => {
            c.stage_sink
                .set_path(&log_path)
                .map_err(|e| StageError::io(&log_path, e))?;
            c.stage_sink.clone()
        }
        Some(_) => LogSink::create(&log_path).map_err(|e| StageError::io(&log_path, e))?,
    };
    let _g = enter_sink(Some(sink));
    let scratch = store.root().join("scratch").join(key.to_hex());
    let item_id = item.as_ref().map(|i| i.id.clone());
    let mut ctx = new_context(c, staging.dir().to_path_buf(), scratch, item);
    tracing::debug!(key = %key.short(), "computing {holder} ({} v{}) on {} with {} thread(s)", c.p.kind.kind(), c.p.kind.version(), c.device, c.threads);
    let result = body(&mut ctx)
        .and_then(|_| finish(&mut ctx, staging.dir()))
        .and_then(|_| check_sources_unchanged(c.p, store));
    let metrics = serde_json::Value::Object(ctx.metrics.clone());
    match result {
        Ok(()) => {
            write_json(&staging.dir().join("metrics.json"), &metrics)?;
            let mut rec = record(
                c,
                key,
                item_id.as_deref(),
                started,
                t0,
                RunStatus::Succeeded,
                None,
                BTreeMap::new(),
                metrics.clone(),
            );
            write_json(&staging.dir().join("record.json"), &rec)?;
            let obj = staging.commit(Provenance {
                stage: c.p.stage.clone(),
                kind: c.p.kind.kind().to_string(),
                item: item_id.clone(),
            })?;
            rec.outputs = obj
                .manifest
                .outputs
                .iter()
                .map(|(k, v)| (k.clone(), v.digest))
                .collect();
            rec.wall_seconds = t0.elapsed().as_secs_f64();
            store.write_run_record_reserved(&rec, &mut reserve)?;
            Ok((obj, true))
        }
        Err(e) => {
            let status = if matches!(e, StageError::Cancelled) {
                RunStatus::Cancelled
            } else {
                RunStatus::Failed
            };
            tracing::error!("{holder} failed: {e}");
            let rec = record(
                c,
                key,
                item_id.as_deref(),
                started,
                t0,
                status,
                Some(e.to_string()),
                BTreeMap::new(),
                metrics,
            );
            // The partial output goes first: on a full disk it is what filled it.
            drop(_g);
            drop(ctx);
            drop(staging);
            if let Err(w) = store.write_run_record_reserved(&rec, &mut reserve) {
                tracing::error!("the run record of {holder} could not be written: {w}");
            }
            Err(e)
        }
    }
}

fn check_sources_unchanged(p: &Prepared, store: &Store) -> Result<(), StageError> {
    let memo = store.memo();
    for (runtime, tree) in &p.sources {
        let again = resolve_source(&runtime.to_string_lossy(), std::path::Path::new("/"), &memo)
            .map_err(StageError::input)?;
        if again.digest != tree.digest {
            return Err(StageError::input(format!("source '{}' changed while the stage ran (its content digest differs from the one in the key); nothing was committed", runtime.display())));
        }
    }
    Ok(())
}

fn emitted_finish(ctx: &mut StageContext, dir: &std::path::Path) -> Result<(), StageError> {
    for out in ctx.outputs.clone() {
        if !out.ty.collection {
            continue;
        }
        let out_dir = dir.join(meduet_cache::store::OUT_DIR).join(out.name);
        let emitted = ctx.emitted.remove(out.name).unwrap_or_default();
        let entries = emitted
            .into_par_iter()
            .map(|(id, attrs)| {
                let idir = out_dir.join(collection::ITEMS_DIR).join(&id);
                let (_, digest) =
                    meduet_cache::hash_tree(&idir, None).map_err(|e| StageError::io(&idir, e))?;
                Ok(ItemEntry { id, attrs, digest })
            })
            .collect::<Result<Vec<_>, StageError>>()?;
        collection::write_items(&out_dir, &entries).map_err(|e| StageError::io(&out_dir, e))?;
    }
    Ok(())
}

/// The key of the object holding an item folder (`objects/<key>/...`).
fn item_object_key(store: &Store, dir: &std::path::Path) -> Option<meduet_cache::StageKey> {
    let rel = dir.strip_prefix(store.root().join("objects")).ok()?;
    let first = rel.components().next()?;
    meduet_cache::StageKey::parse_hex(&first.as_os_str().to_string_lossy()).ok()
}

/// Checks, before a stage reads them, that its input objects (and, for collections, the
/// objects holding their items) still match their manifests. A corrupt object is
/// quarantined, so the next run recomputes it, and the stage fails naming it: nothing is
/// ever computed from bytes that are not the ones its key promises. `only_item`
/// (`(input, item id)`, one task of a job array) limits the mapped input's items to one.
pub fn check_inputs(
    store: &Store,
    p: &Prepared,
    only_item: Option<(&str, &str)>,
) -> Result<(), StageError> {
    for (name, a) in p
        .inputs
        .iter()
        .flat_map(|(n, v)| v.iter().map(move |a| (n, a)))
    {
        let mut objects: Vec<(meduet_cache::StageKey, Option<&str>)> =
            vec![(a.key, Some(a.output.as_str()))];
        let wanted = |id: &str| match only_item {
            Some((input, item)) if input == name.as_str() => id == item,
            _ => true,
        };
        for it in a.items.iter().filter(|it| wanted(&it.id)) {
            if let Some(k) = item_object_key(store, &it.dir) {
                if !objects.iter().any(|(o, _)| *o == k) {
                    objects.push((k, None));
                }
            }
        }
        for (key, output) in objects {
            let problem = match store.load(&key)? {
                None => "its object is gone or lacks files".to_string(),
                Some(obj) => match store.check_files(&obj, output) {
                    Ok(()) => continue,
                    Err(why) => why,
                },
            };
            let moved = match store.quarantine(&key) {
                Ok(q) => format!("; object {} was moved to '{}'", key.short(), q.display()),
                Err(_) => String::new(),
            };
            return Err(StageError::input(format!(
                "input '{}.{}' does not match its manifest: {problem}{moved}; run again to recompute it",
                a.stage, a.output
            )));
        }
    }
    Ok(())
}

/// Executes a prepared stage on `device` with `threads` threads. With `force`, an
/// existing object is discarded first.
pub fn execute(
    env: &ExecEnv,
    p: &Prepared,
    device: Device,
    threads: usize,
    force: bool,
) -> Result<Executed, StageError> {
    let t0 = Instant::now();
    let store = &env.store;
    env.protect([p.key])?;
    if force && store.contains(&p.key) {
        let q = store.quarantine(&p.key)?;
        let _ = std::fs::remove_dir_all(q);
    }
    if store.contains(&p.key) {
        let object = store.load(&p.key)?.expect("exists");
        return Ok(Executed {
            object,
            computed: false,
            items_total: 0,
            items_computed: 0,
            wall_seconds: t0.elapsed().as_secs_f64(),
        });
    }
    check_inputs(store, p, None)?;
    let threads = threads.max(1);
    let stage_sink = LogSink::deferred();
    let sink = Some(stage_sink.clone());
    let hook = env.thread_hook.clone();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("meduet-stage-{i}"))
        .start_handler(move |_| {
            std::mem::forget(enter_sink(sink.clone()));
            if let Some(h) = &hook {
                h(threads);
            }
        })
        .build()
        .map_err(|e| StageError::failed(format!("cannot build a thread pool of {threads}: {e}")))?;
    let c = Common {
        env,
        p,
        device,
        threads,
        stage_sink,
    };
    pool.install(|| match p.kind.map_over() {
        None => {
            let (object, computed) = compute_object(
                &c,
                p.key,
                None,
                &|ctx| p.kind.run(&p.runtime_params, ctx),
                &emitted_finish,
            )?;
            Ok(Executed {
                object,
                computed,
                items_total: 0,
                items_computed: 0,
                wall_seconds: t0.elapsed().as_secs_f64(),
            })
        }
        Some(map_input) => execute_mapped(&c, map_input, t0, force),
    })
}

fn execute_mapped(
    c: &Common,
    map_input: &str,
    t0: Instant,
    force: bool,
) -> Result<Executed, StageError> {
    let p = c.p;
    let items = mapped_items(p, map_input);
    {
        let mut ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        ids.sort();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(StageError::input(format!(
                "input '{map_input}' has two items with id '{}'",
                w[0]
            )));
        }
    }
    let bar = c
        .env
        .progress
        .bar(items.len() as u64, &format!("{} items", p.stage));
    let computed_count = std::sync::atomic::AtomicUsize::new(0);
    let one = |item: &Item| -> Result<(Object, BTreeMap<String, serde_json::Value>), StageError> {
        let (obj, computed) = compute_item(c, map_input, item, force)?;
        if computed {
            computed_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let ikey = obj.key();
        bar.inc(1);
        let meta_path = obj.meta_path("item.json");
        let meta: serde_json::Value = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                StageError::failed(format!(
                    "item object {} has no readable item.json",
                    ikey.short()
                ))
            })?;
        let attrs = serde_json::from_value(meta["attrs"].clone()).unwrap_or_default();
        Ok((obj, attrs))
    };
    let results: Vec<(
        String,
        Result<(Object, BTreeMap<String, serde_json::Value>), StageError>,
    )> = if p.kind.parallel_items() {
        items.par_iter().map(|i| (i.id.clone(), one(i))).collect()
    } else {
        items.iter().map(|i| (i.id.clone(), one(i))).collect()
    };
    bar.finish_and_clear();
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for (id, r) in results {
        match r {
            Ok(x) => done.push((id, x)),
            Err(StageError::Cancelled) => return Err(StageError::Cancelled),
            Err(e) => failures.push(format!("item '{id}': {e}")),
        }
    }
    if !failures.is_empty() {
        let n = failures.len();
        failures.truncate(5);
        return Err(StageError::failed(format!(
            "{n} of {} item(s) failed ({} computed item(s) are kept in the cache): {}",
            items.len(),
            done.len(),
            failures.join("; ")
        )));
    }
    let items_computed = computed_count.load(std::sync::atomic::Ordering::Relaxed);
    // The cohort object: items.json per output, and the item locations.
    let body = |_ctx: &mut StageContext| Ok(());
    let finish = |ctx: &mut StageContext, dir: &std::path::Path| {
        let mut refs = Refs::default();
        for out in &ctx.outputs {
            let mut entries = Vec::new();
            let mut locs = BTreeMap::new();
            for (id, (obj, attrs)) in &done {
                let digest = obj
                    .manifest
                    .outputs
                    .get(out.name)
                    .map(|o| o.digest)
                    .ok_or_else(|| {
                        StageError::failed(format!("item '{id}' produced no output '{}'", out.name))
                    })?;
                entries.push(ItemEntry {
                    id: id.clone(),
                    attrs: attrs.clone(),
                    digest,
                });
                locs.insert(
                    id.clone(),
                    ItemLocation {
                        key: obj.key(),
                        path: format!("{}/{}", meduet_cache::store::OUT_DIR, out.name),
                    },
                );
            }
            let out_dir = dir.join(meduet_cache::store::OUT_DIR).join(out.name);
            collection::write_items(&out_dir, &entries).map_err(|e| StageError::io(&out_dir, e))?;
            refs.locations.insert(out.name.to_string(), locs);
        }
        refs.keys = done.iter().map(|(_, (o, _))| o.key()).collect();
        ctx.set_metric("items", done.len());
        ctx.set_metric("items_computed", items_computed);
        write_json(&dir.join(collection::REFS_FILE), &refs)
    };
    let (object, computed) = compute_object(c, p.key, None, &body, &finish)?;
    Ok(Executed {
        object,
        computed,
        items_total: items.len(),
        items_computed,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The items a fan-out stage maps over, in the order of its input collections (the
/// order cluster job arrays index).
pub fn mapped_items(p: &Prepared, map_input: &str) -> Vec<Item> {
    p.inputs
        .get(map_input)
        .map(|v| v.iter().flat_map(|a| a.items.iter().cloned()).collect())
        .unwrap_or_default()
}

/// The key of item `item` of fan-out stage `p` (mapping over input `map_input`).
pub fn item_key(p: &Prepared, map_input: &str, item: &Item) -> StageKey {
    p.fingerprint
        .for_item(map_input, &item.id, &item.attrs, item.digest)
        .key()
}

/// Loads or computes (under its lease) the object of one item. Returns whether this
/// call computed it.
fn compute_item(
    c: &Common,
    map_input: &str,
    item: &Item,
    force: bool,
) -> Result<(Object, bool), StageError> {
    if c.env.cancel.is_cancelled() {
        return Err(StageError::Cancelled);
    }
    let store = &c.env.store;
    let p = c.p;
    let ikey = item_key(p, map_input, item);
    c.env.protect([ikey])?;
    if force && store.contains(&ikey) {
        let q = store.quarantine(&ikey)?;
        let _ = std::fs::remove_dir_all(q);
    }
    if let Some(o) = store.load(&ikey)? {
        return Ok((o, false));
    }
    let body = |ctx: &mut StageContext| p.kind.run_item(&p.runtime_params, ctx);
    let finish = |ctx: &mut StageContext, dir: &std::path::Path| {
        let meta = serde_json::json!({ "id": item.id, "attrs": ctx.item_attrs });
        write_json(&dir.join("item.json"), &meta)
    };
    compute_object(c, ikey, Some(item.clone()), &body, &finish)
}

/// Executes one item of a fan-out stage (what one task of a cluster job array runs):
/// the item's own object only, never the cohort. Idempotent and leased like
/// [`execute`].
pub fn execute_item(
    env: &ExecEnv,
    p: &Prepared,
    item_id: &str,
    device: Device,
    threads: usize,
    force: bool,
) -> Result<Executed, StageError> {
    let t0 = Instant::now();
    let map_input = p.kind.map_over().ok_or_else(|| {
        StageError::failed(format!(
            "stage '{}' ({}) is not a fan-out stage: it has no items",
            p.stage,
            p.kind.kind()
        ))
    })?;
    let item = mapped_items(p, map_input)
        .into_iter()
        .find(|i| i.id == item_id)
        .ok_or_else(|| {
            StageError::failed(format!(
                "stage '{}' has no item '{item_id}' in its input '{map_input}'",
                p.stage
            ))
        })?;
    check_inputs(&env.store, p, Some((map_input, item_id)))?;
    let threads = threads.max(1);
    let stage_sink = LogSink::deferred();
    let sink = Some(stage_sink.clone());
    let hook = env.thread_hook.clone();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("meduet-stage-{i}"))
        .start_handler(move |_| {
            std::mem::forget(enter_sink(sink.clone()));
            if let Some(h) = &hook {
                h(threads);
            }
        })
        .build()
        .map_err(|e| StageError::failed(format!("cannot build a thread pool of {threads}: {e}")))?;
    let c = Common {
        env,
        p,
        device,
        threads,
        stage_sink,
    };
    let (object, computed) = pool.install(|| compute_item(&c, map_input, &item, force))?;
    Ok(Executed {
        object,
        computed,
        items_total: 1,
        items_computed: usize::from(computed),
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}
