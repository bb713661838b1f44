//! Declarations of the MeDUET kinds (their code runs in the `meduet-torch` worker).
//!
//! | kind              | inputs                       | output    | does                                  |
//! |-------------------|------------------------------|-----------|---------------------------------------|
//! | `pretrain`        | `latents`                    | `meduet`  | MeDUET self-supervised pretraining    |
//! | `extract_factors` | `meduet`, `latents`          | `factors` | one content and one style vector per subject |
//!
//! A `meduet` artifact holds `student.safetensors` and `teacher.safetensors` (the authors'
//! parameter names), `config.json` (model, training and the domain map), `losses.jsonl`
//! (every loss term per step) and `losses.png`. A `factors` artifact holds
//! `factors.safetensors` (`content` `[N, d_c]`, `style` `[N, d_s]`, `domain_id` `[N]`),
//! `subjects.csv` (row, subject, domain, domain_id and known attributes) and
//! `factors.csv` (the same rows with every component), readable from Python.

use meduet_engine::{
    Arity, ArtifactType, DeviceRequest, InputSpec, OutputSpec, Resources, Runtime, Stage,
};
use serde::{Deserialize, Serialize};

use crate::configs::meduet::Config as MeduetConfig;
use crate::kinds::preset::apply_overrides;
use crate::kinds::vae::{LATENTS, TORCH};
use crate::sampling::{Augment, Sampling};
use crate::training::{
    training_params, training_stage, Amp, OptimConfig, ResolvedOptim, ResolvedSchedule,
    ScheduleConfig, TrainingDefaults, MOVED_PARAMS,
};

/// A pretrained MeDUET model.
pub const MEDUET: ArtifactType = ArtifactType::single("meduet");
/// Per-subject content and style vectors.
pub const FACTORS: ArtifactType = ArtifactType::single("factors");

/// Named MeDUET sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MeduetPreset {
    /// Encoder 96x2, decoder 48x2: CPU quickstart and tests.
    #[default]
    Tiny,
    /// Encoder 288x2, decoder 288x2: the smallest whose tokens carry a patch (CPU experiments).
    Small,
    /// The paper: ViT-B encoder 768x12, decoder 384x8.
    VitB,
}

impl MeduetPreset {
    pub fn config(self) -> MeduetConfig {
        match self {
            MeduetPreset::Tiny => MeduetConfig::tiny(),
            MeduetPreset::Small => MeduetConfig::small(),
            MeduetPreset::VitB => MeduetConfig::vit_b(),
        }
    }
}

/// Resolves `preset` + `model` overrides (`n_domains` is set from the data later).
pub fn meduet_config(
    preset: MeduetPreset,
    model: &serde_json::Map<String, serde_json::Value>,
) -> Result<MeduetConfig, String> {
    if model.contains_key("n_domains") {
        return Err(
            "model.n_domains: the number of domains comes from the data; do not set it".into(),
        );
    }
    let cfg = apply_overrides(&preset.config(), model, "model")?;
    cfg.validate().map_err(|e| format!("model: {e}"))?;
    Ok(cfg)
}

/// `pretrain` parameters (defaults: the authors' optimisation, scaled to CPU steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainParams {
    pub preset: MeduetPreset,
    /// Model fields that differ from the preset: sizes, the ablation switches
    /// (`disentangle`, `demix`), the paper/code switches (`rec_mask_pairing`,
    /// `siqc_learnable_scale`) and loss weights (`loss.siqc = 0` switches SiQC off).
    pub model: serde_json::Map<String, serde_json::Value>,
    pub steps: u64,
    /// Per-step batch (even: samples are paired i <-> B-1-i).
    pub batch_size: usize,
    /// The optimiser (default AdamW, lr 1e-4 to min_lr 2e-5, betas (0.9, 0.95), weight
    /// decay 0.01: the authors').
    pub optim: OptimConfig,
    /// The learning-rate schedule (default 15 warmup steps, then cosine).
    pub schedule: ScheduleConfig,
    pub grad_clip: f64,
    /// EMA teacher momentum: cosine from `ema_base` to `ema_final` over all steps.
    pub ema_base: f64,
    pub ema_final: f64,
    pub sampling: Sampling,
    pub augment: Augment,
    pub checkpoint_every: u64,
    pub amp: Amp,
    pub seed: u64,
}

