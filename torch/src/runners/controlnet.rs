//! `controlnet_train`, `controlnet_sample` and `mask_adherence` (declared in
//! `meduet_stages::kinds::controlnet`).
//!
//! Training: the base DiT/SiT is loaded frozen; the masks are the labels of the labelled
//! training subjects of `split` (the rule of `segment_train`); each step draws latent crops
//! of the base's `input_size` with the matching label crops at image resolution (centred
//! on foreground with probability `fg_fraction`, no augmentation, seeded by step), one-hot
//! encodes the labels, replaces masks by zeros with probability `mask_dropout` and the
//! conditions by their null vectors (`dropout_content`, `dropout_style`), and regresses the
//! base's target (DiT noise, SiT velocity) through base + ControlNet. Only the ControlNet
//! learns. The shared trainer gives resume, checkpoints, EMA and `losses.png`.
//!
//! Sampling: each mask is a crop of the base's image-resolution window centred on the
//! subject's foreground centroid, optionally flipped, deformed and with one class dropped;
//! content (and, unless `style_from = "other_domains"`, style) come from the mask's
//! subject. Latents are drawn with dual CFG and mask guidance and decoded with the VAE;
//! the image and the mask are written as a `volumes` item (`image.zarr`, `label.zarr`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use meduet_engine::{Item, StageContext, StageError};
use meduet_stages::data::nifti_io::{write_nifti, write_nifti_labels, NiftiDtype};
use meduet_stages::data::volume::{LabelVolume, Volume};
use meduet_stages::data::zarr_store::{write_zarr, Attrs};
use meduet_stages::kinds::controlnet::*;
use meduet_stages::kinds::diffusion::{SampleParams, SampleWeights};
use meduet_stages::kinds::resample::{IMAGE_ZARR, LABEL_ZARR};
use meduet_stages::plot::{bar_chart, montage};
use meduet_stages::segmentation::metrics::{per_class, ClassMetrics};
use meduet_stages::segmentation::sampler::{SegAugment, SegSampler};
use rand::{Rng, SeedableRng};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::common::{
    batch_tensor, device, fail, load_frozen, read_json, step_seed, trainable_parameters, write_json,
};
use super::diffusion::{
    decode_to_volume, load_diffusion, orthogonal_slices, training_target, ConditionBank,
    LatentSampler, LoadedDiffusion, WeightsChoice,
};
use super::segment::{
    by_id, domain_of, label_lut, label_values, latent_scale, latent_seg_sources, load_segmenter,
    read_case, segment_case, subject_splits, summary_means, Case,
};
use crate::diffusion::gaussian::GaussianDiffusion;
use crate::diffusion::{controlled_guided_output, MaskTokens};
use crate::inference::SlidingWindow;
use crate::models::controlnet::{drop_masks, one_hot, ControlConfig, ControlNet};
use crate::models::dit::{dropout_mask, Cond, ConditionMode, Config as DitConfig};
use crate::train::trainer::{self, Ema, Learner, Step, StepOutput, TrainingTask};

/// Weights file of a `controlnet` artifact.
pub const CONTROLNET_WEIGHTS: &str = "controlnet.safetensors";
/// Its EMA weights.
pub const CONTROLNET_EMA: &str = "ema.safetensors";

/// `config.json` of a `controlnet` artifact.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ControlnetArtifact {
    pub control: ControlConfig,
    /// Label value of each mask class `1..` (class `c` = `labels[c - 1]`).
    pub labels: Vec<u8>,
    /// Content digest of the base `diffusion` artifact it was trained on.
    pub base_digest: String,
    pub base_weights: SampleWeights,
    /// The subjects whose masks trained it, and their domains.
    pub subjects: Vec<String>,
    pub domains: BTreeMap<String, String>,
    pub training: ControlnetTrainParams,
    pub trainable_parameters: i64,
}

/// The condition bank of the subjects: the `factors` input when connected, else the base
/// model's own bank.
fn condition_bank(
    ctx: &StageContext,
    model_dir: &Path,
    cfg: &DitConfig,
) -> Result<ConditionBank, StageError> {
    let bank = match ctx.inputs("factors").first() {
        Some(f) if cfg.condition == ConditionMode::Factors => ConditionBank::from_factors(&f.dir)?,
        Some(_) => {
            return Err(StageError::input(
                "factors: the 'factors' input is only used when the base model is conditioned on factors",
            ))
        }
        None => ConditionBank::load(model_dir)?,
    };
    bank.check_fits(cfg)?;
    Ok(bank)
}

/// Refuses subjects without a label: the masks come from labelled volumes.
fn check_labelled(items: &BTreeMap<String, Item>, ids: &[String]) -> Result<(), StageError> {
    for id in ids {
        let it = &items[id];
        if !it.dir.join(LABEL_ZARR).join("zarr.json").is_file() {
            return Err(StageError::input(format!(
                "volumes: subject '{id}' has no label ({}): the masks come from labelled \
                 volumes (a dataset with labels)",
                it.dir.join(LABEL_ZARR).display()
            )));
        }
    }
    Ok(())
}

