//! Downstream analysis (issue 7): sliding-window inference against whole-volume inference,
//! UNETR and U-Net shapes and MONAI names, the MeDUET -> UNETR weight transfer, and a tiny
//! segmentation + classification pipeline run end to end on phantoms.
//!
//! Run: `cargo test --release -p meduet-torch --test segmentation -- --nocapture`.

mod common;

use common::{global_rng, read_json, TinyData};

use meduet_stages::data::nifti_io::read_nifti_labels;
use meduet_stages::data::zarr_store::read_zarr;
use meduet_torch::inference::{sliding_window, SlidingWindow};
use meduet_torch::models::meduet::{Config as MeduetConfig, MeDuet};
use meduet_torch::models::unet::{Unet, UnetConfig};
use meduet_torch::models::unetr::{default_skips, PosEmbedInit, Unetr, UnetrConfig, UnetrHead};
use tch::{nn, Device, Kind, Tensor};

/// A translation-equivariant network without boundary effects: a fixed 1x1x1 map mixing
/// the channels, then (for `scale > 1`) nearest upsampling.
fn pointwise(x: &Tensor, scale: i64) -> Tensor {
    let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75]).view([3, 2, 1, 1, 1]);
    let y = x
        .conv3d(&w, None::<&Tensor>, [1, 1, 1], [0, 0, 0], [1, 1, 1], 1)
        .tanh();
    if scale == 1 {
        y
    } else {
        let s = y.size();
        y.upsample_nearest3d([s[2] * scale, s[3] * scale, s[4] * scale], None, None, None)
    }
}

#[test]
fn sliding_window_equals_whole_volume_and_covers_every_voxel() {
    let x = {
        let _g = global_rng();
        tch::manual_seed(3);
        Tensor::randn([1, 2, 21, 16, 9], (Kind::Float, Device::Cpu))
    };
    for (roi, overlap, scale, batch) in [
        ([8, 8, 8], 0.5, 1, 4),
        ([8, 16, 12], 0.25, 1, 3), // the last axis is smaller than the window: padded
        ([6, 6, 6], 0.5, 4, 5),    // predictions on a 4x finer grid (UNETR on latents)
    ] {
        let sw = SlidingWindow {
            roi,
            overlap,
            batch,
            scale,
            sigma_scale: 0.125,
        };
        let (out, windows) = sliding_window(&x, &sw, &mut |b| Ok(pointwise(b, scale))).unwrap();
        let whole = pointwise(&x, scale);
        assert_eq!(out.size(), whole.size());
        let err = (&out - &whole).abs().max().double_value(&[]);
        assert!(err < 1e-5, "roi {roi:?}: max |sliding - whole| = {err}");
        assert!(windows > 1);
        // Coverage: a constant predictor gives the constant everywhere (the summed weights
        // are positive at every voxel, or the division would give NaN/inf).
        let (ones, _) = sliding_window(&x, &sw, &mut |b| {
            let s = b.size();
            Ok(Tensor::ones(
                [s[0], 1, s[2] * scale, s[3] * scale, s[4] * scale],
                (Kind::Float, Device::Cpu),
            ))
        })
        .unwrap();
        let dev = (ones - 1.0).abs().max().double_value(&[]);
        assert!(dev < 1e-6, "roi {roi:?}: a voxel is not covered ({dev})");
    }
    // A predictor of the wrong size is reported.
    let sw = SlidingWindow {
        roi: [8, 8, 8],
        overlap: 0.5,
        batch: 2,
        scale: 2,
        sigma_scale: 0.125,
    };
    let e = sliding_window(&x, &sw, &mut |b| Ok(pointwise(b, 1))).unwrap_err();
    assert!(e.contains("expected [n, K, [16, 16, 16]]"), "{e}");
}

fn tiny_meduet() -> MeduetConfig {
    MeduetConfig {
        crop: 16,
        depth: 4,
        ..MeduetConfig::tiny()
    }
}

