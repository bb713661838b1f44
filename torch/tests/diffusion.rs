//! DiT/SiT, diffusion math and the synthesis stages: AdaLN-Zero identity, dual-CFG formula,
//! dropout rate, samplers on an analytic Gaussian target, MeDUET init, equivalence with the
//! PyTorch reference (`reference/dit_ref.py`), and a tiny train -> sample -> metrics pipeline.
//!
//! Run: `cargo test --release -p meduet-torch --test diffusion -- --nocapture` (prints the
//! measured errors). The reference test needs the project venv (torch 2.13, safetensors).

mod common;

use common::{global_rng, output_of, reference_dir, rel_err, run_pipeline, TinyData};

use meduet_stages::kinds::diffusion::snapshot_file;
use meduet_stages::testing::run_python;
use meduet_torch::diffusion::gaussian::{DdpmVariance, GaussianDiffusion};
use meduet_torch::diffusion::transport::{self, OdeMethod};
use meduet_torch::diffusion::{dual_cfg, guided_output, GuidanceNaming, GuidanceParams};
use meduet_torch::models::dit::{dropout_mask, AdaLn, Cond, ConditionMode, Config, Dit};
use meduet_torch::models::meduet::{Config as MeduetConfig, MeDuet};
use meduet_torch::models::pos_embed::interpolate_3d;
use meduet_torch::models::resnet3d::{FeatureNetwork, ResNet3d};
use meduet_torch::runners::synthesis::ms_ssim_3d;
use rand::SeedableRng;
use tch::{nn, Device, Kind, Tensor};

fn small(condition: ConditionMode, adaln: AdaLn) -> Config {
    Config {
        input_size: [8, 8, 8],
        hidden_size: 48,
        depth: 2,
        num_heads: 4,
        content_dim: 12,
        style_dim: 6,
        metadata_dim: 5,
        condition,
        adaln,
        num_classes: 10,
        ..Config::tiny()
    }
}

fn build(cfg: &Config, seed: i64) -> (nn::VarStore, Dit) {
    let _g = global_rng();
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = Dit::new(&vs.root(), cfg).expect("valid config");
    (vs, m)
}

/// Gives every zero-initialised `mod_*` layer random weights, so conditions matter.
fn perturb(vs: &nn::VarStore, seed: i64) {
    let _g = global_rng();
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains(".mod_") {
                v.copy_(&(Tensor::randn_like(&v) * 0.05));
            }
        }
    });
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    c: Tensor,
    s: Tensor,
    m: Tensor,
}

fn inputs(cfg: &Config, b: i64, seed: i64) -> Inputs {
    let _g = global_rng();
    tch::manual_seed(seed);
    let [x, y, z] = cfg.input_size;
    Inputs {
        x: Tensor::randn([b, cfg.in_chans, x, y, z], (Kind::Float, Device::Cpu)),
        t: Tensor::randint(1000, [b], (Kind::Int64, Device::Cpu)).to_kind(Kind::Float),
        c: Tensor::randn([b, cfg.content_dim], (Kind::Float, Device::Cpu)),
        s: Tensor::randn([b, cfg.style_dim], (Kind::Float, Device::Cpu)),
        m: Tensor::randn([b, cfg.metadata_dim], (Kind::Float, Device::Cpu)),
    }
}

fn cond<'a>(mode: ConditionMode, i: &'a Inputs) -> Cond<'a> {
    match mode {
        ConditionMode::Factors => Cond::Factors {
            content: &i.c,
            style: &i.s,
        },
        ConditionMode::Metadata => Cond::Metadata(&i.m),
        ConditionMode::None => Cond::None,
    }
}

/// `final_layer.linear(LN(x_embed(x) + pos))`, unpatchified, first C channels: what every
/// zero-initialised network computes, from the variables directly.
fn identity_path(vs: &nn::VarStore, m: &Dit, x: &Tensor) -> Tensor {
    let v = vs.variables();
    let cfg = m.config();
    let h = x
        .conv3d(
            &v["x_embedder.proj.weight"],
            Some(&v["x_embedder.proj.bias"]),
            [cfg.patch; 3],
            [0; 3],
            [1; 3],
            1,
        )
        .flatten(2, -1)
        .transpose(1, 2)
        + &v["pos_embed"];
    let n = h.layer_norm(
        [cfg.hidden_size],
        None::<&Tensor>,
        None::<&Tensor>,
        1e-6,
        true,
    );
    let o = n.linear(
        &v["final_layer.linear.weight"],
        Some(&v["final_layer.linear.bias"]),
    );
    m.unpatchify(&o).narrow(1, 0, cfg.in_chans)
}

