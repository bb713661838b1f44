//! `resample`: fan-out over `subjects`; the method's preprocessing (method.md 1.1 steps
//! 1-5, [`crate::data::preprocess`]) into Zarr v3 volumes.
//!
//! Per item: locate the image (and label) by content digest, read and check them, reorient
//! to RAS, window (CT) or percentile-normalise (MRI), resample to `spacing` (trilinear /
//! nearest), crop to foreground, centre crop to `max_size`, pad to `min_size` and to a
//! multiple of `divisible`. Output `volumes` (collection), one item per subject:
//!
//! ```text
//! image.zarr/   float32 [i, j, k] (C order; axes towards R, A, S), zstd, chunks of 64
//! label.zarr/   uint8, same grid (only when the subject has a label)
//! ```
//!
//! Attributes of both arrays (see [`crate::data::zarr_store`]): `affine`, `spacing`,
//! `orientation`, and `subject`, `dataset`, `case`, `domain`, `domain_id`,
//! `original_spacing`, `original_shape`, `original_orientation`, `source_digest` (the
//! image's content digest), `label_digest` (or null), `intensity` (mode, window,
//! output_range, clip), `has_lesion` (phantoms). Item attributes gain `shape` and `spacing`.

use meduet_engine::{Arity, InputSpec, OutputSpec, Resources, Stage, StageContext, StageError};

use crate::data::nifti_io::{read_nifti, read_nifti_labels};
use crate::data::preprocess::{preprocess, IntensityMode, PreprocessConfig};
use crate::data::zarr_store::{write_zarr, Attrs};
use crate::kinds::subject::{SubjectRecord, SUBJECTS};

/// The artifact type of preprocessed volume collections.
pub const VOLUMES: meduet_engine::ArtifactType = meduet_engine::ArtifactType::collection("volumes");
/// Image array folder inside a `volumes` item.
pub const IMAGE_ZARR: &str = "image.zarr";
/// Label array folder inside a `volumes` item.
pub const LABEL_ZARR: &str = "label.zarr";

/// `resample`.
pub struct Resample;

impl Stage for Resample {
    type Params = PreprocessConfig;
    const KIND: &'static str = "resample";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "reorients to RAS, windows, resamples to 1.5 mm, crops and pads each subject into Zarr volumes";

    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "subjects",
            ty: SUBJECTS,
            arity: Arity::One,
            doc: "subjects from ingest",
        }]
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "volumes",
            ty: VOLUMES,
            doc: "per subject: image.zarr (float32) and label.zarr (uint8)",
        }]
    }

    fn default_resources(&self) -> Resources {
        Resources {
            threads: 0,
            ..Resources::default()
        }
    }

    fn validate(&self, p: &PreprocessConfig) -> Result<(), String> {
        p.validate()
    }

    fn map_over(&self) -> Option<&'static str> {
        Some("subjects")
    }

    fn parallel_items(&self) -> bool {
        true
    }

    fn run_item(&self, p: &PreprocessConfig, ctx: &mut StageContext) -> Result<(), StageError> {
        let item = ctx.item()?.clone();
        let rec = SubjectRecord::read(&item.dir)?;
        let image_path = ctx.locate(&rec.image.digest)?;
        let (image, info) = read_nifti(&image_path)?;
        let label = match &rec.label {
            Some(l) => Some(read_nifti_labels(&ctx.locate(&l.digest)?)?.0),
            None => None,
        };
        ctx.check_cancelled()?;
        let out = preprocess(&image, label.as_ref(), p).map_err(|e| {
            StageError::input(format!("subject '{}' ({}): {e}", rec.id, rec.image.file))
        })?;
        drop(image);
        drop(label);
        let mut attrs = Attrs::new();
        attrs.insert("subject".into(), rec.id.clone().into());
        attrs.insert("dataset".into(), rec.dataset.clone().into());
        attrs.insert("case".into(), rec.case.clone().into());
        attrs.insert("domain".into(), rec.domain.clone().into());
        attrs.insert("domain_id".into(), rec.domain_id.into());
        attrs.insert("original_spacing".into(), serde_json::json!(info.spacing));
        attrs.insert("original_shape".into(), serde_json::json!(info.shape));
        attrs.insert(
            "original_orientation".into(),
            info.orientation.clone().into(),
        );
        attrs.insert("source_digest".into(), rec.image.digest.to_hex().into());
        attrs.insert(
            "label_digest".into(),
            rec.label.as_ref().map(|l| l.digest.to_hex()).into(),
        );
        if let Some(h) = rec.phantom_truth.as_ref().and_then(|t| t.get("has_lesion")) {
            attrs.insert("has_lesion".into(), h.clone());
        }
        let mut image_attrs = attrs.clone();
        image_attrs.insert(
            "intensity".into(),
            serde_json::json!({
                "mode": p.mode,
                "window": out.window,
                "output_range": p.output_range,
                "clip": p.clip && p.mode != IntensityMode::None,
            }),
        );
        let dir = ctx.output_dir("volumes")?;
        write_zarr(&dir.join(IMAGE_ZARR), &out.image, &image_attrs)?;
        if let Some(l) = &out.label {
            write_zarr(&dir.join(LABEL_ZARR), l, &attrs)?;
        }
        ctx.set_item_attr("shape", serde_json::json!(out.image.shape));
        ctx.set_item_attr("spacing", serde_json::json!(out.image.spacing()));
        ctx.set_item_attr("has_label", serde_json::json!(out.label.is_some()));
        Ok(())
    }
}
