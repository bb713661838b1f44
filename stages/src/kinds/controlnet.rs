//! Declarations of the mask-conditioned synthesis kinds (the paper's section 4.2, Fig. 6;
//! their code runs in the `meduet-torch` worker, except `fig6_table`).
//!
//! | kind                 | inputs                                          | output(s)            | does |
//! |----------------------|-------------------------------------------------|----------------------|------|
//! | `controlnet_train`   | `model` (diffusion), `latents`, `volumes`, `factors`? | `controlnet`   | a ControlNet on a frozen DiT/SiT: mask encoder, copied blocks, zero projections; mask dropout |
//! | `controlnet_sample`  | `model`, `controlnet`, `vae`, `volumes`, `factors`? | `volumes`, `samples` | samples image + label pairs from (transformed) training masks, dual CFG + mask guidance |
//! | `mask_adherence`     | `segmenter`, `generated`, `real`?               | `report`             | Dice of a real-data segmenter's prediction on synthesized volumes against their conditioning masks, beside its Dice on real test volumes |
//! | `fig6_table`         | `reports` (many `segment_eval`)                 | `table`              | Fig. 6: Dice / HD95 per regime and label fraction, mean and spread over seeds |
//!
//! A `controlnet` artifact holds `controlnet.safetensors` (the trainable weights, names in
//! `reference/controlnet_ref.py`), `ema.safetensors`, `config.json` (the ControlNet's sizes,
//! the mask label values, the base model's digest, the training parameters and subjects),
//! `losses.jsonl` and `losses.png`.

use std::collections::BTreeMap;

use meduet_engine::{Arity, ArtifactType, InputSpec, OutputSpec, Resources, Runtime, Stage};
use serde::{Deserialize, Serialize};

use crate::analysis::stats::Spread;
use crate::kinds::diffusion::{
    DdpmVariance, GuidanceParams, OdeMethod, SampleWeights, Sampler, DIFFUSION, SAMPLES,
};
use crate::kinds::pretrain::FACTORS;
use crate::kinds::resample::VOLUMES;
use crate::kinds::segment::{
    auto, input, SplitParams, WindowParams, RESULTS_TABLE, SEGMENTATION_REPORT, SEGMENTER,
};
use crate::kinds::vae::{LATENTS, TORCH, VAE};
use crate::training::{
    training_params, training_stage, Amp, OptimConfig, ResolvedOptim, ResolvedSchedule,
    ScheduleConfig, TrainingDefaults, MOVED_PARAMS,
};

/// A trained ControlNet.
pub const CONTROLNET: ArtifactType = ArtifactType::single("controlnet");
/// A mask-adherence report.
pub const MASK_ADHERENCE: ArtifactType = ArtifactType::single("mask_adherence");

/// MAISI's mask-encoder widths (`conditioning_embedding_num_channels = [8, 32, 64]` for
/// its 4x VAE), continued by doubling: the first `log2(scale) + 1` are the default.
pub const MAISI_EMBEDDING_CHANNELS: [i64; 6] = [8, 32, 64, 128, 256, 512];

/// `controlnet_train` parameters. Defaults: the base's optimisation (AdamW, warmup +
/// cosine, EMA), mask dropout 0.1, half the base's blocks copied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlnetTrainParams {
    /// Label values that become mask classes, in order (empty: every non-zero value in
    /// the training subjects' labels); other values count as background.
    pub labels: Vec<u8>,
    /// Which subjects' masks train it: the labelled training subjects of this split (the
    /// same rule and seeds as `segment_train`, so its test and held-out subjects never
    /// shape the synthetic data).
    pub split: SplitParams,
    /// Seed of the labelled subset (`segment_train`'s `seed` for the same subjects).
    pub label_seed: u64,
    /// Copied DiT blocks (default: half the base's depth, at least 1).
    pub depth: Option<i64>,
    /// Mask encoder widths (default: MAISI's, as many as the VAE's halvings need).
    pub embedding_channels: Vec<i64>,
    /// The base weights the ControlNet is trained against (and sampled with).
    pub base_weights: SampleWeights,
    /// Probability of replacing a mask by zeros (no mask), for mask guidance.
    pub mask_dropout: f64,
    /// Classifier-free dropout of the content / style conditions (as the base's).
    pub dropout_content: f64,
    pub dropout_style: f64,
    /// Probability that a training crop is centred on a foreground voxel.
    pub fg_fraction: f64,
    pub steps: u64,
    pub batch_size: usize,
    /// The optimiser (default AdamW, lr 1e-4 to min_lr 1e-5, no weight decay).
    pub optim: OptimConfig,
    /// The learning-rate schedule (default 10 warmup steps, then cosine).
    pub schedule: ScheduleConfig,
    pub grad_clip: f64,
    /// EMA decay of the sampling weights, updated every step.
    pub ema_decay: f64,
    pub checkpoint_every: u64,
    pub amp: Amp,
    pub seed: u64,
}

