//! The DiT ControlNet: zero initialisation (the controlled model is the base model,
//! exactly), the copied blocks, and equivalence of the forward pass and the mask- and
//! dual-guided output with the PyTorch reference (`reference/controlnet_ref.py`), whose
//! modules load meduet's weights strictly.
//!
//! Run: `cargo test --release -p meduet-torch --test controlnet -- --nocapture` (prints the
//! measured errors). The reference test needs the project venv (torch, safetensors).

use std::path::{Path, PathBuf};

use meduet_stages::testing::run_python;
use meduet_torch::diffusion::{
    controlled_guided_output, GuidanceNaming, GuidanceParams, MaskTokens,
};
use meduet_torch::models::controlnet::{drop_masks, one_hot, ControlConfig, ControlNet};
use meduet_torch::models::dit::{AdaLn, ConditionMode, Config, Dit};
use tch::{nn, Device, Kind, Tensor};

static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn global_rng() -> std::sync::MutexGuard<'static, ()> {
    GLOBAL_RNG.lock().unwrap_or_else(|p| p.into_inner())
}

fn small(condition: ConditionMode) -> Config {
    Config {
        input_size: [8, 8, 8],
        hidden_size: 48,
        depth: 3,
        num_heads: 4,
        content_dim: 12,
        style_dim: 6,
        metadata_dim: 5,
        condition,
        adaln: AdaLn::Code,
        num_classes: 0,
        ..Config::tiny()
    }
}

fn control_cfg() -> ControlConfig {
    ControlConfig {
        mask_channels: 3,
        depth: 2,
        embedding_channels: vec![4, 8, 16],
        scale: 4,
    }
}

struct Built {
    base_vs: nn::VarStore,
    base: Dit,
    vs: nn::VarStore,
    control: ControlNet,
}

/// A base DiT whose `mod_*` layers are random (so conditions and time matter) and its
/// ControlNet with the first blocks copied.
fn build(cfg: &Config, seed: i64) -> Built {
    let _g = global_rng();
    tch::manual_seed(seed);
    let base_vs = nn::VarStore::new(Device::Cpu);
    let base = Dit::new(&base_vs.root(), cfg).unwrap();
    tch::no_grad(|| {
        for (name, mut v) in base_vs.variables() {
            if name.contains(".mod_") {
                v.copy_(&(Tensor::randn_like(&v) * 0.05));
            }
        }
    });
    let vs = nn::VarStore::new(Device::Cpu);
    let control = ControlNet::new(&vs.root(), cfg, &control_cfg()).unwrap();
    let n = control.copy_base_blocks(&vs, &base_vs).unwrap();
    assert!(n > 0);
    Built {
        base_vs,
        base,
        vs,
        control,
    }
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    c: Tensor,
    s: Tensor,
    m: Tensor,
    mask: Tensor,
}

fn inputs(cfg: &Config, b: i64, seed: i64) -> Inputs {
    let _g = global_rng();
    tch::manual_seed(seed);
    let [x, y, z] = cfg.input_size;
    let classes = Tensor::randint(3, [b, x * 4, y * 4, z * 4], (Kind::Int64, Device::Cpu));
    Inputs {
        x: Tensor::randn([b, cfg.in_chans, x, y, z], (Kind::Float, Device::Cpu)),
        t: Tensor::randint(1000, [b], (Kind::Int64, Device::Cpu)).to_kind(Kind::Float),
        c: Tensor::randn([b, cfg.content_dim], (Kind::Float, Device::Cpu)),
        s: Tensor::randn([b, cfg.style_dim], (Kind::Float, Device::Cpu)),
        m: Tensor::randn([b, cfg.metadata_dim], (Kind::Float, Device::Cpu)),
        mask: one_hot(&classes, 3),
    }
}