#[test]
fn adaln_zero_blocks_are_identity_at_init() {
    for (mode, adaln) in [
        (ConditionMode::Factors, AdaLn::Code),
        (ConditionMode::Factors, AdaLn::Paper),
        (ConditionMode::Metadata, AdaLn::Code),
        (ConditionMode::None, AdaLn::Code),
    ] {
        let cfg = small(mode, adaln);
        let (vs, m) = build(&cfg, 1);
        let a = inputs(&cfg, 3, 2);
        let b = inputs(&cfg, 3, 3);
        let out = tch::no_grad(|| m.forward(&a.x, &a.t, &cond(mode, &a), &[]).unwrap());
        assert_eq!(out.size(), [3, 4, 8, 8, 8]);
        let want = tch::no_grad(|| identity_path(&vs, &m, &a.x));
        let e = rel_err(&out, &want);
        assert!(e < 1e-5, "{mode:?}/{adaln:?}: identity path error {e}");
        // Other timesteps and conditions: the same output.
        let other = tch::no_grad(|| m.forward(&a.x, &b.t, &cond(mode, &b), &[]).unwrap());
        assert!(
            rel_err(&other, &out) < 1e-6,
            "{mode:?}: conditions leak at init"
        );
        // Once the gates are non-zero the blocks act (so this test can fail).
        perturb(&vs, 4);
        let moved = tch::no_grad(|| m.forward(&a.x, &a.t, &cond(mode, &a), &[]).unwrap());
        assert!(
            rel_err(&moved, &want) > 1e-4,
            "{mode:?}: perturbed gates change nothing"
        );
    }
}

#[test]
fn dual_cfg_equals_its_formula() {
    let _g = global_rng();
    tch::manual_seed(5);
    let (o_nn, o_ns, o_cn) = (
        Tensor::randn([2, 3], (Kind::Float, Device::Cpu)),
        Tensor::randn([2, 3], (Kind::Float, Device::Cpu)),
        Tensor::randn([2, 3], (Kind::Float, Device::Cpu)),
    );
    drop(_g);
    let (wc, ws) = (2.5, 0.75);
    let code = dual_cfg(&o_nn, &o_ns, &o_cn, wc, ws, GuidanceNaming::Code);
    let paper = dual_cfg(&o_nn, &o_ns, &o_cn, wc, ws, GuidanceNaming::Paper);
    let f = |a: &Tensor, b: &Tensor| &o_nn + (a - &o_nn) * wc + (b - &o_nn) * ws;
    assert!(rel_err(&code, &f(&o_ns, &o_cn)) < 1e-7);
    assert!(rel_err(&paper, &f(&o_cn, &o_ns)) < 1e-7);
    assert!(
        rel_err(&code, &paper) > 1e-3,
        "the naming switch changes the result"
    );
    // w = (1, 0) under the paper's naming gives the content-only branch, (0, 0) the null.
    let c_only = dual_cfg(&o_nn, &o_ns, &o_cn, 1.0, 0.0, GuidanceNaming::Paper);
    assert!(rel_err(&c_only, &o_cn) < 1e-7);

    // The batched guided forward equals three separate forwards combined by the formula.
    let cfg = small(ConditionMode::Factors, AdaLn::Code);
    let (vs, m) = build(&cfg, 6);
    perturb(&vs, 7);
    let i = inputs(&cfg, 2, 8);
    tch::no_grad(|| {
        let emb = m.embed(&cond(ConditionMode::Factors, &i), &[]).unwrap();
        let null = m.null_embed(2);
        let g = GuidanceParams {
            content: 3.0,
            style: 1.5,
            naming: GuidanceNaming::Code,
        };
        let got = guided_output(&m, &i.x, &i.t, &emb, &null, &g).unwrap();
        let run = |c: &Tensor, s: &Tensor| {
            m.forward_emb(&i.x, &i.t, &[c.shallow_clone(), s.shallow_clone()])
                .unwrap()
        };
        let (nn_, ns, cn) = (
            run(&null[0], &null[1]),
            run(&null[0], &emb[1]),
            run(&emb[0], &null[1]),
        );
        let want = &nn_ + (&ns - &nn_) * 3.0 + (&cn - &nn_) * 1.5;
        let e = rel_err(&got, &want);
        println!("batched dual CFG vs separate forwards: rel err {e:.2e}");
        assert!(e < 1e-5, "{e}");
        assert!(rel_err(&ns, &nn_) > 1e-3 && rel_err(&cn, &nn_) > 1e-3);
    });
}

