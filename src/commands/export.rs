//! `meduet export`: a stage's volume and label outputs back to NIfTI.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use meduet_cache::{Object, Store};
use meduet_engine::{OutputSpec, Registry};

use super::common::{load, pipeline_store, stage_object};
use crate::cli::ExportArgs;

/// `meduet export PIPELINE STAGE --to DIR`: one folder per subject (item).
pub(super) fn export(args: ExportArgs, registry: &Registry) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    let store = pipeline_store(&p, &args.cache)?;
    let (stage, to) = (&args.stage, &args.to);
    let obj = stage_object(&p, &store, stage)?;
    let def = p.stage(stage).expect("stage exists");
    let mut written = 0;
    for out in def.kind.outputs() {
        for (name, dir) in output_dirs(&store, &obj, &out)? {
            if !has_volume(&dir) {
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

/// The folders of output `out` of `obj`, named: one per item of a collection, else the
/// output's own.
fn output_dirs(store: &Store, obj: &Object, out: &OutputSpec) -> Result<Vec<(String, PathBuf)>> {
    Ok(if out.ty.collection {
        meduet_engine::collection::read_items(store, &obj.dir, out.name)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(|it| (it.id, it.dir))
            .collect()
    } else {
        vec![(out.name.to_string(), obj.output_dir(out.name))]
    })
}

/// Whether `dir` holds a Zarr volume.
fn has_volume(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "zarr"))
        })
        .unwrap_or(false)
}
