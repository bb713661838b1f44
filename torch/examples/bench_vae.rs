//! Benchmarks of the MAISI VAE (paper width, random weights, f32 on the CPU):
//!
//! * `throughput`: encoder voxels per second on an `n^3` volume (default 96) against MONAI's
//!   `AutoencoderKlMaisi` in PyTorch eager (`norm_float16=False`, `num_splits=1`), both with
//!   the same intra-op threads (default 2), run alternately in one go; prints the ratio
//!   meduet time / MONAI time (target: at most 1.0).
//! * `memory`: peak resident memory (VmHWM) of child processes that encode a volume
//!   (default 512x512x300) with tiling (`global`, `per_tile`), and whole-volume encodes at
//!   64^3, 96^3 and 128^3 from which a linear fit estimates the whole-volume peak at the
//!   requested size (measuring it would need far more than this machine's memory).
//!
//! ```text
//! . scripts/env.sh
//! cargo run --release -p meduet-torch --example bench_vae -- throughput [--size 96] [--threads 2] [--reps 3]
//! cargo run --release -p meduet-torch --example bench_vae -- memory [--volume 512x512x300] [--tile 128] \
//!     [--threads 2] [--modes global,per_tile] [--whole-sizes 64,96,128]
//! ```
//!
//! `child MODE DxHxW TILE THREADS` is the internal entry point of one memory measurement.
#![allow(clippy::print_stdout)]

use std::process::Command;
use std::time::Instant;

use meduet_stages::testing::python;
use meduet_torch::models::vae::{encode_tiled, AutoencoderKlMaisi, Config, TileConfig, TileNorm};
use tch::{nn, Device, Kind, Tensor};

const MONAI_ENCODE: &str = r#"
import sys, time, json, torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
n, threads, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
m = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
    num_channels=(64, 128, 256), num_res_blocks=(2, 2, 2), norm_num_groups=32, norm_eps=1e-6,
    attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False,
    norm_float16=False, num_splits=1, dim_split=1).eval()
x = torch.rand(1, 1, n, n, n)
ts = []
with torch.no_grad():
    m.encode(x)
    for _ in range(reps):
        t = time.perf_counter()
        m.encode(x)
        ts.append(time.perf_counter() - t)
print(json.dumps({"times": ts, "torch": torch.__version__}))
"#;

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn parse_dims(s: &str) -> [i64; 3] {
    let v: Vec<i64> = s
        .split('x')
        .map(|p| p.parse().expect("dimensions as DxHxW"))
        .collect();
    assert_eq!(v.len(), 3, "dimensions as DxHxW, got {s}");
    [v[0], v[1], v[2]]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

fn paper_vae() -> (nn::VarStore, AutoencoderKlMaisi) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKlMaisi::new(vs.root(), &Config::maisi()).expect("paper config");
    (vs, vae)
}

fn meduet_encode_times(vae: &AutoencoderKlMaisi, n: i64, reps: usize) -> Vec<f64> {
    let x = Tensor::rand([1, 1, n, n, n], (Kind::Float, Device::Cpu));
    let _g = tch::no_grad_guard();
    let _ = vae.encode(&x).expect("encode");
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            let _ = vae.encode(&x).expect("encode");
            t.elapsed().as_secs_f64()
        })
        .collect()
}

fn monai_encode_times(n: i64, threads: usize, reps: usize) -> Vec<f64> {
    let out = Command::new(python())
        .args(["-c", MONAI_ENCODE])
        .args([n.to_string(), threads.to_string(), reps.to_string()])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "MONAI benchmark failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("MONAI prints JSON");
    v["times"]
        .as_array()
        .expect("times")
        .iter()
        .map(|t| t.as_f64().expect("seconds"))
        .collect()
}

fn throughput(args: &[String]) {
    let n: i64 = flag(args, "--size", "96").parse().expect("--size N");
    let threads: usize = flag(args, "--threads", "2").parse().expect("--threads N");
    let reps: usize = flag(args, "--reps", "3").parse().expect("--reps N");
    tch::set_num_threads(threads as i32);
    let (_vs, vae) = paper_vae();
    let voxels = (n * n * n) as f64;
    // alternate the two implementations so that background load affects both alike
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..2 {
        ours.extend(meduet_encode_times(&vae, n, reps));
        theirs.extend(monai_encode_times(n, threads, reps));
        println!(
            "round {round}: meduet {:?} s, MONAI {:?} s",
            &ours[ours.len() - reps..],
            &theirs[theirs.len() - reps..]
        );
    }
    let (mo, mt) = (median(&ours), median(&theirs));
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "paper-width VAE encoder, {n}^3, {threads} threads, {} runs each (median / best):",
        ours.len()
    );
    println!(
        "  meduet (tch):      {mo:.3} s / {:.3} s  ->  {:.0} voxels/s (median)",
        best(&ours),
        voxels / mo
    );
    println!(
        "  MONAI (PyTorch):   {mt:.3} s / {:.3} s  ->  {:.0} voxels/s (median)",
        best(&theirs),
        voxels / mt
    );
    println!(
        "  ratio meduet time / MONAI time: {:.3} (median), {:.3} (best)",
        mo / mt,
        best(&ours) / best(&theirs)
    );
}