/// Refuses a mask that holds none of the ControlNet's classes (its label values; other
/// values count as background, as in training): it would condition on an empty mask.
fn check_mask_values(it: &Item, labels: &[u8]) -> Result<(), StageError> {
    let (l, _) = meduet_stages::data::zarr_store::read_zarr::<u8>(&it.dir.join(LABEL_ZARR))
        .map_err(StageError::input)?;
    let mut seen = [false; 256];
    l.data.iter().for_each(|&v| seen[v as usize] = true);
    if !labels.iter().any(|&v| seen[v as usize]) {
        let present: Vec<u8> = (1..=255u8).filter(|&v| seen[v as usize]).collect();
        return Err(StageError::input(format!(
            "volumes: the mask of subject '{}' holds none of the ControlNet's {} classes (labels \
             {labels:?}; it has {present:?})",
            it.id,
            labels.len()
        )));
    }
    Ok(())
}

pub fn train(
    _: &ControlnetTrain,
    p: &ControlnetTrainParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let training = p.training().map_err(StageError::input)?;
    let base_in = ctx.input("model")?.clone();
    let ld = load_diffusion(&base_in.dir, WeightsChoice::of(None, p.base_weights), dev)?;
    let cfg = ld.model.config().clone();
    let vol_items = ctx.input("volumes")?.items.clone();
    let latents = by_id(&ctx.input("latents")?.items);
    let items = by_id(&vol_items);
    let splits = subject_splits(&vol_items, &p.split, p.label_seed)?;
    if splits.train.is_empty() {
        return Err(StageError::input(
            "split: no labelled training subject (raise split.label_fraction or add subjects)",
        ));
    }
    check_labelled(&items, &splits.train)?;
    let labels = label_values(&p.labels, &splits.train, &items)?;
    let lut = label_lut(&labels);
    let cases: Vec<Case> = splits
        .train
        .iter()
        .map(|id| read_case(&items[id], Some(&latents), &lut))
        .collect::<Result<_, _>>()?;
    let scale = latent_scale(&cases[0])?;
    let control_cfg = ControlConfig {
        mask_channels: labels.len() as i64 + 1,
        depth: p.depth_for(cfg.depth),
        embedding_channels: p.embedding_channels_for(scale),
        scale,
    };
    control_cfg
        .validate(&cfg)
        .map_err(|e| StageError::input(format!("{e} (the ControlNet of this base model)")))?;
    if let Some(c) = cases.iter().find(|c| {
        c.latent
            .as_ref()
            .is_some_and(|l| l.1[0] as i64 != cfg.in_chans)
    }) {
        return Err(StageError::input(format!(
            "latents: '{}' has {} channels, the base model expects {}",
            c.id,
            c.latent.as_ref().expect("checked").1[0],
            cfg.in_chans
        )));
    }
    let sources = latent_seg_sources(&cases, scale)?;
    let crop = cfg.input_size.map(|v| v as usize);
    let sampler = SegSampler::new(sources, crop, p.fg_fraction, SegAugment::NONE, p.seed)
        .map_err(StageError::input)?;
    let bank = condition_bank(ctx, &base_in.dir, &cfg)?;
    let bank = bank.select(&splits.train)?;
    let rows: HashMap<String, i64> = splits
        .train
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as i64))
        .collect();
    tch::manual_seed(p.seed as i64);
    let vs = VarStore::new(dev);
    let control = ControlNet::new(&vs.root(), &cfg, &control_cfg).map_err(fail)?;
    let copied = control.copy_base_blocks(&vs, &ld.vs).map_err(fail)?;
    let mut ema_vs = VarStore::new(dev);
    let _ema = ControlNet::new(&ema_vs.root(), &cfg, &control_cfg).map_err(fail)?;
    ema_vs.copy(&vs).map_err(fail)?;
    ema_vs.freeze();
    let n_params = trainable_parameters(&vs);
    tracing::info!(
        "ControlNet: {} of {} blocks copied ({copied} tensors), mask encoder {:?} over {} classes (labels {labels:?}) at {scale}x the latent grid, {:.2} M trainable parameters; {} masks, {} steps of batch {} on {dev:?}",
        control_cfg.depth, cfg.depth, control_cfg.embedding_channels, control_cfg.mask_channels,
        n_params as f64 / 1e6, splits.train.len(), p.steps, p.batch_size
    );
    let mut task = ControlnetTask {
        p,
        dev,
        ld: &ld,
        learner: Learner::new(&vs, &training),
        vs,
        ema_vs,
        control,
        ddpm: GaussianDiffusion::linear(
            ld.schedule.timesteps,
            ld.schedule.beta_start,
            ld.schedule.beta_end,
        ),
        sampler,
        rows,
        bank: bank.tensors.iter().map(|t| t.to_device(dev)).collect(),
        classes: control_cfg.mask_channels,
    };
    let trained = trainer::run(ctx, &training, &mut task)?;
    let out = ctx.output_dir("controlnet")?;
    task.vs.save(out.join(CONTROLNET_WEIGHTS)).map_err(fail)?;
    task.ema_vs.save(out.join(CONTROLNET_EMA)).map_err(fail)?;
    let domains = splits
        .train
        .iter()
        .map(|id| (id.clone(), domain_of(&items[id])))
        .collect();
    write_json(
        &out.join("config.json"),
        &ControlnetArtifact {
            control: control_cfg,
            labels,
            base_digest: base_in.digest.to_string(),
            base_weights: p.base_weights,
            subjects: splits.train.clone(),
            domains,
            training: p.clone(),
            trainable_parameters: n_params,
        },
    )?;
    trainer::finish(&trained, &out, "ControlNet training loss", &["loss"])?;
    let col = crate::train::log::read_column(&out.join("losses.jsonl"), "loss");
    if let Some((head, tail)) = crate::train::log::first_and_last_tenth(&col) {
        ctx.set_metric("loss_first_tenth", head);
        ctx.set_metric("loss_last_tenth", tail);
    }
    ctx.set_metric("masks", splits.train.len());
    ctx.set_metric("trainable_parameters", n_params);
    Ok(())
}

