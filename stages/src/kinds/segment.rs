//! Declarations of the downstream-analysis kinds (method.md 5; their code runs in the
//! `meduet-torch` worker).
//!
//! | kind             | inputs                                              | output       |
//! |------------------|-----------------------------------------------------|--------------|
//! | `segment_train`  | `volumes`, `latents`?, `meduet`?, `vae`?            | `model` (`segmenter`) |
//! | `segment_eval`   | `model`, `volumes`, `latents`?                      | `report` (`segmentation_report`) |
//! | `classify_train` | `latents`, `meduet`?                                | `model` (`classifier`) |
//! | `classify_eval`  | `model`, `latents`                                  | `report` (`classification_report`) |
//! | `segment_table`  | `reports` (many `segment_eval`)                     | `table` (plain Rust) |
//!
//! **Networks.** `unetr` (method.md 5): UNETR on VAE latents (needs `latents`), initialised
//! from `scratch` or from a pretrained `meduet`; its logits are trilinearly upsampled to
//! the image grid (the authors' code) or decoded by a copy of the VAE decoder (the paper;
//! needs `vae`). `unet`: an nnU-Net-style 3-D U-Net on the image volumes from scratch, its
//! patch size and depth planned from the data's median shape and spacing.
//!
//! **Splits** ([`crate::segmentation::splits`]): per training domain a seeded test and
//! validation split, the label fraction (`"1-shot"`, `"10%"`, `"50%"`, `"100%"`) drawn
//! from the rest with `seed`, and every subject of the domains not in `train_domains` held
//! out. They are written into the model (`splits.json`); the evaluation scores the test
//! subjects (in-domain) and the held-out subjects (unseen domains) separately.
//!
//! A `segmenter` holds `weights.safetensors` (MONAI names), `config.json` (network,
//! classes, input grid, resolved training parameters, the plan for `unet`), `splits.json`,
//! `losses.jsonl`, `losses.png` and `val_dice.png`. A `segmentation_report` holds
//! nnU-Net's `summary.json` (per case, per class Dice and HD95; means), `per_case.csv` and
//! `predictions/<subject>.nii.gz` (uint8 label values, the input volume's affine).

use meduet_engine::{
    Arity, ArtifactType, DeviceRequest, InputSpec, OutputSpec, Resources, Runtime, Stage,
};
use serde::{Deserialize, Serialize};

use crate::kinds::pretrain::{MeduetPreset, MEDUET};
use crate::kinds::resample::VOLUMES;
use crate::kinds::subject::SUBJECTS;
use crate::kinds::vae::{LATENTS, TORCH, VAE};
use crate::segmentation::planner::PlannerConfig;
use crate::segmentation::sampler::SegAugment;
use crate::segmentation::splits::LabelFraction;
use crate::segmentation::style_augment::StyleAugmentParams;
use crate::training::{
    training_params, training_stage, Amp, OptimConfig, ResolvedOptim, ResolvedSchedule,
    ScheduleConfig, TrainingDefaults, MOVED_PARAMS,
};

/// A trained segmentation network.
pub const SEGMENTER: ArtifactType = ArtifactType::single("segmenter");
/// Segmentation metrics and predictions.
pub const SEGMENTATION_REPORT: ArtifactType = ArtifactType::single("segmentation_report");
/// A trained classification network.
pub const CLASSIFIER: ArtifactType = ArtifactType::single("classifier");
/// Classification metrics.
pub const CLASSIFICATION_REPORT: ArtifactType = ArtifactType::single("classification_report");

/// Which network segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// UNETR on VAE latents.
    #[default]
    Unetr,
    /// nnU-Net-style U-Net on image volumes.
    Unet,
}

/// UNETR weights at the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    #[default]
    Scratch,
    /// Patch embedding, blocks and norm of a pretrained MeDUET student (input `meduet`).
    Meduet,
}

/// MeDUET's position table at init (method.md 9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PosEmbed {
    /// Not transferred (the authors' code).
    #[default]
    Skip,
    /// Trilinearly interpolated to UNETR's grid (the paper).
    Interpolate,
}

/// How UNETR's latent-grid output reaches the image grid (method.md 9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnetrOutput {
    /// Logits upsampled trilinearly (the authors' code).
    #[default]
    Upsample,
    /// A latent-channel output decoded by a copy of the VAE decoder (weights from the `vae`
    /// input, fine-tuned) whose last convolution gives the class logits (the paper).
    VaeDecoder,
}

