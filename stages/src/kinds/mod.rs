//! The stage kinds.
//!
//! | kind       | does                                                                  |
//! |------------|-----------------------------------------------------------------------|
//! | `phantom`  | seeded multi-domain CT phantoms as MSD-style dataset folders          |
//! | `ingest`   | reads and checks NIfTI datasets; one `subjects` item per subject      |
//! | `resample` | fan-out: RAS, window, 1.5 mm, crop/pad per subject into Zarr volumes  |
//!
//! Kinds that need libtorch are declared here (parameters, inputs, outputs) and run in
//! the `meduet-torch` worker, which registers their implementations:
//!
//! | kind              | does                                                            |
//! |-------------------|-----------------------------------------------------------------|
//! | `vae_train`       | trains the MAISI-topology VAE                                   |
//! | `vae_import`      | imports MAISI VAE weights                                       |
//! | `vae_encode`      | fan-out: tiled whole-volume encoding into Zarr latents          |
//! | `vae_decode`      | fan-out: latents back to volumes                                |
//! | `pretrain`        | MeDUET pretraining                                              |
//! | `extract_factors` | per-subject content and style vectors                           |
//! | `probe`           | factor identifiability: linear probes, silhouettes, t-SNE       |
//! | `segment_train`   | UNETR (latents, scratch / MeDUET init) or nnU-Net-style U-Net   |
//! | `segment_eval`    | sliding-window Dice / HD95, in-domain and unseen domains        |
//! | `classify_train`  | UNETR + pooled linear head on a volume-level label              |
//! | `classify_eval`   | accuracy and macro AUC, in-domain and unseen domains            |
//! | `segment_table`   | Table 2: Dice by model and label fraction (MD, CSV, bar plot)   |
//! | `diffusion_train` | DiT / SiT on latents, conditioned on MeDUET factors             |
//! | `sample`          | dual-CFG sampling, VAE decoding, NIfTI + montage                |
//! | `volume_features` | real volumes' features for FID/MMD, computed once, shared        |
//! | `synthesis_metrics` | FID, MMD (3-D feature network), MS-SSIM diversity             |
//! | `synthesis_curve` | Fig. 5: FID against training steps, steps-to-equal-FID ratio    |
//! | `guidance_sweep`  | Fig. 7: content Dice and style hit rate over dual-CFG weights  |

pub mod diffusion;
pub mod guidance;
pub mod ingest;
pub mod phantom;
pub mod preset;
pub mod pretrain;
pub mod probe;
pub mod resample;
pub mod segment;
pub mod subject;
pub mod synthesis_curve;
pub mod vae;

/// Registers this crate's stage kinds.
pub fn register(r: &mut meduet_engine::Registry) {
    r.register(phantom::Phantom)
        .register(ingest::Ingest)
        .register(resample::Resample)
        .register(vae::VaeTrain)
        .register(vae::VaeImport)
        .register(vae::VaeEncode)
        .register(vae::VaeDecode)
        .register(pretrain::Pretrain)
        .register(pretrain::ExtractFactors)
        .register(probe::Probe)
        .register(diffusion::DiffusionTrain)
        .register(diffusion::Sample)
        .register(diffusion::VolumeFeatures)
        .register(diffusion::SynthesisMetrics)
        .register(synthesis_curve::SynthesisCurve)
        .register(guidance::GuidanceSweep)
        .register(segment::SegmentTrain)
        .register(segment::SegmentEval)
        .register(segment::ClassifyTrain)
        .register(segment::ClassifyEval)
        .register(segment::SegmentTable);
}

#[cfg(test)]
mod tests {
    use meduet_engine::Stage;

    use super::*;

    /// A preset enters the stage key by the sizes it stands for (after `model` overrides),
    /// so redefining a preset reruns what used it.
    #[test]
    fn preset_kinds_resolve_their_presets_for_the_key() {
        let mut dit = diffusion::DiffusionTrainParams {
            preset: diffusion::DitPreset::Small,
            ..Default::default()
        };
        let r = diffusion::DiffusionTrain.resolved(&dit).unwrap();
        assert_eq!(
            (r["hidden_size"].as_i64(), r["depth"].as_i64()),
            (Some(288), Some(2))
        );
        dit.model.insert("depth".into(), serde_json::json!(3));
        let r = diffusion::DiffusionTrain.resolved(&dit).unwrap();
        assert_eq!(r["depth"].as_i64(), Some(3));

        let pre = pretrain::PretrainParams {
            preset: pretrain::MeduetPreset::Small,
            ..Default::default()
        };
        let r = pretrain::Pretrain.resolved(&pre).unwrap();
        assert_eq!(r["embed_dim"].as_i64(), Some(288));
        assert!(vae::VaeTrain.resolved(&Default::default()).is_some());

        // The UNETR's preset counts only when it is used: from scratch, not from a MeDUET.
        let mut seg = segment::SegmentTrainParams::default();
        let r = segment::SegmentTrain.resolved(&seg).unwrap();
        assert!(r["unetr"]["embed_dim"].is_i64(), "{r}");
        seg.unetr.init = segment::Init::Meduet;
        assert_eq!(segment::SegmentTrain.resolved(&seg), None);
        seg.network = segment::Network::Unet;
        assert_eq!(segment::SegmentTrain.resolved(&seg), None);
        // Kinds without presets add nothing to their keys.
        assert_eq!(diffusion::Sample.resolved(&Default::default()), None);
    }
}