/// Resident-set figures of this process from /proc/self/status, in bytes.
fn proc_status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn child(args: &[String]) {
    let mode = args[0].as_str();
    let d = parse_dims(&args[1]);
    let tile: i64 = args[2].parse().expect("tile");
    let threads: i32 = args[3].parse().expect("threads");
    tch::set_num_threads(threads);
    let (_vs, vae) = paper_vae();
    let base = proc_status("VmRSS:");
    let x = Tensor::rand([1, 1, d[0], d[1], d[2]], (Kind::Float, Device::Cpu));
    let t = Instant::now();
    let _g = tch::no_grad_guard();
    let (mu, _) = match mode {
        "whole" => vae.encode(&x),
        "global" | "per_tile" => {
            let cfg = TileConfig {
                tile: [tile; 3],
                overlap: 32,
                norm: if mode == "global" {
                    TileNorm::Global
                } else {
                    TileNorm::PerTile
                },
            };
            encode_tiled(&vae, &x, &cfg)
        }
        other => panic!("unknown mode {other}"),
    }
    .expect("encode");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "mode": mode, "dims": d, "tile": tile, "seconds": secs,
            "latent": mu.size(), "base_rss": base, "peak_rss": proc_status("VmHWM:"),
        })
    );
}

fn run_child(mode: &str, dims: [i64; 3], tile: i64, threads: usize) -> serde_json::Value {
    let exe = std::env::current_exe().expect("current exe");
    let dims_s = format!("{}x{}x{}", dims[0], dims[1], dims[2]);
    let out = Command::new(exe)
        .args([
            "child",
            mode,
            &dims_s,
            &tile.to_string(),
            &threads.to_string(),
        ])
        .output()
        .expect("child runs");
    if !out.status.success() {
        return serde_json::json!({
            "mode": mode, "dims": dims, "failed": String::from_utf8_lossy(&out.stderr).lines().last(),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).expect("child JSON");
    let gib = |k: &str| v[k].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    println!(
        "  {mode:>8} {dims_s:>12} tile {tile:>3}: peak RSS {:6.2} GiB (base {:.2} GiB), {:7.1} s",
        gib("peak_rss"),
        gib("base_rss"),
        v["seconds"].as_f64().unwrap_or(0.0)
    );
    v
}

fn memory(args: &[String]) {
    let dims = parse_dims(&flag(args, "--volume", "512x512x300"));
    let tile: i64 = flag(args, "--tile", "128").parse().expect("--tile N");
    let threads: usize = flag(args, "--threads", "2").parse().expect("--threads N");
    let modes = flag(args, "--modes", "global,per_tile");
    let sizes: Vec<i64> = flag(args, "--whole-sizes", "64,96,128")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("--whole-sizes N,N"))
        .collect();
    println!("peak memory of paper-width encoding, {threads} threads:");
    let mut fit = Vec::new();
    for &n in &sizes {
        let v = run_child("whole", [n; 3], tile, threads);
        if let Some(p) = v["peak_rss"].as_f64() {
            fit.push(((n * n * n) as f64, p));
        }
    }
    if fit.len() >= 2 {
        // least squares peak = a + b * voxels
        let k = fit.len() as f64;
        let (sx, sy) = fit.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        let (sxx, sxy) = fit
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x * x, b + x * y));
        let b = (k * sxy - sx * sy) / (k * sxx - sx * sx);
        let a = (sy - b * sx) / k;
        let voxels = (dims[0] * dims[1] * dims[2]) as f64;
        println!(
            "  whole-volume fit: {:.2} GiB + {:.0} bytes/voxel -> {}x{}x{} estimated {:.1} GiB (not run)",
            a / (1u64 << 30) as f64,
            b,
            dims[0],
            dims[1],
            dims[2],
            (a + b * voxels) / (1u64 << 30) as f64
        );
    }
    for mode in modes.split(',').filter(|m| !m.is_empty()) {
        run_child(mode, dims, tile, threads);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("throughput") => throughput(&args[1..]),
        Some("memory") => memory(&args[1..]),
        Some("child") => child(&args[1..]),
        _ => {
            eprintln!(
                "usage: bench_vae throughput [--size 96] [--threads 2] [--reps 3]\n       \
                 bench_vae memory [--volume 512x512x300] [--tile 128] [--threads 2] \
                 [--modes global,per_tile] [--whole-sizes 64,96,128]"
            );
            std::process::exit(2);
        }
    }
}