/// UNETR options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnetrParams {
    /// ViT size when training from scratch (`tiny`, `vit_b`); with `init = "meduet"` the
    /// sizes come from the checkpoint.
    pub preset: MeduetPreset,
    pub init: Init,
    pub pos_embed: PosEmbed,
    pub output: UnetrOutput,
    /// Decoder width (the paper: 32).
    pub feature_size: i64,
    /// Input crop in latent voxels (the paper: 24 = 96 image voxels).
    pub crop: usize,
    /// Blocks feeding the skips (empty: depth/4, depth/2, 3 depth/4).
    pub skips: Vec<i64>,
}

impl UnetrParams {
    /// The ViT sizes its preset stands for, when they are used (`init = "scratch"`; with
    /// `meduet` the sizes come from the checkpoint, an input).
    pub fn resolved(&self) -> Option<serde_json::Value> {
        match self.init {
            Init::Scratch => serde_json::to_value(self.preset.config())
                .ok()
                .map(|c| serde_json::json!({ "unetr": c })),
            Init::Meduet => None,
        }
    }
}

impl Default for UnetrParams {
    fn default() -> Self {
        Self {
            preset: MeduetPreset::Tiny,
            init: Init::Scratch,
            pos_embed: PosEmbed::Skip,
            output: UnetrOutput::Upsample,
            feature_size: 16,
            crop: 24,
            skips: vec![],
        }
    }
}

/// U-Net options: the planner's inputs (nnU-Net's defaults: 32 base features, up to 5
/// poolings; CPU pipelines set smaller values) and `patch`, which overrides the planned patch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnetParams {
    pub planner: PlannerConfig,
    pub patch: Option<[usize; 3]>,
    pub deep_supervision: bool,
}

impl Default for UnetParams {
    fn default() -> Self {
        Self {
            planner: PlannerConfig::default(),
            patch: None,
            deep_supervision: true,
        }
    }
}

/// Where the subjects go (shared by segmentation and classification).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitParams {
    /// `"1-shot"`, `"k-shot"` or a percentage (`"10%"`, `"50%"`, `"100%"`).
    pub label_fraction: String,
    /// Domains to train on (empty: all); the others are held out as unseen domains.
    pub train_domains: Vec<String>,
    pub test_fraction: f64,
    pub val_fraction: f64,
    /// Seed of the test / validation split (shared by every fraction and initialisation).
    pub split_seed: u64,
}

impl Default for SplitParams {
    fn default() -> Self {
        Self {
            label_fraction: "100%".into(),
            train_domains: vec![],
            test_fraction: 0.25,
            val_fraction: 0.0,
            split_seed: 0,
        }
    }
}

impl SplitParams {
    pub fn validate(&self) -> Result<(), String> {
        LabelFraction::parse(&self.label_fraction)?;
        if !(0.0..1.0).contains(&self.test_fraction) || !(0.0..1.0).contains(&self.val_fraction) {
            return Err(format!(
                "split.test_fraction {} / split.val_fraction {} must lie in [0, 1)",
                self.test_fraction, self.val_fraction
            ));
        }
        Ok(())
    }
}

/// `segment_train` parameters. Unset optimisation fields follow the network (filled in
/// before the key is computed): UNETR AdamW lr 2e-4, weight decay 1e-5, 15 warmup steps +
/// cosine to 2e-5, foreground fraction 0.9 (the authors); U-Net SGD Nesterov momentum 0.99,
/// lr 1e-2, weight decay 3e-5, poly 0.9, foreground fraction 1/3 (nnU-Net).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentTrainParams {
    pub network: Network,
    /// Label values to segment, in class order (empty: every non-zero value in the
    /// training labels); other values count as background.
    pub labels: Vec<u8>,
    pub split: SplitParams,
    pub unetr: UnetrParams,
    pub unet: UnetParams,
    pub steps: u64,
    pub batch_size: usize,
    /// The optimiser (default: the network's, above).
    pub optim: OptimConfig,
    /// The learning-rate schedule (default: the network's, above).
    pub schedule: ScheduleConfig,
    pub grad_clip: f64,
    /// Probability that a crop is centred on foreground.
    pub fg_fraction: Option<f64>,
    pub augment: SegAugment,
    /// Style augmentation through a pretrained MeDUET (UNETR only; appendix C.4).
    pub style_augment: StyleAugmentParams,
    /// Validation Dice (sliding window on the validation subjects) every this many steps
    /// (0: never).
    pub val_every: u64,
    pub checkpoint_every: u64,
    pub amp: Amp,
    pub seed: u64,
    /// Synthetic training pairs from the `synthetic` input (`network = "unet"`).
    #[serde(skip_serializing_if = "SyntheticParams::is_default")]
    pub synthetic: SyntheticParams,
}

