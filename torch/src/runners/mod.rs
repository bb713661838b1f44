//! Implementations of the stage kinds that use tensors (declared in `meduet-stages`).
//!
//! | kind        | implementation          |
//! |-------------|-------------------------|
//! | `pretrain`        | [`pretrain`]      |
//! | `extract_factors` | [`factors`]       |
//! | `vae_train`, `vae_import`, `vae_encode`, `vae_decode` | [`vae`] |
//! | `segment_train`, `segment_eval` | [`segment`] |
//! | `classify_train`, `classify_eval` | [`classify`] |
//! | `diffusion_train`, `sample` | [`diffusion`] |
//! | `volume_features` | [`volume_features`] |
//! | `synthesis_metrics` | [`synthesis`] |
//! | `guidance_sweep` | [`guidance`] |
//! | `controlnet_train`, `controlnet_sample`, `mask_adherence` | [`controlnet`] |
//!
//! [`style_augment`] is the style augmentation shared by `segment_train` and `classify_train`.

pub mod classify;
pub mod common;
pub mod controlnet;
pub mod diffusion;
pub mod factors;
pub mod guidance;
pub mod pretrain;
pub mod segment;
pub mod style_augment;
pub mod synthesis;
pub mod vae;
pub mod volume_features;

use meduet_engine::{Implementation, Registry};
use meduet_stages::kinds;

/// Registers the implementations.
pub fn implement(r: &mut Registry) {
    r.implement(
        kinds::pretrain::Pretrain,
        Implementation::run(pretrain::run),
    );
    r.implement(
        kinds::pretrain::ExtractFactors,
        Implementation::run(factors::run),
    );
    r.implement(kinds::vae::VaeTrain, Implementation::run(vae::train));
    r.implement(kinds::vae::VaeImport, Implementation::run(vae::import));
    r.implement(kinds::vae::VaeEncode, Implementation::run_item(vae::encode));
    r.implement(kinds::vae::VaeDecode, Implementation::run_item(vae::decode));
    r.implement(
        kinds::diffusion::DiffusionTrain,
        Implementation::run(diffusion::train),
    );
    r.implement(
        kinds::diffusion::Sample,
        Implementation::run(diffusion::sample),
    );
    r.implement(
        kinds::diffusion::VolumeFeatures,
        Implementation::run(volume_features::run),
    );
    r.implement(
        kinds::diffusion::SynthesisMetrics,
        Implementation::run(synthesis::run),
    );
    r.implement(
        kinds::guidance::GuidanceSweep,
        Implementation::run(guidance::run),
    );
    r.implement(
        kinds::segment::SegmentTrain,
        Implementation::run(segment::train),
    );
    r.implement(
        kinds::segment::SegmentEval,
        Implementation::run(segment::eval),
    );
    r.implement(
        kinds::segment::ClassifyTrain,
        Implementation::run(classify::train),
    );
    r.implement(
        kinds::segment::ClassifyEval,
        Implementation::run(classify::eval),
    );
    r.implement(
        kinds::controlnet::ControlnetTrain,
        Implementation::run(controlnet::train),
    );
    r.implement(
        kinds::controlnet::ControlnetSample,
        Implementation::run(controlnet::sample),
    );
    r.implement(
        kinds::controlnet::MaskAdherence,
        Implementation::run(controlnet::mask_adherence),
    );
}