/// One ControlNet training run as the shared loop sees it.
struct ControlnetTask<'a> {
    p: &'a ControlnetTrainParams,
    dev: Device,
    ld: &'a LoadedDiffusion,
    vs: VarStore,
    ema_vs: VarStore,
    control: ControlNet,
    learner: Learner,
    ddpm: GaussianDiffusion,
    sampler: SegSampler,
    /// Subject id -> row of the condition bank.
    rows: HashMap<String, i64>,
    bank: Vec<Tensor>,
    classes: i64,
}

impl TrainingTask for ControlnetTask<'_> {
    fn stores(&mut self) -> Vec<(&'static str, &mut VarStore)> {
        vec![
            (CONTROLNET_WEIGHTS, &mut self.vs),
            (CONTROLNET_EMA, &mut self.ema_vs),
        ]
    }
    fn learners(&mut self) -> Vec<(&'static str, &mut Learner)> {
        vec![("optimizer", &mut self.learner)]
    }
    fn ema(&self, _step: u64) -> Option<Ema<'_>> {
        Some(Ema {
            averaged: &self.ema_vs,
            source: &self.vs,
            momentum: self.p.ema_decay,
        })
    }
    fn step(&mut self, s: &Step) -> Result<StepOutput, StageError> {
        let (p, dev) = (self.p, self.dev);
        let batch = self.sampler.batch(s.step, p.batch_size);
        let b = p.batch_size;
        let x1 =
            (batch_tensor(&batch.input, &batch.input_shape) * self.ld.scale_factor).to_device(dev);
        let ls: Vec<i64> = batch.label_shape.iter().map(|&v| v as i64).collect();
        let classes = Tensor::from_slice(&batch.label).view(ls.as_slice());
        let ids: Vec<i64> = batch.ids.iter().map(|id| self.rows[id]).collect();
        let idx = Tensor::from_slice(&ids).to_device(dev);
        let conds: Vec<Tensor> = self.bank.iter().map(|t| t.index_select(0, &idx)).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
        let drops = [
            dropout_mask(b, p.dropout_content, &mut rng, dev),
            dropout_mask(b, p.dropout_style, &mut rng, dev),
        ];
        let mask_drop = dropout_mask(b, p.mask_dropout, &mut rng, dev);
        let mask = drop_masks(&one_hot(&classes, self.classes).to_device(dev), &mask_drop);
        tch::manual_seed(s.seed as i64);
        let model = &self.ld.model;
        let cond = Cond::of(model.config().condition, &conds);
        let loss = tch::autocast(self.learner.autocast(), || -> Result<Tensor, StageError> {
            let (xt, t_model, target) = training_target(self.ld.method, &self.ddpm, &x1);
            let emb = model
                .embed(&cond, &[Some(&drops[0]), Some(&drops[1])])
                .map_err(fail)?;
            let pred = self
                .control
                .forward_emb(model, &xt, &t_model, &emb, &mask)
                .map_err(fail)?;
            Ok((pred.to_kind(Kind::Float) - target)
                .square()
                .mean(Kind::Float))
        })?;
        let (grad_norm, stepped) = self.learner.minimize(&loss, s)?;
        let dropped = Vec::<bool>::try_from(mask_drop.to_device(Device::Cpu))
            .map_err(fail)?
            .iter()
            .filter(|&&d| d)
            .count();
        let rec = serde_json::json!({
            "loss": loss.double_value(&[]), "grad_norm": grad_norm, "stepped": stepped,
            "masks_dropped": dropped,
        });
        Ok(StepOutput {
            record: rec.as_object().expect("object").clone(),
            stepped,
        })
    }
}

/// A loaded `controlnet` artifact.
pub struct LoadedControlnet {
    pub vs: VarStore,
    pub control: ControlNet,
    pub artifact: ControlnetArtifact,
}

/// Loads a `controlnet` artifact for the base model `ld` (whose input digest is
/// `base_digest`): refuses a ControlNet trained on another base.
pub fn load_controlnet(
    dir: &Path,
    weights: SampleWeights,
    ld: &LoadedDiffusion,
    base_digest: &str,
    dev: Device,
) -> Result<LoadedControlnet, StageError> {
    let artifact: ControlnetArtifact = read_json(&dir.join("config.json"))?;
    if artifact.base_digest != base_digest {
        return Err(StageError::input(format!(
            "model: the ControlNet '{}' was trained on the base model with digest {}, not on \
             this 'model' input ({base_digest}): connect the diffusion model it was trained on",
            dir.display(),
            artifact.base_digest
        )));
    }
    if artifact.control.mask_channels != artifact.labels.len() as i64 + 1 {
        return Err(StageError::input(format!(
            "controlnet: '{}' has {} mask channels but {} labels {:?} (expected labels + \
             background): not a controlnet_train output",
            dir.join("config.json").display(),
            artifact.control.mask_channels,
            artifact.labels.len(),
            artifact.labels
        )));
    }
    let mut vs = VarStore::new(dev);
    let control = ControlNet::new(&vs.root(), ld.model.config(), &artifact.control)
        .map_err(|e| StageError::input(format!("'{}': {e}", dir.display())))?;
    let file = match weights {
        SampleWeights::Ema => CONTROLNET_EMA,
        SampleWeights::Model => CONTROLNET_WEIGHTS,
    };
    load_frozen(&mut vs, &dir.join(file))?;
    Ok(LoadedControlnet {
        vs,
        control,
        artifact,
    })
}

