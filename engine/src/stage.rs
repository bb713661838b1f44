//! The contract between the engine and stage kinds.
//!
//! A stage kind (phantom, resample, vae_train, ...) implements [`Stage`]: a typed
//! parameter struct (serde, `deny_unknown_fields`, defaults), the inputs it accepts and
//! the outputs it produces (each with an [`ArtifactType`]), and `run` (or `run_item` for
//! fan-out kinds). The engine owns everything else: parsing, validation, keys, caching,
//! leases, scheduling, logs, progress and run records. Stage kinds of later work plug in
//! through a [`crate::Registry`] without touching the engine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use meduet_cache::ContentDigest;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::collection::Item;
use crate::error::StageError;
use crate::params::SourceTree;
use crate::resources::{Device, Resources};

/// The type of an artifact flowing between stages. Wiring an output to an input of a
/// different type is a validation error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactType {
    /// For example `"volumes"`, `"latents"`, `"checkpoint"`.
    pub name: &'static str,
    /// Whether the artifact is a collection of per-subject items.
    pub collection: bool,
}

impl ArtifactType {
    pub const fn single(name: &'static str) -> Self {
        Self {
            name,
            collection: false,
        }
    }
    pub const fn collection(name: &'static str) -> Self {
        Self {
            name,
            collection: true,
        }
    }
}

impl std::fmt::Display for ArtifactType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.collection {
            write!(f, "collection of {}", self.name)
        } else {
            f.write_str(self.name)
        }
    }
}

/// How many references an input takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// Exactly one.
    One,
    /// Zero or one.
    Optional,
    /// One or more.
    Many,
    /// Zero or more.
    Any,
}

/// An input a stage kind accepts.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: &'static str,
    pub ty: ArtifactType,
    pub arity: Arity,
    pub doc: &'static str,
}

/// An output a stage kind produces.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub name: &'static str,
    pub ty: ArtifactType,
    pub doc: &'static str,
}

/// Where a stage kind's code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// In the process that schedules it.
    InProcess,
    /// In a worker binary (found next to the running executable, or through the
    /// environment variable `MEDUET_<NAME>_BIN`, e.g. `MEDUET_TORCH_BIN`), which runs
    /// `exec-stage --spec` and registers the kind's implementation with
    /// [`crate::Registry::implement`].
    Worker(&'static str),
}

/// A stage kind with typed parameters.
pub trait Stage: Send + Sync + 'static {
    /// Parameters, as written in the pipeline file. Use `#[serde(deny_unknown_fields,
    /// default)]` so a mistyped key is an error, never a silent default. Source paths
    /// (datasets, weights) are [`crate::SourcePath`] fields: they enter the key by
    /// content, never by path.
    type Params: Serialize + DeserializeOwned + Send + Sync;

    /// The `kind = "..."` name.
    const KIND: &'static str;
    /// Implementation version: bump it whenever the code changes what the stage produces.
    const VERSION: u32;
    /// One line for `meduet kinds` and error messages.
    const ABOUT: &'static str;

    fn inputs(&self) -> Vec<InputSpec>;
    fn outputs(&self) -> Vec<OutputSpec>;

    /// Resources used when the pipeline file does not say.
    fn default_resources(&self) -> Resources {
        Resources::default()
    }

    /// Checks a parsed parameter set beyond what serde checks (ranges, consistency).
    /// The message should name the parameter.
    fn validate(&self, _params: &Self::Params) -> Result<(), String> {
        Ok(())
    }

    /// The seed recorded in run records, if the stage has one.
    fn seed(&self, _params: &Self::Params) -> Option<u64> {
        None
    }

    /// What named presets among the parameters resolve to (a model preset's full sizes,
    /// after `model = {..}` overrides). It enters the stage's key beside the parameters, so
    /// a change to a preset's definition reruns the stages that used it. `None` (the
    /// default) for kinds without presets.
    fn resolved(&self, _params: &Self::Params) -> Option<serde_json::Value> {
        None
    }

    /// Fills defaults that depend on other parameters (a segmentation network's optimiser,
    /// a training kind's `optim` and `schedule` tables) before validation and hashing, so
    /// the key holds every number that shapes the output.
    fn resolve(&self, _params: &mut Self::Params) {}

    /// Parameters that were renamed or moved, as `(old name, new spelling)`: an old pipeline
    /// file that uses one gets an error saying the new spelling.
    fn moved_params(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// Versions of shared code the kind runs on (the training loop: `("trainer", N)`).
    /// They enter the key, so a change to shared code reruns every stage that uses it
    /// without a hand-bumped [`Stage::VERSION`] in each kind.
    fn code_versions(&self) -> &'static [(&'static str, u32)] {
        &[]
    }

    /// Whether the output's bytes depend on the class of device the stage runs on (CPU or
    /// CUDA), as with fp16 autocast, which runs only on CUDA. The device class then enters
    /// the key; otherwise a CPU and a GPU run share it.
    fn device_dependent(&self, _params: &Self::Params) -> bool {
        false
    }

    /// For fan-out kinds: the collection input mapped over. Each item becomes its own
    /// object computed by [`Stage::run_item`]; `run` is not called.
    fn map_over(&self) -> Option<&'static str> {
        None
    }

    /// For fan-out kinds: whether items may run concurrently on the stage's thread pool
    /// (true for pure-CPU kernels; false for kinds that use all threads per item).
    fn parallel_items(&self) -> bool {
        false
    }

    /// Where the kind's code runs. Kinds that need libtorch run in the `meduet-torch`
    /// worker process (loading libtorch costs about half a second and 500 MB, which the
    /// planner and pure-Rust stages should not pay); the kind is still declared here, so
    /// pipelines validate and plan without it.
    fn runtime(&self) -> Runtime {
        Runtime::InProcess
    }

    /// Computes the stage's outputs into `ctx.output_dir(..)`.
    fn run(&self, _params: &Self::Params, _ctx: &mut StageContext) -> Result<(), StageError> {
        Err(StageError::failed(format!(
            "stage kind '{}' is a fan-out kind: it has no whole-stage run",
            Self::KIND
        )))
    }

    /// Computes one item of a fan-out kind.
    fn run_item(&self, _params: &Self::Params, _ctx: &mut StageContext) -> Result<(), StageError> {
        Err(StageError::failed(format!(
            "stage kind '{}' is not a fan-out kind",
            Self::KIND
        )))
    }
}

