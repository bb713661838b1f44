//! The MAISI VAE against MONAI's `AutoencoderKlMaisi` (numerical equivalence through the
//! converter and the strict loader), key-mismatch reporting, and tiled encoding/decoding
//! against whole-volume results.
//!
//! The MONAI tests need the project venv with `monai` (see `meduet_stages::testing`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meduet_stages::testing::{python, run_python};
use meduet_torch::models::vae::{
    decode_tiled, encode_tiled, encode_tiled_latent, load_vae_safetensors, AutoencoderKlMaisi,
    Config, EncodeMode, TileConfig, TileNorm, VaeError,
};
use tch::{nn, Device, Kind, Tensor};

/// MONAI model with the paper's constructor arguments at a reduced width (two width
/// changes, so both `nin_shortcut`s exist; GroupNorm(32) as in the paper), CPU settings
/// `norm_float16=False`, `num_splits=1`. GroupNorm affine parameters are randomised too.
const MONAI_REFERENCE: &str = r#"
import sys, torch
from safetensors.torch import save_file
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
out, layout = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
torch.set_num_threads(2)
m = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
    num_channels=(32, 64, 96), num_res_blocks=(2, 2, 2), norm_num_groups=32, norm_eps=1e-6,
    attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False,
    norm_float16=False, num_splits=1, dim_split=1).eval()
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            mod.weight.copy_(1 + 0.3 * torch.randn_like(mod.weight))
            mod.bias.copy_(0.3 * torch.randn_like(mod.bias))
    x = torch.rand(1, 1, 32, 24, 40)
    mu, sigma = m.encode(x)
    recon = m.reconstruct(x)
    z = torch.randn(1, 4, 6, 5, 7)
    dec = m.decode(z)
sd = m.state_dict()
if layout == "old":
    # the MONAI-generative layout of autoencoder_epoch273.pt, wrapped in a dict
    sd = {"state_dict": {k.replace("conv.conv.weight", "conv.weight").replace("conv.conv.bias", "conv.bias")
                         if k.startswith(("encoder.", "decoder.")) else k: v for k, v in sd.items()}}
    assert "encoder.blocks.0.conv.weight" in sd["state_dict"]
    assert "encoder.blocks.3.conv.conv.weight" in sd["state_dict"]
torch.save(sd, out + "/autoencoder.pt")
save_file({"x": x, "mu": mu, "sigma": sigma, "recon": recon, "z": z, "dec": dec}, out + "/refs.safetensors")
print(len(m.state_dict()))
"#;

fn reduced_config() -> Config {
    Config {
        num_channels: vec![32, 64, 96],
        ..Config::maisi()
    }
}

fn converter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/convert_maisi.py")
}

