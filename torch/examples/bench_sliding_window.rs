//! Sliding-window inference throughput of meduet's `inference::sliding_window` with the
//! nnU-Net-style U-Net (MONAI `DynUNet` topology and names), for comparison with MONAI's
//! `sliding_window_inference` on the same network and weights in PyTorch eager
//! (`scripts/bench_sliding_window.py`, which runs this example).
//!
//! `cargo run --release -p meduet-torch --example bench_sliding_window -- \
//!     --weights W.safetensors --volume 96,96,96 --roi 48 --overlap 0.5 --sw-batch 4 --runs 3 --threads 2`
//!
//! Prints one JSON line: seconds per volume (best and median of the runs), voxels per second,
//! windows, and the output checksum (sum of the blended logits) to compare with MONAI's.

use meduet_torch::inference::{sliding_window, SlidingWindow};
use meduet_torch::models::unet::{Unet, UnetConfig};
use tch::{nn, Device, Kind, Tensor};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: i32 = arg(&args, "--threads", 2);
    tch::set_num_threads(threads);
    tch::set_num_interop_threads(1);
    let vol: Vec<i64> = arg(&args, "--volume", "96,96,96".to_string())
        .split(',')
        .map(|v| v.parse().expect("--volume X,Y,Z"))
        .collect();
    let roi: i64 = arg(&args, "--roi", 48);
    let overlap: f64 = arg(&args, "--overlap", 0.5);
    let sw_batch: usize = arg(&args, "--sw-batch", 4);
    let runs: usize = arg(&args, "--runs", 3);
    let weights: String = arg(&args, "--weights", String::new());
    let input: String = arg(&args, "--input", String::new());
    let cfg = UnetConfig {
        in_channels: 1,
        out_channels: 3,
        kernels: vec![[3, 3, 3]; 4],
        strides: vec![[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        features: vec![16, 32, 64, 128],
        deep_supervision: 0,
    };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Unet::new(&vs.root(), &cfg).expect("config");
    if !weights.is_empty() {
        vs.load(&weights).expect("weights");
    }
    let x = if input.is_empty() {
        tch::manual_seed(0);
        Tensor::rand([1, 1, vol[0], vol[1], vol[2]], (Kind::Float, Device::Cpu))
    } else {
        Tensor::read_safetensors(&input).expect("input")[0]
            .1
            .shallow_clone()
    };
    let sw = SlidingWindow {
        roi: [roi; 3],
        overlap,
        batch: sw_batch,
        scale: 1,
        sigma_scale: 0.125,
    };
    let _ng = tch::no_grad_guard();
    let mut times = Vec::new();
    let mut windows = 0;
    let mut checksum = 0.0;
    for r in 0..runs + 1 {
        let t0 = std::time::Instant::now();
        let (out, w) = sliding_window(&x, &sw, &mut |b| Ok(net.logits(b))).expect("inference");
        let dt = t0.elapsed().as_secs_f64();
        windows = w;
        checksum = out.sum(Kind::Double).double_value(&[]);
        if r > 0 {
            times.push(dt); // run 0 warms up
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let voxels = (x.size()[2] * x.size()[3] * x.size()[4]) as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "meduet (tch)", "threads": threads, "volume": x.size()[2..], "roi": roi,
            "overlap": overlap, "sw_batch": sw_batch, "windows": windows,
            "best_s": times[0], "median_s": times[times.len() / 2],
            "voxels_per_s": voxels / times[0], "checksum": checksum,
        })
    );
}
