//! `pretrain`: MeDUET self-supervised pretraining on latent crops.
//!
//! Each step draws a batch of 24³ latent crops (balanced over domains by default), a
//! random mixing mask, computes every loss term with the EMA teacher, takes an AdamW step
//! (warmup + cosine learning rate, gradient clipping, fp16 autocast with loss scaling on
//! CUDA) and moves the teacher. Batches, masks and libtorch's generator are seeded from
//! `(seed, step)`, and checkpoints hold the student, the teacher, the optimiser moments
//! and the loss scale, so a killed run resumes with exactly the losses of an
//! uninterrupted one. Every term is logged per step to `losses.jsonl` and plotted.

use std::sync::Arc;

use crate::models::meduet::{Masks, MeDuet, StepInfo, Teacher};
use meduet_engine::{StageContext, StageError};
use meduet_stages::kinds::pretrain::{meduet_config, Pretrain, PretrainParams};
use meduet_stages::kinds::vae::Amp;
use meduet_stages::sampling::{CropSampler, Prefetcher};
use meduet_stages::schedule::{CosineLrScheduler, EmaSchedule};
use rand::SeedableRng;
use tch::nn::VarStore;
use tch::Tensor;

use super::common::{device, fail, latent_sources, step_seed, write_json, DomainMap};
use crate::train::amp::GradScaler;
use crate::train::checkpoint::Checkpoints;
use crate::train::log::{plot_jsonl, JsonlLog};
use crate::train::optim::{AdamW, AdamWConfig};

/// Loss columns of `losses.jsonl`.
pub const LOSS_FIELDS: [&str; 6] = ["total", "rec", "domain_c", "domain_s", "mftd", "siqc"];