/// The base's image window (`input_size * scale` mask voxels) of a subject's class map,
/// centred on its foreground centroid (the volume centre without foreground), clamped to
/// the volume, background outside it. Returns the crop and its origin.
pub fn mask_window(classes: &[u8], shape: [usize; 3], size: [usize; 3]) -> (Vec<u8>, [i64; 3]) {
    let [_, ny, nz] = shape;
    let (mut sum, mut n) = ([0f64; 3], 0usize);
    for (i, &c) in classes.iter().enumerate() {
        if c > 0 {
            sum[0] += (i / (ny * nz)) as f64;
            sum[1] += ((i / nz) % ny) as f64;
            sum[2] += (i % nz) as f64;
            n += 1;
        }
    }
    let centre: [f64; 3] = std::array::from_fn(|a| {
        if n > 0 {
            sum[a] / n as f64
        } else {
            (shape[a] as f64 - 1.0) / 2.0
        }
    });
    let origin: [i64; 3] = std::array::from_fn(|a| {
        let (s, k) = (shape[a] as i64, size[a] as i64);
        if s <= k {
            -((k - s) / 2)
        } else {
            ((centre[a].round() as i64) - k / 2).clamp(0, s - k)
        }
    });
    let mut out = vec![0u8; size.iter().product()];
    let mut o = 0;
    for i in 0..size[0] as i64 {
        for j in 0..size[1] as i64 {
            for k in 0..size[2] as i64 {
                let (x, y, z) = (origin[0] + i, origin[1] + j, origin[2] + k);
                if x >= 0
                    && y >= 0
                    && z >= 0
                    && x < shape[0] as i64
                    && y < shape[1] as i64
                    && z < shape[2] as i64
                {
                    out[o] = classes[((x as usize * ny) + y as usize) * nz + z as usize];
                }
                o += 1;
            }
        }
    }
    (out, origin)
}

/// What [`transform_mask`] did to a mask.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MaskEdits {
    pub flipped: [bool; 3],
    pub elastic: bool,
    /// The class index dropped (set to background).
    pub dropped_class: Option<u8>,
}

/// Applies the random edits of `t` to a class map `[X, Y, Z]` (seeded by `seed`): axis flips,
/// a smooth deformation (nearest-neighbour resampling through a displacement field drawn on
/// a coarse grid and upsampled trilinearly) and dropping one present foreground class.
pub fn transform_mask(
    classes: &[u8],
    size: [usize; 3],
    t: &MaskTransform,
    seed: u64,
) -> Result<(Vec<u8>, MaskEdits), StageError> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let s = size.map(|v| v as i64);
    let mut m = Tensor::from_slice(classes).view([1, 1, s[0], s[1], s[2]]);
    let mut edits = MaskEdits::default();
    // One draw per axis whatever `flip_axes` says, so the later edits draw the same numbers.
    let flips: Vec<i64> = (0..3)
        .filter(|&a| {
            let f = t.flip_p > 0.0 && rng.random_bool(t.flip_p) && t.flip_axes[a];
            edits.flipped[a] = f;
            f
        })
        .map(|a| a as i64 + 2)
        .collect();
    if !flips.is_empty() {
        m = m.flip(flips.as_slice());
    }
    if t.elastic > 0.0 {
        let g = t.elastic_grid;
        let normal: Vec<f32> = (0..3 * g * g * g)
            .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
            .collect();
        let disp = (Tensor::from_slice(&normal).view([1, 3, g, g, g]) * (t.elastic / 2.0))
            .clamp(-t.elastic, t.elastic)
            .upsample_trilinear3d([s[0], s[1], s[2]], true, None, None, None);
        // Sampling positions in voxels, normalised to [-1, 1] (align_corners); the grid's
        // last axis is (z, y, x) for an [N, C, X, Y, Z] input.
        let axis = |a: usize| {
            let n = s[a];
            let pos = Tensor::arange(n, (Kind::Float, Device::Cpu));
            let mut shape = [1i64, 1, 1, 1];
            shape[a + 1] = n;
            let p = pos.view(shape) + disp.select(1, a as i64);
            p * (2.0 / (n - 1).max(1) as f64) - 1.0
        };
        let grid = Tensor::stack(&[axis(2), axis(1), axis(0)], -1);
        m = m
            .to_kind(Kind::Float)
            .grid_sampler(&grid, 1, 0, true)
            .round()
            .to_kind(Kind::Uint8);
        edits.elastic = true;
    }
    let mut out = Vec::<u8>::try_from(m.contiguous().view([-1])).map_err(fail)?;
    if t.drop_class_p > 0.0 && rng.random_bool(t.drop_class_p) {
        let mut present: Vec<u8> = out.iter().copied().filter(|&c| c > 0).collect();
        present.sort_unstable();
        present.dedup();
        if !present.is_empty() {
            let c = present[rng.random_range(0..present.len())];
            out.iter_mut().filter(|v| **v == c).for_each(|v| *v = 0);
            edits.dropped_class = Some(c);
        }
    }
    Ok((out, edits))
}

