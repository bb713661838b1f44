//! Times one full MeDUET training step in tch: forward, every loss with MFTD on, backward,
//! gradient clipping (1.0), AdamW step (timm weight-decay groups) and the EMA-teacher update.
//!
//! ```text
//! cargo run --release -p meduet-stages --example bench_meduet_step -- \
//!     --size tiny|small|vit_b --batch 2 --steps 10 --warmup 2 --threads 2
//! ```
//!
//! Prints one JSON line: `{"impl":"tch","size":..,"batch":..,"threads":..,"ms_per_step":..,
//! "ms_min":..,"steps":..,"loss_first":..,"loss_last":..}` (`ms_per_step` is the median).
//! `scripts/bench_meduet_step.sh` runs it next to the PyTorch reference.

use std::time::Instant;

use meduet_stages::schedule::EmaSchedule;
use meduet_torch::models::meduet::{Config, Masks, MeDuet, StepInfo, Teacher};
use meduet_torch::train::optim::{AdamW, AdamWConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{nn, Device, Kind, Tensor};

struct Args {
    size: String,
    batch: i64,
    steps: usize,
    warmup: usize,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        size: "tiny".into(),
        batch: 2,
        steps: 10,
        warmup: 2,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => a.size = value()?,
            "--batch" => a.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--steps" => a.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--warmup" => a.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--threads" => a.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    tch::set_num_threads(args.threads as i32);
    let cfg = match args.size.as_str() {
        "tiny" => Config::tiny(),
        "small" => Config::small(),
        "vit_b" => Config::vit_b(),
        other => return Err(format!("unknown size {other} (tiny | small | vit_b)").into()),
    };
    let device = Device::Cpu;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let student = MeDuet::new(&vs.root(), &cfg)?;
    let teacher = Teacher::from_student(&vs, &cfg)?;
    let mut opt = AdamW::new(
        &vs,
        AdamWConfig {
            beta2: 0.95,
            ..Default::default()
        },
    );
    let x = Tensor::randn(
        [args.batch, cfg.in_chans, cfg.crop, cfg.crop, cfg.crop],
        (Kind::Float, device),
    );
    let domains = Tensor::arange(args.batch, (Kind::Int64, device)).remainder(cfg.n_domains);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let total = (args.warmup + args.steps) as u64;
    let ema = EmaSchedule::meduet(total);

    let mut times = Vec::with_capacity(args.steps);
    let mut losses = Vec::new();
    for step in 0..total {
        let masks = Masks::random(
            args.batch,
            cfg.num_tokens(),
            cfg.mask_ratio,
            &mut rng,
            device,
        );
        let t0 = Instant::now();
        // MFTD on: every step is past the start fraction
        let l = student.forward_losses(
            teacher.model(),
            &x,
            &domains,
            &masks,
            StepInfo::new(total, total),
        )?;
        opt.zero_grad();
        l.total.backward();
        opt.clip_grad_norm(1.0);
        opt.step(1e-4);
        teacher.update(&vs, ema.momentum(step))?;
        let loss = l.total.double_value(&[]);
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        losses.push(loss);
        if step as usize >= args.warmup {
            times.push(dt);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\":\"tch\",\"size\":\"{}\",\"batch\":{},\"threads\":{},\"ms_per_step\":{:.2},\"ms_min\":{:.2},\"steps\":{},\"loss_first\":{:.6},\"loss_last\":{:.6}}}",
        args.size,
        args.batch,
        args.threads,
        median,
        times[0],
        times.len(),
        losses[0],
        losses[losses.len() - 1]
    );
    Ok(())
}