fn convert(input: &Path, output: &Path) -> String {
    let out = std::process::Command::new(python())
        .arg(converter())
        .arg(input)
        .arg(output)
        .output()
        .expect("the converter runs");
    assert!(
        out.status.success(),
        "convert_maisi.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// `max |a - b| / max |b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[])
}

fn tch_threads() {
    tch::set_num_threads(2);
}

/// Builds the MONAI reference in `layout`, converts it, loads it, compares all outputs.
fn monai_equivalence(layout: &str) {
    tch_threads();
    let dir = tempfile::tempdir().unwrap();
    let n_keys = run_python(MONAI_REFERENCE, &[dir.path().to_str().unwrap(), layout]);
    let st = dir.path().join("vae.safetensors");
    let msg = convert(&dir.path().join("autoencoder.pt"), &st);
    assert!(msg.contains(&format!("source layout: {layout}")), "{msg}");

    let mut vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKlMaisi::new(vs.root(), &reduced_config()).unwrap();
    let loaded = load_vae_safetensors(&st, &mut vs).unwrap();
    assert_eq!(loaded.to_string(), n_keys.trim());
    assert_eq!(loaded, 130);

    let r = read(&dir.path().join("refs.safetensors"));
    let _g = tch::no_grad_guard();
    let (mu, sigma) = vae.encode(&r["x"]).unwrap();
    let recon = vae.forward(&r["x"]).unwrap();
    let dec = vae.decode(&r["z"]).unwrap();
    let errs = [
        ("mu", rel_err(&mu, &r["mu"])),
        ("sigma", rel_err(&sigma, &r["sigma"])),
        ("reconstruct", rel_err(&recon, &r["recon"])),
        ("decode", rel_err(&dec, &r["dec"])),
    ];
    println!("{layout} layout, relative errors vs MONAI: {errs:?}");
    for (what, e) in errs {
        assert!(e < 1e-4, "{what}: relative error {e:e} vs MONAI");
    }
    assert_eq!(mu.size(), vec![1, 4, 8, 6, 10]);
    assert_eq!(dec.size(), vec![1, 1, 24, 20, 28]);
}

#[test]
fn monai_equivalence_encoder_mu_and_decoder() {
    monai_equivalence("new");
}

#[test]
fn monai_old_layout_checkpoint_converts_and_matches() {
    monai_equivalence("old");
}

/// Weights saved by meduet (`VarStore::save`) load into MONAI with `strict=True` and give
/// the same encoding: the names map both ways.
#[test]
fn meduet_weights_load_into_monai_strictly() {
    tch_threads();
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKlMaisi::new(vs.root(), &reduced_config()).unwrap();
    let st = dir.path().join("w.safetensors");
    vs.save(&st).unwrap();
    let x = Tensor::rand([1, 1, 16, 16, 24], (Kind::Float, Device::Cpu));
    let (mu, _) = tch::no_grad(|| vae.encode(&x)).unwrap();
    let io = dir.path().join("io.safetensors");
    Tensor::write_safetensors(&[("x", &x), ("mu", &mu)], &io).unwrap();
    let code = r#"
import sys, torch
from safetensors.torch import load_file
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
m = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
    num_channels=(32, 64, 96), num_res_blocks=(2, 2, 2), norm_num_groups=32, norm_eps=1e-6,
    attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False, norm_float16=False, num_splits=1, dim_split=1).eval()
m.load_state_dict(load_file(sys.argv[1]), strict=True)
io = load_file(sys.argv[2])
with torch.no_grad():
    mu, _ = m.encode(io["x"])
print(((mu - io["mu"]).abs().max() / io["mu"].abs().max()).item())
"#;
    let e: f64 = run_python(code, &[st.to_str().unwrap(), io.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    println!("meduet weights in MONAI: relative error of mu {e:e}");
    assert!(e < 1e-4, "{e:e}");
}

#[test]
fn key_mismatch_error_lists_missing_unexpected_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    AutoencoderKlMaisi::new(vs.root(), &Config::small()).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    tensors.remove("encoder.blocks.4.nin_shortcut.conv.conv.bias");
    tensors.remove("quant_conv_mu.conv.weight");
    tensors.insert(
        "encoder.blocks.11.conv.conv.weight".into(),
        Tensor::zeros([4, 4, 1, 1, 1], (Kind::Float, Device::Cpu)),
    );
    tensors.insert(
        "decoder.blocks.9.weight".into(),
        Tensor::ones([32], (Kind::Float, Device::Cpu)),
    );
    let path = dir.path().join("bad.safetensors");
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&named, &path).unwrap();

    let mut fresh = nn::VarStore::new(Device::Cpu);
    AutoencoderKlMaisi::new(fresh.root(), &Config::small()).unwrap();
    let before = fresh.variables()["decoder.blocks.9.weight"].copy();
    let err = load_vae_safetensors(&path, &mut fresh).unwrap_err();
    let VaeError::Weights { report, .. } = &err else {
        panic!("expected a key report, got {err}");
    };
    assert_eq!(
        report.missing,
        vec![
            "encoder.blocks.4.nin_shortcut.conv.conv.bias".to_string(),
            "quant_conv_mu.conv.weight".to_string()
        ]
    );
    assert_eq!(
        report.unexpected,
        vec!["encoder.blocks.11.conv.conv.weight"]
    );
    assert_eq!(report.mismatched.len(), 1);
    assert_eq!(report.mismatched[0].name, "decoder.blocks.9.weight");
    assert_eq!(report.mismatched[0].expected, vec![16]);
    assert_eq!(report.mismatched[0].found, vec![32]);
    let text = err.to_string();
    for needle in [
        "missing keys (2)",
        "unexpected keys (1)",
        "shape mismatches (1)",
        "decoder.blocks.9.weight: network [16], file [32]",
        "hint: check that the vae config",
    ] {
        assert!(text.contains(needle), "'{needle}' not in:\n{text}");
    }
    // nothing was copied
    assert!(fresh.variables()["decoder.blocks.9.weight"].equal(&before));

    // an unconverted old-layout file gets the converter hint
    let old = dir.path().join("old.safetensors");
    Tensor::write_safetensors(
        &[(
            "encoder.blocks.0.conv.weight",
            Tensor::zeros([16, 1, 3, 3, 3], (Kind::Float, Device::Cpu)),
        )],
        &old,
    )
    .unwrap();
    let text = load_vae_safetensors(&old, &mut fresh)
        .unwrap_err()
        .to_string();
    assert!(text.contains("scripts/convert_maisi.py"), "{text}");

    let text = load_vae_safetensors(&dir.path().join("none.safetensors"), &mut fresh)
        .unwrap_err()
        .to_string();
    assert!(text.contains("cannot read vae weights"), "{text}");
}