fn unetr_cfg(m: &MeduetConfig, head: UnetrHead) -> UnetrConfig {
    UnetrConfig {
        in_channels: m.in_chans,
        out_channels: 3,
        img_size: m.crop,
        patch: m.patch,
        hidden_size: m.embed_dim,
        mlp_dim: (m.embed_dim as f64 * m.mlp_ratio) as i64,
        num_layers: m.depth,
        num_heads: m.num_heads,
        feature_size: 8,
        qkv_bias: true,
        skips: default_skips(m.depth),
        head,
    }
}

#[test]
fn transposed_conv_as_matmul_equals_libtorchs() {
    use meduet_torch::models::conv::ConvT3;
    let _g = global_rng();
    tch::manual_seed(9);
    let vs = nn::VarStore::new(Device::Cpu);
    let t = ConvT3::new(&vs.root(), 5, 3, [2, 2, 1]);
    let x = Tensor::randn([2, 5, 3, 4, 6], (Kind::Float, Device::Cpu));
    let (a, b) = (t.forward(&x), t.forward_reference(&x));
    assert_eq!(a.size(), [2, 3, 6, 8, 6]);
    let err = (&a - &b).abs().max().double_value(&[]);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn unetr_and_unet_shapes_and_monai_names() {
    let _g = global_rng();
    tch::manual_seed(0);
    assert_eq!(default_skips(12), [3, 6, 9]);
    let m = tiny_meduet();
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Unetr::new(&vs.root(), &unetr_cfg(&m, UnetrHead::Segmentation)).unwrap();
    let x = Tensor::randn([2, 4, 16, 16, 16], (Kind::Float, Device::Cpu));
    assert_eq!(net.forward(&x).size(), [2, 3, 16, 16, 16]);
    let names = vs.variables();
    for n in [
        "vit.patch_embedding.patch_embeddings.weight",
        "vit.patch_embedding.position_embeddings",
        "vit.blocks.3.attn.qkv.weight",
        "vit.blocks.3.attn.out_proj.bias",
        "vit.blocks.0.mlp.linear1.weight",
        "vit.norm.weight",
        "encoder1.layer.conv1.conv.weight",
        "encoder1.layer.conv3.conv.weight",
        "encoder2.transp_conv_init.conv.weight",
        "encoder2.blocks.1.0.conv.weight",
        "encoder2.blocks.1.1.conv2.conv.weight",
        "encoder4.transp_conv_init.conv.weight",
        "decoder5.transp_conv.conv.weight",
        "decoder3.conv_block.conv1.conv.weight",
        "decoder2.conv.weight",
        "out.conv.conv.bias",
    ] {
        assert!(names.contains_key(n), "missing {n}");
    }
    assert_eq!(
        names["encoder2.transp_conv_init.conv.weight"].size(),
        [96, 16, 2, 2, 2]
    );
    let vc = nn::VarStore::new(Device::Cpu);
    let cls = Unetr::new(&vc.root(), &unetr_cfg(&m, UnetrHead::Classification)).unwrap();
    assert_eq!(cls.forward(&x).size(), [2, 3]);

    let uv = nn::VarStore::new(Device::Cpu);
    let cfg = UnetConfig {
        in_channels: 1,
        out_channels: 2,
        kernels: vec![[3, 3, 3]; 4],
        strides: vec![[1, 1, 1], [2, 2, 2], [2, 2, 1], [2, 2, 2]],
        features: vec![4, 8, 16, 16],
        deep_supervision: 2,
    };
    let u = Unet::new(&uv.root(), &cfg).unwrap();
    assert_eq!(cfg.divisor(), [8, 8, 4]);
    let outs = u.forward(&Tensor::randn(
        [1, 1, 16, 24, 8],
        (Kind::Float, Device::Cpu),
    ));
    let sizes: Vec<Vec<i64>> = outs.iter().map(|t| t.size()).collect();
    assert_eq!(
        sizes,
        vec![
            vec![1, 2, 16, 24, 8],
            vec![1, 2, 8, 12, 4],
            vec![1, 2, 4, 6, 4]
        ]
    );
    let un = uv.variables();
    for n in [
        "input_block.conv1.conv.weight",
        "input_block.norm1.weight",
        "downsamples.0.conv1.conv.weight",
        "bottleneck.conv2.conv.weight",
        "upsamples.0.transp_conv.conv.weight",
        "upsamples.2.conv_block.norm2.bias",
        "output_block.conv.conv.weight",
        "deep_supervision_heads.1.conv.conv.bias",
    ] {
        assert!(un.contains_key(n), "missing {n}");
    }
    assert_eq!(
        un["upsamples.1.transp_conv.conv.weight"].size(),
        [16, 8, 2, 2, 1]
    );
    assert!(UnetConfig {
        deep_supervision: 3,
        ..cfg
    }
    .validate()
    .is_err());
}

/// The paper's head: UNETR's latent-channel output decoded to class logits on the image
/// grid by a VAE decoder whose last convolution has one output per class.
#[test]
fn unetr_with_vae_decoder_head_predicts_on_the_image_grid() {
    use meduet_stages::kinds::segment::{Network, SegmentTrainParams};
    use meduet_torch::runners::segment::{Net, SegmenterConfig};
    let _g = global_rng();
    tch::manual_seed(5);
    let m = tiny_meduet();
    let mut vae = meduet_stages::configs::vae::Config::small();
    vae.out_channels = 3;
    let mut u = unetr_cfg(&m, UnetrHead::Segmentation);
    u.out_channels = vae.latent_channels;
    let p = SegmentTrainParams::default();
    let cfg = SegmenterConfig {
        network: Network::Unetr,
        labels: vec![1, 2],
        scale: 4,
        roi: [16; 3],
        unetr: Some(u),
        unet: None,
        plan: None,
        vae_decoder: Some(vae),
        training: p,
        trainable_parameters: 0,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Net::build(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([1, 4, 16, 16, 16], (Kind::Float, Device::Cpu));
    let out = tch::no_grad(|| net.outputs(&x)).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].size(), [1, 3, 64, 64, 64]);
    assert!(vs
        .variables()
        .contains_key("vae_decoder.decoder.blocks.10.conv.conv.weight"));
}

#[test]
fn unetr_from_meduet_copies_bit_identical_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_meduet();
    let student = dir.path().join("student.safetensors");
    let (uvs, unetr, init_pos) = {
        let _g = global_rng();
        tch::manual_seed(11);
        let mvs = nn::VarStore::new(Device::Cpu);
        let _meduet = MeDuet::new(&mvs.root(), &m).unwrap();
        // Non-trivial values everywhere (LayerNorms are 1/0 at init).
        tch::no_grad(|| {
            for (_, mut t) in mvs.variables() {
                let r = Tensor::randn(t.size(), (Kind::Float, Device::Cpu));
                t.copy_(&r);
            }
        });
        mvs.save(&student).unwrap();
        tch::manual_seed(12);
        let uvs = nn::VarStore::new(Device::Cpu);
        let unetr = Unetr::new(&uvs.root(), &unetr_cfg(&m, UnetrHead::Segmentation)).unwrap();
        let init_pos = uvs.variables()["vit.patch_embedding.position_embeddings"].copy();
        (uvs, unetr, init_pos)
    };
    let mut uvs = uvs;
    let t = unetr
        .load_meduet(&mut uvs, &student, PosEmbedInit::Skip, m.grid())
        .unwrap();
    assert_eq!(t.copied.len(), 4 + 12 * m.depth as usize);
    let src: std::collections::BTreeMap<String, Tensor> = Tensor::read_safetensors(&student)
        .unwrap()
        .into_iter()
        .collect();
    let vars = uvs.variables();
    for (from, to) in &t.copied {
        assert!(
            src[from].equal(&vars[to]),
            "{from} -> {to} is not bit-identical"
        );
    }
    let pairs: Vec<(&str, &str)> = t
        .copied
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert!(pairs.contains(&(
        "blocks.2.attn.proj.weight",
        "vit.blocks.2.attn.out_proj.weight"
    )));
    assert!(pairs.contains(&("blocks.0.mlp.fc2.bias", "vit.blocks.0.mlp.linear2.bias")));
    assert!(pairs.contains(&(
        "embed_layer.proj.weight",
        "vit.patch_embedding.patch_embeddings.weight"
    )));
    assert!(pairs.contains(&("norm.bias", "vit.norm.bias")));
    // Skip (the authors' code): the position table keeps its init.
    assert!(vars["vit.patch_embedding.position_embeddings"].equal(&init_pos));
    // Interpolate (the paper): same grid -> MeDUET's table without its cls row, exactly.
    let t = unetr
        .load_meduet(&mut uvs, &student, PosEmbedInit::Interpolate, m.grid())
        .unwrap();
    assert!(t.pos_embed);
    let table = src["pos_embed"].narrow(1, 1, m.num_tokens());
    assert!(uvs.variables()["vit.patch_embedding.position_embeddings"].equal(&table));
    // A UNETR of another width is refused, naming the tensor.
    let other = nn::VarStore::new(Device::Cpu);
    let mut wide = unetr_cfg(&m, UnetrHead::Segmentation);
    wide.hidden_size = 48;
    wide.mlp_dim = 192;
    let net = Unetr::new(&other.root(), &wide).unwrap();
    let mut other = other;
    let e = net
        .load_meduet(&mut other, &student, PosEmbedInit::Skip, m.grid())
        .unwrap_err();
    assert!(e.contains("has shape"), "{e}");
}