impl Default for ControlnetTrainParams {
    fn default() -> Self {
        Self {
            labels: vec![],
            split: SplitParams::default(),
            label_seed: 0,
            depth: None,
            embedding_channels: vec![],
            base_weights: SampleWeights::Ema,
            mask_dropout: 0.1,
            dropout_content: 0.2,
            dropout_style: 0.2,
            fg_fraction: 0.5,
            steps: 200,
            batch_size: 2,
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            grad_clip: 0.0,
            ema_decay: 0.9999,
            checkpoint_every: 100,
            amp: Amp::Off,
            seed: 0,
        }
    }
}

training_params!(ControlnetTrainParams);

impl ControlnetTrainParams {
    /// The copied depth for a base of `base_depth` blocks.
    pub fn depth_for(&self, base_depth: i64) -> i64 {
        self.depth.unwrap_or((base_depth / 2).max(1))
    }

    /// The mask encoder widths for latents `scale` times coarser than the masks.
    pub fn embedding_channels_for(&self, scale: i64) -> Vec<i64> {
        if !self.embedding_channels.is_empty() {
            return self.embedding_channels.clone();
        }
        let n = (scale.max(1) as f64).log2().round() as usize + 1;
        MAISI_EMBEDDING_CHANNELS[..n.min(MAISI_EMBEDDING_CHANNELS.len())].to_vec()
    }
}

/// `controlnet_train`'s optimiser and schedule when the pipeline file does not say.
pub const CONTROLNET_TRAINING: TrainingDefaults = TrainingDefaults {
    optim: ResolvedOptim::adamw(1e-4, 1e-5, 0.0),
    schedule: ResolvedSchedule::cosine(10),
};

fn check_prob(name: &str, p: f64) -> Result<(), String> {
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("{name}: {p} must be a probability in [0, 1]"));
    }
    Ok(())
}

/// `controlnet_train`.
pub struct ControlnetTrain;

impl Stage for ControlnetTrain {
    type Params = ControlnetTrainParams;
    const KIND: &'static str = "controlnet_train";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "trains a ControlNet (mask encoder, copy of the first DiT blocks, zero projections) that conditions a frozen DiT/SiT on segmentation masks";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            input(
                "model",
                DIFFUSION,
                Arity::One,
                "the trained DiT/SiT (frozen)",
            ),
            input(
                "latents",
                LATENTS,
                Arity::One,
                "latents of the volumes (vae_encode)",
            ),
            input(
                "volumes",
                VOLUMES,
                Arity::One,
                "the encoded volumes, with labels (the masks)",
            ),
            input(
                "factors",
                FACTORS,
                Arity::Optional,
                "condition vectors of the subjects (default: the base model's bank)",
            ),
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "controlnet",
            ty: CONTROLNET,
            doc: "weights, EMA weights, config (sizes, labels, base digest), loss curve",
        }]
    }
    fn default_resources(&self) -> Resources {
        auto()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &ControlnetTrainParams) -> Option<u64> {
        Some(p.seed)
    }
    training_stage!(
        ControlnetTrainParams,
        |_: &ControlnetTrainParams| CONTROLNET_TRAINING,
        MOVED_PARAMS
    );
    fn validate(&self, p: &ControlnetTrainParams) -> Result<(), String> {
        p.split.validate()?;
        if p.batch_size == 0 {
            return Err("batch_size: must be positive".into());
        }
        if p.labels.contains(&0) {
            return Err("labels: 0 is the background; list foreground label values only".into());
        }
        if let Some(d) = p.depth {
            if d < 1 {
                return Err(format!("depth: {d} copied blocks; at least 1"));
            }
        }
        if p.embedding_channels.iter().any(|&c| c < 1) {
            return Err(format!(
                "embedding_channels: {:?} must be positive widths",
                p.embedding_channels
            ));
        }
        p.training()?;
        if !(0.0..=1.0).contains(&p.ema_decay) {
            return Err(format!("ema_decay: {} must be in [0, 1]", p.ema_decay));
        }
        check_prob("mask_dropout", p.mask_dropout)?;
        check_prob("dropout_content", p.dropout_content)?;
        check_prob("dropout_style", p.dropout_style)?;
        check_prob("fg_fraction", p.fg_fraction)?;
        Ok(())
    }
}

