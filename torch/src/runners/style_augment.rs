//! Style augmentation for the latent-space trainers (`segment_train`, `classify_train`
//! with UNETR; the paper's appendix C.4, method.md 6). The settings and the per-step draws
//! are plain Rust ([`meduet_stages::segmentation::style_augment`]); this holds the frozen
//! MeDUET student and the target style prototype:
//!
//! - **Prototype** (Eq. 25): the mean style tokens `[L, d_s]` of every grid crop (the
//!   crop of the MeDUET model, overlap 0.25, replicate padding as `extract_factors`) of
//!   K target volumes, refreshed every `prototype_every` steps with an EMA over the
//!   updates (the authors refresh once an epoch with seed 2025 + epoch).
//! - **Augmented view** (Eqs. 26-27): `z_aug = decode_full(z_c, (1 - a) z_s + a E_s, cls)`
//!   for the batch's own `encode_full(z)`, without gradient.
//! - **Consistency** (Eq. 29): [`kl_consistency`], the KL divergence between the clean and
//!   the augmented softmax outputs.

use std::collections::BTreeMap;
use std::path::Path;

use meduet_engine::{Item, StageError};
use meduet_stages::data::array_store::read_array_f32;
use meduet_stages::kinds::pretrain::Weights;
use meduet_stages::kinds::vae::LATENT_ZARR;
use meduet_stages::segmentation::splits::Splits;
use meduet_stages::segmentation::style_augment::{AugmentedTask, StyleAugment, StyleAugmentParams};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::common::fail;
use super::factors::{grid_starts, load_meduet, replicate_patch};
use crate::models::meduet::MeDuet;

/// The prototype's file in a training checkpoint.
pub const PROTOTYPE_FILE: &str = "style_prototype.safetensors";

/// Crops encoded per forward pass while building the prototype.
const PROTOTYPE_BATCH: usize = 8;

/// A frozen MeDUET student and the running target style prototype.
pub struct StyleAugmenter {
    _vs: VarStore,
    model: MeDuet,
    pub settings: StyleAugment,
    /// `[L, d_s]`, once the first update ran.
    prototype: Option<Tensor>,
}

impl StyleAugmenter {
    /// Loads the student of a `meduet` artifact; its crop and channels must be the
    /// trainer's.
    pub fn load(
        meduet_dir: &Path,
        settings: StyleAugment,
        crop: usize,
        in_chans: i64,
        dev: Device,
    ) -> Result<Self, StageError> {
        let (vs, model, _) = load_meduet(meduet_dir, Weights::Student, dev)?;
        let c = model.config();
        if c.crop != crop as i64 || c.in_chans != in_chans {
            return Err(StageError::input(format!(
                "style_augment: the MeDUET model takes {}-channel {}^3 crops, the trainer {in_chans}-channel {crop}^3 (set unetr.crop = {})",
                c.in_chans, c.crop, c.crop
            )));
        }
        Ok(Self {
            _vs: vs,
            model,
            settings,
            prototype: None,
        })
    }

    /// The augmenter a trainer's `style_augment` settings ask for: `None` when off; an
    /// error naming the missing `meduet` input when on without one. Logs the resolved
    /// settings.
    pub fn for_training(
        params: &StyleAugmentParams,
        label_fraction: &str,
        task: AugmentedTask,
        meduet_dir: Option<&Path>,
        crop: usize,
        in_chans: i64,
        dev: Device,
    ) -> Result<Option<Self>, StageError> {
        let Some(s) = params
            .resolve(label_fraction, task)
            .map_err(StageError::input)?
        else {
            return Ok(None);
        };
        let dir = meduet_dir.ok_or_else(|| {
            StageError::input("style_augment needs a 'meduet' input (a pretrain stage's model)")
        })?;
        tracing::info!(
            "style augmentation: p {}, alpha {:?}, weight {}, KL weight {}, prototype of {} {:?} volumes every {} steps (EMA {})",
            s.probability, s.alpha, s.weight, s.kl_weight, s.prototype_volumes, s.target,
            s.prototype_every, s.prototype_ema
        );
        Self::load(dir, s, crop, in_chans, dev).map(Some)
    }

    /// The current prototype `[L, d_s]`.
    pub fn prototype(&self) -> Option<&Tensor> {
        self.prototype.as_ref()
    }

    /// Mean style tokens `[L, d_s]` over the grid crops of `[C, X, Y, Z]` latents.
    pub fn mean_style(&self, latents: &[(Vec<f32>, [usize; 4])]) -> Tensor {
        let _ng = tch::no_grad_guard();
        let c = self.model.config();
        let patch = c.crop as usize;
        let stride = ((patch as f64) * 0.75).round().max(1.0) as usize;
        let dev = self.model.device();
        let mut sum = Tensor::zeros([c.num_tokens(), c.style_out_dim()], (Kind::Float, dev));
        let mut n = 0usize;
        for (data, shape) in latents {
            let mut origins = Vec::new();
            for &x in &grid_starts(shape[1], patch, stride) {
                for &y in &grid_starts(shape[2], patch, stride) {
                    for &z in &grid_starts(shape[3], patch, stride) {
                        origins.push([x, y, z]);
                    }
                }
            }
            for chunk in origins.chunks(PROTOTYPE_BATCH) {
                let mut buf = Vec::with_capacity(chunk.len() * shape[0] * patch.pow(3));
                for o in chunk {
                    replicate_patch(data, shape, *o, patch, &mut buf);
                }
                let x = Tensor::from_slice(&buf)
                    .view([chunk.len() as i64, c.in_chans, c.crop, c.crop, c.crop])
                    .to_device(dev);
                sum += self
                    .model
                    .encode_full(&x)
                    .style
                    .to_kind(Kind::Float)
                    .sum_dim_intlist(0, false, Kind::Float);
                n += chunk.len();
            }
        }
        sum / n.max(1) as f64
    }

