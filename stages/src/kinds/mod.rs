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
//! | `controlnet_train` | ControlNet on a frozen DiT/SiT, conditioned on segmentation masks |
//! | `controlnet_sample` | image + label pairs from (transformed) masks, mask guidance     |
//! | `mask_adherence`  | Dice of synthesized volumes against their conditioning masks    |
//! | `fig6_table`      | Fig. 6: Dice by augmentation regime, mean ± sd over seeds (plain Rust) |

pub mod controlnet;
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
        .register(segment::SegmentTable)
        .register(controlnet::ControlnetTrain)
        .register(controlnet::ControlnetSample)
        .register(controlnet::MaskAdherence)
        .register(controlnet::Fig6Table);
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

    /// Phantoms to resampled volumes: what a training stage of the tests below reads.
    const PHANTOM_TO_VOLUMES: &str = r#"[stages.phantom]
kind = "phantom"
[stages.ingest]
kind = "ingest"
inputs = { datasets = "phantom.datasets" }
[stages.resample]
kind = "resample"
inputs = { subjects = "ingest.subjects" }
"#;

    fn params(kind: &str, toml_text: &str) -> Result<serde_json::Value, (String, String)> {
        let r = crate::registry();
        r.get(kind)
            .unwrap()
            .resolve_params(toml_text.parse::<toml::Table>().unwrap())
    }

    /// Every number that shapes a training run is in the parameters that enter the key,
    /// defaults included: a change to one (here AdamW's eps of `vae_train`, hard-coded
    /// before the shared training configuration) changes the key and is named.
    #[test]
    fn training_numbers_enter_the_key_and_are_named() {
        let before = params("vae_train", "").unwrap();
        assert_eq!(before["optim"]["eps"], 1e-8);
        assert_eq!(before["optim"]["betas"], serde_json::json!([0.9, 0.999]));
        assert_eq!(before["schedule"]["warmup_lr_init"], 1e-6);
        let after = params("vae_train", "optim = { eps = 1e-6 }").unwrap();
        let fp = |params: serde_json::Value| meduet_engine::fingerprint::Fingerprint {
            schema: meduet_engine::fingerprint::KEY_SCHEMA_VERSION,
            kind: "vae_train".into(),
            kind_version: 1,
            params,
            resolved: None,
            code: Default::default(),
            device_class: None,
            inputs: Default::default(),
            item: None,
        };
        let (a, b) = (fp(before), fp(after));
        assert_ne!(a.key(), b.key());
        let why = meduet_engine::fingerprint::explain(Some(&a), &b, &Default::default());
        assert_eq!(
            why.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["parameter 'optim.eps' changed: 1e-8 -> 1e-6"]
        );
        // Writing a default out gives the same key as leaving it out.
        let explicit = params("vae_train", "optim = { lr = 2e-4, eps = 1e-8 }").unwrap();
        assert_eq!(fp(explicit).key(), a.key());
        // The segmentation network's defaults are filled before hashing (was `lr = null`).
        let unet = params("segment_train", "network = \"unet\"").unwrap();
        assert_eq!(
            unet["optim"],
            serde_json::json!({"kind": "sgd", "lr": 1e-2, "momentum": 0.99, "nesterov": true, "weight_decay": 3e-5})
        );
        assert_eq!(
            unet["schedule"],
            serde_json::json!({"kind": "poly", "warmup_steps": 0, "power": 0.9})
        );
        assert_eq!(unet["fg_fraction"], 1.0 / 3.0);
        let unetr = params("segment_train", "").unwrap();
        assert_eq!(unetr["optim"]["kind"], "adamw");
        assert_eq!(unetr["schedule"]["kind"], "cosine");
        // Every training kind runs on the shared trainer, whose version enters its key.
        let r = crate::registry();
        for kind in [
            "vae_train",
            "pretrain",
            "diffusion_train",
            "segment_train",
            "classify_train",
        ] {
            assert_eq!(
                r.get(kind).unwrap().code_versions(),
                crate::training::TRAINER_CODE,
                "{kind}"
            );
            params(kind, "").unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        }
        assert!(r.get("probe").unwrap().code_versions().is_empty());
    }

    /// An old pipeline file that uses a moved parameter is told the new spelling; a field
    /// that does not apply to the chosen optimiser is refused, naming it.
    #[test]
    fn old_training_spellings_say_the_new_one() {
        let (path, msg) = params("pretrain", "lr = 1e-3").unwrap_err();
        assert!(
            msg.contains("`lr` is now written `optim.lr`"),
            "{path}: {msg}"
        );
        let (_, msg) = params("segment_train", "optimizer = \"sgd\"").unwrap_err();
        assert!(
            msg.contains("`optimizer` is now written `optim.kind`"),
            "{msg}"
        );
        let (_, msg) = params("diffusion_train", "schedule = { timesteps = 500 }").unwrap_err();
        assert!(msg.contains("noise_schedule.timesteps"), "{msg}");
        let (path, msg) = params("vae_train", "optim = { momentum = 0.9 }").unwrap_err();
        assert_eq!(path, "optim.momentum");
        assert!(msg.contains("applies to kind = \"sgd\" only"), "{msg}");
        let (path, _) = params("classify_train", "optim = { lr = -1.0 }").unwrap_err();
        assert_eq!(path, "optim.lr");
    }

    /// fp16 autocast runs only on CUDA, so a training stage with `amp = "fp16"` keys the
    /// device class it runs on (a CPU run and a CUDA run get different keys; `auto` asks
    /// whether a CUDA device is visible); with `amp = "off"` CPU and CUDA share the key.
    #[test]
    fn fp16_training_keys_the_device_class_and_fp32_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            format!(
                "name = \"device_class\"\n{PHANTOM_TO_VOLUMES}{}",
                r#"
[stages.fp16]
kind = "vae_train"
inputs = { volumes = "resample.volumes" }
[stages.fp32]
kind = "vae_train"
inputs = { volumes = "resample.volumes" }
amp = "off"
[stages.fp16_cpu]
kind = "vae_train"
inputs = { volumes = "resample.volumes" }
resources = { device = "cpu" }
"#
            ),
        )
        .unwrap();
        let p = meduet_engine::Pipeline::load(&file, &crate::registry()).unwrap();
        let store = meduet_cache::Store::open(dir.path().join("cache")).unwrap();
        let key = |stage: &str, cuda: bool| {
            let def = &p.stages[p.index_of(stage).unwrap()];
            meduet_engine::exec::prepare(def, &store, Default::default(), &|_| cuda).unwrap()
        };
        let (cpu, gpu) = (key("fp16", false), key("fp16", true));
        assert_ne!(cpu.key, gpu.key);
        let why = meduet_engine::fingerprint::explain(
            Some(&cpu.fingerprint),
            &gpu.fingerprint,
            &Default::default(),
        );
        assert_eq!(why.len(), 1);
        assert!(
            why[0]
                .to_string()
                .starts_with("device class changed: cpu -> cuda"),
            "{}",
            why[0]
        );
        assert_eq!(key("fp32", false).key, key("fp32", true).key);
        assert_eq!(key("fp32", false).fingerprint.device_class, None);
        // An explicit CPU stage is a CPU stage whatever this machine has.
        assert_eq!(key("fp16_cpu", true).key, cpu.key);
    }

    /// `extends` merges `optim` entry by entry (an lr override keeps the base's betas), and
    /// starts over when the override names another optimiser.
    #[test]
    fn extends_merges_optim_unless_the_kind_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            format!(
                "{PHANTOM_TO_VOLUMES}{}",
                r#"
[stages.base]
kind = "vae_train"
inputs = { volumes = "resample.volumes" }
optim = { lr = 1e-3, betas = [0.8, 0.9] }
[stages.faster]
extends = "base"
optim.lr = 2e-3
[stages.sgd]
extends = "base"
optim = { kind = "sgd" }
"#
            ),
        )
        .unwrap();
        let p = meduet_engine::Pipeline::load(&file, &crate::registry()).unwrap();
        let optim = |s: &str| p.stages[p.index_of(s).unwrap()].params["optim"].clone();
        assert_eq!(optim("faster")["betas"], serde_json::json!([0.8, 0.9]));
        assert_eq!(optim("faster")["lr"], 2e-3);
        let sgd = optim("sgd");
        assert_eq!(sgd["kind"], "sgd");
        assert!(sgd.get("betas").is_none(), "{sgd}");
        assert_eq!(
            (sgd["lr"].as_f64(), sgd["momentum"].as_f64()),
            (Some(2e-4), Some(0.9))
        );
    }
}