/// A smooth random volume (trilinearly upsampled noise): statistically homogeneous.
fn smooth_volume(shape: [i64; 3], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let coarse = Tensor::rand(
        [1, 1, shape[0] / 4 + 1, shape[1] / 4 + 1, shape[2] / 4 + 1],
        (Kind::Float, Device::Cpu),
    );
    let noise = Tensor::rand(
        [1, 1, shape[0], shape[1], shape[2]],
        (Kind::Float, Device::Cpu),
    );
    coarse.upsample_trilinear3d([shape[0], shape[1], shape[2]], false, None, None, None)
        + noise * 0.1
}

fn small_vae(seed: i64) -> (nn::VarStore, AutoencoderKlMaisi) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKlMaisi::new(vs.root(), &Config::small()).unwrap();
    // random GroupNorm affines, so that normalisation errors would show
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut v) in vars {
            if name.contains("norm")
                || name.ends_with("blocks.9.weight")
                || name.ends_with("blocks.9.bias")
            {
                let r = v.randn_like() * 0.3;
                let _ = v.f_add_(&r).unwrap();
            }
        }
    });
    (vs, vae)
}

/// Exact mode: equal to whole-volume encoding everywhere, border voxels included, with
/// sizes that are not multiples of 4, on a volume that is partly constant "air", with
/// 2-4 tiles per axis at levels 0 and 1, and 2 along `d` at level 2.
#[test]
fn tiled_global_equals_whole_volume() {
    tch_threads();
    let (_vs, vae) = small_vae(11);
    // a heterogeneous volume: half "air" (constant), half texture, so that per-tile
    // statistics would differ strongly from whole-volume ones
    let x = smooth_volume([64, 38, 30], 5);
    let _ = x.narrow(2, 0, 26).f_fill_(-1.0).unwrap();
    let _g = tch::no_grad_guard();
    let (mu, sigma) = vae.encode(&x).unwrap();
    let cfg = TileConfig {
        tile: [16, 16, 12],
        overlap: 0,
        norm: TileNorm::Global,
    };
    let (tmu, tsigma) = encode_tiled(&vae, &x, &cfg).unwrap();
    assert_eq!(tmu.size(), vec![1, 4, 16, 9, 7]);
    let (emu, esigma) = (rel_err(&tmu, &mu), rel_err(&tsigma, &sigma));
    // the per-tile mode on the same input, to show what global statistics buy
    let per_tile = TileConfig {
        tile: [32, 24, 24],
        overlap: 8,
        norm: TileNorm::PerTile,
    };
    let (pmu, _) = encode_tiled(&vae, &x, &per_tile).unwrap();
    let ep = rel_err(&pmu, &mu);
    println!("global tiling vs whole: mu {emu:e}, sigma {esigma:e}; per-tile mode: mu {ep:e}");
    assert!(emu < 1e-5 && esigma < 1e-5, "mu {emu:e} sigma {esigma:e}");
    assert!(
        ep > 100.0 * emu,
        "per-tile {ep:e} should differ far more than global {emu:e}"
    );

    // mean / seeded sample through the tiled path (one tile per level: fast)
    let big = TileConfig {
        tile: [64, 40, 32],
        ..cfg
    };
    let (bmu, bsigma) = encode_tiled(&vae, &x, &big).unwrap();
    assert!(rel_err(&bmu, &mu) < 1e-5);
    let m = encode_tiled_latent(&vae, &x, &big, EncodeMode::Mean).unwrap();
    assert!(m.equal(&bmu));
    let s1 = encode_tiled_latent(&vae, &x, &big, EncodeMode::Sample { seed: 9 }).unwrap();
    let s2 = encode_tiled_latent(&vae, &x, &big, EncodeMode::Sample { seed: 9 }).unwrap();
    assert!(s1.equal(&s2));
    // the same noise as a seeded sample of the whole-volume encoding
    let whole_sample = AutoencoderKlMaisi::sample_seeded(&mu, &sigma, 9).unwrap();
    assert!(rel_err(&s1, &whole_sample) < 1e-5);
    let z = ((&s1 - &bmu) / &bsigma).std(true).double_value(&[]);
    assert!((z - 1.0).abs() < 0.1, "standardised sample std {z}");
}

