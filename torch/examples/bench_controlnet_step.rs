//! Times one ControlNet training step in tch: the frozen DiT-tiny (or B/4) with a ControlNet
//! copying half its blocks, a one-hot 4-class mask at 4x the latent grid (MAISI's encoder
//! widths [8, 32, 64]), the DDPM epsilon loss with content/style dropout and mask dropout
//! (0.2 / 0.1), backward through the ControlNet only, AdamW (lr 1e-4) and the EMA update.
//!
//! ```text
//! cargo run --release -p meduet-torch --example bench_controlnet_step -- \
//!     --size tiny|b4 --batch 2 --steps 10 --warmup 2 --threads 2
//! ```
//!
//! Prints one JSON line (`ms_per_step` is the median). `scripts/bench_controlnet_step.sh`
//! runs it next to the PyTorch reference (`reference/controlnet_ref.py`).

use std::time::Instant;

use meduet_torch::diffusion::gaussian::GaussianDiffusion;
use meduet_torch::models::controlnet::{drop_masks, one_hot, ControlConfig, ControlNet};
use meduet_torch::models::dit::{dropout_mask, Cond, Config, Dit};
use meduet_torch::train::ema::ema_update;
use meduet_torch::train::optim::{AdamW, AdamWConfig};
use rand::SeedableRng;
use tch::{nn, Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut size = "tiny".to_string();
    let (mut batch, mut steps, mut warmup, mut threads) = (2i64, 10usize, 2usize, 2i32);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => size = v,
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
        "b4" => Config::b4(),
        other => return Err(format!("unknown size {other} (tiny | b4)").into()),
    };
    let cfg = Config {
        content_dim: base.hidden_size,
        style_dim: base.hidden_size / 4,
        ..base
    };
    let ccfg = ControlConfig {
        mask_channels: 5,
        depth: (cfg.depth / 2).max(1),
        embedding_channels: vec![8, 32, 64],
        scale: 4,
    };
    let dev = Device::Cpu;
    tch::manual_seed(0);
    let mut base_vs = nn::VarStore::new(dev);
    let model = Dit::new(&base_vs.root(), &cfg)?;
    base_vs.freeze();
    let vs = nn::VarStore::new(dev);
    let control = ControlNet::new(&vs.root(), &cfg, &ccfg)?;
    control.copy_base_blocks(&vs, &base_vs)?;
    let mut ema = nn::VarStore::new(dev);
    let _ema = ControlNet::new(&ema.root(), &cfg, &ccfg)?;
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
    let classes = Tensor::randint(5, [batch, x * 4, y * 4, z * 4], (Kind::Int64, dev));
    // One-hot once, as the PyTorch side does (the step itself applies mask dropout).
    let onehot = one_hot(&classes, 5);
    let ddpm = GaussianDiffusion::linear(1000, 1e-4, 0.02);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    for step in 0..warmup + steps {
        let t0 = Instant::now();
        let dc = dropout_mask(batch as usize, 0.2, &mut rng, dev);
        let ds = dropout_mask(batch as usize, 0.2, &mut rng, dev);
        let dm = dropout_mask(batch as usize, 0.1, &mut rng, dev);
        let mask = drop_masks(&onehot, &dm);
        let t = Tensor::randint(1000, [batch], (Kind::Int64, dev));
        let noise = x1.randn_like();
        let xt = ddpm.q_sample(&x1, &t, &noise);
        let cond = Cond::Factors {
            content: &c,
            style: &s,
        };
        let emb = model.embed(&cond, &[Some(&dc), Some(&ds)])?;
        let pred = control.forward_emb(&model, &xt, &ddpm.model_timesteps(&t), &emb, &mask)?;
        let loss = (pred - noise).square().mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        opt.step(1e-4);
        ema_update(&ema, &vs, 0.9999)?;
        losses.push(loss.double_value(&[]));
        if step >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"impl\":\"tch\",\"size\":\"{size}\",\"batch\":{batch},\"threads\":{threads},\"ms_per_step\":{:.2},\"ms_min\":{:.2},\"steps\":{},\"loss_first\":{:.6},\"loss_last\":{:.6}}}",
        times[times.len() / 2],
        times[0],
        times.len(),
        losses[0],
        losses[losses.len() - 1]
    );
    Ok(())
}