/// How many synthetic image + label pairs (the `synthetic` input of `segment_train`) join
/// the training subjects. Validation and test subjects are always real, and the split is
/// made from the real volumes alone; synthetic pairs made from a mask of a validation, test
/// or held-out subject are left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticParams {
    /// This many synthetic pairs (a seeded draw); with neither `count` nor `ratio`: all.
    pub count: Option<usize>,
    /// Or this many per labelled real training subject (rounded).
    pub ratio: Option<f64>,
    /// Also train on the labelled real subjects (`false`: synthetic only).
    pub with_real: bool,
}

impl Default for SyntheticParams {
    fn default() -> Self {
        Self {
            count: None,
            ratio: None,
            with_real: true,
        }
    }
}

impl SyntheticParams {
    /// Whether nothing is set (then it stays out of the stage key).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// How many of `available` synthetic pairs to use beside `real` labelled subjects.
    pub fn how_many(&self, available: usize, real: usize) -> usize {
        match (self.count, self.ratio) {
            (Some(n), _) => n.min(available),
            (None, Some(r)) => ((r * real as f64).round() as usize).min(available),
            (None, None) => available,
        }
    }

    /// Checks `count` / `ratio`.
    pub fn validate(&self) -> Result<(), String> {
        if self.count.is_some() && self.ratio.is_some() {
            return Err("synthetic: give `count` or `ratio`, not both".into());
        }
        if let Some(r) = self.ratio {
            if !(r >= 0.0) || !r.is_finite() {
                return Err(format!("synthetic.ratio: {r} must be >= 0"));
            }
        }
        Ok(())
    }
}

impl Default for SegmentTrainParams {
    fn default() -> Self {
        Self {
            network: Network::Unetr,
            labels: vec![],
            split: SplitParams::default(),
            unetr: UnetrParams::default(),
            unet: UnetParams::default(),
            steps: 300,
            batch_size: 2,
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            grad_clip: 12.0,
            fg_fraction: None,
            augment: SegAugment::default(),
            style_augment: StyleAugmentParams::default(),
            val_every: 50,
            checkpoint_every: 100,
            amp: Amp::Fp16,
            seed: 0,
            synthetic: SyntheticParams::default(),
        }
    }
}

training_params!(SegmentTrainParams);

impl SegmentTrainParams {
    /// The optimiser and schedule of the network when the pipeline file does not say.
    pub fn training_defaults(&self) -> TrainingDefaults {
        match self.network {
            Network::Unet => TrainingDefaults {
                optim: ResolvedOptim::sgd(1e-2, 0.99, true, 3e-5),
                schedule: ResolvedSchedule::poly(0.9),
            },
            Network::Unetr => TrainingDefaults {
                optim: ResolvedOptim::adamw(2e-4, 2e-5, 1e-5),
                schedule: ResolvedSchedule::cosine(15),
            },
        }
    }

    /// The probability that a crop is centred on foreground (after `Stage::resolve`).
    pub fn fg_fraction(&self) -> f64 {
        self.fg_fraction.unwrap_or(match self.network {
            Network::Unet => 1.0 / 3.0,
            Network::Unetr => 0.9,
        })
    }
}

pub(crate) fn auto() -> Resources {
    Resources {
        threads: 0,
        device: DeviceRequest::Auto,
        memory_gb: None,
    }
}

pub(crate) fn input(
    name: &'static str,
    ty: ArtifactType,
    arity: Arity,
    doc: &'static str,
) -> InputSpec {
    InputSpec {
        name,
        ty,
        arity,
        doc,
    }
}

/// `segment_train`.
pub struct SegmentTrain;