fn embed(b: &Built, mode: ConditionMode, i: &Inputs) -> Vec<Tensor> {
    use meduet_torch::models::dit::Cond;
    let c = match mode {
        ConditionMode::Factors => Cond::Factors {
            content: &i.c,
            style: &i.s,
        },
        ConditionMode::Metadata => Cond::Metadata(&i.m),
        ConditionMode::None => Cond::None,
    };
    b.base.embed(&c, &[]).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

/// Before training the controlled model is the base model: max |difference| = 0, whatever
/// the mask, the time and the conditions; and the copied blocks are the base's.
#[test]
fn zero_initialised_controlnet_leaves_the_base_output_unchanged() {
    for mode in [
        ConditionMode::Factors,
        ConditionMode::Metadata,
        ConditionMode::None,
    ] {
        let cfg = small(mode);
        let b = build(&cfg, 1);
        let i = inputs(&cfg, 2, 2);
        let emb = embed(&b, mode, &i);
        let (base, controlled, no_mask) = tch::no_grad(|| {
            (
                b.base.forward_emb(&i.x, &i.t, &emb).unwrap(),
                b.control
                    .forward_emb(&b.base, &i.x, &i.t, &emb, &i.mask)
                    .unwrap(),
                b.control
                    .forward_emb(&b.base, &i.x, &i.t, &emb, &i.mask.zeros_like())
                    .unwrap(),
            )
        });
        assert_eq!(max_abs(&base, &controlled), 0.0, "{mode:?}");
        assert_eq!(max_abs(&base, &no_mask), 0.0, "{mode:?}");
        let (bv, cv) = (b.base_vs.variables(), b.vs.variables());
        for name in ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias"] {
            assert_eq!(max_abs(&bv[name], &cv[name]), 0.0, "{name} copied");
        }
        assert!(!cv.contains_key("blocks.2.attn.qkv.weight"), "depth 2 of 3");
        // The zero layers do carry gradient: a loss on the output reaches zero_projs.
        let out = b
            .control
            .forward_emb(&b.base, &i.x, &i.t, &emb, &i.mask)
            .unwrap();
        out.square().mean(Kind::Float).backward();
        let g = cv["zero_projs.0.weight"].grad();
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{mode:?}");
    }
}

/// Once its zero layers are trained, the ControlNet changes the output, and a different
/// mask gives a different output (the mask reaches the prediction).
#[test]
fn a_trained_controlnet_makes_the_output_depend_on_the_mask() {
    let cfg = small(ConditionMode::Factors);
    let b = build(&cfg, 3);
    randomise_zero_layers(&b.vs, 4);
    let i = inputs(&cfg, 2, 5);
    let emb = embed(&b, ConditionMode::Factors, &i);
    let other = i.mask.flip([2]);
    let (a, c, base) = tch::no_grad(|| {
        (
            b.control
                .forward_emb(&b.base, &i.x, &i.t, &emb, &i.mask)
                .unwrap(),
            b.control
                .forward_emb(&b.base, &i.x, &i.t, &emb, &other)
                .unwrap(),
            b.base.forward_emb(&i.x, &i.t, &emb).unwrap(),
        )
    });
    assert!(rel_err(&a, &base) > 1e-3);
    assert!(rel_err(&a, &c) > 1e-4);
    // Dropped masks are zeros.
    let drop = Tensor::from_slice(&[1u8, 0]).to_kind(Kind::Bool);
    let d = drop_masks(&i.mask, &drop);
    assert_eq!(d.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert_eq!(max_abs(&d.get(1), &i.mask.get(1)), 0.0);
}

fn randomise_zero_layers(vs: &nn::VarStore, seed: i64) {
    let _g = global_rng();
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.starts_with("zero_projs") || name.contains("patch_embed") {
                v.copy_(&(Tensor::randn_like(&v) * 0.05));
            }
        }
    });
}

#[test]
fn control_config_errors_name_the_field() {
    let base = small(ConditionMode::Factors);
    let mut c = control_cfg();
    c.depth = 4;
    assert!(c.validate(&base).unwrap_err().contains("depth: 4"));
    let mut c = control_cfg();
    c.embedding_channels = vec![4, 8];
    let e = c.validate(&base).unwrap_err();
    assert!(
        e.contains("embedding_channels") && e.contains("give 3 widths"),
        "{e}"
    );
    let mut c = control_cfg();
    c.mask_channels = 1;
    assert!(c.validate(&base).unwrap_err().contains("mask_channels"));
}

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../reference")
}