/// Random edits of a conditioning mask (each seeded per sample).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskTransform {
    /// Probability of flipping each axis of `flip_axes`.
    pub flip_p: f64,
    /// Which axes may flip (volumes are RAS after `resample`: `[true, false, false]` is
    /// left-right only). Default: all three.
    #[serde(skip_serializing_if = "all_axes")]
    pub flip_axes: [bool; 3],
    /// Largest displacement of a smooth random deformation, in mask voxels (0: none):
    /// Gaussian displacements on a coarse grid of `elastic_grid`^3 points (standard
    /// deviation `elastic / 2`, clipped to `elastic`), upsampled trilinearly, labels
    /// resampled by nearest neighbour.
    pub elastic: f64,
    pub elastic_grid: i64,
    /// Probability of dropping one present foreground class (set to background).
    pub drop_class_p: f64,
}

impl Default for MaskTransform {
    fn default() -> Self {
        Self {
            flip_p: 0.0,
            flip_axes: [true; 3],
            elastic: 0.0,
            elastic_grid: 4,
            drop_class_p: 0.0,
        }
    }
}

/// Whether `axes` is the default, every axis (left out of the cache key then, so keys
/// from before `flip_axes` existed are unchanged).
fn all_axes(axes: &[bool; 3]) -> bool {
    axes.iter().all(|&a| a)
}

/// Where the style vector of a synthetic sample comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StyleFrom {
    /// The mask subject's own style (and content).
    #[default]
    Same,
    /// A random training subject of another domain (style diversification, Fig. 6 R4).
    OtherDomains,
}

/// `controlnet_sample` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlnetSampleParams {
    /// Subjects whose labels condition the samples (empty: every subject the ControlNet
    /// was trained on).
    pub masks_from: Vec<String>,
    /// Samples per mask subject.
    pub samples_per_mask: usize,
    pub mask_transform: MaskTransform,
    /// The content vector is the mask subject's; the style is its own or another domain's.
    pub style_from: StyleFrom,
    pub guidance: GuidanceParams,
    /// Mask guidance weight (1: plain mask conditioning, no extra evaluation).
    pub mask_weight: f64,
    /// The ControlNet's weights: `ema` or `model` (the last training weights).
    pub weights: SampleWeights,
    pub sampler: Sampler,
    pub steps: usize,
    pub ddpm_variance: DdpmVariance,
    pub ode_method: OdeMethod,
    pub last_step_size: f64,
    pub diffusion_norm: f64,
    pub batch_size: usize,
    pub decode_tile: i64,
    /// Samples shown in the montage (image and mask side by side).
    pub montage: usize,
    pub seed: u64,
}

impl Default for ControlnetSampleParams {
    fn default() -> Self {
        Self {
            masks_from: vec![],
            samples_per_mask: 1,
            mask_transform: MaskTransform::default(),
            style_from: StyleFrom::Same,
            guidance: GuidanceParams::default(),
            mask_weight: 1.0,
            weights: SampleWeights::Ema,
            sampler: Sampler::Auto,
            steps: 250,
            ddpm_variance: DdpmVariance::Large,
            ode_method: OdeMethod::Heun,
            last_step_size: 0.04,
            diffusion_norm: 1.0,
            batch_size: 2,
            decode_tile: 0,
            montage: 4,
            seed: 0,
        }
    }
}

/// `controlnet_sample`.
pub struct ControlnetSample;