impl Stage for SegmentTrain {
    type Params = SegmentTrainParams;
    const KIND: &'static str = "segment_train";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "trains UNETR on latents (scratch or MeDUET init) or an nnU-Net-style U-Net on images, at a label fraction, with DiceCE";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            input("volumes", VOLUMES, Arity::One, "volumes with labels"),
            input(
                "latents",
                LATENTS,
                Arity::Optional,
                "latents of the same volumes (unetr)",
            ),
            input(
                "meduet",
                MEDUET,
                Arity::Optional,
                "a pretrained MeDUET (unetr.init = \"meduet\")",
            ),
            input(
                "vae",
                VAE,
                Arity::Optional,
                "the VAE of the latents (unetr.output = \"vae_decoder\")",
            ),
            input(
                "synthetic",
                VOLUMES,
                Arity::Optional,
                "synthetic image + label pairs added to training (controlnet_sample; network = \"unet\")",
            ),
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model",
            ty: SEGMENTER,
            doc: "weights, config, splits, loss and validation-Dice curves",
        }]
    }
    fn default_resources(&self) -> Resources {
        auto()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &SegmentTrainParams) -> Option<u64> {
        Some(p.seed)
    }
    training_stage!(
        SegmentTrainParams,
        |p: &SegmentTrainParams| p.training_defaults(),
        MOVED_PARAMS,
        |p: &mut SegmentTrainParams| {
            p.fg_fraction = Some(p.fg_fraction());
        }
    );
    fn resolved(&self, p: &SegmentTrainParams) -> Option<serde_json::Value> {
        match p.network {
            Network::Unetr => p.unetr.resolved(),
            Network::Unet => None,
        }
    }

    fn validate(&self, p: &SegmentTrainParams) -> Result<(), String> {
        p.split.validate()?;
        p.augment.validate()?;
        p.style_augment.validate()?;
        p.synthetic.validate()?;
        if p.style_augment.enabled && p.network != Network::Unetr {
            return Err("style_augment: style augmentation works on MeDUET latents: network must be \"unetr\"".into());
        }
        if p.batch_size == 0 {
            return Err("batch_size: must be positive".into());
        }
        if p.labels.contains(&0) {
            return Err("labels: 0 is the background; list foreground label values only".into());
        }
        p.training()?;
        if !(0.0..=1.0).contains(&p.fg_fraction()) {
            return Err(format!(
                "fg_fraction: {} is not a probability",
                p.fg_fraction()
            ));
        }
        if p.unetr.crop == 0 || p.unetr.crop % 4 != 0 {
            return Err(format!(
                "unetr.crop: {} must be a positive multiple of the patch size 4",
                p.unetr.crop
            ));
        }
        if !p.unetr.skips.is_empty() && p.unetr.skips.len() != 3 {
            return Err(format!(
                "unetr.skips: {:?} must list 3 block indices (or none)",
                p.unetr.skips
            ));
        }
        if p.unetr.feature_size <= 0 {
            return Err("unetr.feature_size must be positive".into());
        }
        Ok(())
    }
}

/// Sliding-window inference over whole volumes (Gaussian blending), as `segment_eval` runs
/// it; `mask_adherence`'s parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowParams {
    /// Overlap of neighbouring windows.
    pub overlap: f64,
    /// Windows per forward pass.
    pub sw_batch: usize,
    /// Gaussian sigma as a fraction of the window.
    pub sigma_scale: f64,
}

impl Default for WindowParams {
    fn default() -> Self {
        Self {
            overlap: 0.5,
            sw_batch: 4,
            sigma_scale: 0.125,
        }
    }
}

impl WindowParams {
    /// Checks the overlap, batch and sigma.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.overlap) {
            return Err(format!("overlap: {} must lie in [0, 1)", self.overlap));
        }
        if self.sw_batch == 0 || !(self.sigma_scale > 0.0) {
            return Err("sw_batch and sigma_scale must be positive".into());
        }
        Ok(())
    }
}

/// `segment_eval` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentEvalParams {
    /// Sliding-window overlap (the paper: 0.5; the authors' code: 0.75).
    pub overlap: f64,
    /// Windows per forward pass.
    pub sw_batch: usize,
    /// Gaussian sigma as a fraction of the window.
    pub sigma_scale: f64,
    /// Write `predictions/<subject>.nii.gz`.
    pub export_predictions: bool,
    /// Also score the labelled training subjects.
    pub include_train: bool,
}