const PY_COMPARE: &str = r#"
import sys, json
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(2)
from safetensors.torch import load_file, save_file
import dit_ref as D
import controlnet_ref as C
d = sys.argv[2]
j = json.load(open(d + "/config.json"))
cfg, ccfg = j["base"], j["control"]
base = D.DiT(cfg)
D.load_safetensors(base, d + "/base.safetensors")
control = C.ControlNet(cfg, ccfg)
C.load_safetensors(control, d + "/control.safetensors")
base.eval(); control.eval()
i = load_file(d + "/inputs.safetensors")
cond = {"factors": [i.get("c"), i.get("s")], "metadata": [i.get("m")], "none": []}[cfg["condition"]]
out = {}
with torch.no_grad():
    emb = base.embed(cond)
    out["forward"] = C.controlled_forward_emb(base, control, i["x"], i["t"], emb, i["mask"])
    for w_m in (1.0, 2.0):
        out[f"guided_{w_m}"] = C.forward_with_guidance(base, control, i["x"], i["t"], cond, i["mask"], 3.0, 1.5, w_m, j["naming"])
# A freshly initialised reference ControlNet (copied blocks) loads into tch with the same keys.
fresh = C.ControlNet(cfg, ccfg)
fresh.copy_base_blocks(base)
save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, d + "/py_init.safetensors")
save_file({k: v.contiguous() for k, v in out.items()}, d + "/py_out.safetensors")
print(json.dumps(sorted(control.state_dict().keys())))
"#;

