//! Slow end-to-end checks of the whole method on tiny phantoms (CPU, a few minutes in
//! all): the pipeline through `probe`, resuming killed pretraining, segmentation and
//! diffusion trainings, VAE training quality,
//! latent reuse between pipelines, Python interop of the artifacts, NIfTI export.
//!
//! Run alone with `cargo test --release --test e2e`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{meduet, read_json, run_ok, text};

fn python() -> PathBuf {
    meduet_stages::testing::python()
}

fn py(code: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "python failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pipeline small enough for CI: 4 domains x 3 subjects at 3 mm, a 6-step VAE, a
/// 10-step MeDUET on 16^3 latent crops.
const TINY: &str = r#"
name = "tiny"
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
checkpoint_every = 3
[stages.encode]
kind = "vae_encode"
inputs = { vae = "vae.vae", volumes = "resample.volumes" }
[stages.pretrain]
kind = "pretrain"
inputs = { latents = "encode.latents" }
steps = 10
batch_size = 4
model = { crop = 16 }
checkpoint_every = 3
[stages.factors]
kind = "extract_factors"
inputs = { model = "pretrain.model", latents = "encode.latents" }
[stages.probe]
kind = "probe"
inputs = { factors = "factors.factors" }
folds = 3
tsne_iterations = 300
"#;

fn object_of(dir: &Path, pipeline: &str, stage: &str) -> PathBuf {
    let out = run_ok(&["show", &dir.join(pipeline).to_string_lossy(), stage]);
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = t
        .lines()
        .find(|l| l.starts_with("object"))
        .expect("object line");
    PathBuf::from(line.split_whitespace().nth(1).unwrap())
}

fn computed_stages(out: &Output) -> Vec<String> {
    let t = text(out);
    let mut v: Vec<String> = t
        .lines()
        .filter(|l| l.contains("✓ "))
        .map(|l| {
            l.split("✓ ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn tiny_method_pipeline_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tiny.toml"), TINY).unwrap();
    let p = d.path().join("tiny.toml").to_string_lossy().into_owned();
    let t0 = Instant::now();
    let out = run_ok(&["run", &p]);
    assert_eq!(
        computed_stages(&out),
        ["encode", "factors", "ingest", "phantom", "pretrain", "probe", "resample", "vae"]
    );
    println!("tiny pipeline: {:.1}s", t0.elapsed().as_secs_f64());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("probe.report: "),
        "the run prints where the probe results are"
    );

    // Probe outputs exist and are well formed.
    let report = object_of(d.path(), "tiny.toml", "probe").join("out/report");
    let j = read_json(report.join("probe.json"));
    for f in ["content", "style"] {
        let r = &j[format!("domain_from_{f}")];
        let acc = r["probe"]["accuracy"]["mean"].as_f64().unwrap();
        let auc = r["probe"]["macro_auc"]["mean"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&acc) && (0.0..=1.0).contains(&auc),
            "{r}"
        );
        // Error bars over 20 fold seeds and a permutation test against chance.
        assert_eq!(r["probe"]["accuracy"]["n"], 20);
        let lo = r["probe"]["accuracy"]["min"].as_f64().unwrap();
        let hi = r["probe"]["accuracy"]["max"].as_f64().unwrap();
        assert!(lo <= acc && acc <= hi, "{r}");
        let t = &r["probe"]["permutation"];
        assert_eq!(t["permutations"], 200);
        let p = t["accuracy_p"].as_f64().unwrap();
        assert!((1.0 / 201.0..=1.0).contains(&p), "{t}");
        let band = t["accuracy_chance_band"].as_array().unwrap();
        assert!(
            band[0].as_f64().unwrap() <= band[1].as_f64().unwrap(),
            "{t}"
        );
        assert_eq!(r["probe"]["samples"], 12);
        assert_eq!(r["probe"]["classes"], 4);
        assert!(r["silhouette"].as_f64().unwrap().abs() <= 1.0);
    }
    assert!(j["has_lesion_from_factors"]["content"]["accuracy"]["mean"].is_number());
    let md = std::fs::read_to_string(report.join("probe.md")).unwrap();
    assert!(md.contains("| domain | content |") && md.contains("| domain | style |"));
    let png = std::fs::read(report.join("tsne.png")).unwrap();
    assert!(png.starts_with(&[0x89, b'P', b'N', b'G']) && png.len() > 10_000);

    // The factor table is readable from Python.
    let factors = object_of(d.path(), "tiny.toml", "factors").join("out/factors");
    let shapes = py(
        "import sys, csv\nfrom safetensors.numpy import load_file\nt = load_file(sys.argv[1] + '/factors.safetensors')\nrows = list(csv.DictReader(open(sys.argv[1] + '/subjects.csv')))\nprint(t['content'].shape, t['style'].shape, t['domain_id'].tolist() == [int(r['domain_id']) for r in rows], len(rows))",
        &[&factors.to_string_lossy()],
    );
    assert_eq!(shapes.trim(), "(12, 96) (12, 24) True 12");

    // Latents open in zarr-python with the documented layout and attributes.
    let enc = object_of(d.path(), "tiny.toml", "encode");
    let refs = read_json(enc.join("refs.json"));
    let first_key = refs["keys"][0].as_str().unwrap();
    let latent = enc
        .parent()
        .unwrap()
        .join(first_key)
        .join("out/latents/latent.zarr");
    let info = py(
        "import sys, zarr, numpy as np\na = zarr.open_array(sys.argv[1], mode='r')\nprint(a.shape, a.dtype, a.attrs['mode'], len(a.attrs['vae_digest']), np.isfinite(a[:]).all())",
        &[&latent.to_string_lossy()],
    );
    assert_eq!(info.trim(), "(4, 16, 16, 16) float32 sample 64 True");

    // Export of the resampled volumes to NIfTI, read back by nibabel with the same affine.
    let out_dir = d.path().join("nifti");
    run_ok(&["export", &p, "resample", "--to", &out_dir.to_string_lossy()]);
    let subj: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(subj.len(), 12);
    let check = py(
        "import sys, nibabel as nib, zarr, numpy as np\ni = nib.load(sys.argv[1] + '/image.nii.gz')\nprint(i.shape, nib.aff2axcodes(i.affine), i.get_fdata().max() <= 1.0)",
        &[&subj[0].to_string_lossy()],
    );
    assert_eq!(check.trim(), "(64, 64, 64) ('R', 'A', 'S') True");
    let e = meduet()
        .args(["export", &p, "probe", "--to", &out_dir.to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        !e.status.success() && text(&e).contains("no volume or label outputs"),
        "{}",
        text(&e)
    );

    // A second pipeline that differs only downstream of the encoder reuses the latents.
    std::fs::write(
        d.path().join("ablation.toml"),
        "name = \"ablation\"\ninclude = [\"tiny.toml\"]\n[stages.pretrain]\nmodel = { crop = 16, demix = false }\n",
    )
    .unwrap();
    let out = run_ok(&["run", &d.path().join("ablation.toml").to_string_lossy()]);
    assert_eq!(
        computed_stages(&out),
        ["factors", "pretrain", "probe"],
        "{}",
        text(&out)
    );
    let plan = run_ok(&["plan", &p]);
    assert!(text(&plan).contains("8 of 8 stage(s) cached"));
}

/// Runs `stage` of `pipe` twice in fresh folders: once uninterrupted, once SIGKILLed (the
/// scheduler, and with it the worker) as soon as `checkpoint` is the stage's latest (after
/// computing the `upstream` stages), then rerun. Returns both runs' loss logs, parsed.
fn uninterrupted_and_resumed(
    pipe: &str,
    upstream: &[&str],
    stage: &str,
    output: &str,
    checkpoint: &str,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let b = d.path().join("b");
    for dir in [&a, &b] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("p.toml"), pipe).unwrap();
    }
    let pa = a.join("p.toml").to_string_lossy().into_owned();
    let pb = b.join("p.toml").to_string_lossy().into_owned();
    run_ok(&["run", &pa, "--only", stage, "--threads", "2"]);
    // b: compute the stage's inputs, then run it until `checkpoint` is written and kill it.
    let mut prep = vec!["run", pb.as_str(), "--threads", "2"];
    for u in upstream {
        prep.extend(["--only", u]);
    }
    run_ok(&prep);
    let mut child = meduet()
        .args(["run", &pb, "--only", stage, "--threads", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let scratch = b.join(".meduet/scratch");
    loop {
        // Any stage's scratch (upstream ones may keep theirs) naming `checkpoint` latest.
        let reached = std::fs::read_dir(&scratch).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok()).any(|e| {
                std::fs::read_to_string(e.path().join("latest"))
                    .is_ok_and(|l| l.trim() == checkpoint)
            })
        });
        if reached {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "no {checkpoint} appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGKILL the scheduler: its worker dies with it (parent-death signal).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let orphans = Command::new("pgrep")
        .args([
            "-f",
            &format!("exec-stage .*{}", b.join(".meduet").display()),
        ])
        .output()
        .unwrap();
    assert!(
        orphans.stdout.is_empty(),
        "no worker survives its scheduler: {}",
        String::from_utf8_lossy(&orphans.stdout)
    );
    let out = run_ok(&["run", &pb, "--only", stage, "--threads", "2"]);
    assert!(
        text(&out).contains("resuming from the checkpoint at step"),
        "{}",
        text(&out)
    );
    let log = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(
            object_of(dir, "p.toml", stage)
                .join("out")
                .join(output)
                .join("losses.jsonl"),
        )
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
    };
    (log(&a), log(&b))
}