    /// Folds a new mean style into the prototype: the first update sets it, later ones
    /// are `ema * old + (1 - ema) * new`.
    pub fn update_prototype(&mut self, new: Tensor) {
        let ema = self.settings.prototype_ema;
        self.prototype = Some(match self.prototype.take() {
            None => new,
            Some(old) => old * ema + new * (1.0 - ema),
        });
    }

    /// Runs the prototype update due before `step`, if any: the update's target subjects
    /// (seeded by `seed` and the update number) are read from `latents` and encoded.
    /// Returns the subjects used.
    pub fn refresh(
        &mut self,
        step: u64,
        splits: &Splits,
        seed: u64,
        latents: &BTreeMap<String, Item>,
    ) -> Result<Option<Vec<String>>, StageError> {
        if !self.settings.refresh_at(step) {
            return Ok(None);
        }
        let update = step / self.settings.prototype_every;
        let ids = self
            .settings
            .prototype_subjects(splits, seed, update)
            .map_err(StageError::input)?;
        let mut arrays = Vec::with_capacity(ids.len());
        for id in &ids {
            let it = latents.get(id).ok_or_else(|| {
                StageError::input(format!("style_augment: subject '{id}' has no latent"))
            })?;
            let (d, s, _) = read_array_f32(&it.dir.join(LATENT_ZARR)).map_err(StageError::input)?;
            if s.len() != 4 {
                return Err(StageError::input(format!(
                    "latent of '{id}' has shape {s:?}, expected [C, X, Y, Z]"
                )));
            }
            arrays.push((d, [s[0], s[1], s[2], s[3]]));
        }
        let m = self.mean_style(&arrays);
        self.update_prototype(m);
        Ok(Some(ids))
    }

    /// The style-mixed view of a batch `[n, C, crop, crop, crop]` with strength `alpha`
    /// (no gradient). Needs a prototype (see [`Self::refresh`]).
    pub fn augment(&self, z: &Tensor, alpha: f64) -> Result<Tensor, StageError> {
        let proto = self
            .prototype
            .as_ref()
            .ok_or_else(|| fail("style augmentation before the first prototype update"))?;
        let _ng = tch::no_grad_guard();
        let f = self.model.encode_full(&z.to_kind(Kind::Float));
        let style = f.style * (1.0 - alpha) + proto.unsqueeze(0) * alpha;
        Ok(self.model.decode_full(&f.content, &style, &f.cls))
    }

    /// Writes the prototype of an optional augmenter into a checkpoint folder
    /// ([`crate::train::trainer::TrainingTask::save_extra`]).
    pub fn save_optional(a: &Option<Self>, dir: &Path) -> Result<serde_json::Value, String> {
        if let Some(a) = a {
            a.save(&dir.join(PROTOTYPE_FILE))?;
        }
        Ok(serde_json::Value::Null)
    }

    /// Restores what [`StyleAugmenter::save_optional`] wrote.
    pub fn load_optional(a: &mut Option<Self>, dir: &Path) -> Result<(), StageError> {
        match a.as_mut() {
            Some(a) => a.load_state(dir),
            None => Ok(()),
        }
    }

    /// Writes the prototype (for a checkpoint).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        match &self.prototype {
            Some(p) => {
                Tensor::write_safetensors(&[("prototype", p)], path).map_err(|e| e.to_string())
            }
            None => Ok(()),
        }
    }

    /// Restores the prototype of a checkpoint folder (none when it had none).
    pub fn load_state(&mut self, checkpoint: &Path) -> Result<(), StageError> {
        let p = checkpoint.join(PROTOTYPE_FILE);
        if !p.is_file() {
            self.prototype = None;
            return Ok(());
        }
        let t = Tensor::read_safetensors(&p)
            .map_err(|e| fail(format!("'{}': {e}", p.display())))?
            .into_iter()
            .find(|(n, _)| n == "prototype")
            .ok_or_else(|| fail(format!("'{}' has no 'prototype'", p.display())))?
            .1;
        self.prototype = Some(t.to_device(self.model.device()));
        Ok(())
    }
}

/// Mean over samples and voxels of `KL(softmax(clean) || softmax(augmented))` along the
/// class axis 1 (the paper's Eq. 29), in float32.
pub fn kl_consistency(clean: &Tensor, augmented: &Tensor) -> Tensor {
    let lp = clean.to_kind(Kind::Float).log_softmax(1, Kind::Float);
    let lq = augmented.to_kind(Kind::Float).log_softmax(1, Kind::Float);
    (lp.exp() * (&lp - lq))
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_logits_and_matches_the_formula() {
        let a = Tensor::from_slice(&[1.0f32, 0.0, 2.0, -1.0]).view([2, 2]);
        assert!(kl_consistency(&a, &a).double_value(&[]).abs() < 1e-7);
        let b = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0]).view([2, 2]);
        // Row 1: p = softmax(1, 0); q = (0.5, 0.5). Row 2: p = softmax(2, -1).
        let kl = |x: f64| {
            let p1 = 1.0 / (1.0 + (-x).exp());
            let p0 = 1.0 - p1;
            p1 * (p1 / 0.5).ln() + p0 * (p0 / 0.5).ln()
        };
        let expect = (kl(1.0) + kl(3.0)) / 2.0;
        let got = kl_consistency(&a, &b).double_value(&[]);
        assert!((got - expect).abs() < 1e-6, "{got} vs {expect}");
    }
}