/// One upstream output wired to an input.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    /// The producing stage (pipeline name).
    pub stage: String,
    pub output: String,
    pub ty: ArtifactType,
    /// Key of the object holding it.
    pub key: meduet_cache::StageKey,
    pub digest: ContentDigest,
    /// The output folder (`objects/<key>/out/<output>`).
    pub dir: PathBuf,
    /// The items, for collections.
    pub items: Vec<Item>,
}

/// Signals cancellation (Ctrl-C) to running stages.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a running stage sees.
pub struct StageContext {
    pub(crate) stage: String,
    pub(crate) kind: &'static str,
    pub(crate) inputs: BTreeMap<String, Vec<InputArtifact>>,
    pub(crate) sources: BTreeMap<PathBuf, SourceTree>,
    pub(crate) locator: Arc<crate::locator::Locator>,
    pub(crate) object_dir: PathBuf,
    pub(crate) scratch: PathBuf,
    pub(crate) device: Device,
    pub(crate) threads: usize,
    pub(crate) cancel: CancelFlag,
    pub(crate) progress: crate::progress::Reporter,
    pub(crate) metrics: serde_json::Map<String, serde_json::Value>,
    pub(crate) item: Option<Item>,
    pub(crate) item_attrs: BTreeMap<String, serde_json::Value>,
    pub(crate) emitted: BTreeMap<String, Vec<(String, BTreeMap<String, serde_json::Value>)>>,
    pub(crate) outputs: Vec<OutputSpec>,
}

impl StageContext {
    /// A context writing into `object_dir`, with no inputs (unit tests of stage kinds).
    pub fn for_tests(object_dir: &Path, outputs: Vec<OutputSpec>) -> Self {
        StageContext {
            stage: "test".into(),
            kind: "test",
            inputs: BTreeMap::new(),
            sources: BTreeMap::new(),
            locator: Arc::new(crate::locator::Locator::new()),
            object_dir: object_dir.to_path_buf(),
            scratch: object_dir.join("scratch"),
            device: Device::Cpu,
            threads: 1,
            cancel: CancelFlag::new(),
            progress: crate::progress::Reporter::hidden(),
            metrics: serde_json::Map::new(),
            item: None,
            item_attrs: BTreeMap::new(),
            emitted: BTreeMap::new(),
            outputs,
        }
    }

