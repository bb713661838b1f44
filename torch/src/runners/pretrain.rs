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
use meduet_stages::sampling::CropSampler;
use meduet_stages::schedule::EmaSchedule;
use rand::SeedableRng;
use tch::nn::VarStore;
use tch::Tensor;

use super::common::{
    batch_tensor, device, fail, latent_sources, trainable_parameters, write_json, CropBatches,
    DomainMap,
};
use crate::train::trainer::{self, Ema, Learner, Step, StepOutput, TrainingTask};

/// Loss columns of `losses.jsonl`.
pub const LOSS_FIELDS: [&str; 6] = ["total", "rec", "domain_c", "domain_s", "mftd", "siqc"];

pub fn run(_: &Pretrain, p: &PretrainParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let dev = device(ctx);
    let training = p.training().map_err(StageError::input)?;
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
    let vs = VarStore::new(dev);
    let model = MeDuet::new(&vs.root(), &cfg).map_err(fail)?;
    let teacher = Teacher::from_student(&vs, &cfg).map_err(fail)?;
    let learner = Learner::new(&vs, &training);
    let n_params = trainable_parameters(&vs);
    tracing::info!("MeDUET {}x{} (decoder {}x{}), {} domains, {:.2} M trainable parameters, {} steps of batch {} on {dev:?}", cfg.embed_dim, cfg.depth, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.n_domains, n_params as f64 / 1e6, p.steps, p.batch_size);
    super::common::warn_if_bottlenecked("pretrain (encoder)", cfg.embed_dim, cfg.patch_values());
    super::common::warn_if_bottlenecked(
        "pretrain (decoder)",
        cfg.decoder_embed_dim,
        cfg.patch_values(),
    );
    let mut task = PretrainTask {
        p,
        num_tokens: cfg.num_tokens(),
        mask_ratio: cfg.mask_ratio,
        dev,
        vs,
        model,
        teacher,
        learner,
        ema: EmaSchedule {
            base: p.ema_base,
            final_value: p.ema_final,
            total_steps: p.steps,
        },
        batches: CropBatches::new(sampler, p.steps, p.batch_size),
    };
    let trained = trainer::run(ctx, &training, &mut task)?;
    let out = ctx.output_dir("model")?;
    task.vs
        .save(out.join("student.safetensors"))
        .map_err(fail)?;
    task.teacher
        .var_store()
        .save(out.join("teacher.safetensors"))
        .map_err(fail)?;
    write_json(
        &out.join("config.json"),
        &serde_json::json!({ "model": cfg, "training": p, "domains": domains, "trainable_parameters": n_params }),
    )?;
    trainer::finish(&trained, &out, "MeDUET pretraining losses", &LOSS_FIELDS)?;
    if let Some(l) = &trained.last {
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

/// One pretraining run as the shared loop sees it.
struct PretrainTask<'a> {
    p: &'a PretrainParams,
    num_tokens: i64,
    mask_ratio: f64,
    dev: tch::Device,
    vs: VarStore,
    model: MeDuet,
    teacher: Teacher,
    learner: Learner,
    ema: EmaSchedule,
    batches: CropBatches,
}

impl TrainingTask for PretrainTask<'_> {
    fn stores(&mut self) -> Vec<(&'static str, &mut VarStore)> {
        vec![
            ("student.safetensors", &mut self.vs),
            ("teacher.safetensors", self.teacher.var_store_mut()),
        ]
    }
    fn learners(&mut self) -> Vec<(&'static str, &mut Learner)> {
        vec![("optimizer", &mut self.learner)]
    }
    fn start(&mut self, first_step: u64) -> Result<(), StageError> {
        self.batches.start(first_step);
        Ok(())
    }
    fn step(&mut self, s: &Step) -> Result<StepOutput, StageError> {
        let batch = self.batches.next()?;
        let x = batch_tensor(&batch.data, &batch.shape).to_device(self.dev);
        let doms = Tensor::from_slice(&batch.domains).to_device(self.dev);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
        let masks = Masks::random(
            batch.shape[0] as i64,
            self.num_tokens,
            self.mask_ratio,
            &mut rng,
            self.dev,
        );
        tch::manual_seed(s.seed as i64);
        let losses = tch::autocast(self.learner.autocast(), || {
            self.model.forward_losses(
                self.teacher.model(),
                &x,
                &doms,
                &masks,
                StepInfo::new(s.step, self.p.steps),
            )
        })
        .map_err(fail)?;
        let v = losses.values();
        let (grad_norm, stepped) = self.learner.minimize(&losses.total, s)?;
        let rec = serde_json::json!({
            "momentum": self.ema.momentum(s.step), "grad_norm": grad_norm, "stepped": stepped,
            "total": v.total, "rec": v.rec, "domain_c": v.domain_c, "domain_s": v.domain_s,
            "mftd": v.mftd, "siqc": v.siqc, "mftd_active": v.mftd_active,
        });
        Ok(StepOutput {
            record: rec.as_object().expect("object").clone(),
            stepped,
        })
    }
    fn ema(&self, step: u64) -> Option<Ema<'_>> {
        Some(Ema {
            averaged: self.teacher.var_store(),
            source: &self.vs,
            momentum: self.ema.momentum(step),
        })
    }
}
