//! What the tensor stage implementations share: devices, errors, reading latents and
//! volumes into crop sources, domain maps, output helpers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use meduet_engine::{Item, StageContext, StageError};
use meduet_stages::data::array_store::read_array_f32;
use meduet_stages::data::zarr_store::read_zarr;
use meduet_stages::kinds::resample::IMAGE_ZARR;
use meduet_stages::kinds::vae::LATENT_ZARR;
use meduet_stages::sampling::{Batch, CropSampler, CropSource, Prefetcher};
use rayon::prelude::*;

/// The tch device of the stage (and its threads set for libtorch).
pub fn device(ctx: &StageContext) -> tch::Device {
    crate::device::set_threads(ctx.threads());
    crate::device::tch_device(ctx.device())
}

/// Wraps any displayable error as a stage failure.
pub fn fail(e: impl std::fmt::Display) -> StageError {
    StageError::failed(e)
}

/// Reads every item's `latent.zarr` (`[C, X, Y, Z]`) as a crop source, in parallel.
pub fn latent_sources(items: &[Item]) -> Result<Vec<CropSource>, StageError> {
    items
        .par_iter()
        .map(|it| {
            let (data, shape, _) =
                read_array_f32(&it.dir.join(LATENT_ZARR)).map_err(StageError::input)?;
            if shape.len() != 4 {
                return Err(StageError::input(format!(
                    "latent of '{}' has shape {shape:?}, expected [C, X, Y, Z]",
                    it.id
                )));
            }
            Ok(CropSource {
                id: it.id.clone(),
                domain_id: domain_id(it)?,
                shape: [shape[0], shape[1], shape[2], shape[3]],
                data: Arc::new(data),
            })
        })
        .collect()
}

/// Reads every item's `image.zarr` as a one-channel crop source, in parallel.
pub fn volume_sources(items: &[Item]) -> Result<Vec<CropSource>, StageError> {
    items
        .par_iter()
        .map(|it| {
            let (v, _) = read_zarr::<f32>(&it.dir.join(IMAGE_ZARR)).map_err(StageError::input)?;
            Ok(CropSource {
                id: it.id.clone(),
                domain_id: domain_id(it)?,
                shape: [1, v.shape[0], v.shape[1], v.shape[2]],
                data: Arc::new(v.data),
            })
        })
        .collect()
}

/// The item's `domain_id` attribute.
pub fn domain_id(it: &Item) -> Result<i64, StageError> {
    it.attr_i64("domain_id").ok_or_else(|| {
        StageError::input(format!(
            "item '{}' has no integer 'domain_id' attribute",
            it.id
        ))
    })
}

/// Dataset domain ids mapped to contiguous class indices `0..n` (sorted by id), with names.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DomainMap {
    /// `(domain_id, domain name)` by class index.
    pub classes: Vec<(i64, String)>,
}

impl DomainMap {
    pub fn from_items(items: &[Item]) -> Result<Self, StageError> {
        let mut m: BTreeMap<i64, String> = BTreeMap::new();
        for it in items {
            m.entry(domain_id(it)?)
                .or_insert_with(|| it.attr_str("domain").unwrap_or("").to_string());
        }
        Ok(Self {
            classes: m.into_iter().collect(),
        })
    }
    pub fn len(&self) -> usize {
        self.classes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
    /// The class index of a domain id.
    pub fn class_of(&self, domain_id: i64) -> Option<usize> {
        self.classes.iter().position(|c| c.0 == domain_id)
    }
    /// Display names (falling back to the id).
    pub fn names(&self) -> Vec<String> {
        self.classes
            .iter()
            .map(|(id, n)| {
                if n.is_empty() {
                    format!("domain {id}")
                } else {
                    n.clone()
                }
            })
            .collect()
    }
}

/// Writes pretty JSON.
pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<(), StageError> {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("json"))
        .map_err(|e| StageError::io(path, e))
}

/// Warns when a transformer's tokens are narrower than the patch they embed: the patch
/// embedding then compresses `patch_values` numbers into `width` channels and the network
/// cannot pass its input through (a DiT's ε-loss floors; measured on the quickstart
/// latents: DiT 96-wide, patch 4 (256 values) 0.71 after 4000 steps, patch 2 (32 values)
/// 0.23 after 400).
pub fn warn_if_bottlenecked(model: &str, width: i64, patch_values: i64) {
    if let Some(w) = bottleneck(model, width, patch_values) {
        tracing::warn!("{w}");
    }
}

/// The warning of [`warn_if_bottlenecked`], if any.
pub fn bottleneck(model: &str, width: i64, patch_values: i64) -> Option<String> {
    (width < patch_values).then(|| {
        format!(
            "{model}: width {width} is below the {patch_values} values of a patch; the network cannot represent its input (widen it or use a smaller patch)"
        )
    })
}

/// Loads a model's weights from `file` into `vs` and freezes them (inference); a failure
/// names the file.
pub fn load_frozen(vs: &mut tch::nn::VarStore, file: &Path) -> Result<(), StageError> {
    vs.load(file)
        .map_err(|e| StageError::input(format!("cannot load '{}': {e}", file.display())))?;
    vs.freeze();
    Ok(())
}

/// Reads JSON.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    let b = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_slice(&b)
        .map_err(|e| StageError::input(format!("'{}' is not valid: {e}", path.display())))
}

/// Training batches of random crops, drawn ahead on background threads from the step a
/// run starts at (0, or a resumed checkpoint's), as [`Prefetcher`] does.
pub struct CropBatches {
    sampler: Arc<CropSampler>,
    steps: u64,
    batch_size: usize,
    prefetch: Option<Prefetcher>,
}

impl CropBatches {
    pub fn new(sampler: Arc<CropSampler>, steps: u64, batch_size: usize) -> Self {
        Self {
            sampler,
            steps,
            batch_size,
            prefetch: None,
        }
    }

    /// Starts drawing at `first_step` ([`crate::train::trainer::TrainingTask::start`]).
    pub fn start(&mut self, first_step: u64) {
        self.prefetch = Some(Prefetcher::new(
            self.sampler.clone(),
            first_step,
            self.steps,
            self.batch_size,
            1,
            2,
        ));
    }

    /// The next step's batch.
    pub fn next(&self) -> Result<Batch, StageError> {
        self.prefetch
            .as_ref()
            .and_then(|p| p.next_batch())
            .map(|(_, b)| b)
            .ok_or_else(|| fail("the batch prefetcher stopped early"))
    }

    /// The sampler (for batches outside the run, such as the first batch's statistics).
    pub fn sampler(&self) -> &CropSampler {
        &self.sampler
    }
}

/// A batch of `f32` values as a tensor of `shape` (on the CPU).
pub fn batch_tensor(data: &[f32], shape: &[usize]) -> tch::Tensor {
    let shape: Vec<i64> = shape.iter().map(|&v| v as i64).collect();
    tch::Tensor::from_slice(data).view(shape.as_slice())
}

/// The number of trainable parameters of a store.
pub fn trainable_parameters(vs: &tch::nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// A seed for step `step` of a run seeded with `seed` (splitmix64 of both).
pub fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed
        ^ step
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_tokens_are_reported() {
        // DiT-tiny: 96 wide, patch 4 on 4 channels (256 values); patch 2 (32 values); B/4.
        let w = bottleneck("diffusion_train", 96, 4 * 4 * 4 * 4).unwrap();
        assert!(w.contains("width 96") && w.contains("256 values"), "{w}");
        assert_eq!(bottleneck("diffusion_train", 96, 2 * 2 * 2 * 4), None);
        assert_eq!(bottleneck("diffusion_train", 768, 256), None);
    }
}