pub fn run(_: &Pretrain, p: &PretrainParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let dev = device(ctx);
    let items = ctx.input("latents")?.items.clone();
    if items.len() < 2 {
        return Err(StageError::input(format!(
            "pretraining needs at least 2 subjects, got {}",
            items.len()
        )));
    }
    let domains = DomainMap::from_items(&items)?;
    let mut cfg = meduet_config(p.preset, &p.model).map_err(StageError::input)?;
    cfg.n_domains = domains.len().max(2) as i64;
    let mut sources = latent_sources(&items)?;
    for s in &mut sources {
        s.domain_id = domains.class_of(s.domain_id).expect("mapped") as i64;
        if s.shape[0] as i64 != cfg.in_chans {
            return Err(StageError::input(format!(
                "latent '{}' has {} channels, the model expects {}",
                s.id, s.shape[0], cfg.in_chans
            )));
        }
    }
    let crop = cfg.crop as usize;
    let sampler = Arc::new(
        CropSampler::new(sources, [crop; 3], p.augment, p.sampling, p.seed)
            .map_err(StageError::input)?,
    );
    tch::manual_seed(p.seed as i64);
    let mut vs = VarStore::new(dev);
    let model = MeDuet::new(&vs.root(), &cfg).map_err(fail)?;
    let mut teacher = Teacher::from_student(&vs, &cfg).map_err(fail)?;
    let mut opt = AdamW::new(
        &vs,
        AdamWConfig {
            beta1: p.beta1,
            beta2: p.beta2,
            eps: 1e-8,
            weight_decay: p.weight_decay,
        },
    );
    let sched = CosineLrScheduler {
        base_lr: p.lr,
        warmup_t: p.warmup_steps,
        warmup_lr_init: 1e-6f64.min(p.lr),
        t_initial: p.steps,
        lr_min: p.min_lr,
        warmup_prefix: false,
    };
    let ema = EmaSchedule {
        base: p.ema_base,
        final_value: p.ema_final,
        total_steps: p.steps,
    };
    let mut scaler = GradScaler::new(dev.is_cuda() && p.amp == Amp::Fp16);
    let n_params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    tracing::info!("MeDUET {}x{} (decoder {}x{}), {} domains, {:.2} M trainable parameters, {} steps of batch {} on {dev:?}", cfg.embed_dim, cfg.depth, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.n_domains, n_params as f64 / 1e6, p.steps, p.batch_size);
    super::common::warn_if_bottlenecked("pretrain (encoder)", cfg.embed_dim, cfg.patch_values());
    super::common::warn_if_bottlenecked(
        "pretrain (decoder)",
        cfg.decoder_embed_dim,
        cfg.patch_values(),
    );

    let scratch = ctx.scratch_dir()?;
    let cps = Checkpoints::new(&scratch);
    let mut start = 0;
    if let Some((step, dir)) = cps.latest() {
        Checkpoints::load_into(&dir, "student.safetensors", &mut vs).map_err(fail)?;
        Checkpoints::load_into(&dir, "teacher.safetensors", teacher.var_store_mut())
            .map_err(fail)?;
        opt.load(&dir.join("optimizer.safetensors")).map_err(fail)?;
        let st = Checkpoints::state(&dir).map_err(fail)?;
        scaler = serde_json::from_value(st["scaler"].clone()).map_err(fail)?;
        start = step;
        tracing::info!("resuming from the checkpoint at step {step}");
    }
    let log_path = scratch.join("losses.jsonl");
    let mut log = JsonlLog::open(&log_path, start).map_err(|e| StageError::io(&log_path, e))?;
    let prefetch = Prefetcher::new(sampler, start, p.steps, p.batch_size, 1, 2);
    let bar = ctx.progress(p.steps, "steps");
    bar.set_position(start);
    let num_tokens = cfg.num_tokens();
    let mut last = None;
    for step in start..p.steps {
        ctx.check_cancelled()?;
        let (_, batch) = prefetch
            .next_batch()
            .ok_or_else(|| fail("the batch prefetcher stopped early"))?;
        let x = Tensor::from_slice(&batch.data)
            .view([
                batch.shape[0] as i64,
                batch.shape[1] as i64,
                batch.shape[2] as i64,
                batch.shape[3] as i64,
                batch.shape[4] as i64,
            ])
            .to_device(dev);
        let doms = Tensor::from_slice(&batch.domains).to_device(dev);
        let seed = step_seed(p.seed, step);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let masks = Masks::random(
            batch.shape[0] as i64,
            num_tokens,
            cfg.mask_ratio,
            &mut rng,
            dev,
        );
        tch::manual_seed(seed as i64);
        let losses = tch::autocast(scaler.enabled, || {
            model.forward_losses(
                teacher.model(),
                &x,
                &doms,
                &masks,
                StepInfo::new(step, p.steps),
            )
        })
        .map_err(fail)?;
        let v = losses.values();
        if !v.total.is_finite() {
            return Err(fail(format!("the loss is not finite at step {step} ({v:?}); nothing is committed (lower lr or check the latents)")));
        }
        opt.zero_grad();
        scaler.backward(&losses.total);
        let lr = sched.lr(step);
        let (grad_norm, stepped) = scaler.step(&mut opt, lr, p.grad_clip);
        let m = ema.momentum(step);
        if stepped {
            teacher.update(&vs, m).map_err(fail)?;
        }
        let rec = serde_json::json!({
            "step": step, "lr": lr, "momentum": m, "grad_norm": grad_norm, "stepped": stepped,
            "total": v.total, "rec": v.rec, "domain_c": v.domain_c, "domain_s": v.domain_s,
            "mftd": v.mftd, "siqc": v.siqc, "mftd_active": v.mftd_active,
        });
        log.write(&rec).map_err(|e| StageError::io(&log_path, e))?;
        last = Some(rec);
        bar.inc(1);
        let done = step + 1;
        if p.checkpoint_every > 0 && done % p.checkpoint_every == 0 && done < p.steps {
            let write_opt = |path: &std::path::Path| opt.save(path).map_err(|e| e.to_string());
            cps.save(
                done,
                &[
                    ("student.safetensors", &vs),
                    ("teacher.safetensors", teacher.var_store()),
                ],
                &[("optimizer.safetensors", &write_opt)],
                serde_json::json!({ "scaler": scaler }),
            )
            .map_err(fail)?;
        }
    }
    bar.finish_and_clear();
    let out = ctx.output_dir("model")?;
    vs.save(out.join("student.safetensors")).map_err(fail)?;
    teacher
        .var_store()
        .save(out.join("teacher.safetensors"))
        .map_err(fail)?;
    std::fs::copy(&log_path, out.join("losses.jsonl")).map_err(|e| StageError::io(&log_path, e))?;
    write_json(
        &out.join("config.json"),
        &serde_json::json!({ "model": cfg, "training": p, "domains": domains, "trainable_parameters": n_params }),
    )?;
    plot_jsonl(
        &out.join("losses.jsonl"),
        &out.join("losses.png"),
        "MeDUET pretraining losses",
        &LOSS_FIELDS,
        true,
    )
    .map_err(fail)?;
    if let Some(l) = last {
        for f in LOSS_FIELDS {
            ctx.set_metric(&format!("final_{f}"), l[f].clone());
        }
    }
    let first = crate::train::log::read_column(&out.join("losses.jsonl"), "rec");
    if let (Some(a), Some(b)) = (first.first(), first.last()) {
        ctx.set_metric("rec_first", a.1);
        ctx.set_metric("rec_last", b.1);
    }
    ctx.set_metric("trainable_parameters", n_params);
    Ok(())
}
