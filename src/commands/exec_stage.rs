//! `meduet exec-stage`: execute one stage (or one item of it) from a spec written by the
//! planner, as a cluster job does.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::MultiProgress;
use meduet_cache::Store;
use meduet_engine::exec_stage::{delegate_item, exec_stage_item, spec_cache, ExecStage};
use meduet_engine::Registry;

use super::common::{env_for, load};
use super::devices::cuda_devices;
use super::slurm;
use crate::cli::ExecStageArgs;

/// `meduet exec-stage --spec SPEC` or `--pipeline FILE --stage NAME`: prints whether the
/// object was computed or found cached, and where it is.
pub(super) fn exec_stage(
    args: ExecStageArgs,
    registry: &Registry,
    multi: &MultiProgress,
) -> Result<i32> {
    let Some(spec) = spec_of(&args, registry)? else {
        return Ok(0);
    };
    let spec_path = spec
        .canonicalize()
        .with_context(|| format!("spec '{}' not found", spec.display()))?;
    let dir = spec_cache(&spec_path, args.cache);
    let store = Store::open_existing(&dir)
        .with_context(|| format!("'{}' is not a meduet cache", dir.display()))?;
    let env = env_for(store.clone(), multi);
    let cancel = env.cancel.clone();
    let _ = ctrlc::set_handler(move || cancel.cancel());
    match exec_stage_item(
        &spec_path,
        args.item_index,
        store,
        registry,
        &env,
        &cuda_devices,
    )? {
        ExecStage::Delegate(worker) => {
            Err(delegate_item(worker, &spec_path, &dir, args.item_index).into())
        }
        ExecStage::Done(ex) => {
            println!(
                "{} {}",
                if ex.computed { "computed" } else { "cached" },
                ex.object.dir.display()
            );
            Ok(0)
        }
    }
}

/// The spec to execute: `--spec`, or the one planned now for `--pipeline` and `--stage`;
/// `None` when that stage is cached (nothing to execute).
fn spec_of(args: &ExecStageArgs, registry: &Registry) -> Result<Option<PathBuf>> {
    match (&args.spec, &args.pipeline, &args.stage) {
        (Some(s), _, _) => Ok(Some(s.clone())),
        (None, Some(pf), Some(stage)) => {
            let p = load(pf, registry)?;
            let dir = args.cache.clone().unwrap_or_else(|| p.cache_dir.clone());
            slurm::plan_stage_spec(&p, &dir, stage)
        }
        _ => bail!("give --spec SPEC, or --pipeline FILE --stage NAME"),
    }
}