/// Mean over all but the `d` axis of `|a - b|`, relative to `max |b|`, per latent slice.
fn slice_errors(a: &Tensor, b: &Tensor) -> Vec<f64> {
    let d = (a - b)
        .abs()
        .amax(&[0i64, 1, 3, 4][..], false)
        .to_kind(Kind::Double)
        / b.abs().max().double_value(&[]);
    Vec::try_from(&d).unwrap()
}

/// Mean `|z[i + 1] - z[i]|` along `d`, per slice pair.
fn neighbour_steps(z: &Tensor) -> Vec<f64> {
    let n = z.size()[2];
    let d = (z.narrow(2, 1, n - 1) - z.narrow(2, 0, n - 1))
        .abs()
        .mean_dim(Some(&[0i64, 1, 3, 4][..]), false, Kind::Double);
    Vec::try_from(&d).unwrap()
}

/// Largest ratio, over the slice pairs in `range`, of the tiled result's step between
/// neighbouring slices to the whole-volume result's: a seam would show as a step well
/// above 1.
fn max_step_ratio(tiled: &Tensor, whole: &Tensor, range: std::ops::Range<usize>) -> f64 {
    let (t, w) = (neighbour_steps(tiled), neighbour_steps(whole));
    range.map(|i| t[i] / w[i]).fold(0.0, f64::max)
}

