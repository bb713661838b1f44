//! Helpers every subcommand shares: loading a pipeline, finding and opening its cache,
//! the execution environment, the versions recorded in run records, a stage's object.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::MultiProgress;
use meduet_cache::{Store, Versions};
use meduet_engine::plan::{plan, StageStatus};
use meduet_engine::progress::Reporter;
use meduet_engine::{ExecEnv, Pipeline, Registry};

use super::devices::cuda_visible;
use crate::cli::CacheArg;

/// Versions recorded in run records.
pub fn versions() -> Versions {
    let commit = env!("MEDUET_GIT_COMMIT");
    Versions {
        meduet: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: (!commit.is_empty()).then(|| commit.to_string()),
        torch: None,
    }
}

/// Loads and validates a pipeline file.
pub fn load(path: &Path, registry: &Registry) -> Result<Pipeline> {
    Ok(Pipeline::load(path, registry)?)
}

/// The cache folder of a pipeline, honouring --cache / MEDUET_CACHE.
pub fn cache_dir(p: &Pipeline, arg: &CacheArg) -> PathBuf {
    arg.cache.clone().unwrap_or_else(|| p.cache_dir.clone())
}

/// Opens the cache at `dir`, creating it if needed.
pub fn open_store(dir: &Path) -> Result<Store> {
    Store::open(dir).with_context(|| format!("cannot open the cache '{}'", dir.display()))
}

/// The existing cache given by --cache / MEDUET_CACHE, else the pipeline's; an error
/// when neither is given or the folder is not a cache.
pub fn existing_store(
    pipeline: &Option<PathBuf>,
    cache: &CacheArg,
    registry: &Registry,
) -> Result<Store> {
    let dir = match (&cache.cache, pipeline) {
        (Some(c), _) => c.clone(),
        (None, Some(p)) => load(p, registry)?.cache_dir,
        (None, None) => bail!("give a pipeline file or --cache DIR (or set MEDUET_CACHE)"),
    };
    existing_store_at(&dir)
}

/// The existing cache of a loaded pipeline (see [`cache_dir`]).
pub fn pipeline_store(p: &Pipeline, cache: &CacheArg) -> Result<Store> {
    existing_store_at(&cache_dir(p, cache))
}

fn existing_store_at(dir: &Path) -> Result<Store> {
    Store::open_existing(dir).with_context(|| {
        format!(
            "'{}' is not a meduet cache (no objects/ folder)",
            dir.display()
        )
    })
}

/// The execution environment of a run on `store`: progress bars, versions.
pub fn env_for(store: Store, multi: &MultiProgress) -> ExecEnv {
    let mut env = ExecEnv::new(store);
    env.progress = Reporter::new(multi.clone());
    env.versions = versions();
    env
}

/// The cached object of `stage` for the current pipeline; an error naming the command
/// that computes it when there is none.
pub fn stage_object(p: &Pipeline, store: &Store, stage: &str) -> Result<meduet_cache::Object> {
    let i = p
        .index_of(stage)
        .with_context(|| format!("no stage named '{stage}' (stages: {})", p.stage_names()))?;
    let planned = plan(p, store, &p.ancestors_of(i), &[], &cuda_visible)?;
    match planned.iter().find(|s| s.name == stage).map(|s| &s.status) {
        Some(StageStatus::Cached { key }) => Ok(store.load(key)?.expect("cached object exists")),
        _ => bail!("stage '{stage}' has no object for the current pipeline yet (run 'meduet run {} --only {stage}')", p.file.display()),
    }
}