#[test]
fn dropout_replaces_conditions_by_nulls_at_the_stated_rate() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let n = 40_000;
    let mc = dropout_mask(n, 0.2, &mut rng, Device::Cpu);
    let ms = dropout_mask(n, 0.2, &mut rng, Device::Cpu);
    let rate = |m: &Tensor| m.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    let (rc, rs) = (rate(&mc), rate(&ms));
    let both = rate(&mc.logical_and(&ms));
    println!("dropout rates: content {rc:.4}, style {rs:.4}, both {both:.4} (independent: 0.04)");
    // 4.5 sigma of a binomial(40000, 0.2) rate is 0.009.
    assert!((rc - 0.2).abs() < 0.009 && (rs - 0.2).abs() < 0.009);
    assert!(
        (both - 0.04).abs() < 0.0045,
        "content and style drops are independent"
    );
    assert_eq!(rate(&dropout_mask(100, 0.0, &mut rng, Device::Cpu)), 0.0);

    let cfg = small(ConditionMode::Factors, AdaLn::Code);
    let (_vs, m) = build(&cfg, 10);
    let i = inputs(&cfg, 4, 11);
    let drop_c = Tensor::from_slice(&[1u8, 0, 1, 0]).to_kind(Kind::Bool);
    let drop_s = Tensor::from_slice(&[0u8, 0, 1, 1]).to_kind(Kind::Bool);
    tch::no_grad(|| {
        let e = m
            .embed(
                &cond(ConditionMode::Factors, &i),
                &[Some(&drop_c), Some(&drop_s)],
            )
            .unwrap();
        let plain = m.embed(&cond(ConditionMode::Factors, &i), &[]).unwrap();
        let null = m.null_embed(4);
        for (k, d) in [(0, [1, 0, 1, 0]), (1, [0, 0, 1, 1])] {
            for (r, &dropped) in d.iter().enumerate() {
                let want = if dropped == 1 { &null[k] } else { &plain[k] };
                assert!(
                    rel_err(&e[k].get(r as i64), &want.get(r as i64)) < 1e-7,
                    "branch {k} row {r}"
                );
            }
        }
    });
}

/// The exact posterior-mean predictors for data `x ~ N(mu, sd^2)` per coordinate.
fn gaussian_eps(x: &Tensor, ab: f64, mu: f64, sd: f64) -> Tensor {
    // x_t = sqrt(ab) x0 + sqrt(1-ab) eps: E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / V
    let v = ab * sd * sd + 1.0 - ab;
    (x - ab.sqrt() * mu) * ((1.0 - ab).sqrt() / v)
}

fn gaussian_velocity(x: &Tensor, t: f64, mu: f64, sd: f64) -> Tensor {
    // x_t = t x1 + (1-t) x0: v = E[x1 | x_t] - E[x0 | x_t]
    let v = t * t * sd * sd + (1.0 - t) * (1.0 - t);
    (x - t * mu) * ((t * sd * sd - (1.0 - t)) / v) + mu
}

fn moments(x: &Tensor) -> (f64, f64) {
    let x = x.to_kind(Kind::Double);
    (
        x.mean(Kind::Double).double_value(&[]),
        x.var(true).double_value(&[]),
    )
}

#[test]
fn samplers_recover_a_gaussian_target() {
    let (mu, sd) = (1.5, 0.5);
    let n = 20_000;
    let _g = global_rng();
    // DDPM, respaced to 250 steps (the authors' sampling) and the full 1000 steps. Exact
    // moment propagation of this linear-Gaussian chain gives the final variance 0.2533
    // (250, large), 0.2508 (1000, large), 0.2461 (1000, small); 250 steps with the small
    // (posterior) variance is biased to 0.2360, which is why DiT's fixed variance is large.
    let full = GaussianDiffusion::linear(1000, 1e-4, 0.02);
    for (steps, var) in [
        (250, DdpmVariance::Large),
        (1000, DdpmVariance::Large),
        (1000, DdpmVariance::Small),
    ] {
        let proc = if steps == 1000 {
            full.clone()
        } else {
            full.respaced(steps).unwrap()
        };
        tch::manual_seed(12);
        let init = Tensor::randn([n, 1], (Kind::Double, Device::Cpu));
        let out = proc
            .sample_loop(
                &init,
                var,
                |x: &Tensor, t: &Tensor| -> Result<Tensor, ()> {
                    let k = t.double_value(&[0]) as usize;
                    Ok(gaussian_eps(x, full.alphas_cumprod[k], mu, sd))
                },
                |_| Ok(()),
            )
            .unwrap();
        let (m, v) = moments(&out);
        println!("DDPM {steps} steps {var:?}: mean {m:.4} (1.5), var {v:.4} (0.25)");
        assert!((m - mu).abs() < 0.02, "DDPM {steps} mean {m}");
        assert!(
            (v / (sd * sd) - 1.0).abs() < 0.04,
            "DDPM {steps} {var:?} variance {v}"
        );
    }
    // SiT: Euler-Maruyama SDE (250 steps, "Mean" last step 0.04) and the ODE.
    tch::manual_seed(13);
    let init = Tensor::randn([n, 1], (Kind::Double, Device::Cpu));
    let vel = |x: &Tensor, t: &Tensor| -> Result<Tensor, ()> {
        Ok(gaussian_velocity(x, t.double_value(&[0]), mu, sd))
    };
    let sde = transport::sample_sde(&init, 250, 0.04, 1.0, vel, |_| Ok(())).unwrap();
    let (m, v) = moments(&sde);
    println!("SiT SDE 250 steps: mean {m:.4}, var {v:.4}");
    assert!(
        (m - mu).abs() < 0.02 && (v / (sd * sd) - 1.0).abs() < 0.05,
        "SDE {m} {v}"
    );
    for method in [OdeMethod::Euler, OdeMethod::Heun] {
        let ode = transport::sample_ode(&init, 100, method, vel, |_| Ok(())).unwrap();
        let (m, v) = moments(&ode);
        println!("SiT ODE {method:?} 100 steps: mean {m:.4}, var {v:.4}");
        assert!(
            (m - mu).abs() < 0.02 && (v / (sd * sd) - 1.0).abs() < 0.05,
            "ODE {m} {v}"
        );
    }
    // A wrong model (the target's mean shifted) is detected: the bounds can fail.
    let wrong = |x: &Tensor, t: &Tensor| -> Result<Tensor, ()> {
        Ok(gaussian_velocity(x, t.double_value(&[0]), mu + 0.1, sd))
    };
    let off = transport::sample_ode(&init, 100, OdeMethod::Heun, wrong, |_| Ok(())).unwrap();
    assert!((moments(&off).0 - mu).abs() > 0.05);
}

