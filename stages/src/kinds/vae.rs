//! Declarations of the VAE stage kinds (their code runs in the `meduet-torch` worker).
//!
//! | kind         | inputs                 | output            | does                                        |
//! |--------------|------------------------|-------------------|---------------------------------------------|
//! | `vae_train`  | `volumes`              | `vae`             | trains the MAISI-topology VAE on crops      |
//! | `vae_import` | (a weights file)       | `vae`             | imports MAISI weights (safetensors)         |
//! | `vae_encode` | `vae`, `volumes`       | `latents` (items) | tiled whole-volume encoding into Zarr       |
//! | `vae_decode` | `vae`, `latents`       | `volumes` (items) | decodes latents back to image volumes       |
//!
//! A `vae` artifact is a folder with `vae.safetensors` (MONAI state-dict names),
//! `config.json` (the architecture, MONAI constructor names) and, for trained ones,
//! `losses.jsonl`, `losses.png` and `eval.json` (held-out PSNR/SSIM). A `latents` item is
//! `latent.zarr`: float32 `[C, X/f, Y/f, Z/f]` (channel first, C order, axes as the image's
//! RAS grid), zstd, with attributes `vae_digest`, `mode`, `seed`, `scale_factor`,
//! `source_digest`, `domain`, `domain_id`, `subject`, `affine` (of the latent grid) and
//! `spacing`. The key of a latent depends only on the volume, the VAE weights and these
//! parameters, so every experiment that uses the same data and VAE shares it.

use meduet_engine::{
    Arity, ArtifactType, DeviceRequest, InputSpec, OutputSpec, Resources, Runtime, SourcePath,
    Stage,
};
use serde::{Deserialize, Serialize};

use crate::configs::vae::Config as VaeConfig;
use crate::kinds::preset::apply_overrides;
use crate::kinds::resample::VOLUMES;
use crate::sampling::Augment;
use crate::training::{
    training_params, training_stage, Amp, OptimConfig, ResolvedOptim, ResolvedSchedule,
    ScheduleConfig, TrainingDefaults, MOVED_PARAMS,
};

/// A trained or imported VAE.
pub const VAE: ArtifactType = ArtifactType::single("vae");
/// Per-subject latents.
pub const LATENTS: ArtifactType = ArtifactType::collection("latents");
/// The latent array inside a `latents` item.
pub const LATENT_ZARR: &str = "latent.zarr";
/// Weights file inside a `vae` artifact.
pub const VAE_WEIGHTS: &str = "vae.safetensors";
/// Architecture file inside a `vae` artifact.
pub const VAE_CONFIG: &str = "config.json";

/// The worker that runs tensor kinds.
pub const TORCH: Runtime = Runtime::Worker("meduet-torch");

/// Named VAE architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VaePreset {
    /// 16/32/64 channels, GroupNorm(8): the CPU quickstart and tests.
    #[default]
    Small,
    /// The paper's MAISI VAE: 64/128/256 channels, GroupNorm(32).
    Maisi,
}

impl VaePreset {
    pub fn config(self) -> VaeConfig {
        match self {
            VaePreset::Small => VaeConfig::small(),
            VaePreset::Maisi => VaeConfig::maisi(),
        }
    }
}

/// Resolves `preset` + `model` overrides into an architecture.
pub fn vae_config(
    preset: VaePreset,
    model: &serde_json::Map<String, serde_json::Value>,
) -> Result<VaeConfig, String> {
    let cfg = apply_overrides(&preset.config(), model, "model")?;
    cfg.validate().map_err(|e| format!("model: {e}"))?;
    Ok(cfg)
}

fn gpu_default() -> Resources {
    Resources {
        threads: 0,
        device: DeviceRequest::Auto,
        memory_gb: None,
    }
}