/// The controlled forward pass and the guided output (mask weight 1: three evaluations;
/// 2: four) equal the PyTorch reference to 1e-4 relative, for every condition mode; the
/// reference loads the tch weights strictly and its fresh ControlNet loads into tch.
#[test]
fn controlnet_matches_pytorch_reference_and_weights_interchange() {
    for (mode, naming) in [
        (ConditionMode::Factors, GuidanceNaming::Code),
        (ConditionMode::Factors, GuidanceNaming::Paper),
        (ConditionMode::Metadata, GuidanceNaming::Code),
        (ConditionMode::None, GuidanceNaming::Code),
    ] {
        let cfg = small(mode);
        let b = build(&cfg, 10);
        randomise_zero_layers(&b.vs, 11);
        let d = tempfile::tempdir().unwrap();
        b.base_vs.save(d.path().join("base.safetensors")).unwrap();
        b.vs.save(d.path().join("control.safetensors")).unwrap();
        let j = serde_json::json!({
            "base": cfg, "control": control_cfg(), "naming": naming,
        });
        std::fs::write(d.path().join("config.json"), j.to_string()).unwrap();
        let i = inputs(&cfg, 2, 12);
        Tensor::write_safetensors(
            &[
                ("x", i.x.shallow_clone()),
                ("t", i.t.shallow_clone()),
                ("c", i.c.shallow_clone()),
                ("s", i.s.shallow_clone()),
                ("m", i.m.shallow_clone()),
                ("mask", i.mask.shallow_clone()),
            ],
            d.path().join("inputs.safetensors"),
        )
        .unwrap();
        let keys = run_python(
            PY_COMPARE,
            &[
                &reference_dir().to_string_lossy(),
                &d.path().to_string_lossy(),
            ],
        );
        let py: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(d.path().join("py_out.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let emb = embed(&b, mode, &i);
        let null = b.base.null_embed(2);
        let g = GuidanceParams {
            content: 3.0,
            style: 1.5,
            naming,
        };
        tch::no_grad(|| {
            let f = b
                .control
                .forward_emb(&b.base, &i.x, &i.t, &emb, &i.mask)
                .unwrap();
            let e = rel_err(&f, &py["forward"]);
            println!("{mode:?}/{naming:?}: forward rel err {e:.2e}");
            assert!(e < 1e-4, "{mode:?}: forward {e}");
            let tokens = MaskTokens::new(&b.base, &b.control, &i.mask).unwrap();
            for w_m in [1.0, 2.0] {
                let o = controlled_guided_output(
                    &b.base, &b.control, &i.x, &i.t, &emb, &null, &tokens, &g, w_m,
                )
                .unwrap();
                let e = rel_err(&o, &py[&format!("guided_{w_m:.1}")]);
                println!("{mode:?}/{naming:?}: guided (w_m {w_m}) rel err {e:.2e}");
                assert!(e < 1e-4, "{mode:?} w_m {w_m}: guided {e}");
            }
        });
        let py_keys: Vec<String> =
            serde_json::from_str(keys.trim().lines().last().unwrap()).unwrap();
        let mut ours: Vec<String> = b.vs.variables().into_keys().collect();
        ours.sort();
        assert_eq!(ours, py_keys, "{mode:?}: state-dict keys");
        let mut vs2 = nn::VarStore::new(Device::Cpu);
        let _c2 = ControlNet::new(&vs2.root(), &cfg, &control_cfg()).unwrap();
        vs2.load(d.path().join("py_init.safetensors")).unwrap();
        let v2 = vs2.variables();
        assert_eq!(
            max_abs(
                &v2["blocks.1.attn.qkv.weight"],
                &b.base_vs.variables()["blocks.1.attn.qkv.weight"]
            ),
            0.0
        );
        assert_eq!(
            v2["zero_projs.0.weight"]
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }
}

/// The tiny Fig. 6 chain: 4 domains x 3 phantoms at 3 mm, a 6-step VAE, a metadata-
/// conditioned DiT, a ControlNet on it, masked sampling (flips, a deformation, a dropped
/// class, styles from other domains, mask guidance 1.5), a U-Net on real data and one on
/// real + synthetic pairs, their evaluations, mask adherence and the regime table.
const PIPELINE: &str = r#"
name = "tiny_controlnet"
[stages.phantom]
kind = "phantom"
domains = 4
subjects_per_domain = 3
shape = [48, 48, 40]
spacing = [3.0, 3.0, 3.0]
seed = 1
[stages.ingest]
kind = "ingest"
inputs = { datasets = "phantom.datasets" }
[stages.resample]
kind = "resample"
inputs = { subjects = "ingest.subjects" }
spacing = [3.0, 3.0, 3.0]
min_size = [64, 64, 64]
[stages.vae]
kind = "vae_train"
inputs = { volumes = "resample.volumes" }
steps = 6
crop = [32, 32, 32]
heldout = 1
[stages.encode]
kind = "vae_encode"
inputs = { vae = "vae.vae", volumes = "resample.volumes" }
[stages.dit]
kind = "diffusion_train"
inputs = { latents = "encode.latents" }
model = { condition = "metadata" }
steps = 6
batch_size = 2
optim.lr = 1e-3
schedule.warmup_steps = 2
[stages.controlnet]
kind = "controlnet_train"
inputs = { model = "dit.model", latents = "encode.latents", volumes = "resample.volumes" }
labels = [1, 2, 3, 4]
split = { train_domains = ["venous", "arterial", "lowdose"] }
steps = 6
batch_size = 2
optim.lr = 1e-3
schedule.warmup_steps = 2
base_weights = "model"
[stages.synth]
kind = "controlnet_sample"
inputs = { model = "dit.model", controlnet = "controlnet.controlnet", vae = "vae.vae", volumes = "resample.volumes" }
samples_per_mask = 2
mask_transform = { flip_p = 0.5, elastic = 3.0, drop_class_p = 0.5 }
style_from = "other_domains"
mask_weight = 1.5
weights = "model"
steps = 4
batch_size = 2
montage = 2
[stages.seg_real]
kind = "segment_train"
inputs = { volumes = "resample.volumes" }
network = "unet"
labels = [1, 2, 3, 4]
split = { train_domains = ["venous", "arterial", "lowdose"] }
unet = { patch = [32, 32, 32], planner = { base_features = 4, max_pools = 2 } }
steps = 3
batch_size = 1
val_every = 0
[stages.seg_synth]
extends = "seg_real"
inputs = { volumes = "resample.volumes", synthetic = "synth.volumes" }
synthetic = { ratio = 1.0 }
[stages.seg_synth_only]
extends = "seg_real"
inputs = { volumes = "resample.volumes", synthetic = "synth.volumes" }
synthetic = { with_real = false }
[stages.eval_real]
kind = "segment_eval"
inputs = { model = "seg_real.model", volumes = "resample.volumes" }
export_predictions = false
[stages.eval_synth]
kind = "segment_eval"
inputs = { model = "seg_synth.model", volumes = "resample.volumes" }
export_predictions = false
[stages.adherence]
kind = "mask_adherence"
inputs = { segmenter = "seg_real.model", generated = "synth.volumes", real = "resample.volumes" }
[stages.table]
kind = "fig6_table"
inputs = { reports = ["eval_real.report", "eval_synth.report"] }
regimes = { R1 = ["eval_real"], R3 = ["eval_synth"] }
"#;

fn run_pipeline(dir: &Path, toml: &str) -> meduet_engine::RunSummary {
    std::fs::write(dir.join("p.toml"), toml).unwrap();
    let reg = meduet_torch::registry();
    let p = meduet_engine::Pipeline::load(&dir.join("p.toml"), &reg).unwrap();
    let store = meduet_cache::Store::open(&p.cache_dir).unwrap();
    let opts = meduet_engine::RunOptions {
        cuda_devices: Some(vec![]),
        threads: 2,
        ..Default::default()
    };
    meduet_engine::run(&p, &meduet_engine::ExecEnv::new(store), &opts).unwrap()
}

fn output_of(dir: &Path, stage: &str, output: &str) -> PathBuf {
    let reg = meduet_torch::registry();
    let p = meduet_engine::Pipeline::load(&dir.join("p.toml"), &reg).unwrap();
    let store = meduet_cache::Store::open(&p.cache_dir).unwrap();
    let h = meduet_engine::plan::load_history(&store, &p);
    store
        .object_dir(&h.stages[stage].key)
        .join("out")
        .join(output)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap_or_else(|e| panic!("{p:?}: {e}"))
}

#[test]
fn tiny_controlnet_pipeline_trains_samples_augments_and_tabulates() {
    let d = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let s = run_pipeline(d.path(), PIPELINE);
    assert!(s.failures().is_empty(), "{:?}", s.failures());
    println!(
        "tiny ControlNet pipeline: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let mut computed = s.computed();
    computed.sort();
    assert_eq!(
        computed,
        [
            "adherence",
            "controlnet",
            "dit",
            "encode",
            "eval_real",
            "eval_synth",
            "ingest",
            "phantom",
            "resample",
            "seg_real",
            "seg_synth",
            "seg_synth_only",
            "synth",
            "table",
            "vae"
        ]
    );
    // The ControlNet: half of the 2 blocks copied, MAISI's widths for the 4x VAE, 5 classes.
    let cn = output_of(d.path(), "controlnet", "controlnet");
    let cfg = json(&cn.join("config.json"));
    assert_eq!(cfg["control"]["depth"], 1);
    assert_eq!(
        cfg["control"]["embedding_channels"],
        serde_json::json!([8, 32, 64])
    );
    assert_eq!(cfg["control"]["mask_channels"], 5);
    assert_eq!(cfg["control"]["scale"], 4);
    // Only the three training domains' labelled training subjects gave masks.
    let subjects: Vec<String> = serde_json::from_value(cfg["subjects"].clone()).unwrap();
    assert!(!subjects.is_empty());
    assert!(
        subjects.iter().all(|s| !s.starts_with("native")),
        "{subjects:?}"
    );
    let losses = std::fs::read_to_string(cn.join("losses.jsonl")).unwrap();
    assert_eq!(losses.lines().count(), 6);
    for f in ["controlnet.safetensors", "ema.safetensors", "losses.png"] {
        assert!(cn.join(f).is_file(), "{f}");
    }
    // Samples: two per mask, image + label on one grid, labels from the conditioning mask.
    let synth = output_of(d.path(), "synth", "samples");
    let j = json(&synth.join("samples.json"));
    let recs = j["samples"].as_array().unwrap();
    assert_eq!(recs.len(), 2 * subjects.len());
    for r in recs {
        let (m, st) = (
            r["mask_subject"].as_str().unwrap(),
            r["style_subject"].as_str().unwrap(),
        );
        let dom = |s: &str| s.split("_case_").next().unwrap().to_string();
        assert_ne!(dom(m), dom(st), "style from another domain: {r}");
    }
    assert!(synth.join("montage.png").is_file());
    let vols = output_of(d.path(), "synth", "volumes");
    let first = recs[0]["id"].as_str().unwrap();
    let item = vols.join("items").join(first);
    let item = if item.is_dir() {
        item
    } else {
        vols.join(first)
    };
    let (img, _) = meduet_stages::data::zarr_store::read_zarr::<f32>(&item.join("image.zarr"))
        .unwrap_or_else(|e| panic!("{item:?}: {e}"));
    let (lab, _) =
        meduet_stages::data::zarr_store::read_zarr::<u8>(&item.join("label.zarr")).unwrap();
    assert_eq!(img.shape, [64, 64, 64]);
    assert_eq!(lab.shape, img.shape);
    assert!(lab.data.iter().all(|&v| v <= 4));
    assert!(lab.data.iter().any(|&v| v > 0), "the mask has foreground");
    // Augmented segmentation: as many synthetic pairs as labelled real subjects (ratio 1),
    // and none when with_real = false changes nothing about validation and test.
    let seg = output_of(d.path(), "seg_synth", "model");
    let used = json(&seg.join("synthetic.json"));
    let real_split = json(&output_of(d.path(), "seg_real", "model").join("splits.json"));
    let n_train = real_split["train"].as_array().unwrap().len();
    assert_eq!(used["used"].as_array().unwrap().len(), n_train);
    let synth_split = json(&seg.join("splits.json"));
    assert_eq!(
        synth_split, real_split,
        "the split ignores the synthetic data"
    );
    // Mask adherence: Dice on the synthetic volumes and the real ceiling, both computed.
    let adh = json(&output_of(d.path(), "adherence", "report").join("adherence.json"));
    for k in ["synthetic_dice", "real_test_dice"] {
        let v = adh[k].as_f64().unwrap_or_else(|| panic!("{k}: {adh}"));
        assert!((0.0..=1.0).contains(&v), "{k} {v}");
    }
    // The table: R1 and R3 at 100 %, one seed each.
    let table = output_of(d.path(), "table", "table");
    let md = std::fs::read_to_string(table.join("table.md")).unwrap();
    assert!(
        md.contains("| 100% | R1 | 1 |") && md.contains("| 100% | R3 | 1 |"),
        "{md}"
    );
    assert!(table.join("dice.png").is_file());
    // A second run computes nothing.
    let again = run_pipeline(d.path(), PIPELINE);
    assert!(again.computed().is_empty(), "{:?}", again.computed());
}

/// Bad inputs are refused naming the stage's field: a ControlNet sampled with another base
/// model, and masks without labels.
#[test]
fn a_controlnet_refuses_another_base_model() {
    // The digest check is in load_controlnet: a config naming another digest.
    let cfg = small(ConditionMode::None);
    let d = tempfile::tempdir().unwrap();
    let art = serde_json::json!({
        "control": control_cfg(), "labels": [1, 2], "base_digest": "abc",
        "base_weights": "ema", "subjects": [], "domains": {},
        "training": meduet_stages::kinds::controlnet::ControlnetTrainParams::default(),
        "trainable_parameters": 0,
    });
    std::fs::write(d.path().join("config.json"), art.to_string()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Dit::new(&vs.root(), &cfg).unwrap();
    let ld = meduet_torch::runners::diffusion::LoadedDiffusion {
        vs,
        model,
        method: meduet_stages::kinds::diffusion::Method::Dit,
        schedule: Default::default(),
        scale_factor: 1.0,
        image_spacing: [1.5; 3],
    };
    let e = meduet_torch::runners::controlnet::load_controlnet(
        d.path(),
        meduet_stages::kinds::diffusion::SampleWeights::Ema,
        &ld,
        "def",
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("model:") && e.contains("digest abc"), "{e}");
}