/// Asserts two loss traces agree step by step to a relative 1e-4. Not bit-exact: libtorch's
/// vectorised reductions (the logged loss means) can round differently with the memory
/// alignment of a run's buffers, by a few 1e-6 relative, while the trajectory itself is the
/// same; a resume that lost the weights, the optimiser or the data position differs by
/// orders of magnitude more.
///
/// Compares the `names` columns of the two logs and returns the first's.
fn assert_same_trace(
    a: &[serde_json::Value],
    b: &[serde_json::Value],
    names: &[&str],
) -> Vec<(u64, Vec<Option<f64>>)> {
    let (a, b) = (columns(a, names), columns(b, names));
    assert_eq!(a.len(), b.len(), "step counts\n{a:?}\n{b:?}");
    for ((sa, va), (sb, vb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert_eq!(va.len(), vb.len());
        for (x, y) in va.iter().zip(vb) {
            match (x, y) {
                (Some(x), Some(y)) => assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(y.abs()).max(1e-3),
                    "step {sa}: {x} vs {y}: the resumed run's losses equal the uninterrupted run's\n{a:?}\n{b:?}"
                ),
                _ => assert_eq!(x.is_some(), y.is_some(), "step {sa}"),
            }
        }
    }
    a
}

/// The named columns of a loss log, per step.
fn columns(log: &[serde_json::Value], names: &[&str]) -> Vec<(u64, Vec<Option<f64>>)> {
    log.iter()
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                names.iter().map(|n| v[*n].as_f64()).collect(),
            )
        })
        .collect()
}