    /// The stage's name in the pipeline.
    pub fn stage_name(&self) -> &str {
        &self.stage
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The artifacts wired to input `name` (empty for an absent optional input).
    pub fn inputs(&self, name: &str) -> &[InputArtifact] {
        self.inputs.get(name).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The single artifact wired to input `name`.
    pub fn input(&self, name: &str) -> Result<&InputArtifact, StageError> {
        match self.inputs(name) {
            [one] => Ok(one),
            [] => Err(StageError::failed(format!("input '{name}' is not wired"))),
            many => Err(StageError::failed(format!(
                "input '{name}' has {} artifacts, expected one",
                many.len()
            ))),
        }
    }

    /// The resolved content of a source path parameter (its files with digests).
    pub fn source(&self, path: &crate::SourcePath) -> Result<&SourceTree, StageError> {
        self.sources.get(Path::new(path.as_str())).ok_or_else(|| {
            StageError::failed(format!(
                "source path '{}' was not resolved by the planner",
                path.as_str()
            ))
        })
    }

    /// The path of a file by its content digest: any source file of this stage or of its
    /// ancestors, or any file of an ancestor's object. Items refer to source files this
    /// way, so they keep working after the data folder moves.
    pub fn locate(&self, digest: &ContentDigest) -> Result<PathBuf, StageError> {
        if let Some(p) = self.locator.get(digest) {
            return Ok(p.clone());
        }
        for t in self.sources.values() {
            if let Some(f) = t.files.iter().find(|f| f.digest == *digest) {
                return Ok(t.path_of(&f.path));
            }
        }
        Err(StageError::input(format!(
            "no file with content digest {} is among the sources of this stage or its upstream stages (was the data folder changed or removed?)",
            digest.short()
        )))
    }

    /// The folder of output `name`. For fan-out kinds, the item's own output folder.
    pub fn output_dir(&self, name: &str) -> Result<PathBuf, StageError> {
        if !self.outputs.iter().any(|o| o.name == name) {
            return Err(StageError::failed(format!(
                "stage kind '{}' declares no output '{name}'",
                self.kind
            )));
        }
        let p = self
            .object_dir
            .join(meduet_cache::store::OUT_DIR)
            .join(name);
        std::fs::create_dir_all(&p).map_err(|e| StageError::io(&p, e))?;
        Ok(p)
    }

    /// Emits one item of a collection output of a non-fan-out stage (for example one
    /// subject of `ingest`). Returns the item's folder; the engine digests it after `run`.
    pub fn emit_item(
        &mut self,
        output: &str,
        id: &str,
        attrs: BTreeMap<String, serde_json::Value>,
    ) -> Result<PathBuf, StageError> {
        crate::collection::check_item_id(id).map_err(StageError::failed)?;
        let list = self.emitted.entry(output.to_string()).or_default();
        if list.iter().any(|(i, _)| i == id) {
            return Err(StageError::failed(format!(
                "item id '{id}' emitted twice on output '{output}'"
            )));
        }
        list.push((id.to_string(), attrs));
        let dir = self
            .output_dir(output)?
            .join(crate::collection::ITEMS_DIR)
            .join(id);
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        Ok(dir)
    }

    /// For fan-out kinds: the item being computed.
    pub fn item(&self) -> Result<&Item, StageError> {
        self.item.as_ref().ok_or_else(|| {
            StageError::failed("no current item: this stage kind is not a fan-out kind")
        })
    }

    /// For fan-out kinds: sets an attribute on the produced item (it inherits the input
    /// item's attributes).
    pub fn set_item_attr(&mut self, key: &str, value: serde_json::Value) {
        self.item_attrs.insert(key.to_string(), value);
    }

    /// A folder that survives a killed run (for checkpoints). Removed when the object commits.
    pub fn scratch_dir(&self) -> Result<PathBuf, StageError> {
        std::fs::create_dir_all(&self.scratch).map_err(|e| StageError::io(&self.scratch, e))?;
        Ok(self.scratch.clone())
    }

    /// The device assigned to this stage.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The number of threads assigned to this stage (its rayon pool has this many).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Returns `Err(StageError::Cancelled)` once the run is cancelled. Call it often.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }

    pub fn cancel_flag(&self) -> &CancelFlag {
        &self.cancel
    }

    /// A progress bar (drawn only on a terminal) for `len` steps.
    pub fn progress(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        self.progress.bar(len, &format!("{} {what}", self.stage))
    }

    /// Records a metric: shown by `meduet show` and stored in the run record.
    pub fn set_metric(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.metrics.insert(name.to_string(), value.into());
    }

    /// The metrics recorded so far.
    pub fn metrics(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.metrics
    }
}