/// Style augmentation's tensor parts on a tiny random MeDUET: the prototype of a latent
/// exactly one crop large is that crop's style; the EMA of two updates; mixing toward a
/// prototype equal to the batch's own style changes nothing whatever the strength, while a
/// different prototype does, and strength 0 is MeDUET's plain reconstruction; the
/// prototype survives a checkpoint.
#[test]
fn style_augmenter_mixes_toward_the_prototype() {
    use meduet_stages::segmentation::style_augment::{AugmentedTask, StyleAugmentParams};
    use meduet_torch::runners::style_augment::{StyleAugmenter, PROTOTYPE_FILE};
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_meduet();
    let (z, other) = {
        let _g = global_rng();
        tch::manual_seed(21);
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = MeDuet::new(&vs.root(), &m).unwrap();
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if !name.contains("norm") {
                    let r = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.2;
                    t.copy_(&r);
                }
            }
        });
        vs.save(dir.path().join("student.safetensors")).unwrap();
        let z = Tensor::randn(
            [1, m.in_chans, m.crop, m.crop, m.crop],
            (Kind::Float, Device::Cpu),
        );
        let other = Tensor::randn(
            [1, m.in_chans, m.crop, m.crop, m.crop],
            (Kind::Float, Device::Cpu),
        ) * 2.0
            + 1.0;
        (z, other)
    };
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&serde_json::json!({ "model": m })).unwrap(),
    )
    .unwrap();
    let settings = StyleAugmentParams {
        enabled: true,
        ..Default::default()
    }
    .resolve("100%", AugmentedTask::Segmentation)
    .unwrap()
    .unwrap();
    let crop = m.crop as usize;
    let mut aug =
        StyleAugmenter::load(dir.path(), settings, crop, m.in_chans, Device::Cpu).unwrap();
    let err = StyleAugmenter::load(dir.path(), settings, crop + 4, m.in_chans, Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("unetr.crop"), "{err}");
    assert!(aug.augment(&z, 0.3).is_err(), "no prototype yet");
    // From a trainer's settings: off is None; on without a MeDUET names the missing input.
    let on = StyleAugmentParams {
        enabled: true,
        ..Default::default()
    };
    let seg = AugmentedTask::Segmentation;
    let e = StyleAugmenter::for_training(&on, "100%", seg, None, crop, m.in_chans, Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("'meduet' input"), "{e}");
    let off = StyleAugmentParams::default();
    assert!(
        StyleAugmenter::for_training(&off, "100%", seg, None, crop, m.in_chans, Device::Cpu)
            .unwrap()
            .is_none()
    );
    assert!(StyleAugmenter::for_training(
        &on,
        "1-shot",
        seg,
        Some(dir.path()),
        crop,
        m.in_chans,
        Device::Cpu
    )
    .unwrap()
    .is_some_and(|a| a.settings.probability == 0.9));

    // A reference model to compare with.
    let rvs = {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = MeDuet::new(&vs.root(), &m).unwrap();
        vs.load(dir.path().join("student.safetensors")).unwrap();
        (vs, net)
    };
    let net = &rvs.1;
    let _ng = tch::no_grad_guard();
    let f = net.encode_full(&z);
    let as_array = |t: &Tensor| {
        let s = t.size();
        (
            Vec::<f32>::try_from(t.reshape([-1])).unwrap(),
            [s[1] as usize, s[2] as usize, s[3] as usize, s[4] as usize],
        )
    };
    let own = aug.mean_style(&[as_array(&z)]);
    let expect = f.style.squeeze_dim(0);
    assert!(
        own.allclose(&expect, 1e-5, 1e-5, false),
        "prototype of one crop is its style"
    );

    aug.update_prototype(own.copy());
    let a = aug.augment(&z, 0.2).unwrap();
    let b = aug.augment(&z, 0.8).unwrap();
    let plain = net.decode_full(&f.content, &f.style, &f.cls);
    assert!(
        a.allclose(&b, 1e-4, 1e-5, false),
        "own style: the strength does not matter"
    );
    assert!(a.allclose(&plain, 1e-4, 1e-5, false));

    // Another prototype: EMA 0.9 of the updates; the augmented view moves with the strength.
    let theirs = aug.mean_style(&[as_array(&other)]);
    aug.update_prototype(theirs.copy());
    let p = aug.prototype().unwrap().copy();
    assert!(p.allclose(&(&own * 0.9 + &theirs * 0.1), 1e-6, 1e-6, false));
    let a0 = aug.augment(&z, 0.0).unwrap();
    let a1 = aug.augment(&z, 1.0).unwrap();
    assert!(
        a0.allclose(&plain, 1e-4, 1e-5, false),
        "strength 0 reconstructs"
    );
    let moved = (&a1 - &a0).abs().max().double_value(&[]);
    assert!(moved > 1e-3, "strength 1 changes the view ({moved})");
    let by_hand = net.decode_full(&f.content, &p.unsqueeze(0), &f.cls);
    assert!(a1.allclose(&by_hand, 1e-4, 1e-5, false));

    // Checkpoint round trip.
    let cp = dir.path().join("cp");
    std::fs::create_dir_all(&cp).unwrap();
    aug.save(&cp.join(PROTOTYPE_FILE)).unwrap();
    let mut fresh =
        StyleAugmenter::load(dir.path(), settings, crop, m.in_chans, Device::Cpu).unwrap();
    fresh.load_state(&cp).unwrap();
    assert!(fresh.prototype().unwrap().equal(&p));
}