/// MAISI-style mode: per-tile statistics and a sin^2 crossfade. Two tiles along `d`
/// ([0, 96) and [64, 160), latents [0, 24) and [16, 40)): a latent farther than the
/// encoder's receptive radius (9 latents) from the inner tile edges is exactly that tile's
/// encoding and differs from whole-volume encoding only through GroupNorm statistics; the
/// crossfade region shows no step larger than the whole-volume latent's own.
#[test]
fn tiled_per_tile_is_close_and_seamless() {
    tch_threads();
    let (_vs, vae) = small_vae(12);
    let x = smooth_volume([160, 48, 40], 6);
    let _g = tch::no_grad_guard();
    let (mu, _) = vae.encode(&x).unwrap();
    let cfg = TileConfig {
        tile: [96, 48, 40],
        overlap: 32,
        norm: TileNorm::PerTile,
    };
    let (tmu, _) = encode_tiled(&vae, &x, &cfg).unwrap();
    let err = slice_errors(&tmu, &mu);
    let interior = err[..15]
        .iter()
        .chain(&err[25..])
        .cloned()
        .fold(0.0, f64::max);
    let overall = err.iter().cloned().fold(0.0, f64::max);
    let seam = max_step_ratio(&tmu, &mu, 14..25);
    println!(
        "per-tile encode vs whole: interior {interior:.4}, overall {overall:.4}, \
         step ratio across the crossfade {seam:.3}"
    );
    // measured: interior 0.050, overall 0.18, step ratio 1.00
    assert!(interior < 0.08, "interior {interior}");
    assert!(overall < 0.3, "overall {overall}");
    assert!(seam < 1.25, "seam: steps {seam}x the whole-volume ones");
    // a single tile covering the volume is the whole-volume computation
    let single = TileConfig {
        tile: [160, 48, 40],
        ..cfg.clone()
    };
    let e1 = rel_err(&encode_tiled(&vae, &x, &single).unwrap().0, &mu);
    assert!(e1 < 1e-6, "single tile {e1:e}");
}

#[test]
fn tiled_decode_matches_whole_and_rejects_global() {
    tch_threads();
    let (_vs, vae) = small_vae(13);
    let _g = tch::no_grad_guard();
    let z = smooth_volume([40, 12, 10], 7) * 2.0 - 1.0;
    let z = z.repeat([1, 4, 1, 1, 1]);
    let y = vae.decode(&z).unwrap();
    let one = TileConfig {
        tile: [160, 48, 40],
        overlap: 32,
        norm: TileNorm::PerTile,
    };
    let e1 = rel_err(&decode_tiled(&vae, &z, &one).unwrap(), &y);
    let cfg = TileConfig {
        tile: [96, 48, 40],
        overlap: 32,
        norm: TileNorm::PerTile,
    };
    let yt = decode_tiled(&vae, &z, &cfg).unwrap();
    assert_eq!(yt.size(), vec![1, 1, 160, 48, 40]);
    let err = slice_errors(&yt, &y);
    let overall = err.iter().cloned().fold(0.0, f64::max);
    // tiles [0, 96) and [64, 160) along d: the crossfade is within [64, 96)
    let seam = max_step_ratio(&yt, &y, 60..100);
    println!(
        "per-tile decode vs whole: single tile {e1:e}, overall {overall:.4}, step ratio {seam:.3}"
    );
    // measured: overall 0.31, step ratio about 1.1
    assert!(overall < 0.45, "overall {overall}");
    assert!(seam < 1.4, "seam: steps {seam}x the whole-volume ones");
    assert!(e1 < 1e-6, "{e1:e}");
    let global = TileConfig {
        norm: TileNorm::Global,
        ..cfg
    };
    let msg = decode_tiled(&vae, &z, &global).unwrap_err().to_string();
    assert!(msg.contains("per_tile"), "{msg}");
}

#[test]
fn tile_config_is_validated() {
    let (_vs, vae) = small_vae(1);
    let x = Tensor::zeros([1, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
    for (tile, overlap, needle) in [
        ([6, 16, 16], 0, "tile size 6"),
        ([16, 16, 16], 16, "overlap 16"),
        ([16, 16, 16], 2, "overlap 2"),
    ] {
        let cfg = TileConfig {
            tile,
            overlap,
            norm: TileNorm::PerTile,
        };
        let e = encode_tiled(&vae, &x, &cfg).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let e = toml_like_json_error();
    assert!(e.contains("overlapp"), "{e}");
}

fn toml_like_json_error() -> String {
    // unknown keys in the tiling config are rejected (serde deny_unknown_fields)
    match serde_json::from_str::<TileConfig>(r#"{"tile": [64, 64, 64], "overlapp": 8}"#) {
        Ok(_) => "accepted".into(),
        Err(e) => e.to_string(),
    }
}