/// The sampler settings of a `controlnet_sample` as `sample`'s parameters.
fn sample_settings(p: &ControlnetSampleParams) -> SampleParams {
    SampleParams {
        batch_size: p.batch_size,
        sampler: p.sampler,
        steps: p.steps,
        guidance: p.guidance,
        ddpm_variance: p.ddpm_variance,
        ode_method: p.ode_method,
        last_step_size: p.last_step_size,
        diffusion_norm: p.diffusion_norm,
        decode_tile: p.decode_tile,
        seed: p.seed,
        ..SampleParams::default()
    }
}

/// One synthetic sample to draw.
struct Planned {
    id: String,
    mask_subject: String,
    style_subject: String,
    classes: Vec<u8>,
    edits: MaskEdits,
}

pub fn sample(
    _: &ControlnetSample,
    p: &ControlnetSampleParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let base_in = ctx.input("model")?.clone();
    let cn_dir = ctx.input("controlnet")?.dir.clone();
    let vae_dir = ctx.input("vae")?.dir.clone();
    let ld = load_diffusion(&base_in.dir, WeightsChoice::Ema, dev)?;
    let cn_json: ControlnetArtifact = read_json(&cn_dir.join("config.json"))?;
    // The base weights the ControlNet was trained against.
    let ld = if cn_json.base_weights == SampleWeights::Model {
        load_diffusion(&base_in.dir, WeightsChoice::Model, dev)?
    } else {
        ld
    };
    let lc = load_controlnet(&cn_dir, p.weights, &ld, &base_in.digest.to_string(), dev)?;
    let cfg = ld.model.config().clone();
    let ccfg = lc.artifact.control.clone();
    let items = by_id(&ctx.input("volumes")?.items);
    let masks_from: Vec<String> = if p.masks_from.is_empty() {
        lc.artifact.subjects.clone()
    } else {
        p.masks_from.clone()
    };
    for id in &masks_from {
        if !items.contains_key(id) {
            return Err(StageError::input(format!(
                "masks_from: subject '{id}' is not among the 'volumes' input"
            )));
        }
    }
    check_labelled(&items, &masks_from)?;
    let lut = label_lut(&lc.artifact.labels);
    let bank = condition_bank(ctx, &base_in.dir, &cfg)?;
    let (vae_vs, vae) = super::vae::load_vae(&vae_dir, dev)?;
    let f = vae.config().downsample_factor();
    if f != ccfg.scale {
        return Err(StageError::input(format!(
            "vae: the VAE upsamples latents {f}x, the ControlNet's masks are {}x the latent grid",
            ccfg.scale
        )));
    }
    let msize = ccfg.mask_size(cfg.input_size).map(|v| v as usize);
    // Style donors: the ControlNet's training subjects, by domain.
    let domain_of_subject: BTreeMap<String, String> = items
        .iter()
        .map(|(id, it)| (id.clone(), domain_of(it)))
        .collect();
    let donors: Vec<String> = lc
        .artifact
        .subjects
        .iter()
        .filter(|s| bank.row(s).is_some())
        .cloned()
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
    let mut planned = Vec::new();
    for id in &masks_from {
        check_mask_values(&items[id], &lc.artifact.labels)?;
        let case = read_case(&items[id], None, &lut)?;
        let (window, _) = mask_window(&case.classes, case.image.shape, msize);
        for k in 0..p.samples_per_mask {
            let i = planned.len();
            let (classes, edits) = transform_mask(
                &window,
                msize,
                &p.mask_transform,
                step_seed(p.seed, i as u64),
            )?;
            let style_subject = match p.style_from {
                StyleFrom::Same => id.clone(),
                StyleFrom::OtherDomains => {
                    let mine = &domain_of_subject[id];
                    let others: Vec<&String> = donors
                        .iter()
                        .filter(|d| domain_of_subject.get(*d) != Some(mine))
                        .collect();
                    if others.is_empty() {
                        return Err(StageError::input(format!(
                            "style_from: no training subject of a domain other than '{mine}' to take a style from"
                        )));
                    }
                    others[rng.random_range(0..others.len())].clone()
                }
            };
            planned.push(Planned {
                id: format!("synth_{id}_{k:02}"),
                mask_subject: id.clone(),
                style_subject,
                classes,
                edits,
            });
        }
    }
    let row = |s: &str| -> Result<usize, StageError> {
        if cfg.condition == ConditionMode::None {
            return Ok(0);
        }
        bank.row(s).ok_or_else(|| {
            StageError::input(format!(
                "subject '{s}' has no condition vectors in the bank (connect a 'factors' input that covers it)"
            ))
        })
    };
    let settings = sample_settings(p);
    let gen = LatentSampler::new(&ld, &settings)?;
    let n = planned.len();
    let bar = ctx.progress(
        (n.div_ceil(p.batch_size) * p.steps) as u64,
        "sampling steps",
    );
    let vol_root = ctx.output_dir("samples")?;
    let [sx, sy, sz] = ld.image_spacing;
    let affine = [
        [sx, 0.0, 0.0, 0.0],
        [0.0, sy, 0.0, 0.0],
        [0.0, 0.0, sz, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let _ng = tch::no_grad_guard();
    let (mut records, mut montage_rows, mut done_steps) = (Vec::new(), Vec::new(), 0u64);
    let ms = msize.map(|v| v as i64);
    for (bi, start) in (0..n).step_by(p.batch_size).enumerate() {
        ctx.check_cancelled()?;
        let chunk = &planned[start..(start + p.batch_size).min(n)];
        let b = chunk.len();
        let c_rows: Vec<usize> = chunk
            .iter()
            .map(|s| row(&s.mask_subject))
            .collect::<Result<_, _>>()?;
        let s_rows: Vec<usize> = chunk
            .iter()
            .map(|s| row(&s.style_subject))
            .collect::<Result<_, _>>()?;
        // Metadata carries the domain: it follows the style donor.
        let conds = match cfg.condition {
            ConditionMode::Metadata => bank.gather(cfg.condition, &s_rows, &s_rows, dev),
            _ => bank.gather(cfg.condition, &c_rows, &s_rows, dev),
        };
        let cond = Cond::of(cfg.condition, &conds);
        let emb = ld.model.embed(&cond, &[]).map_err(fail)?;
        let null = ld.model.null_embed(b as i64);
        let flat: Vec<u8> = chunk.iter().flat_map(|s| s.classes.clone()).collect();
        let mask = one_hot(
            &Tensor::from_slice(&flat).view([b as i64, ms[0], ms[1], ms[2]]),
            ccfg.mask_channels,
        )
        .to_device(dev);
        let tokens = MaskTokens::new(&ld.model, &lc.control, &mask).map_err(fail)?;
        let cancel = ctx.cancel_flag().clone();
        let progress = |k: usize| -> Result<(), StageError> {
            if cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            bar.set_position(done_steps + k.min(p.steps) as u64);
            Ok(())
        };
        let model_fn = |xt: &Tensor, t: &Tensor| -> Result<Tensor, StageError> {
            controlled_guided_output(
                &ld.model,
                &lc.control,
                xt,
                t,
                &emb,
                &null,
                &tokens,
                &p.guidance,
                p.mask_weight,
            )
            .map_err(fail)
        };
        let latents = gen.sample_with(b, step_seed(p.seed, bi as u64), model_fn, progress)?;
        done_steps += p.steps as u64;
        for (k, s) in chunk.iter().enumerate() {
            let zk = latents.narrow(0, k as i64, 1);
            let vol = decode_to_volume(&vae, &zk, p.decode_tile, affine)?;
            if vol.shape != msize {
                return Err(fail(format!(
                    "the decoded volume has shape {:?}, the mask {msize:?}",
                    vol.shape
                )));
            }
            let values: Vec<u8> = s
                .classes
                .iter()
                .map(|&c| {
                    if c == 0 {
                        0
                    } else {
                        lc.artifact.labels[c as usize - 1]
                    }
                })
                .collect();
            let label = LabelVolume::from_parts(values, msize, affine).map_err(fail)?;
            let mask_item = &items[&s.mask_subject];
            let mut attrs = BTreeMap::new();
            attrs.insert("subject".into(), serde_json::json!(s.id));
            attrs.insert("synthetic".into(), serde_json::json!(true));
            attrs.insert("mask_subject".into(), serde_json::json!(s.mask_subject));
            attrs.insert("style_subject".into(), serde_json::json!(s.style_subject));
            attrs.insert(
                "domain".into(),
                serde_json::json!(domain_of_subject[&s.mask_subject]),
            );
            if let Some(d) = mask_item.attrs.get("domain_id") {
                attrs.insert("domain_id".into(), d.clone());
            }
            attrs.insert(
                "style_domain".into(),
                serde_json::json!(domain_of_subject.get(&s.style_subject)),
            );
            attrs.insert("shape".into(), serde_json::json!(msize));
            attrs.insert("spacing".into(), serde_json::json!(ld.image_spacing));
            attrs.insert(
                "mask_edits".into(),
                serde_json::to_value(&s.edits).expect("json"),
            );
            let item_dir = ctx.emit_item("volumes", &s.id, attrs.clone())?;
            let extra: Attrs = attrs.clone().into_iter().collect();
            write_zarr(&item_dir.join(IMAGE_ZARR), &vol, &extra).map_err(fail)?;
            write_zarr(&item_dir.join(LABEL_ZARR), &label, &extra).map_err(fail)?;
            write_nifti(
                &vol_root.join(format!("{}.nii.gz", s.id)),
                &vol,
                NiftiDtype::Float32,
            )
            .map_err(fail)?;
            write_nifti_labels(&vol_root.join(format!("{}_label.nii.gz", s.id)), &label)
                .map_err(fail)?;
            if montage_rows.len() < p.montage {
                let as_float = Volume::from_parts(
                    s.classes.iter().map(|&c| c as f32).collect(),
                    msize,
                    affine,
                )
                .map_err(fail)?;
                let mut r = orthogonal_slices(&vol, &s.id, 0.0, 1.0);
                r.extend(orthogonal_slices(
                    &as_float,
                    "mask",
                    0.0,
                    (ccfg.mask_channels - 1) as f32,
                ));
                montage_rows.push(r);
            }
            records.push(serde_json::json!({
                "id": s.id, "mask_subject": s.mask_subject, "style_subject": s.style_subject,
                "edits": s.edits,
            }));
        }
    }
    bar.finish_and_clear();
    drop(vae_vs);
    if !montage_rows.is_empty() {
        montage(
            &vol_root.join("montage.png"),
            &format!(
                "ControlNet samples and their masks ({} steps, w_c {} w_s {} w_m {})",
                p.steps, p.guidance.content, p.guidance.style, p.mask_weight
            ),
            &montage_rows,
            140,
        )
        .map_err(fail)?;
    }
    write_json(
        &vol_root.join("samples.json"),
        &serde_json::json!({
            "samples": records, "sampler": gen.sampler, "steps": p.steps,
            "guidance": p.guidance, "mask_weight": p.mask_weight, "labels": lc.artifact.labels,
            "seed": p.seed, "mask_size": msize, "style_from": p.style_from,
        }),
    )?;
    ctx.set_metric("samples", n);
    Ok(())
}

/// Per-class Dice means of scored cases, by label value, and the foreground mean.
fn dice_means(cases: &[(String, Vec<ClassMetrics>)], labels: &[u8]) -> serde_json::Value {
    summary_means(cases, labels)
}

pub fn mask_adherence(
    _: &MaskAdherence,
    p: &MaskAdherenceParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let seg_dir = ctx.input("segmenter")?.dir.clone();
    let (_vs, net, cfg, splits) = load_segmenter(&seg_dir, dev)?;
    if cfg.network != meduet_stages::kinds::segment::Network::Unet {
        return Err(StageError::input(
            "segmenter: mask adherence segments images; give a segmenter with network = \"unet\" \
             (a UNETR reads latents, which synthesized volumes do not have)",
        ));
    }
    let lut = label_lut(&cfg.labels);
    let k = cfg.labels.len() as u8;
    let sw = SlidingWindow {
        roi: cfg.roi,
        overlap: p.overlap,
        batch: p.sw_batch,
        scale: cfg.scale,
        sigma_scale: p.sigma_scale,
    };
    let generated = ctx.input("generated")?.items.clone();
    let gen_map = by_id(&generated);
    let gen_ids: Vec<String> = generated.iter().map(|i| i.id.clone()).collect();
    check_labelled(&gen_map, &gen_ids)?;
    let real = ctx.inputs("real").first().map(|r| by_id(&r.items));
    let mut sets: Vec<(&str, Vec<(String, &Item)>)> = vec![(
        "synthetic",
        generated.iter().map(|i| (i.id.clone(), i)).collect(),
    )];
    if let Some(real) = &real {
        let test: Vec<(String, &Item)> = splits
            .test
            .iter()
            .map(|id| {
                real.get(id).map(|it| (id.clone(), it)).ok_or_else(|| {
                    StageError::input(format!(
                        "real: the segmenter's test subject '{id}' is not among the 'real' volumes"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        sets.push(("real_test", test));
    }
    let n: usize = sets.iter().map(|s| s.1.len()).sum();
    let bar = ctx.progress(n as u64, "cases");
    let mut csv = String::from("case,set,label,dice,n_pred,n_ref\n");
    let mut by_set: BTreeMap<&str, Vec<(String, Vec<ClassMetrics>)>> = BTreeMap::new();
    for (set, cases) in &sets {
        for (id, it) in cases {
            ctx.check_cancelled()?;
            let case = read_case(it, None, &lut)?;
            let (pred, _) = segment_case(&net, &case, &sw, dev)?;
            let m = per_class(
                &pred,
                &case.classes,
                case.image.shape,
                case.image.spacing(),
                k,
            );
            for (c, cm) in m.iter().enumerate() {
                csv.push_str(&format!(
                    "{id},{set},{},{},{},{}\n",
                    cfg.labels[c],
                    cm.dice.map_or(String::new(), |d| format!("{d:.6}")),
                    cm.n_pred,
                    cm.n_ref
                ));
            }
            by_set.entry(set).or_default().push((id.clone(), m));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let summary: serde_json::Map<String, serde_json::Value> = by_set
        .iter()
        .map(|(s, cases)| (s.to_string(), dice_means(cases, &cfg.labels)))
        .collect();
    let fg = |s: &str| {
        summary
            .get(s)
            .and_then(|v| v["foreground_mean"]["Dice"].as_f64())
    };
    let out = ctx.output_dir("report")?;
    write_json(
        &out.join("adherence.json"),
        &serde_json::json!({
            "sets": summary, "labels": cfg.labels,
            "synthetic_dice": fg("synthetic"), "real_test_dice": fg("real_test"),
        }),
    )?;
    std::fs::write(out.join("per_case.csv"), csv)
        .map_err(|e| StageError::io(&out.join("per_case.csv"), e))?;
    let groups: Vec<String> = cfg.labels.iter().map(|l| format!("label {l}")).collect();
    let series: Vec<String> = by_set.keys().map(|s| s.to_string()).collect();
    let values: Vec<Vec<f64>> = cfg
        .labels
        .iter()
        .map(|l| {
            by_set
                .keys()
                .map(|s| {
                    summary[*s]["mean"][l.to_string()]["Dice"]
                        .as_f64()
                        .unwrap_or(0.0)
                })
                .collect()
        })
        .collect();
    bar_chart(
        &out.join("dice.png"),
        "mask adherence: Dice against the conditioning mask (synthetic) and the label (real test)",
        "Dice",
        &groups,
        &series,
        &values,
    )
    .map_err(fail)?;
    if let Some(d) = fg("synthetic") {
        ctx.set_metric("synthetic_dice", d);
    }
    if let Some(d) = fg("real_test") {
        ctx.set_metric("real_test_dice", d);
    }
    tracing::info!(
        "mask adherence: Dice {} on {} synthetic volumes, {} on real test volumes",
        fg("synthetic").map_or("-".into(), |d| format!("{d:.3}")),
        generated.len(),
        fg("real_test").map_or("-".into(), |d| format!("{d:.3}"))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meduet_stages::data::volume::VolumeOf;

    fn item(dir: &Path, id: &str, label: Option<Vec<u8>>) -> Item {
        let d = dir.join(id);
        std::fs::create_dir_all(&d).unwrap();
        if let Some(l) = label {
            let v =
                VolumeOf::from_parts(l, [2, 2, 2], meduet_stages::data::volume::IDENTITY).unwrap();
            write_zarr(&d.join(LABEL_ZARR), &v, &Attrs::new()).unwrap();
        }
        Item {
            id: id.into(),
            dir: d,
            attrs: Default::default(),
            digest: meduet_cache::ContentDigest::of_bytes(id.as_bytes()),
        }
    }

    #[test]
    fn masks_without_labels_or_with_unknown_values_are_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let a = item(t.path(), "a", None);
        let items = by_id(&[a]);
        let e = check_labelled(&items, &["a".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("volumes: subject 'a' has no label"), "{e}");
        let b = item(t.path(), "b", Some(vec![0, 1, 2, 5, 0, 0, 1, 1]));
        let e = check_mask_values(&b, &[3, 4]).unwrap_err().to_string();
        assert!(
            e.contains("none of the ControlNet's 2 classes") && e.contains("[1, 2, 5]"),
            "{e}"
        );
        assert!(
            check_mask_values(&b, &[2, 3]).is_ok(),
            "other values are background"
        );
    }

    #[test]
    fn mask_window_centres_on_the_foreground_and_pads() {
        // 6^3 volume, foreground at the corner (5, 5, 5): a 4^3 window is clamped inside.
        let mut c = vec![0u8; 216];
        c[215] = 3;
        let (w, origin) = mask_window(&c, [6, 6, 6], [4, 4, 4]);
        assert_eq!(origin, [2, 2, 2]);
        assert_eq!(w[63], 3);
        // A window larger than the volume is centred with background around it.
        let (w, origin) = mask_window(&c, [6, 6, 6], [8, 8, 8]);
        assert_eq!(origin, [-1, -1, -1]);
        assert_eq!(w.iter().filter(|&&v| v == 3).count(), 1);
        assert_eq!(w[(6 * 8 + 6) * 8 + 6], 3);
    }

    #[test]
    fn mask_edits_flip_deform_and_drop_as_told() {
        let s = [8usize, 8, 8];
        let mut c = vec![0u8; 512];
        for (i, v) in c.iter_mut().enumerate() {
            let x = i / 64;
            *v = if x < 3 {
                1
            } else if x > 5 {
                2
            } else {
                0
            };
        }
        let none = MaskTransform::default();
        assert_eq!(transform_mask(&c, s, &none, 1).unwrap().0, c);
        let flip = MaskTransform {
            flip_p: 1.0,
            ..none
        };
        let (f, e) = transform_mask(&c, s, &flip, 1).unwrap();
        assert_eq!(e.flipped, [true; 3]);
        assert_eq!(f[0], 2, "axis 0 reversed");
        // Left-right only: axes 1 and 2 stay; the result is axis 0's flip alone.
        let lr = MaskTransform {
            flip_axes: [true, false, false],
            ..flip
        };
        let (f, e) = transform_mask(&c, s, &lr, 1).unwrap();
        assert_eq!(e.flipped, [true, false, false]);
        let by_hand: Vec<u8> = (0..512).map(|i| c[(7 - i / 64) * 64 + i % 64]).collect();
        assert_eq!(f, by_hand);
        let off = MaskTransform {
            flip_axes: [false; 3],
            ..flip
        };
        assert_eq!(transform_mask(&c, s, &off, 1).unwrap().0, c);
        let drop = MaskTransform {
            drop_class_p: 1.0,
            ..none
        };
        let (d, e) = transform_mask(&c, s, &drop, 2).unwrap();
        let gone = e.dropped_class.unwrap();
        assert!(!d.contains(&gone) && d.iter().any(|&v| v > 0));
        let el = MaskTransform {
            elastic: 2.0,
            ..none
        };
        let (d, e) = transform_mask(&c, s, &el, 3).unwrap();
        assert!(e.elastic);
        let changed = d.iter().zip(&c).filter(|(a, b)| a != b).count();
        assert!(changed > 0 && changed < 256, "{changed}");
        assert!(
            d.iter().all(|&v| v <= 2),
            "nearest neighbour keeps the classes"
        );
        // Same seed, same edit.
        assert_eq!(transform_mask(&c, s, &el, 3).unwrap().0, d);
    }
}