impl Default for PretrainParams {
    fn default() -> Self {
        Self {
            preset: MeduetPreset::Tiny,
            model: Default::default(),
            steps: 300,
            batch_size: 8,
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            grad_clip: 1.0,
            ema_base: 0.997,
            ema_final: 0.9997,
            sampling: Sampling::Balanced,
            augment: Augment::default(),
            checkpoint_every: 50,
            amp: Amp::Fp16,
            seed: 0,
        }
    }
}

/// `pretrain`.
pub struct Pretrain;

/// `pretrain`'s optimiser and schedule when the pipeline file does not say.
pub const PRETRAIN_TRAINING: TrainingDefaults = TrainingDefaults {
    optim: ResolvedOptim {
        betas: [0.9, 0.95],
        ..ResolvedOptim::adamw(1e-4, 2e-5, 0.01)
    },
    schedule: ResolvedSchedule::cosine(15),
};

training_params!(PretrainParams);

impl Stage for Pretrain {
    type Params = PretrainParams;
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "MeDUET pretraining: token mixing, factor disentanglement, MFTD and SiQC with an EMA teacher";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "latents",
            ty: LATENTS,
            arity: Arity::One,
            doc: "per-subject latents",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model",
            ty: MEDUET,
            doc: "student and teacher weights, config, loss curves",
        }]
    }
    fn default_resources(&self) -> Resources {
        Resources {
            threads: 0,
            device: DeviceRequest::Auto,
            memory_gb: None,
        }
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &PretrainParams) -> Option<u64> {
        Some(p.seed)
    }
    training_stage!(
        PretrainParams,
        |_: &PretrainParams| PRETRAIN_TRAINING,
        MOVED_PARAMS
    );
    fn resolved(&self, p: &PretrainParams) -> Option<serde_json::Value> {
        meduet_config(p.preset, &p.model)
            .ok()
            .and_then(|c| serde_json::to_value(c).ok())
    }

    fn validate(&self, p: &PretrainParams) -> Result<(), String> {
        meduet_config(p.preset, &p.model)?;
        if p.batch_size < 2 || p.batch_size % 2 != 0 {
            return Err(format!(
                "batch_size: {} must be even and at least 2 (samples are paired)",
                p.batch_size
            ));
        }
        p.training()?;
        if !(0.0..1.0).contains(&p.ema_base) || !(0.0..=1.0).contains(&p.ema_final) {
            return Err("ema_base: EMA momenta must lie in [0, 1)".into());
        }
        Ok(())
    }
}

/// Which weights extract factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    /// The student (what the authors' downstream code loads).
    #[default]
    Student,
    /// The EMA teacher.
    Teacher,
}

/// `extract_factors` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractFactorsParams {
    pub weights: Weights,
    /// Overlap of the grid patches (MONAI `GridPatchd`, replicate padding).
    pub overlap: f64,
    /// Patches encoded per forward pass.
    pub batch_size: usize,
}

impl Default for ExtractFactorsParams {
    fn default() -> Self {
        Self {
            weights: Weights::Student,
            overlap: 0.25,
            batch_size: 16,
        }
    }
}

/// `extract_factors`.
pub struct ExtractFactors;

impl Stage for ExtractFactors {
    type Params = ExtractFactorsParams;
    const KIND: &'static str = "extract_factors";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "one content and one style vector per subject: encode_full on grid patches, mean over tokens and patches";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                ty: MEDUET,
                arity: Arity::One,
                doc: "a pretrained MeDUET",
            },
            InputSpec {
                name: "latents",
                ty: LATENTS,
                arity: Arity::One,
                doc: "per-subject latents",
            },
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "factors",
            ty: FACTORS,
            doc: "factors.safetensors, subjects.csv, factors.csv",
        }]
    }
    fn default_resources(&self) -> Resources {
        Resources {
            threads: 0,
            device: DeviceRequest::Auto,
            memory_gb: None,
        }
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn validate(&self, p: &ExtractFactorsParams) -> Result<(), String> {
        if !(0.0..1.0).contains(&p.overlap) {
            return Err(format!("overlap: {} must be in [0, 1)", p.overlap));
        }
        if p.batch_size == 0 {
            return Err("batch_size: must be positive".into());
        }
        Ok(())
    }
}