/// `vae_train` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeTrainParams {
    pub preset: VaePreset,
    /// Architecture fields that differ from the preset (MONAI constructor names).
    pub model: serde_json::Map<String, serde_json::Value>,
    pub steps: u64,
    pub batch_size: usize,
    /// Training crop in voxels (multiple of the downsampling factor).
    pub crop: [usize; 3],
    /// The optimiser (default AdamW, lr 2e-4 to min_lr 2e-5, weight decay 1e-5).
    pub optim: OptimConfig,
    /// The learning-rate schedule (default 20 warmup steps, then cosine).
    pub schedule: ScheduleConfig,
    /// Weight of the KL term (sum over latent voxels, mean over the batch).
    pub kl_weight: f64,
    /// Weight of the 3D patch-adversarial (LSGAN) loss; 0 switches the discriminator off.
    pub adversarial_weight: f64,
    /// Step from which the adversarial loss is used.
    pub adversarial_start: u64,
    pub grad_clip: f64,
    /// Subjects held out for the reported PSNR and SSIM.
    pub heldout: usize,
    pub augment: Augment,
    pub checkpoint_every: u64,
    pub amp: Amp,
    pub seed: u64,
}

impl Default for VaeTrainParams {
    fn default() -> Self {
        Self {
            preset: VaePreset::Small,
            model: Default::default(),
            steps: 400,
            batch_size: 2,
            crop: [64, 64, 64],
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            kl_weight: 1e-6,
            adversarial_weight: 0.0,
            adversarial_start: 0,
            grad_clip: 1.0,
            heldout: 2,
            augment: Augment {
                flip_p: 0.5,
                rot90_p: 0.0,
            },
            checkpoint_every: 100,
            amp: Amp::Fp16,
            seed: 0,
        }
    }
}

/// `vae_train`'s optimiser and schedule when the pipeline file does not say.
pub const VAE_TRAINING: TrainingDefaults = TrainingDefaults {
    optim: ResolvedOptim::adamw(2e-4, 2e-5, 1e-5),
    schedule: ResolvedSchedule::cosine(20),
};

training_params!(VaeTrainParams);

/// `vae_train`.
pub struct VaeTrain;

impl Stage for VaeTrain {
    type Params = VaeTrainParams;
    const KIND: &'static str = "vae_train";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "trains the MAISI-topology 3D VAE (L1 + KL, optional patch adversarial) on random crops";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "volumes",
            ty: VOLUMES,
            arity: Arity::One,
            doc: "preprocessed volumes",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "vae",
            ty: VAE,
            doc: "weights, config, loss curve, held-out PSNR/SSIM",
        }]
    }
    fn default_resources(&self) -> Resources {
        gpu_default()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &VaeTrainParams) -> Option<u64> {
        Some(p.seed)
    }
    training_stage!(
        VaeTrainParams,
        |_: &VaeTrainParams| VAE_TRAINING,
        MOVED_PARAMS
    );
    fn resolved(&self, p: &VaeTrainParams) -> Option<serde_json::Value> {
        vae_config(p.preset, &p.model)
            .ok()
            .and_then(|c| serde_json::to_value(c).ok())
    }

    fn validate(&self, p: &VaeTrainParams) -> Result<(), String> {
        let cfg = vae_config(p.preset, &p.model)?;
        let f = cfg.downsample_factor() as usize;
        if p.crop.iter().any(|&c| c == 0 || c % f != 0) {
            return Err(format!(
                "crop: {:?} must be positive multiples of the downsampling factor {f}",
                p.crop
            ));
        }
        if p.batch_size == 0 {
            return Err("batch_size: must be positive".into());
        }
        p.training().map(|_| ())
    }
}

/// `vae_import` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeImportParams {
    /// A `.safetensors` file converted from MONAI's `autoencoder.pt` by
    /// `scripts/convert_maisi.py` (hashed by content).
    pub weights: SourcePath,
    #[serde(default = "maisi")]
    pub preset: VaePreset,
    #[serde(default)]
    pub model: serde_json::Map<String, serde_json::Value>,
}

fn maisi() -> VaePreset {
    VaePreset::Maisi
}

/// `vae_import`.
pub struct VaeImport;

impl Stage for VaeImport {
    type Params = VaeImportParams;
    const KIND: &'static str = "vae_import";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "imports MAISI VAE weights converted to safetensors (every key checked)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "vae",
            ty: VAE,
            doc: "weights and config",
        }]
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn resolved(&self, p: &VaeImportParams) -> Option<serde_json::Value> {
        vae_config(p.preset, &p.model)
            .ok()
            .and_then(|c| serde_json::to_value(c).ok())
    }

    fn validate(&self, p: &VaeImportParams) -> Result<(), String> {
        vae_config(p.preset, &p.model).map(|_| ())
    }
}