impl Stage for ControlnetSample {
    type Params = ControlnetSampleParams;
    const KIND: &'static str = "controlnet_sample";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "samples image + label pairs from (transformed) training masks with a ControlNet, dual classifier-free and mask guidance; decodes with the VAE";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            input(
                "model",
                DIFFUSION,
                Arity::One,
                "the base DiT/SiT the ControlNet was trained on",
            ),
            input("controlnet", CONTROLNET, Arity::One, "a trained ControlNet"),
            input(
                "vae",
                VAE,
                Arity::One,
                "the VAE that made the training latents",
            ),
            input(
                "volumes",
                VOLUMES,
                Arity::One,
                "the labelled volumes the masks come from",
            ),
            input(
                "factors",
                FACTORS,
                Arity::Optional,
                "condition vectors (default: the base model's bank)",
            ),
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "volumes",
                ty: VOLUMES,
                doc: "per sample: image.zarr and label.zarr (the conditioning mask)",
            },
            OutputSpec {
                name: "samples",
                ty: SAMPLES,
                doc: "synth_*.nii.gz, synth_*_label.nii.gz, montage.png, samples.json",
            },
        ]
    }
    fn default_resources(&self) -> Resources {
        auto()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &ControlnetSampleParams) -> Option<u64> {
        Some(p.seed)
    }
    fn validate(&self, p: &ControlnetSampleParams) -> Result<(), String> {
        if p.samples_per_mask == 0 || p.batch_size == 0 {
            return Err(
                "samples_per_mask: samples_per_mask and batch_size must be positive".into(),
            );
        }
        if p.steps < 2 {
            return Err(format!("steps: {} must be at least 2", p.steps));
        }
        let t = &p.mask_transform;
        check_prob("mask_transform.flip_p", t.flip_p)?;
        check_prob("mask_transform.drop_class_p", t.drop_class_p)?;
        if !(t.elastic >= 0.0) || t.elastic_grid < 2 {
            return Err(format!(
                "mask_transform.elastic: {} must be >= 0 voxels and elastic_grid {} >= 2",
                t.elastic, t.elastic_grid
            ));
        }
        if !p.mask_weight.is_finite() {
            return Err("mask_weight: must be finite".into());
        }
        if !(0.0..1.0).contains(&p.last_step_size) || p.diffusion_norm < 0.0 {
            return Err(format!(
                "last_step_size: {} must be in [0, 1) and diffusion_norm {} >= 0",
                p.last_step_size, p.diffusion_norm
            ));
        }
        if p.decode_tile < 0 {
            return Err("decode_tile: must be >= 0".into());
        }
        Ok(())
    }
}

/// `mask_adherence` parameters: the sliding window of `segment_eval`.
pub type MaskAdherenceParams = WindowParams;

/// `mask_adherence`.
pub struct MaskAdherence;

impl Stage for MaskAdherence {
    type Params = MaskAdherenceParams;
    const KIND: &'static str = "mask_adherence";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "segments synthesized volumes with a segmenter trained on real data; per-class Dice against the conditioning masks beside its Dice on real test volumes (the ceiling)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            input(
                "segmenter",
                SEGMENTER,
                Arity::One,
                "a segmenter trained on real images (network = \"unet\")",
            ),
            input(
                "generated",
                VOLUMES,
                Arity::One,
                "synthesized volumes with their conditioning masks (controlnet_sample)",
            ),
            input(
                "real",
                VOLUMES,
                Arity::Optional,
                "the real labelled volumes: the segmenter's test subjects give the ceiling",
            ),
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            ty: MASK_ADHERENCE,
            doc: "adherence.json, per_case.csv, dice.png",
        }]
    }
    fn default_resources(&self) -> Resources {
        auto()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn validate(&self, p: &MaskAdherenceParams) -> Result<(), String> {
        p.validate()
    }
}

/// `fig6_table` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Fig6TableParams {
    pub title: Option<String>,
    /// Regime label -> the names of the `segment_eval` stages that scored it (one per
    /// seed and label fraction), e.g. `R1 = ["eval_r1_10_s0", "eval_r1_10_s1"]`.
    pub regimes: BTreeMap<String, Vec<String>>,
}

/// `fig6_table`: Fig. 6 from `segment_eval` reports (plain Rust).
pub struct Fig6Table;

/// One cell group of the table: a regime at a label fraction over seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fig6Row {
    pub regime: String,
    pub label_fraction: String,
    pub seeds: usize,
    pub dice_in_domain: Spread,
    pub hd95_in_domain: Spread,
    pub dice_unseen: Spread,
    pub hd95_unseen: Spread,
}