/// 3 domains x 4 subjects at 3 mm (64³ after resampling); train on two domains, evaluate
/// on their test subjects and on the third. A 4-step VAE and a 10-step MeDUET feed the
/// UNETR and the classifier (run for coverage, no accuracy floor: their latents are
/// barely trained); the U-Net on images must reach the stated Dice floor on the liver.
const PIPELINE_STAGES: &str = r#"
[stages.pretrain]
kind = "pretrain"
inputs = { latents = "encode.latents" }
steps = 10
batch_size = 4
model = { crop = 16 }
[stages.seg_unet]
kind = "segment_train"
inputs = { volumes = "resample.volumes" }
network = "unet"
labels = [1]
split = { train_domains = ["venous", "arterial"], val_fraction = 0.25 }
unet = { patch = [32, 32, 32], planner = { base_features = 8, max_pools = 3 } }
steps = 100
batch_size = 2
val_every = 100
checkpoint_every = 50
[stages.eval_unet]
kind = "segment_eval"
inputs = { model = "seg_unet.model", volumes = "resample.volumes", originals = "ingest.subjects" }
sw_batch = 8
[stages.seg_unetr]
kind = "segment_train"
inputs = { volumes = "resample.volumes", latents = "encode.latents", meduet = "pretrain.model" }
labels = [1]
split = { train_domains = ["venous", "arterial"], val_fraction = 0.25 }
unetr = { init = "meduet", crop = 16, feature_size = 8 }
steps = 6
val_every = 0
[stages.eval_unetr]
kind = "segment_eval"
inputs = { model = "seg_unetr.model", volumes = "resample.volumes", latents = "encode.latents" }
export_predictions = false
[stages.table]
kind = "segment_table"
inputs = { reports = ["eval_unet.report", "eval_unetr.report"] }
[stages.cls]
kind = "classify_train"
inputs = { latents = "encode.latents", meduet = "pretrain.model" }
split = { train_domains = ["venous", "arterial"] }
unetr = { init = "meduet", crop = 16, feature_size = 8 }
steps = 4
style_augment = { enabled = true, probability = 1.0, target = "heldout", kl_weight = 0.3 }
[stages.cls_eval]
kind = "classify_eval"
inputs = { model = "cls.model", latents = "encode.latents" }
"#;