/// How latents are taken from the posterior.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LatentMode {
    /// `mu + sigma * eps` (MONAI's `encode_stage_2_inputs`, the authors' default), seeded.
    #[default]
    Sample,
    /// The posterior mean.
    Mean,
}

/// GroupNorm statistics when tiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tiling {
    /// Whole-volume statistics (equals whole-volume encoding).
    #[default]
    Global,
    /// Each tile's own statistics, blended (MAISI's sliding window).
    PerTile,
}

/// `vae_encode` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeEncodeParams {
    pub mode: LatentMode,
    /// Base seed of `sample` mode (each subject's noise is seeded from it and the subject).
    pub seed: u64,
    /// Tile edge in voxels (memory stays bounded by it).
    pub tile: [i64; 3],
    /// Overlap of tiles in voxels (`per_tile` only).
    pub overlap: i64,
    pub tiling: Tiling,
}

impl Default for VaeEncodeParams {
    fn default() -> Self {
        Self {
            mode: LatentMode::Sample,
            seed: 0,
            tile: [128, 128, 128],
            overlap: 32,
            tiling: Tiling::Global,
        }
    }
}

/// `vae_encode`.
pub struct VaeEncode;

impl Stage for VaeEncode {
    type Params = VaeEncodeParams;
    const KIND: &'static str = "vae_encode";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "encodes whole volumes into latents (tiled, bounded memory) stored as Zarr";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "vae",
                ty: VAE,
                arity: Arity::One,
                doc: "a trained or imported VAE",
            },
            InputSpec {
                name: "volumes",
                ty: VOLUMES,
                arity: Arity::One,
                doc: "preprocessed volumes",
            },
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "latents",
            ty: LATENTS,
            doc: "per subject: latent.zarr [C, X/4, Y/4, Z/4]",
        }]
    }
    fn default_resources(&self) -> Resources {
        gpu_default()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn map_over(&self) -> Option<&'static str> {
        Some("volumes")
    }
    fn seed(&self, p: &VaeEncodeParams) -> Option<u64> {
        Some(p.seed)
    }
    fn validate(&self, p: &VaeEncodeParams) -> Result<(), String> {
        if p.tile.iter().any(|&t| t < 8 || t % 4 != 0) {
            return Err(format!(
                "tile: {:?} must be multiples of 4 and at least 8",
                p.tile
            ));
        }
        if p.overlap < 0 || p.overlap % 4 != 0 || p.tile.iter().any(|&t| p.overlap >= t) {
            return Err(format!(
                "overlap: {} must be a non-negative multiple of 4 below the tile size",
                p.overlap
            ));
        }
        Ok(())
    }
}

/// `vae_decode` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeDecodeParams {
    /// Decode in overlapping tiles of this many latent voxels (0: whole volume at once).
    pub tile: i64,
    /// Overlap of tiles in latent voxels.
    pub overlap: i64,
}

impl Default for VaeDecodeParams {
    fn default() -> Self {
        Self {
            tile: 0,
            overlap: 8,
        }
    }
}

/// `vae_decode`.
pub struct VaeDecode;

impl Stage for VaeDecode {
    type Params = VaeDecodeParams;
    const KIND: &'static str = "vae_decode";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "decodes latents back into image volumes (exportable to NIfTI)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "vae",
                ty: VAE,
                arity: Arity::One,
                doc: "the VAE that made the latents",
            },
            InputSpec {
                name: "latents",
                ty: LATENTS,
                arity: Arity::One,
                doc: "latents",
            },
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "volumes",
            ty: VOLUMES,
            doc: "per subject: image.zarr",
        }]
    }
    fn default_resources(&self) -> Resources {
        gpu_default()
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn map_over(&self) -> Option<&'static str> {
        Some("latents")
    }
    fn validate(&self, p: &VaeDecodeParams) -> Result<(), String> {
        if p.tile < 0 || (p.tile > 0 && (p.overlap < 0 || p.overlap >= p.tile)) {
            return Err(format!("tile: tile {} / overlap {} must satisfy 0 <= overlap < tile (tile 0: whole volume)", p.tile, p.overlap));
        }
        Ok(())
    }
}