/// The loss trace of a pretraining killed after a checkpoint and resumed equals an
/// uninterrupted run's.
#[test]
fn killed_pretraining_resumes_with_identical_losses() {
    let pipe = TINY.replace("steps = 10\nbatch_size = 4", "steps = 12\nbatch_size = 4");
    let (a, b) = uninterrupted_and_resumed(
        &pipe,
        &["encode"],
        "pretrain",
        "model",
        "checkpoint-00000006",
    );
    let ta = assert_same_trace(&a, &b, &["total", "rec"]);
    assert_eq!(ta.len(), 12);
}

/// UNETR segmentation from the tiny MeDUET with style augmentation on every step, its
/// target prototype refreshed every 3 steps: killed after the step-4 checkpoint and
/// resumed, its losses (clean, augmented, KL) equal the uninterrupted run's, so the
/// weights, the optimiser and the style prototype all came back.
#[test]
fn killed_segmentation_training_resumes_with_identical_losses() {
    let pipe = format!(
        "{TINY}{}",
        r#"
[stages.seg]
kind = "segment_train"
inputs = { volumes = "resample.volumes", latents = "encode.latents", meduet = "pretrain.model" }
labels = [1]
split = { train_domains = ["venous", "arterial", "native"] }
unetr = { init = "meduet", crop = 16, feature_size = 8 }
steps = 12
batch_size = 2
val_every = 0
checkpoint_every = 2
style_augment = { enabled = true, probability = 1.0, prototype_every = 3, prototype_volumes = 2, target = "heldout", kl_weight = 0.3 }
"#
    );
    let (a, b) =
        uninterrupted_and_resumed(&pipe, &["pretrain"], "seg", "model", "checkpoint-00000004");
    let names = ["loss", "dice_loss", "ce", "aug_loss", "kl", "style_alpha"];
    let ta = assert_same_trace(&a, &b, &names);
    assert_eq!(ta.len(), 12);
    // Every step was augmented with a strength in the 100% column's range, KL computed.
    for (step, v) in &ta {
        assert!(v.iter().all(Option::is_some), "step {step}: {v:?}");
        let alpha = v[5].unwrap();
        assert!((0.2..=0.5).contains(&alpha), "step {step}: alpha {alpha}");
        assert!(v[4].unwrap() >= 0.0);
    }
}