#[test]
fn q_sample_and_interpolant_follow_their_formulas() {
    let d = GaussianDiffusion::linear(1000, 1e-4, 0.02);
    let x0 = Tensor::from_slice(&[1.0f32, -2.0]).view([2, 1]);
    let noise = Tensor::from_slice(&[0.5f32, 0.25]).view([2, 1]);
    let t = Tensor::from_slice(&[0i64, 999]);
    let xt = d.q_sample(&x0, &t, &noise);
    for (r, k) in [(0usize, 0usize), (1, 999)] {
        let ab = d.alphas_cumprod[k];
        let want = ab.sqrt() * [1.0, -2.0][r] + (1.0 - ab).sqrt() * [0.5, 0.25][r];
        assert!((xt.double_value(&[r as i64, 0]) - want).abs() < 1e-6);
    }
    let s = transport::interpolate(&Tensor::from_slice(&[0.25f32, 1.0]), &noise, &x0);
    assert!((s.xt.double_value(&[0, 0]) - (0.25 * 1.0 + 0.75 * 0.5)).abs() < 1e-7);
    assert!((s.xt.double_value(&[1, 0]) + 2.0).abs() < 1e-7);
    assert!((s.ut.double_value(&[1, 0]) - (-2.25)).abs() < 1e-7);
}

#[test]
fn meduet_init_copies_patch_embedding_positions_and_blocks() {
    let mcfg = MeduetConfig {
        crop: 8,
        ..MeduetConfig::tiny()
    };
    let d = tempfile::tempdir().unwrap();
    let student = d.path().join("student.safetensors");
    let mvs = {
        let _g = global_rng();
        tch::manual_seed(20);
        let vs = nn::VarStore::new(Device::Cpu);
        MeDuet::new(&vs.root(), &mcfg).unwrap();
        vs
    };
    mvs.save(&student).unwrap();
    let cfg = Config {
        input_size: [12, 12, 8],
        content_dim: 96,
        style_dim: 24,
        ..Config::tiny()
    };
    let (vs, m) = build(&cfg, 21);
    let ln_before = vs.variables()["blocks.0.norm1.weight"].copy();
    let r = m.load_meduet(&vs, &student, [2, 2, 2]).unwrap();
    let (src, dst) = (mvs.variables(), vs.variables());
    for n in [
        "blocks.1.attn.qkv.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.1.attn.proj.weight",
    ] {
        assert!(src[n].equal(&dst[n]), "{n}");
    }
    assert!(src["embed_layer.proj.weight"].equal(&dst["x_embedder.proj.weight"]));
    assert!(
        ln_before.equal(&dst["blocks.0.norm1.weight"]),
        "LayerNorms are not copied"
    );
    let want = interpolate_3d(&src["pos_embed"].narrow(1, 1, 8), [2, 2, 2], [3, 3, 2]).unwrap();
    assert!(dst["pos_embed"].equal(&want));
    assert_eq!(r.copied.len(), 2 + 2 * 8 + 1);
    assert!(r.copied_params > 0 && r.copied_params < r.total_params);
    // A wider DiT cannot take these weights: the error names the tensor and both shapes.
    let wide = Config {
        hidden_size: 48,
        ..cfg.clone()
    };
    let (vs2, m2) = build(&wide, 22);
    let e = m2
        .load_meduet(&vs2, &student, [2, 2, 2])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embed_layer.proj.weight") && e.contains("[96, 4, 4, 4, 4]"),
        "{e}"
    );
}

const PY_COMPARE: &str = r#"
import sys, json
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(2)
from safetensors.torch import load_file, save_file
import dit_ref as R
d = sys.argv[2]
cfg = json.load(open(d + "/config.json"))
m = R.DiT(cfg)
R.load_safetensors(m, d + "/weights.safetensors")
m.eval()
i = load_file(d + "/inputs.safetensors")
cond = {"factors": [i.get("c"), i.get("s")], "metadata": [i.get("m")], "none": []}[cfg["condition"]]
drop = (i["drop_c"].bool(), i["drop_s"].bool())
out = {}
with torch.no_grad():
    out["forward"] = m(i["x"], i["t"], cond, drop)
    out["cfg"] = m.forward_with_cfg(i["x"], i["t"], cond, 3.0, 1.5, cfg["naming"])