impl Default for SegmentEvalParams {
    fn default() -> Self {
        Self {
            overlap: 0.5,
            sw_batch: 4,
            sigma_scale: 0.125,
            export_predictions: true,
            include_train: false,
        }
    }
}

/// `segment_eval`.
pub struct SegmentEval;

impl Stage for SegmentEval {
    type Params = SegmentEvalParams;
    const KIND: &'static str = "segment_eval";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "sliding-window inference (Gaussian blending), per-case per-class Dice and HD95 in-domain and on unseen domains, nnU-Net summary.json, NIfTI predictions";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            input("model", SEGMENTER, Arity::One, "a trained segmenter"),
            input("volumes", VOLUMES, Arity::One, "volumes with labels"),
            input("latents", LATENTS, Arity::Optional, "latents (unetr)"),
            input(
                "originals",
                SUBJECTS,
                Arity::Optional,
                "the ingested subjects: predictions mapped back to each original scan's grid, scored against its original label",
            ),
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            ty: SEGMENTATION_REPORT,
            doc: "summary.json, per_case.csv, predictions/*.nii.gz (and predictions_original/*.nii.gz with `originals`)",
        }]
    }
    fn default_resources(&self) -> Resources {
        auto()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn validate(&self, p: &SegmentEvalParams) -> Result<(), String> {
        WindowParams {
            overlap: p.overlap,
            sw_batch: p.sw_batch,
            sigma_scale: p.sigma_scale,
        }
        .validate()
    }
}

/// `classify_train` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyTrainParams {
    /// The latent array attribute holding the class (bool or integer; phantoms:
    /// `has_lesion`).
    pub label_attr: String,
    pub split: SplitParams,
    pub unetr: UnetrParams,
    pub steps: u64,
    pub batch_size: usize,
    /// The optimiser (default AdamW, lr 2e-4 to min_lr 1e-5, weight decay 1e-5).
    pub optim: OptimConfig,
    /// The learning-rate schedule (default 10 warmup steps, then cosine).
    pub schedule: ScheduleConfig,
    pub grad_clip: f64,
    pub augment: SegAugment,
    /// Style augmentation through a pretrained MeDUET (appendix C.4).
    pub style_augment: StyleAugmentParams,
    pub checkpoint_every: u64,
    pub amp: Amp,
    pub seed: u64,
}

impl Default for ClassifyTrainParams {
    /// The authors' CC-CCII settings (AdamW 2e-4, wd 1e-5, cosine to 1e-5).
    fn default() -> Self {
        Self {
            label_attr: "has_lesion".into(),
            split: SplitParams::default(),
            unetr: UnetrParams::default(),
            steps: 200,
            batch_size: 2,
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            grad_clip: 12.0,
            augment: SegAugment {
                scale_p: 0.0,
                shift_p: 0.0,
                ..SegAugment::default()
            },
            style_augment: StyleAugmentParams::default(),
            checkpoint_every: 100,
            amp: Amp::Fp16,
            seed: 0,
        }
    }
}

/// `classify_train`'s optimiser and schedule when the pipeline file does not say.
pub const CLASSIFY_TRAINING: TrainingDefaults = TrainingDefaults {
    optim: ResolvedOptim::adamw(2e-4, 1e-5, 1e-5),
    schedule: ResolvedSchedule::cosine(10),
};

training_params!(ClassifyTrainParams);

/// `classify_train`.
pub struct ClassifyTrain;

impl Stage for ClassifyTrain {
    type Params = ClassifyTrainParams;
    const KIND: &'static str = "classify_train";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "trains UNETR with a pooled linear head (scratch or MeDUET init) on a volume-level label of the latents";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            input(
                "latents",
                LATENTS,
                Arity::One,
                "latents with a class attribute",
            ),
            input(
                "meduet",
                MEDUET,
                Arity::Optional,
                "a pretrained MeDUET (unetr.init = \"meduet\")",
            ),
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model",
            ty: CLASSIFIER,
            doc: "weights, config, splits, loss curve",
        }]
    }
    fn default_resources(&self) -> Resources {
        auto()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &ClassifyTrainParams) -> Option<u64> {
        Some(p.seed)
    }
    training_stage!(
        ClassifyTrainParams,
        |_: &ClassifyTrainParams| CLASSIFY_TRAINING,
        MOVED_PARAMS
    );
    fn resolved(&self, p: &ClassifyTrainParams) -> Option<serde_json::Value> {
        p.unetr.resolved()
    }

    fn validate(&self, p: &ClassifyTrainParams) -> Result<(), String> {
        p.split.validate()?;
        p.augment.validate()?;
        p.style_augment.validate()?;
        if p.batch_size == 0 {
            return Err("batch_size: must be positive".into());
        }
        p.training()?;
        if p.unetr.output != UnetrOutput::Upsample {
            return Err(
                "unetr.output: classification has no image-grid output; leave it at \"upsample\""
                    .into(),
            );
        }
        if p.unetr.crop == 0 || p.unetr.crop % 4 != 0 {
            return Err(format!(
                "unetr.crop: {} must be a positive multiple of the patch size 4",
                p.unetr.crop
            ));
        }
        Ok(())
    }
}

