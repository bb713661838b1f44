//! Times one DiT/SiT training step in tch: the loss (DDPM epsilon or SiT velocity, with
//! content/style dropout), backward, AdamW (lr 5e-5, wd 0) and the EMA update (0.9999).
//!
//! ```text
//! cargo run --release -p meduet-torch --example bench_dit_step -- \
//!     --size tiny|small|b4 --method dit|sit --batch 2 --steps 10 --warmup 2 --threads 2
//! ```
//!
//! Prints one JSON line (`ms_per_step` is the median). `scripts/bench_dit_step.sh` runs it
//! next to the PyTorch reference (`reference/dit_ref.py`).

use std::time::Instant;

use meduet_torch::diffusion::gaussian::GaussianDiffusion;
use meduet_torch::diffusion::transport;
use meduet_torch::models::dit::{dropout_mask, Cond, Config, Dit};
use meduet_torch::train::ema::ema_update;
use meduet_torch::train::optim::{AdamW, AdamWConfig};
use rand::SeedableRng;
use tch::{nn, Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut size = "tiny".to_string();
    let mut method = "dit".to_string();
    let (mut batch, mut steps, mut warmup, mut threads) = (2i64, 10usize, 2usize, 2i32);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => size = v,
            "--method" => method = v,
            "--batch" => batch = v.parse()?,
            "--steps" => steps = v.parse()?,
            "--warmup" => warmup = v.parse()?,
            "--threads" => threads = v.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    tch::set_num_threads(threads);
    let base = match size.as_str() {
        "tiny" => Config::tiny(),
        "small" => Config::small(),
        "b4" => Config::b4(),
        other => return Err(format!("unknown size {other} (tiny | small | b4)").into()),
    };
    let cfg = Config {
        content_dim: base.hidden_size,
        style_dim: base.hidden_size / 4,
        ..base
    };
    let dev = Device::Cpu;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(dev);
    let model = Dit::new(&vs.root(), &cfg)?;
    let ema = nn::VarStore::new(dev);
    let _ema_model = Dit::new(&ema.root(), &cfg)?;
    let mut ema = ema;
    ema.copy(&vs)?;
    let mut opt = AdamW::new(
        &vs,
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    );
    let [x, y, z] = cfg.input_size;
    let x1 = Tensor::randn([batch, cfg.in_chans, x, y, z], (Kind::Float, dev));
    let c = Tensor::randn([batch, cfg.content_dim], (Kind::Float, dev));
    let s = Tensor::randn([batch, cfg.style_dim], (Kind::Float, dev));
    let ddpm = GaussianDiffusion::linear(1000, 1e-4, 0.02);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..warmup + steps {
        let t0 = Instant::now();
        let dc = dropout_mask(batch as usize, 0.2, &mut rng, dev);
        let ds = dropout_mask(batch as usize, 0.2, &mut rng, dev);
        let (xt, t, target) = if method == "dit" {
            let t = Tensor::randint(1000, [batch], (Kind::Int64, dev));
            let noise = x1.randn_like();
            (
                ddpm.q_sample(&x1, &t, &noise),
                ddpm.model_timesteps(&t),
                noise,
            )
        } else {
            let t = Tensor::rand([batch], (Kind::Float, dev));
            let p = transport::interpolate(&t, &x1.randn_like(), &x1);
            (p.xt, t, p.ut)
        };
        let cond = Cond::Factors {
            content: &c,
            style: &s,
        };
        let pred = model.forward(&xt, &t, &cond, &[Some(&dc), Some(&ds)])?;
        let loss = (pred - target).square().mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        opt.step(5e-5);
        ema_update(&ema, &vs, 0.9999)?;
        losses.push(loss.double_value(&[]));
        if step >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"impl\":\"tch\",\"size\":\"{size}\",\"method\":\"{method}\",\"batch\":{batch},\"threads\":{threads},\"ms_per_step\":{:.2},\"ms_min\":{:.2},\"steps\":{},\"loss_first\":{:.6},\"loss_last\":{:.6}}}",
        times[times.len() / 2],
        times[0],
        times.len(),
        losses[0],
        losses[losses.len() - 1]
    );
    Ok(())
}