impl Stage for Fig6Table {
    type Params = Fig6TableParams;
    const KIND: &'static str = "fig6_table";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "Fig. 6: mean foreground Dice / HD95 per augmentation regime and label fraction, in-domain and on the held-out domain, mean ± sd over seeds (Markdown, CSV, bar chart)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![input(
            "reports",
            SEGMENTATION_REPORT,
            Arity::Many,
            "segment_eval reports, named in `regimes`",
        )]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "table",
            ty: RESULTS_TABLE,
            doc: "table.md, table.csv, dice.png",
        }]
    }
    fn validate(&self, p: &Fig6TableParams) -> Result<(), String> {
        if p.regimes.is_empty() {
            return Err(
                "regimes: name at least one regime and the segment_eval stages that scored it"
                    .into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (r, stages) in &p.regimes {
            if stages.is_empty() {
                return Err(format!("regimes.{r}: lists no segment_eval stage"));
            }
            for s in stages {
                if !seen.insert(s.as_str()) {
                    return Err(format!("regimes.{r}: stage '{s}' is listed twice"));
                }
            }
        }
        Ok(())
    }
    fn run(
        &self,
        p: &Fig6TableParams,
        ctx: &mut meduet_engine::StageContext,
    ) -> Result<(), meduet_engine::StageError> {
        crate::analysis::fig6::run(p, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_parameters_are_refused_naming_the_field() {
        let t = ControlnetTrain;
        let bad = |mut p: ControlnetTrainParams| {
            t.resolve(&mut p);
            t.validate(&p).unwrap_err()
        };
        assert!(bad(ControlnetTrainParams {
            labels: vec![0, 1],
            ..Default::default()
        })
        .starts_with("labels:"));
        assert!(bad(ControlnetTrainParams {
            depth: Some(0),
            ..Default::default()
        })
        .starts_with("depth:"));
        assert!(bad(ControlnetTrainParams {
            mask_dropout: 1.5,
            ..Default::default()
        })
        .starts_with("mask_dropout:"));
        let s = ControlnetSample;
        let mut p = ControlnetSampleParams::default();
        p.mask_transform.elastic = -1.0;
        assert!(s
            .validate(&p)
            .unwrap_err()
            .starts_with("mask_transform.elastic:"));
        assert!(Fig6Table
            .validate(&Fig6TableParams::default())
            .unwrap_err()
            .starts_with("regimes:"));
        let mut r = BTreeMap::new();
        r.insert("R1".to_string(), vec!["a".to_string()]);
        r.insert("R2".to_string(), vec!["a".to_string()]);
        let e = Fig6Table
            .validate(&Fig6TableParams {
                title: None,
                regimes: r,
            })
            .unwrap_err();
        assert!(e.contains("'a' is listed twice"), "{e}");
    }

    /// `flip_axes` left at its default stays out of the parameters (keys made before it
    /// existed are unchanged); set, it is read and kept.
    #[test]
    fn flip_axes_default_keeps_old_keys() {
        let p = ControlnetSampleParams::default();
        let v = serde_json::to_value(&p).unwrap();
        assert!(v["mask_transform"].get("flip_axes").is_none(), "{v}");
        let lr: MaskTransform = serde_json::from_value(
            serde_json::json!({ "flip_p": 0.5, "flip_axes": [true, false, false] }),
        )
        .unwrap();
        assert_eq!(lr.flip_axes, [true, false, false]);
        let v = serde_json::to_value(lr).unwrap();
        assert_eq!(v["flip_axes"], serde_json::json!([true, false, false]));
    }

    /// Synthetic pairs: count or ratio (not both); unset, they stay out of the key of
    /// every existing `segment_train`.
    #[test]
    fn synthetic_pairs_are_counted_and_keep_old_keys() {
        use crate::kinds::segment::{SegmentTrainParams, SyntheticParams};
        let s = SyntheticParams {
            count: Some(3),
            ratio: Some(1.0),
            with_real: true,
        };
        assert!(s.validate().unwrap_err().contains("not both"));
        assert_eq!(
            SyntheticParams {
                count: Some(30),
                ..Default::default()
            }
            .how_many(8, 4),
            8
        );
        assert_eq!(
            SyntheticParams {
                ratio: Some(1.5),
                ..Default::default()
            }
            .how_many(20, 4),
            6
        );
        assert_eq!(SyntheticParams::default().how_many(7, 2), 7);
        let j = serde_json::to_value(SegmentTrainParams::default()).unwrap();
        assert!(j.get("synthetic").is_none(), "{j}");
    }

    #[test]
    fn default_widths_follow_the_vae_factor() {
        let p = ControlnetTrainParams::default();
        assert_eq!(p.embedding_channels_for(4), vec![8, 32, 64]);
        assert_eq!(p.embedding_channels_for(8), vec![8, 32, 64, 128]);
        assert_eq!(p.depth_for(12), 6);
        assert_eq!(p.depth_for(1), 1);
    }
}