/// `classify_eval` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyEvalParams {
    /// Overlap of the windows whose class probabilities are averaged per volume.
    pub overlap: f64,
    pub sw_batch: usize,
}

impl Default for ClassifyEvalParams {
    fn default() -> Self {
        Self {
            overlap: 0.5,
            sw_batch: 4,
        }
    }
}

/// `classify_eval`.
pub struct ClassifyEval;

impl Stage for ClassifyEval {
    type Params = ClassifyEvalParams;
    const KIND: &'static str = "classify_eval";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "per-volume class probabilities (mean over windows), accuracy and macro AUC in-domain and on unseen domains";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            input("model", CLASSIFIER, Arity::One, "a trained classifier"),
            input(
                "latents",
                LATENTS,
                Arity::One,
                "latents with the class attribute",
            ),
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            ty: CLASSIFICATION_REPORT,
            doc: "classification.json, per_case.csv",
        }]
    }
    fn default_resources(&self) -> Resources {
        auto()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn validate(&self, p: &ClassifyEvalParams) -> Result<(), String> {
        if !(0.0..1.0).contains(&p.overlap) || p.sw_batch == 0 {
            return Err(format!(
                "overlap: {} must lie in [0, 1) and sw_batch be positive",
                p.overlap
            ));
        }
        Ok(())
    }
}

/// A results table.
pub const RESULTS_TABLE: ArtifactType = ArtifactType::single("results_table");

/// `segment_table` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentTableParams {
    /// Title of the table and the plot.
    pub title: Option<String>,
}

/// `segment_table`: the paper's Table 2 from `segment_eval` reports (plain Rust).
///
/// One row per model (`unet`, `unetr_scratch`, `unetr_meduet`, with `+interp` / `+vae_dec`
/// for the paper switches) and label fraction; columns: mean foreground Dice and HD95
/// in-domain and on unseen domains, and the number of cases. Writes `table.md`,
/// `table.csv` and `dice.png` (grouped bars: label fraction x model, in-domain and unseen).
pub struct SegmentTable;

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableRow {
    pub model: String,
    pub label_fraction: String,
    pub dice_in_domain: Option<f64>,
    pub hd95_in_domain: Option<f64>,
    pub cases_in_domain: u64,
    pub dice_unseen: Option<f64>,
    pub hd95_unseen: Option<f64>,
    pub cases_unseen: u64,
    /// The pipeline stage that evaluated it.
    pub stage: String,
}

/// Orders label fractions: shots first, then percentages ascending.
fn fraction_order(f: &str) -> (u8, f64) {
    match LabelFraction::parse(f) {
        Ok(LabelFraction::Shots(k)) => (0, k as f64),
        Ok(LabelFraction::Fraction(x)) => (1, x),
        Err(_) => (2, 0.0),
    }
}