/// The stated floor: mean in-domain liver Dice of the U-Net after 100 CPU steps. Measured
/// (`cargo test --release -p meduet-torch --test segmentation tiny_segmentation_pipeline
/// -- --nocapture`) in-domain / unseen domain: 0.741 / 0.696 on the machine where it was
/// set; on an AMD EPYC 0.730 / 0.680 (`ATEN_CPU_CAPABILITY=default`), 0.718 / 0.659
/// (`avx2`), 0.699 / 0.650 (`default` + `MKL_CBWR=COMPATIBLE`), 0.717 / 0.653 (`avx2` +
/// `MKL_CBWR=COMPATIBLE`). Spread 0.042; the worst clears the floor by 0.099.
const LIVER_DICE_FLOOR: f64 = 0.6;

fn key_of(summary: &meduet_engine::RunSummary, stage: &str) -> meduet_cache::StageKey {
    let (_, outcome) = summary
        .stages
        .iter()
        .find(|(n, _)| n == stage)
        .unwrap_or_else(|| panic!("no stage {stage}"));
    match outcome {
        meduet_engine::Outcome::Computed { key, .. }
        | meduet_engine::Outcome::Cached { key, .. } => key.clone(),
        other => panic!("{stage}: {other:?}"),
    }
}

fn out_dir(
    store: &meduet_cache::Store,
    summary: &meduet_engine::RunSummary,
    stage: &str,
    output: &str,
) -> std::path::PathBuf {
    store
        .object_dir(&key_of(summary, stage))
        .join("out")
        .join(output)
}