/// A MeDUET-initialised DiT conditioned on the factors (dual-CFG dropout on), killed
/// after its step-6 checkpoint and resumed: the loss trace equals an uninterrupted run's
/// (weights, EMA, optimiser and the latent scale factor all came back).
#[test]
fn killed_diffusion_training_resumes_with_identical_losses() {
    let pipe = format!(
        "{TINY}{}",
        r#"
[stages.dit]
kind = "diffusion_train"
inputs = { latents = "encode.latents", factors = "factors.factors", meduet = "pretrain.model" }
init = "meduet"
steps = 12
batch_size = 2
optim.lr = 1e-3
schedule.warmup_steps = 2
checkpoint_every = 3
"#
    );
    let (a, b) =
        uninterrupted_and_resumed(&pipe, &["factors"], "dit", "model", "checkpoint-00000006");
    let ta = assert_same_trace(&a, &b, &["loss", "grad_norm"]);
    assert_eq!(ta.len(), 12);
    assert!(ta.iter().all(|(_, v)| v[0].is_some_and(f64::is_finite)));
}

/// A ControlNet on a frozen metadata-conditioned DiT, killed after its step-6 checkpoint and
/// resumed: the loss trace equals an uninterrupted run's (ControlNet weights, EMA, optimiser
/// and the batches, condition and mask dropouts all came back).
#[test]
fn killed_controlnet_training_resumes_with_identical_losses() {
    let pipe = format!(
        "{TINY}{}",
        r#"
[stages.dit]
kind = "diffusion_train"
inputs = { latents = "encode.latents" }
model = { condition = "metadata" }
steps = 4
batch_size = 2
[stages.cn]
kind = "controlnet_train"
inputs = { model = "dit.model", latents = "encode.latents", volumes = "resample.volumes" }
labels = [1, 2]
steps = 12
batch_size = 2
optim.lr = 1e-3
schedule.warmup_steps = 2
mask_dropout = 0.3
checkpoint_every = 3
"#
    );
    let (a, b) =
        uninterrupted_and_resumed(&pipe, &["dit"], "cn", "controlnet", "checkpoint-00000006");
    let ta = assert_same_trace(&a, &b, &["loss", "grad_norm", "masks_dropped"]);
    assert_eq!(ta.len(), 12);
    assert!(ta.iter().all(|(_, v)| v[0].is_some_and(f64::is_finite)));
}