impl Stage for SegmentTable {
    type Params = SegmentTableParams;
    const KIND: &'static str = "segment_table";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Table 2: mean Dice / HD95 by model and label fraction, in-domain and unseen domains (Markdown, CSV, bar plot)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![input(
            "reports",
            SEGMENTATION_REPORT,
            Arity::Many,
            "segment_eval reports",
        )]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "table",
            ty: RESULTS_TABLE,
            doc: "table.md, table.csv, dice.png",
        }]
    }
    fn run(
        &self,
        p: &SegmentTableParams,
        ctx: &mut meduet_engine::StageContext,
    ) -> Result<(), meduet_engine::StageError> {
        use meduet_engine::StageError;
        let mut rows = Vec::new();
        for r in ctx.inputs("reports") {
            let path = r.dir.join("summary.json");
            let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
            let s: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| StageError::input(format!("'{}': {e}", path.display())))?;
            let model = s["model"].as_str().ok_or_else(|| {
                StageError::input(format!(
                    "'{}': no 'model' (not a segment_eval summary)",
                    path.display()
                ))
            })?;
            let f = |set: &str, m: &str| s[set]["foreground_mean"][m].as_f64();
            rows.push(TableRow {
                model: model.to_string(),
                label_fraction: s["label_fraction"].as_str().unwrap_or("?").to_string(),
                dice_in_domain: f("in_domain", "Dice"),
                hd95_in_domain: f("in_domain", "HD95"),
                cases_in_domain: s["in_domain"]["cases"].as_u64().unwrap_or(0),
                dice_unseen: f("unseen_domain", "Dice"),
                hd95_unseen: f("unseen_domain", "HD95"),
                cases_unseen: s["unseen_domain"]["cases"].as_u64().unwrap_or(0),
                stage: r.stage.clone(),
            });
        }
        rows.sort_by(|a, b| {
            fraction_order(&a.label_fraction)
                .partial_cmp(&fraction_order(&b.label_fraction))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.model.cmp(&b.model))
        });
        let title = p
            .title
            .clone()
            .unwrap_or_else(|| "Segmentation: mean foreground Dice".into());
        let num = |x: Option<f64>, d: usize| x.map_or("-".to_string(), |v| format!("{v:.d$}"));
        let mut md = format!(
            "# {title}\n\n| label fraction | model | Dice in-domain | HD95 in-domain (mm) | Dice unseen domain | HD95 unseen (mm) | cases (in / unseen) |\n|---|---|---|---|---|---|---|\n"
        );
        let mut csv = String::from("label_fraction,model,dice_in_domain,hd95_in_domain,cases_in_domain,dice_unseen,hd95_unseen,cases_unseen,stage\n");
        for r in &rows {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} / {} |\n",
                r.label_fraction,
                r.model,
                num(r.dice_in_domain, 3),
                num(r.hd95_in_domain, 1),
                num(r.dice_unseen, 3),
                num(r.hd95_unseen, 1),
                r.cases_in_domain,
                r.cases_unseen
            ));
            let c = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{},{}\n",
                r.label_fraction,
                r.model,
                c(r.dice_in_domain),
                c(r.hd95_in_domain),
                r.cases_in_domain,
                c(r.dice_unseen),
                c(r.hd95_unseen),
                r.cases_unseen,
                r.stage
            ));
        }
        let out = ctx.output_dir("table")?;
        std::fs::write(out.join("table.md"), &md)
            .map_err(|e| StageError::io(&out.join("table.md"), e))?;
        std::fs::write(out.join("table.csv"), &csv)
            .map_err(|e| StageError::io(&out.join("table.csv"), e))?;
        // Bars: groups = label fraction x setting, series = models.
        let mut models: Vec<String> = rows.iter().map(|r| r.model.clone()).collect();
        models.dedup();
        models.sort();
        models.dedup();
        let mut fractions: Vec<String> = Vec::new();
        for r in &rows {
            if !fractions.contains(&r.label_fraction) {
                fractions.push(r.label_fraction.clone());
            }
        }
        let mut groups = Vec::new();
        let mut values = Vec::new();
        for f in &fractions {
            for (setting, pick) in [("in-domain", 0), ("unseen", 1)] {
                groups.push(format!("{f} {setting}"));
                values.push(
                    models
                        .iter()
                        .map(|m| {
                            rows.iter()
                                .find(|r| &r.model == m && &r.label_fraction == f)
                                .and_then(|r| {
                                    if pick == 0 {
                                        r.dice_in_domain
                                    } else {
                                        r.dice_unseen
                                    }
                                })
                                .unwrap_or(0.0)
                        })
                        .collect(),
                );
            }
        }
        crate::plot::bar_chart(
            &out.join("dice.png"),
            &title,
            "mean foreground Dice",
            &groups,
            &models,
            &values,
        )
        .map_err(|e| StageError::failed(e.to_string()))?;
        ctx.set_metric("rows", rows.len());
        tracing::info!("{} rows: {}", rows.len(), out.join("table.md").display());
        Ok(())
    }
}