# the Python init loads into tch with the same keys
torch.manual_seed(0)
R.initialize_weights(m)
R.save_safetensors(m, d + "/py_init.safetensors")
save_file({k: v.contiguous() for k, v in out.items()}, d + "/py_out.safetensors")
print(json.dumps(sorted(m.state_dict().keys())))
"#;

#[test]
fn forward_matches_pytorch_reference_and_weights_interchange() {
    for (mode, adaln, naming) in [
        (ConditionMode::Factors, AdaLn::Code, GuidanceNaming::Code),
        (ConditionMode::Factors, AdaLn::Paper, GuidanceNaming::Paper),
        (ConditionMode::Metadata, AdaLn::Code, GuidanceNaming::Code),
        (ConditionMode::None, AdaLn::Code, GuidanceNaming::Code),
    ] {
        let cfg = small(mode, adaln);
        let (vs, m) = build(&cfg, 30);
        perturb(&vs, 31);
        let d = tempfile::tempdir().unwrap();
        vs.save(d.path().join("weights.safetensors")).unwrap();
        let mut j = serde_json::to_value(&cfg).unwrap();
        j["naming"] = serde_json::to_value(naming).unwrap();
        std::fs::write(d.path().join("config.json"), j.to_string()).unwrap();
        let i = inputs(&cfg, 3, 32);
        let drop_c = Tensor::from_slice(&[1u8, 0, 0]).to_kind(Kind::Bool);
        let drop_s = Tensor::from_slice(&[0u8, 1, 0]).to_kind(Kind::Bool);
        Tensor::write_safetensors(
            &[
                ("x", i.x.shallow_clone()),
                ("t", i.t.shallow_clone()),
                ("c", i.c.shallow_clone()),
                ("s", i.s.shallow_clone()),
                ("m", i.m.shallow_clone()),
                ("drop_c", drop_c.to_kind(Kind::Uint8)),
                ("drop_s", drop_s.to_kind(Kind::Uint8)),
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
        let (fwd, guided) = tch::no_grad(|| {
            let c = cond(mode, &i);
            let f = m
                .forward(&i.x, &i.t, &c, &[Some(&drop_c), Some(&drop_s)])
                .unwrap();
            let emb = m.embed(&c, &[]).unwrap();
            let null = m.null_embed(3);
            let g = GuidanceParams {
                content: 3.0,
                style: 1.5,
                naming,
            };
            (f, guided_output(&m, &i.x, &i.t, &emb, &null, &g).unwrap())
        });
        let (e1, e2) = (rel_err(&fwd, &py["forward"]), rel_err(&guided, &py["cfg"]));
        println!("{mode:?}/{adaln:?}: forward rel err {e1:.2e}, dual CFG rel err {e2:.2e}");
        assert!(e1 < 1e-4 && e2 < 1e-4, "{mode:?}/{adaln:?}: {e1} {e2}");
        // Python-initialised weights load into tch (every key, every shape).
        let py_keys: Vec<String> =
            serde_json::from_str(keys.trim().lines().last().unwrap()).unwrap();
        let mut ours: Vec<String> = vs.variables().into_keys().collect();
        ours.sort();
        assert_eq!(ours, py_keys, "{mode:?}: state-dict keys");
        let (mut vs2, _m2) = build(&cfg, 33);
        vs2.load(d.path().join("py_init.safetensors")).unwrap();
        let v2 = vs2.variables();
        assert!(
            v2["final_layer.mod_time.1.weight"]
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                == 0.0
        );
        assert!(
            rel_err(&v2["pos_embed"], &vs.variables()["pos_embed"]) < 1e-6,
            "same sin-cos table"
        );
    }
}

/// A tiny method pipeline through synthesis: 4 domains x 2 phantoms at 3 mm, a 6-step VAE,
/// a 10-step MeDUET, then a DiT initialised from it and sampled with dual CFG; these are its
/// stages after the data prefix ([`tiny_pipeline`]).
const PIPELINE_STAGES: &str = r#"
[stages.pretrain]
kind = "pretrain"
inputs = { latents = "encode.latents" }
steps = 10
batch_size = 4
model = { crop = 16 }
[stages.factors]
kind = "extract_factors"
inputs = { model = "pretrain.model", latents = "encode.latents" }
[stages.dit]
kind = "diffusion_train"
inputs = { latents = "encode.latents", factors = "factors.factors", meduet = "pretrain.model" }
init = "meduet"
steps = 24
batch_size = 2
optim.lr = 1e-3
schedule.warmup_steps = 2
checkpoint_every = 10
snapshot_steps = [12, 24]
[stages.sit]
extends = "dit"
method = "sit"
init = "scratch"
[stages.sample]
kind = "sample"
inputs = { model = "dit.model", vae = "vae.vae" }
num_samples = 3
batch_size = 2
steps = 8
weights = "model"
content_from = ["arterial_case_000"]
[stages.sample_sit]
kind = "sample"
inputs = { model = "sit.model", vae = "vae.vae" }
num_samples = 2
steps = 8
weights = "model"
[stages.metrics]
kind = "synthesis_metrics"
inputs = { generated = "sample.volumes", real = "resample.volumes" }
network = "medicalnet_resnet10"
weights = "resnet10.safetensors"
ms_ssim_scales = 3
[stages.sample_early]
extends = "sample_sit"
inputs = { model = "dit.model", vae = "vae.vae" }
weights = "ema"
snapshot = 12
[stages.metrics_early]
extends = "metrics"
inputs = { generated = "sample_early.volumes", real = "resample.volumes" }
real_crops_per_volume = 2
# The real side computed once: the same crops as metrics_early's, so the same FID.
[stages.real_crops]
kind = "volume_features"
inputs = { volumes = "resample.volumes" }
network = "medicalnet_resnet10"
weights = "resnet10.safetensors"
crop = [64, 64, 64]
crops_per_volume = 2
[stages.metrics_early_shared]
kind = "synthesis_metrics"
inputs = { generated = "sample_early.volumes", real_features = "real_crops.features" }
network = "medicalnet_resnet10"
weights = "resnet10.safetensors"
ms_ssim_scales = 3
[stages.metrics_sit]
extends = "metrics"
inputs = { generated = "sample_sit.volumes", real = "resample.volumes" }
[stages.curve]
kind = "synthesis_curve"
inputs = { reports = ["metrics.report", "metrics_early.report", "metrics_sit.report"] }
[stages.seg]
kind = "segment_train"
inputs = { volumes = "resample.volumes" }
network = "unet"
labels = [1, 2, 3, 4]
unet = { patch = [32, 32, 32], planner = { base_features = 4, max_pools = 2 } }
steps = 3
batch_size = 1
val_every = 0
[stages.domains]
kind = "classify_train"
inputs = { latents = "encode.latents" }
label_attr = "domain_id"
unetr = { crop = 16, feature_size = 8 }
steps = 3
[stages.sweep]
kind = "guidance_sweep"
inputs = { model = "dit.model", vae = "vae.vae", volumes = "resample.volumes", latents = "encode.latents", segmenter = "seg.model", meduet = "pretrain.model" }
content_weights = [0.0, 2.0]
style_weights = [0.0, 2.0]
pairs = 3
steps = 4
batch_size = 2
weights = "model"
[stages.seg_unetr]
kind = "segment_train"
inputs = { volumes = "resample.volumes", latents = "encode.latents" }
labels = [1, 2, 3, 4]
unetr = { crop = 16, feature_size = 8 }
steps = 2
batch_size = 1
val_every = 0
[stages.sweep_trained]
extends = "sweep"
inputs = { model = "dit.model", vae = "vae.vae", volumes = "resample.volumes", latents = "encode.latents", segmenter = "seg_unetr.model", classifier = "domains.model" }
style_classifier = "trained"
content_weights = [1.0]
style_weights = [1.0]
pairs = 2
steps = 2
[stages.sweep_probe]
extends = "sweep_trained"
style_classifier = "style_probe"
"#;

fn tiny_pipeline() -> String {
    let data = TinyData {
        domains: 4,
        subjects_per_domain: 2,
        vae_steps: 6,
        vae_crop: 32,
        vae_extra: "",
    };
    data.toml("tiny_synthesis") + PIPELINE_STAGES
}

#[test]
fn tiny_train_sample_pipeline() {
    let d = tempfile::tempdir().unwrap();
    // A seeded random ResNet-10 in MedicalNet's layout stands in for the pretrained weights
    // (which users supply, converted by scripts/convert_medicalnet.py).
    {
        let _g = global_rng();
        tch::manual_seed(40);
        let vs = nn::VarStore::new(Device::Cpu);
        ResNet3d::new(&vs.root(), FeatureNetwork::MedicalnetResnet10);
        vs.save(d.path().join("resnet10.safetensors")).unwrap();
    }
    let t0 = std::time::Instant::now();
    let s = run_pipeline(d.path(), &tiny_pipeline());
    println!(
        "tiny synthesis pipeline: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let mut computed = s.computed();
    computed.sort();
    assert_eq!(computed.len(), 24, "{computed:?}");

    let model = output_of(d.path(), "dit", "model");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model"]["content_dim"], 96);
    assert_eq!(cfg["model"]["style_dim"], 24);
    assert_eq!(cfg["meduet_init"]["copied"].as_array().unwrap().len(), 19);
    let sf = cfg["scale_factor"].as_f64().unwrap();
    assert!(sf.is_finite() && sf > 0.0);
    let losses = std::fs::read_to_string(model.join("losses.jsonl")).unwrap();
    assert_eq!(losses.lines().count(), 24);
    for f in [
        "model.safetensors",
        "ema.safetensors",
        "conditions.safetensors",
        "losses.png",
    ] {
        assert!(model.join(f).is_file(), "{f}");
    }
    // The weights load into the PyTorch reference's key set (checked above) and into tch.
    let st = Tensor::read_safetensors(model.join("ema.safetensors")).unwrap();
    assert!(st.iter().any(|(k, _)| k == "content_embedder.tau"));
    // EMA snapshots: the last one is the final EMA, the earlier one differs from it.
    let snap = |k: u64| -> std::collections::BTreeMap<String, Tensor> {
        Tensor::read_safetensors(model.join(snapshot_file(k)))
            .unwrap()
            .into_iter()
            .collect()
    };
    let (s12, s24) = (snap(12), snap(24));
    assert_eq!(s24.len(), st.len());
    for (k, t) in &st {
        assert!(
            t.equal(&s24[k]),
            "{k}: the step-24 snapshot is the final EMA"
        );
    }
    assert!(st.iter().any(|(k, t)| !t.equal(&s12[k])));

    let samples = output_of(d.path(), "sample", "samples");
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(samples.join("samples.json")).unwrap()).unwrap();
    let recs = j["samples"].as_array().unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(j["sampler"], "ddpm");
    for r in recs {
        assert_eq!(r["content_subject"], "arterial_case_000");
        assert_eq!(r["shape"], serde_json::json!([64, 64, 64]));
        let (mn, mx) = (r["min"].as_f64().unwrap(), r["max"].as_f64().unwrap());
        assert!(mn.is_finite() && mx.is_finite() && mx > mn, "{r}");
    }
    for f in ["sample_000.nii.gz", "sample_002.nii.gz", "montage.png"] {
        assert!(samples.join(f).is_file(), "{f}");
    }
    let sit = output_of(d.path(), "sample_sit", "samples");
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sit.join("samples.json")).unwrap()).unwrap();
    assert_eq!(j["sampler"], "sde");
    assert_eq!(j["samples"].as_array().unwrap().len(), 2);

    let report = output_of(d.path(), "metrics", "report");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("metrics.json")).unwrap()).unwrap();
    println!("tiny synthesis metrics: {m}");
    let (fid, mmd, ms) = (
        m["fid"].as_f64().unwrap(),
        m["mmd"].as_f64().unwrap(),
        m["ms_ssim"].as_f64().unwrap(),
    );
    assert!(fid.is_finite() && fid >= 0.0 && mmd.is_finite());
    assert!((0.0..=1.0).contains(&ms), "{ms}");
    assert_eq!(m["ms_ssim_pairs"], 3);
    assert_eq!(m["feature_network"]["network"], "medicalnet_resnet10");
    assert_eq!(m["feature_network"]["feature_dim"], 512);
    assert_eq!(m["preprocessing"]["normalization"], "zscore");
    assert_eq!(
        m["generated_from"],
        serde_json::json!({"method": "dit", "init": "meduet", "training_step": 24})
    );

    // Samples from the step-12 snapshot, and the metric against training steps.
    let early = output_of(d.path(), "sample_early", "samples");
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(early.join("samples.json")).unwrap()).unwrap();
    assert_eq!(
        (j["snapshot"].as_u64(), j["training_step"].as_u64()),
        (Some(12), Some(12))
    );
    let m_early: serde_json::Value = serde_json::from_slice(
        &std::fs::read(output_of(d.path(), "metrics_early", "report").join("metrics.json"))
            .unwrap(),
    )
    .unwrap();
    // 8 real volumes, 2 random 64^3 crops of each.
    assert_eq!(
        (m_early["real"].as_u64(), m_early["generated"].as_u64()),
        (Some(16), Some(2))
    );
    assert_eq!(m_early["generated_from"]["training_step"], 12);
    // The same comparison with the real crops' features from a volume_features stage.
    let m_shared: serde_json::Value = serde_json::from_slice(
        &std::fs::read(output_of(d.path(), "metrics_early_shared", "report").join("metrics.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m_shared["real"], 16);
    assert_eq!(
        m_shared["preprocessing"]["real_features"]["crops_per_volume"],
        2
    );
    for k in ["fid", "mmd", "ms_ssim"] {
        let (a, b) = (m_early[k].as_f64().unwrap(), m_shared[k].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-9 * a.abs().max(1.0), "{k}: {a} vs {b}");
    }
    let curve = output_of(d.path(), "curve", "curve");
    let csv = std::fs::read_to_string(curve.join("curve.csv")).unwrap();
    println!("{csv}");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().any(|r| r.starts_with("dit meduet,12,")));
    assert!(rows.iter().any(|r| r.starts_with("dit meduet,24,")));
    assert!(rows.iter().any(|r| r.starts_with("sit scratch,24,")));
    // The FID in the curve is the report's.
    let fid24: f64 = rows
        .iter()
        .find(|r| r.starts_with("dit meduet,24,"))
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (fid24 - fid).abs() <= 1e-6 * fid.max(1.0),
        "{fid24} vs {fid}"
    );
    let cmp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(curve.join("steps_to_equal.json")).unwrap()).unwrap();
    assert_eq!(cmp[0]["series"], "dit meduet");
    assert_eq!(cmp[0]["reference_steps"], 24.0);
    assert!(curve.join("curve.png").is_file() && curve.join("curve.md").is_file());

    // Fig. 7: 2 x 2 guidance cells x 3 reference pairs.
    let sweep = output_of(d.path(), "sweep", "report");
    let csv = std::fs::read_to_string(sweep.join("sweep.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 12, "{csv}");
    let domain = |subject: &str| subject.split("_case").next().unwrap().to_string();
    for r in &rows {
        // content_weight,style_weight,pair,content_subject,style_subject,style_domain_id,
        // predicted_domain_id,hit,dice
        assert_ne!(
            domain(r[3]),
            domain(r[4]),
            "style from another domain: {r:?}"
        );
        assert_eq!(r[7] == "true", r[5] == r[6], "{r:?}");
        if !r[8].is_empty() {
            let dice: f64 = r[8].parse().unwrap();
            assert!((0.0..=1.0).contains(&dice), "{r:?}");
        }
    }
    // Each pair keeps its references in every cell.
    for pair in ["0", "1", "2"] {
        let refs: std::collections::BTreeSet<(&str, &str)> = rows
            .iter()
            .filter(|r| r[2] == pair)
            .map(|r| (r[3], r[4]))
            .collect();
        assert_eq!(refs.len(), 1, "pair {pair}: {refs:?}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sweep.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["cells"].as_array().unwrap().len(), 4);
    let rd = summary["reference_dice_to_labels"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rd), "{rd}");
    let acc = summary["reference_domain_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    assert_eq!(summary["about"]["naming"], "paper");
    // The default style judge is MeDUET's Cls_s over the pretraining's four domains.
    assert_eq!(
        summary["about"]["style_classifier"]["kind"],
        "meduet Cls_s on pooled style tokens"
    );
    assert_eq!(
        summary["about"]["style_classifier"]["classes"],
        serde_json::json!([0, 1, 2, 3])
    );
    let trained = output_of(d.path(), "sweep_trained", "report");
    let ts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(trained.join("summary.json")).unwrap()).unwrap();
    assert_eq!(ts["about"]["style_classifier"]["kind"], "trained");
    // A UNETR segments the samples' latents (only the montage's pair is decoded).
    assert_eq!(ts["about"]["segmenter"], "unetr_scratch");
    assert_eq!(ts["cells"][0]["samples"], 2);
    if let Some(d) = ts["cells"][0]["mean_dice"].as_f64() {
        assert!((0.0..=1.0).contains(&d), "{d}");
    }
    assert!(trained.join("montage.png").is_file());
    // The style probe: fitted on the bank's pooled style vectors of the four domains.
    let probe: serde_json::Value = serde_json::from_slice(
        &std::fs::read(output_of(d.path(), "sweep_probe", "report").join("summary.json")).unwrap(),
    )
    .unwrap();
    let judge = &probe["about"]["style_classifier"];
    assert!(
        judge["kind"]
            .as_str()
            .unwrap()
            .starts_with("logistic regression"),
        "{judge}"
    );
    assert_eq!(judge["classes"], serde_json::json!([0, 1, 2, 3]));
    let cv = judge["bank_cross_validated"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&cv), "{cv}");
    assert_eq!(probe["cells"][0]["samples"], 2);
    for f in [
        "summary.md",
        "content_dice.png",
        "style_hit.png",
        "montage.png",
    ] {
        assert!(sweep.join(f).is_file(), "{f}");
    }
}

#[test]
fn ms_ssim_matches_monai() {
    let d = tempfile::tempdir().unwrap();
    let (x, y) = {
        let _g = global_rng();
        tch::manual_seed(50);
        let x = Tensor::rand([1, 1, 40, 36, 32], (Kind::Float, Device::Cpu));
        let y = (&x * 0.7 + Tensor::rand([1, 1, 40, 36, 32], (Kind::Float, Device::Cpu)) * 0.3)
            .clamp(0.0, 1.0);
        (x, y)
    };
    Tensor::write_safetensors(
        &[("x", x.shallow_clone()), ("y", y.shallow_clone())],
        d.path().join("xy.safetensors"),
    )
    .unwrap();
    let out = run_python(
        "import sys, torch\nfrom safetensors.torch import load_file\nfrom monai.metrics import MultiScaleSSIMMetric\nt = load_file(sys.argv[1])\nw = (0.0448, 0.2856, 0.3001)\nm = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=7, weights=w)\nprint(float(m(t['y'], t['x']).mean()))",
        &[&d.path().join("xy.safetensors").to_string_lossy()],
    );
    let want: f64 = out.trim().lines().last().unwrap().parse().unwrap();
    let got = ms_ssim_3d(&y, &x, 1.0, 7, 3);
    println!("MS-SSIM 3 scales: ours {got:.6}, MONAI {want:.6}");
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    assert!((ms_ssim_3d(&x, &x, 1.0, 7, 3) - 1.0).abs() < 1e-5);
    // Symmetric (the metrics stage scores each unordered pair once).
    assert!((ms_ssim_3d(&x, &y, 1.0, 7, 3) - got).abs() < 1e-12);
}