/// A small VAE trained on 400 crops of phantoms learns: the mean L1 loss of the last 20
/// steps is under [`VAE_L1_RATIO_FLOOR`] times that of the first 20, and the held-out
/// reconstruction (posterior mean, whole volumes) beats the constant image at each
/// volume's mean by more than [`VAE_PSNR_GAIN_FLOOR`] dB. The quickstart's longer run
/// (1200 crops of 32^3) reaches 20.7 dB.
///
/// Measured across CPU paths (libtorch's kernels differ; the constant image is 12.87 dB
/// on all of them), `cargo test --release -p meduet --test e2e vae_training -- --nocapture`
/// with the variables shown:
///
/// | CPU, settings                                   | L1 first -> last | PSNR     | gain    |
/// |-------------------------------------------------|------------------|----------|---------|
/// | AMD EPYC, `ATEN_CPU_CAPABILITY=default`         | 0.2456 -> 0.1147 | 14.69 dB | 1.82 dB |
/// | AMD EPYC, `ATEN_CPU_CAPABILITY=avx2`            | 0.2456 -> 0.1140 | 14.80 dB | 1.93 dB |
/// | AMD EPYC, `default` + `MKL_CBWR=COMPATIBLE`     | 0.2456 -> 0.1147 | 14.69 dB | 1.82 dB |
/// | AMD EPYC, `avx2` + `MKL_CBWR=COMPATIBLE`        | 0.2456 -> 0.1140 | 14.80 dB | 1.93 dB |
/// | the Intel machine of the first measurement      | 0.246 -> 0.111   | 15.43 dB | 2.56 dB |
///
/// The gain spreads over 0.74 dB between CPUs; the floor of 1.0 dB is cleared by the
/// worst (1.82 dB) by 0.82 dB, more than that whole spread (the earlier floor of 2.0 dB,
/// fitted to the Intel machine, failed on AMD). The L1 ratio is 0.464-0.467 everywhere
/// (0.45 on Intel) against a floor of 0.6.
const VAE_PSNR_GAIN_FLOOR: f64 = 1.0;
const VAE_L1_RATIO_FLOOR: f64 = 0.6;
const VAE_FIT: &str = r#"
name = "vae_fit"
[stages.phantom]
kind = "phantom"
domains = 2
subjects_per_domain = 4
shape = [48, 48, 40]
spacing = [3.0, 3.0, 3.0]
seed = 2
[stages.ingest]
kind = "ingest"
inputs = { datasets = "phantom.datasets" }
[stages.resample]
kind = "resample"
inputs = { subjects = "ingest.subjects" }
spacing = [3.0, 3.0, 3.0]
min_size = [32, 32, 32]
[stages.vae]
kind = "vae_train"
inputs = { volumes = "resample.volumes" }
steps = 200
batch_size = 2
crop = [32, 32, 32]
optim.lr = 5e-4
schedule.warmup_steps = 10
"#;

#[test]
fn vae_training_reduces_loss_and_reconstructs_heldout_volumes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("vae_fit.toml"), VAE_FIT).unwrap();
    let p = d.path().join("vae_fit.toml").to_string_lossy().into_owned();
    let t0 = Instant::now();
    run_ok(&["run", &p]);
    println!("vae fit: {:.1}s", t0.elapsed().as_secs_f64());
    let vae = object_of(d.path(), "vae_fit.toml", "vae").join("out/vae");
    let l1: Vec<f64> = std::fs::read_to_string(vae.join("losses.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["l1"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(l1.len(), 200);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&l1[..20]), mean(&l1[l1.len() - 20..]));
    assert!(
        last < VAE_L1_RATIO_FLOOR * first,
        "L1 {first:.4} -> {last:.4}"
    );
    let eval = read_json(vae.join("eval.json"));
    let psnr = eval["psnr"].as_f64().unwrap();
    let floor = eval["psnr_constant"].as_f64().unwrap();
    println!(
        "vae fit: L1 {first:.4} -> {last:.4}, held-out PSNR {psnr:.2} dB (constant {floor:.2} dB)"
    );
    assert_eq!(eval["heldout"].as_array().unwrap().len(), 2);
    assert!(
        floor > 5.0 && floor < 20.0,
        "constant-image PSNR {floor:.2} dB"
    );
    assert!(
        psnr > floor + VAE_PSNR_GAIN_FLOOR,
        "held-out PSNR {psnr:.2} dB, constant image {floor:.2} dB"
    );
    assert!(vae.join("losses.png").is_file() && vae.join("recon.png").is_file());
}