fn tiny_pipeline() -> String {
    let data = TinyData {
        domains: 3,
        subjects_per_domain: 4,
        vae_steps: 4,
        vae_crop: 16,
        vae_extra: "",
    };
    data.toml("tiny_segmentation") + PIPELINE_STAGES
}

#[test]
fn tiny_segmentation_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("seg.toml");
    std::fs::write(&file, tiny_pipeline()).unwrap();
    let p = meduet_engine::Pipeline::load(&file, &meduet_torch::registry()).unwrap();
    let store = meduet_cache::Store::open(&dir.path().join("cache")).unwrap();
    let env = meduet_engine::ExecEnv::new(store.clone());
    let t0 = std::time::Instant::now();
    let summary = meduet_engine::run(
        &p,
        &env,
        &meduet_engine::RunOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!("tiny segmentation pipeline: {secs:.1}s");
    for (name, o) in &summary.stages {
        if let meduet_engine::Outcome::Computed { wall_seconds, .. } = o {
            println!("  {name:<12} {wall_seconds:>6.1}s");
        }
    }
    assert!(summary.failures().is_empty(), "{:?}", summary.failures());

    // Splits recorded and disjoint; the unseen domain held out.
    let model = out_dir(&store, &summary, "seg_unet", "model");
    let splits = read_json(&model.join("splits.json"));
    assert_eq!(splits["heldout_domains"], serde_json::json!(["native"]));
    assert_eq!(splits["heldout"].as_array().unwrap().len(), 4);
    assert_eq!(splits["test"].as_array().unwrap().len(), 2);
    assert_eq!(splits["val"].as_array().unwrap().len(), 2);
    for f in ["losses.png", "val_dice.png"] {
        let png = std::fs::read(model.join(f)).unwrap();
        assert!(png.starts_with(&[0x89, b'P', b'N', b'G']), "{f}");
    }
    let cfg = read_json(&model.join("config.json"));
    assert_eq!(cfg["training"]["optim"]["kind"], "sgd");
    assert_eq!(cfg["training"]["optim"]["momentum"], 0.99);
    assert_eq!(cfg["training"]["schedule"]["kind"], "poly");
    assert_eq!(cfg["plan"]["patch"], serde_json::json!([32, 32, 32]));
    assert_eq!(cfg["plan"]["features"], serde_json::json!([8, 16, 32, 64]));

    // Evaluation: summary.json with per-case per-class metrics, in-domain and unseen.
    let report = out_dir(&store, &summary, "eval_unet", "report");
    let s = read_json(&report.join("summary.json"));
    let dice = s["in_domain"]["foreground_mean"]["Dice"].as_f64().unwrap();
    let unseen = s["unseen_domain"]["foreground_mean"]["Dice"]
        .as_f64()
        .unwrap();
    println!(
        "U-Net liver Dice: in-domain {dice:.3}, unseen domain {unseen:.3}; HD95 in-domain {} mm",
        s["in_domain"]["foreground_mean"]["HD95"]
    );
    assert!(
        dice > LIVER_DICE_FLOOR,
        "in-domain liver Dice {dice:.3} <= floor {LIVER_DICE_FLOOR}"
    );
    assert!((0.0..=1.0).contains(&unseen));
    let cases = s["metric_per_case"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    assert!(cases.iter().all(|c| c["metrics"]["1"]["Dice"].is_number()));

    // Predictions are NIfTI label maps on the input volume's grid and affine.
    let first = &cases[0];
    let id = first["subject"].as_str().unwrap();
    let (pred, _) =
        read_nifti_labels(&report.join(first["prediction_file"].as_str().unwrap())).unwrap();
    let res_key = key_of(&summary, "resample");
    let items =
        meduet_engine::collection::read_items(&store, &store.object_dir(&res_key), "volumes")
            .unwrap();
    let item = items.iter().find(|i| i.id == id).unwrap();
    let (vol, _) = read_zarr::<f32>(&item.dir.join("image.zarr")).unwrap();
    assert_eq!(pred.shape, vol.shape);
    for r in 0..3 {
        for c in 0..4 {
            assert!(
                (pred.affine[r][c] - vol.affine[r][c]).abs() < 1e-4,
                "affine {:?} vs {:?}",
                pred.affine,
                vol.affine
            );
        }
    }
    assert!(pred.data.iter().all(|&v| v == 0 || v == 1));

    // The same prediction on the original scan's grid (48 x 48 x 40 phantoms; resampling
    // padded them to 64^3), scored against the original label: close to the resampled-grid
    // Dice (the grids share their spacing, so only the padding is undone).
    let o = &first["original_grid"];
    assert_eq!(o["shape"], serde_json::json!([48, 48, 40]), "{o}");
    let (orig_pred, _) =
        read_nifti_labels(&report.join(o["prediction_file"].as_str().unwrap())).unwrap();
    assert_eq!(orig_pred.shape, [48, 48, 40]);
    // Voxel by voxel: each original voxel holds the prediction at the same world position
    // (integer offsets: both grids are 3 mm), background where that lies outside.
    let inv = meduet_stages::data::volume::invert_affine(&pred.affine).unwrap();
    let mut inside = 0;
    for i in 0..48 {
        for j in 0..48 {
            for k in 0..40 {
                let w = meduet_stages::data::volume::apply_affine(
                    &orig_pred.affine,
                    [i as f64, j as f64, k as f64],
                );
                let r = meduet_stages::data::volume::apply_affine(&inv, w);
                assert!(r.iter().all(|x| (x - x.round()).abs() < 1e-3), "{r:?}");
                let r = r.map(|x| x.round() as i64);
                let expect = if (0..3).all(|a| r[a] >= 0 && r[a] < pred.shape[a] as i64) {
                    inside += 1;
                    pred.get(r[0] as usize, r[1] as usize, r[2] as usize)
                } else {
                    0
                };
                assert_eq!(orig_pred.get(i, j, k), expect, "voxel {i},{j},{k}");
            }
        }
    }
    assert!(inside > 48 * 48 * 30, "the grids overlap ({inside} voxels)");
    let dice_orig = s["original_grid"]["in_domain"]["foreground_mean"]["Dice"]
        .as_f64()
        .unwrap();
    assert!(
        (dice_orig - dice).abs() < 0.02,
        "original grid {dice_orig} vs resampled {dice}"
    );

    // UNETR with MeDUET init: transfer recorded, evaluation written.
    let um = out_dir(&store, &summary, "seg_unetr", "model");
    let ucfg = read_json(&um.join("config.json"));
    assert_eq!(
        ucfg["meduet_transfer"]["copied"].as_array().unwrap().len(),
        4 + 12 * 2
    );
    assert_eq!(ucfg["scale"], 4);
    let us = read_json(&out_dir(&store, &summary, "eval_unetr", "report").join("summary.json"));
    assert!(
        us["in_domain"]["foreground_mean"]["Dice"].is_number(),
        "{us}"
    );

    // The results table.
    let table = out_dir(&store, &summary, "table", "table");
    let md = std::fs::read_to_string(table.join("table.md")).unwrap();
    assert!(
        md.contains("| 100% | unet | ") && md.contains("| 100% | unetr_meduet | "),
        "{md}"
    );
    let csv = std::fs::read_to_string(table.join("table.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(std::fs::read(table.join("dice.png"))
        .unwrap()
        .starts_with(&[0x89, b'P', b'N', b'G']));

    // The classifier trained with style augmentation on every step (toward the unseen
    // domain's style): augmented loss, strength in the 100% column's range, KL logged.
    let cl =
        std::fs::read_to_string(out_dir(&store, &summary, "cls", "model").join("losses.jsonl"))
            .unwrap();
    let rows: Vec<serde_json::Value> = cl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let a = r["style_alpha"].as_f64().unwrap();
        assert!((0.2..=0.5).contains(&a), "{r}");
        assert!(
            r["aug_loss"].as_f64().unwrap().is_finite() && r["kl"].as_f64().unwrap() >= 0.0,
            "{r}"
        );
    }

    // Classification report.
    let c = read_json(&out_dir(&store, &summary, "cls_eval", "report").join("classification.json"));
    assert!(
        c["in_domain"]["accuracy"]
            .as_f64()
            .is_some_and(|a| (0.0..=1.0).contains(&a)),
        "{c}"
    );
    assert_eq!(c["unseen_domain"]["cases"], 4);
    // Measured on the 2-core VM: 26 s quiet, 278 s at load average 6 (four engineers'
    // builds); the bound leaves room for a loaded CI machine.
    assert!(secs < 300.0, "the tiny pipeline took {secs:.0}s");
}
