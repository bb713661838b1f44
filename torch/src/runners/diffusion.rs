//! `diffusion_train` and `sample`: latent DiT/SiT with MeDUET factor conditioning.
//!
//! Training (method.md 4.1-4.2): random latent crops of the configured `input_size`
//! (zero-padded when a latent is smaller, no other augmentation), multiplied by the latent
//! scale factor (1/std of the first batch unless given). DiT draws `t ~ U{0..T-1}` and
//! regresses the noise (L_simple); SiT draws `t ~ U[0, 1]` and regresses the velocity
//! `x - eps`. Content and style are replaced by their null vectors independently with
//! probabilities `dropout_content` / `dropout_style`. AdamW with warmup + cosine, an EMA
//! copy updated every step, resumable checkpoints (weights, EMA, optimiser, scale factor)
//! with batches, dropout masks and noise seeded from `(seed, step)`.
//!
//! Sampling: DDPM ancestral on the respaced schedule (DiT), Euler-Maruyama SDE or the ODE
//! (SiT), each step one batched forward over the three guidance branches; the latents are
//! divided by the scale factor and decoded with the VAE.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use meduet_engine::{Item, StageContext, StageError};
use meduet_stages::data::nifti_io::{write_nifti, NiftiDtype};
use meduet_stages::data::volume::{Volume, VolumeOf};
use meduet_stages::data::zarr_store::{write_zarr, Attrs};
use meduet_stages::kinds::diffusion::*;
use meduet_stages::kinds::resample::IMAGE_ZARR;
use meduet_stages::plot::{montage, GrayImage};
use meduet_stages::sampling::{Augment, CropSampler, Sampling};
use rand::{Rng, SeedableRng};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::common::{
    batch_tensor, device, fail, latent_sources, load_frozen, read_json, step_seed,
    trainable_parameters, warn_if_bottlenecked, write_json, CropBatches, DomainMap,
};
use crate::diffusion::gaussian::GaussianDiffusion;
use crate::diffusion::{guided_output, transport};
use crate::models::dit::{dropout_mask, Cond, ConditionMode, Config as DitConfig, Dit};
use crate::models::meduet::Config as MeduetConfig;
use crate::models::vae::{decode_tiled, AutoencoderKlMaisi, TileConfig, TileNorm};
use crate::train::trainer::{self, Ema, Learner, Step, StepOutput, TrainingTask};

/// The condition vectors of a set of subjects (one row each).
#[derive(Debug)]
pub struct ConditionBank {
    pub mode: ConditionMode,
    pub subjects: Vec<String>,
    /// `factors`: `[content [N, d_c], style [N, d_s]]`; `metadata`: `[m [N, k]]`.
    pub tensors: Vec<Tensor>,
    /// Names of the metadata components.
    pub components: Vec<String>,
}

impl ConditionBank {
    fn names(&self) -> &'static [&'static str] {
        match self.mode {
            ConditionMode::Factors => &["content", "style"],
            ConditionMode::Metadata => &["metadata"],
            ConditionMode::None => &[],
        }
    }

    /// Reads a `factors` artifact (`factors.safetensors` + `subjects.json`).
    pub fn from_factors(dir: &Path) -> Result<Self, StageError> {
        let st = dir.join("factors.safetensors");
        let t: HashMap<String, Tensor> = Tensor::read_safetensors(&st)
            .map_err(|e| StageError::input(format!("cannot read '{}': {e}", st.display())))?
            .into_iter()
            .collect();
        let get = |k: &str| {
            t.get(k)
                .map(|x| x.to_kind(Kind::Float))
                .ok_or_else(|| StageError::input(format!("'{}' has no '{k}' tensor", st.display())))
        };
        let (c, s) = (get("content")?, get("style")?);
        let rows: Vec<serde_json::Value> = read_json(&dir.join("subjects.json"))?;
        let subjects: Vec<String> = rows
            .iter()
            .map(|r| r["subject"].as_str().unwrap_or_default().to_string())
            .collect();
        if c.size()[0] != subjects.len() as i64 || s.size()[0] != subjects.len() as i64 {
            return Err(StageError::input(format!(
                "'{}': {} content / {} style rows but {} subjects in subjects.json",
                dir.display(),
                c.size()[0],
                s.size()[0],
                subjects.len()
            )));
        }
        Ok(Self {
            mode: ConditionMode::Factors,
            subjects,
            tensors: vec![c, s],
            components: vec![],
        })
    }

    /// Metadata vectors: the domain one-hot (classes of the training data) and the original
    /// voxel spacing in mm.
    pub fn metadata(items: &[Item], domains: &DomainMap) -> Result<Self, StageError> {
        let k = domains.len();
        let mut v = Vec::with_capacity(items.len() * (k + 3));
        for it in items {
            let d = super::common::domain_id(it)?;
            let cls = domains.class_of(d).ok_or_else(|| {
                StageError::input(format!("'{}': domain {d} unknown to the model", it.id))
            })?;
            v.extend((0..k).map(|i| if i == cls { 1.0f32 } else { 0.0 }));
            let sp = it
                .attrs
                .get("original_spacing")
                .or_else(|| it.attrs.get("spacing"))
                .and_then(|s| serde_json::from_value::<[f64; 3]>(s.clone()).ok())
                .ok_or_else(|| {
                    StageError::input(format!(
                        "'{}' has no 'original_spacing' or 'spacing' attribute [x, y, z] \
                         (metadata conditioning needs it)",
                        it.id
                    ))
                })?;
            v.extend(sp.iter().map(|&x| x as f32));
        }
        let mut components: Vec<String> = domains
            .names()
            .into_iter()
            .map(|n| format!("domain={n}"))
            .collect();
        components.extend(["spacing_x_mm", "spacing_y_mm", "spacing_z_mm"].map(String::from));
        Ok(Self {
            mode: ConditionMode::Metadata,
            subjects: items.iter().map(|i| i.id.clone()).collect(),
            tensors: vec![Tensor::from_slice(&v).view([items.len() as i64, (k + 3) as i64])],
            components,
        })
    }

    /// The widths of the condition vectors.
    pub fn dims(&self) -> Vec<i64> {
        self.tensors.iter().map(|t| t.size()[1]).collect()
    }

    /// The row of a subject.
    pub fn row(&self, subject: &str) -> Option<usize> {
        self.subjects.iter().position(|s| s == subject)
    }

    /// Saves `conditions.safetensors` and `conditions.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), StageError> {
        let named: Vec<(&str, Tensor)> = self
            .names()
            .iter()
            .zip(&self.tensors)
            .map(|(n, t)| (*n, t.shallow_clone()))
            .collect();
        if !named.is_empty() {
            Tensor::write_safetensors(&named, dir.join("conditions.safetensors")).map_err(fail)?;
        }
        write_json(
            &dir.join("conditions.json"),
            &serde_json::json!({ "mode": self.mode, "subjects": self.subjects, "components": self.components }),
        )
    }

    /// Reads what [`ConditionBank::save`] wrote.
    pub fn load(dir: &Path) -> Result<Self, StageError> {
        let j: serde_json::Value = read_json(&dir.join("conditions.json"))?;
        let mode: ConditionMode = serde_json::from_value(j["mode"].clone()).map_err(|e| {
            StageError::input(format!(
                "'{}': mode: {e}",
                dir.join("conditions.json").display()
            ))
        })?;
        let subjects: Vec<String> =
            serde_json::from_value(j["subjects"].clone()).unwrap_or_default();
        let components: Vec<String> =
            serde_json::from_value(j["components"].clone()).unwrap_or_default();
        let mut bank = Self {
            mode,
            subjects,
            tensors: vec![],
            components,
        };
        if mode != ConditionMode::None {
            let p = dir.join("conditions.safetensors");
            let t: HashMap<String, Tensor> = Tensor::read_safetensors(&p)
                .map_err(|e| StageError::input(format!("cannot read '{}': {e}", p.display())))?
                .into_iter()
                .collect();
            for n in bank.names() {
                bank.tensors.push(
                    t.get(*n).map(|x| x.shallow_clone()).ok_or_else(|| {
                        StageError::input(format!("'{}' has no '{n}'", p.display()))
                    })?,
                );
            }
        }
        Ok(bank)
    }

    /// The condition tensors of the model's mode for samples whose content comes from
    /// bank rows `content` and style from rows `style` (metadata: the `content` rows).
    pub fn gather(
        &self,
        mode: ConditionMode,
        content: &[usize],
        style: &[usize],
        dev: Device,
    ) -> Vec<Tensor> {
        let rows =
            |r: &[usize]| Tensor::from_slice(&r.iter().map(|&v| v as i64).collect::<Vec<_>>());
        match mode {
            ConditionMode::Factors => vec![
                self.tensors[0]
                    .index_select(0, &rows(content))
                    .to_device(dev),
                self.tensors[1].index_select(0, &rows(style)).to_device(dev),
            ],
            ConditionMode::Metadata => {
                vec![self.tensors[0]
                    .index_select(0, &rows(content))
                    .to_device(dev)]
            }
            ConditionMode::None => vec![],
        }
    }

    /// Checks that the vectors have the widths the model was trained with.
    pub fn check_fits(&self, cfg: &DitConfig) -> Result<(), StageError> {
        if cfg.condition == ConditionMode::None {
            return Ok(());
        }
        let dims = self.dims();
        let want: Vec<i64> = cfg.needed_dims().iter().map(|d| d.1).collect();
        if dims != want {
            return Err(StageError::input(format!(
                "the condition vectors have widths {dims:?}, the model expects {want:?}"
            )));
        }
        Ok(())
    }

    /// Restricted to `subjects` (in that order); errors name a missing subject.
    pub fn select(&self, subjects: &[String]) -> Result<Self, StageError> {
        let idx: Vec<i64> = subjects
            .iter()
            .map(|s| {
                self.row(s).map(|r| r as i64).ok_or_else(|| {
                    StageError::input(format!(
                        "subject '{s}' has no condition vectors (the factor table lacks it)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let idx = Tensor::from_slice(&idx);
        Ok(Self {
            mode: self.mode,
            subjects: subjects.to_vec(),
            tensors: self
                .tensors
                .iter()
                .map(|t| t.index_select(0, &idx))
                .collect(),
            components: self.components.clone(),
        })
    }
}

fn set_condition_dims(cfg: &mut DitConfig, bank: Option<&ConditionBank>) {
    if let Some(b) = bank {
        let d = b.dims();
        match cfg.condition {
            ConditionMode::Factors => {
                cfg.content_dim = d[0];
                cfg.style_dim = d[1];
            }
            ConditionMode::Metadata => cfg.metadata_dim = d[0],
            ConditionMode::None => {}
        }
    }
}

/// Unbiased standard deviation of all values (`torch.std`).
fn std_unbiased(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let ss = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>();
    (ss / (n - 1.0).max(1.0)).sqrt()
}

/// Loss columns of `losses.jsonl`.
pub const LOSS_FIELDS: [&str; 1] = ["loss"];

pub fn train(
    _: &DiffusionTrain,
    p: &DiffusionTrainParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let training = p.training().map_err(StageError::input)?;
    let items = ctx.input("latents")?.items.clone();
    if items.is_empty() {
        return Err(StageError::input(
            "diffusion training needs at least 1 subject",
        ));
    }
    let mut cfg = dit_config(p.preset, &p.model).map_err(StageError::input)?;
    let domains = DomainMap::from_items(&items)?;
    let bank = condition_bank(ctx, &cfg, &items, &domains)?;
    set_condition_dims(&mut cfg, bank.as_ref());
    cfg.validate_complete()
        .map_err(|e| StageError::input(format!("model: {e}")))?;
    let rows: HashMap<String, i64> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.id.clone(), i as i64))
        .collect();
    let sources = latent_sources(&items)?;
    if let Some(s) = sources.iter().find(|s| s.shape[0] as i64 != cfg.in_chans) {
        return Err(StageError::input(format!(
            "latent '{}' has {} channels, the model expects {}",
            s.id, s.shape[0], cfg.in_chans
        )));
    }
    let crop = cfg.input_size.map(|v| v as usize);
    let no_augment = Augment {
        flip_p: 0.0,
        rot90_p: 0.0,
    };
    let sampler = Arc::new(
        CropSampler::new(sources, crop, no_augment, Sampling::Shuffled, p.seed)
            .map_err(StageError::input)?,
    );
    tch::manual_seed(p.seed as i64);
    let vs = VarStore::new(dev);
    let model = Dit::new(&vs.root(), &cfg).map_err(fail)?;
    let transfer = match p.init {
        DitInit::Meduet => Some(init_from_meduet(ctx, &model, &vs)?),
        DitInit::Scratch => None,
    };
    let mut ema_vs = VarStore::new(dev);
    let _ema_model = Dit::new(&ema_vs.root(), &cfg).map_err(fail)?;
    ema_vs.copy(&vs).map_err(fail)?;
    ema_vs.freeze();
    let learner = Learner::new(&vs, &training);
    let n_params = trainable_parameters(&vs);
    tracing::info!(
        "{:?} {}x{} ({} heads, patch {}, {} tokens), condition {:?}, {:.2} M parameters, {} steps of batch {} on {dev:?}",
        p.method, cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch, cfg.num_tokens(),
        cfg.condition, n_params as f64 / 1e6, p.steps, p.batch_size
    );
    warn_if_bottlenecked("diffusion_train", cfg.hidden_size, cfg.patch_values());
    let bank_dev: Vec<Tensor> = bank
        .as_ref()
        .map(|b| b.tensors.iter().map(|t| t.to_device(dev)).collect())
        .unwrap_or_default();
    let mut task = DiffusionTask {
        p,
        dev,
        condition: cfg.condition,
        vs,
        ema_vs,
        model,
        learner,
        ddpm: GaussianDiffusion::linear(
            p.noise_schedule.timesteps,
            p.noise_schedule.beta_start,
            p.noise_schedule.beta_end,
        ),
        rows,
        bank: bank_dev,
        batches: CropBatches::new(sampler, p.steps, p.batch_size),
        scale_factor: p.scale_factor,
        scratch: ctx.scratch_dir()?,
    };
    let trained = trainer::run(ctx, &training, &mut task)?;
    let scale_factor = task.scale_factor.expect("set when training started");
    let out = ctx.output_dir("model")?;
    task.vs.save(out.join("model.safetensors")).map_err(fail)?;
    task.ema_vs
        .save(out.join("ema.safetensors"))
        .map_err(fail)?;
    for &k in &p.snapshot_steps {
        let (from, to) = (
            task.scratch.join(snapshot_file(k)),
            out.join(snapshot_file(k)),
        );
        std::fs::create_dir_all(to.parent().expect("snapshots/"))
            .map_err(|e| StageError::io(&to, e))?;
        std::fs::copy(&from, &to).map_err(|e| StageError::io(&from, e))?;
    }
    match &bank {
        Some(b) => b.save(&out)?,
        None => ConditionBank {
            mode: ConditionMode::None,
            subjects: items.iter().map(|i| i.id.clone()).collect(),
            tensors: vec![],
            components: vec![],
        }
        .save(&out)?,
    }
    let spacing = items[0]
        .attrs
        .get("spacing")
        .cloned()
        .unwrap_or(serde_json::json!([1.5, 1.5, 1.5]));
    write_json(
        &out.join("config.json"),
        &serde_json::json!({
            "model": cfg, "method": p.method, "schedule": p.noise_schedule,
            "scale_factor": scale_factor, "training": p, "domains": domains,
            "image_spacing": spacing, "trainable_parameters": n_params, "meduet_init": transfer,
        }),
    )?;
    trainer::finish(
        &trained,
        &out,
        &format!("{:?} training loss", p.method),
        &LOSS_FIELDS,
    )?;
    let col = crate::train::log::read_column(&out.join("losses.jsonl"), "loss");
    if let Some((head, tail)) = crate::train::log::first_and_last_tenth(&col) {
        ctx.set_metric("loss_first_tenth", head);
        ctx.set_metric("loss_last_tenth", tail);
    }
    if let (Some(first), Some(last)) = (col.first(), col.last()) {
        ctx.set_metric("first_loss", first.1);
        ctx.set_metric("final_loss", last.1);
    }
    ctx.set_metric("scale_factor", scale_factor);
    ctx.set_metric("trainable_parameters", n_params);
    Ok(())
}

/// The condition vectors the model is trained on, by its condition mode.
fn condition_bank(
    ctx: &StageContext,
    cfg: &DitConfig,
    items: &[Item],
    domains: &DomainMap,
) -> Result<Option<ConditionBank>, StageError> {
    Ok(match cfg.condition {
        ConditionMode::Factors => {
            let f = ctx.inputs("factors");
            let f = f.first().ok_or_else(|| {
                StageError::input(
                    "model.condition = \"factors\" needs the 'factors' input (an extract_factors stage)",
                )
            })?;
            let all = ConditionBank::from_factors(&f.dir)?;
            let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
            Some(all.select(&ids)?)
        }
        ConditionMode::Metadata => Some(ConditionBank::metadata(items, domains)?),
        ConditionMode::None => None,
    })
}

/// Copies a pretrained MeDUET encoder (the `meduet` input) into the DiT.
fn init_from_meduet(
    ctx: &StageContext,
    model: &Dit,
    vs: &VarStore,
) -> Result<crate::models::dit::TransferReport, StageError> {
    let m = ctx.inputs("meduet");
    let m = m.first().ok_or_else(|| {
        StageError::input("init = \"meduet\" needs the 'meduet' input (a pretrain stage)")
    })?;
    let mcfg_json: serde_json::Value = read_json(&m.dir.join("config.json"))?;
    let mcfg: MeduetConfig = serde_json::from_value(mcfg_json["model"].clone())
        .map_err(|e| StageError::input(format!("'{}': model: {e}", m.dir.display())))?;
    let r = model
        .load_meduet(vs, &m.dir.join("student.safetensors"), [mcfg.grid(); 3])
        .map_err(|e| StageError::input(e.to_string()))?;
    tracing::info!(
        "initialised from MeDUET: {} tensors, {:.2} M of {:.2} M parameters, position table {:?} -> {:?}",
        r.copied.len(),
        r.copied_params as f64 / 1e6,
        r.total_params as f64 / 1e6,
        r.pos_embed_from,
        r.pos_embed_to
    );
    Ok(r)
}

/// The noised input, the network's time input and the regression target of a training
/// batch `x1` (clean latents, scaled): DiT draws `t ~ U{0..T-1}` and regresses the noise;
/// SiT draws `t ~ U[0, 1]` and regresses the velocity `x1 - x0`. Draws from libtorch's
/// generator (seeded per step by the trainer).
pub fn training_target(
    method: Method,
    ddpm: &GaussianDiffusion,
    x1: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let (b, dev) = (x1.size()[0], x1.device());
    match method {
        Method::Dit => {
            let t = Tensor::randint(ddpm.num_timesteps() as i64, [b], (Kind::Int64, dev));
            let noise = x1.randn_like();
            let xt = ddpm.q_sample(x1, &t, &noise);
            (xt, ddpm.model_timesteps(&t), noise)
        }
        Method::Sit => {
            let t = Tensor::rand([b], (Kind::Float, dev));
            let x0 = x1.randn_like();
            let s = transport::interpolate(&t, &x0, x1);
            (s.xt, t, s.ut)
        }
    }
}

/// One diffusion training run as the shared loop sees it.
struct DiffusionTask<'a> {
    p: &'a DiffusionTrainParams,
    dev: Device,
    condition: ConditionMode,
    vs: VarStore,
    ema_vs: VarStore,
    model: Dit,
    learner: Learner,
    ddpm: GaussianDiffusion,
    /// Subject id -> row of the condition bank.
    rows: HashMap<String, i64>,
    bank: Vec<Tensor>,
    batches: CropBatches,
    /// Set from the parameters, a resumed checkpoint, or the first batch.
    scale_factor: Option<f64>,
    scratch: std::path::PathBuf,
}

impl TrainingTask for DiffusionTask<'_> {
    fn stores(&mut self) -> Vec<(&'static str, &mut VarStore)> {
        vec![
            ("model.safetensors", &mut self.vs),
            ("ema.safetensors", &mut self.ema_vs),
        ]
    }
    fn learners(&mut self) -> Vec<(&'static str, &mut Learner)> {
        vec![("optimizer", &mut self.learner)]
    }
    fn save_extra(&self, _dir: &Path) -> Result<serde_json::Value, String> {
        Ok(serde_json::json!({ "scale_factor": self.scale_factor }))
    }
    fn load_extra(&mut self, _dir: &Path, state: &serde_json::Value) -> Result<(), StageError> {
        self.scale_factor = state["scale_factor"].as_f64();
        Ok(())
    }
    fn start(&mut self, first_step: u64) -> Result<(), StageError> {
        if self.scale_factor.is_none() {
            let b = self.batches.sampler().batch(0, self.p.batch_size);
            let sd = std_unbiased(&b.data);
            if !(sd > 0.0) || !sd.is_finite() {
                return Err(StageError::input(format!(
                    "the first batch of latents has standard deviation {sd}: cannot set the scale factor (give scale_factor)"
                )));
            }
            self.scale_factor = Some(1.0 / sd);
        }
        tracing::info!("latent scale factor {:.6}", self.scale_factor.expect("set"));
        self.batches.start(first_step);
        Ok(())
    }
    fn step(&mut self, s: &Step) -> Result<StepOutput, StageError> {
        let p = self.p;
        let dev = self.dev;
        let batch = self.batches.next()?;
        let b = batch.shape[0] as i64;
        let x1 = (batch_tensor(&batch.data, &batch.shape) * self.scale_factor.expect("set"))
            .to_device(dev);
        let ids: Vec<i64> = batch.ids.iter().map(|id| self.rows[id]).collect();
        let idx = Tensor::from_slice(&ids).to_device(dev);
        let conds: Vec<Tensor> = self.bank.iter().map(|t| t.index_select(0, &idx)).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
        let drops = [
            dropout_mask(b as usize, p.dropout_content, &mut rng, dev),
            dropout_mask(b as usize, p.dropout_style, &mut rng, dev),
        ];
        tch::manual_seed(s.seed as i64);
        let cond = match self.condition {
            ConditionMode::Factors => Cond::Factors {
                content: &conds[0],
                style: &conds[1],
            },
            ConditionMode::Metadata => Cond::Metadata(&conds[0]),
            ConditionMode::None => Cond::None,
        };
        let loss = tch::autocast(self.learner.autocast(), || -> Result<Tensor, StageError> {
            let (xt, t_model, target) = training_target(p.method, &self.ddpm, &x1);
            let pred = self
                .model
                .forward(&xt, &t_model, &cond, &[Some(&drops[0]), Some(&drops[1])])
                .map_err(fail)?;
            Ok((pred.to_kind(Kind::Float) - target)
                .square()
                .mean(Kind::Float))
        })?;
        let (grad_norm, stepped) = self.learner.minimize(&loss, s)?;
        let rec = serde_json::json!({
            "loss": loss.double_value(&[]), "grad_norm": grad_norm, "stepped": stepped,
        });
        Ok(StepOutput {
            record: rec.as_object().expect("object").clone(),
            stepped,
        })
    }
    fn ema(&self, _step: u64) -> Option<Ema<'_>> {
        Some(Ema {
            averaged: &self.ema_vs,
            source: &self.vs,
            momentum: self.p.ema_decay,
        })
    }
    fn after_step(&mut self, done: u64) -> Result<(), StageError> {
        if self.p.snapshot_steps.contains(&done) {
            // Written whole before it is renamed into place: a kill never leaves half a
            // snapshot (a resumed run rewrites it identically from the earlier checkpoint).
            let file = self.scratch.join(snapshot_file(done));
            let part = file.with_extension("partial.safetensors");
            std::fs::create_dir_all(file.parent().expect("snapshots/"))
                .map_err(|e| StageError::io(&file, e))?;
            self.ema_vs.save(&part).map_err(fail)?;
            std::fs::rename(&part, &file).map_err(|e| StageError::io(&file, e))?;
            tracing::info!("EMA snapshot at step {done}");
        }
        Ok(())
    }
}

/// A trained model loaded for sampling.
pub struct LoadedDiffusion {
    pub vs: VarStore,
    pub model: Dit,
    pub method: Method,
    pub schedule: DdpmSchedule,
    pub scale_factor: f64,
    pub image_spacing: [f64; 3],
}

/// Which weights of a `diffusion` artifact to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsChoice {
    /// `ema.safetensors`.
    Ema,
    /// `model.safetensors`.
    Model,
    /// The EMA snapshot after this many steps.
    Snapshot(u64),
}

impl WeightsChoice {
    /// A snapshot when one is named, else the EMA or last training weights.
    pub fn of(snapshot: Option<u64>, weights: SampleWeights) -> Self {
        match (snapshot, weights) {
            (Some(k), _) => WeightsChoice::Snapshot(k),
            (None, SampleWeights::Ema) => WeightsChoice::Ema,
            (None, SampleWeights::Model) => WeightsChoice::Model,
        }
    }
}

/// Loads a `diffusion` artifact.
pub fn load_diffusion(
    dir: &Path,
    weights: WeightsChoice,
    dev: Device,
) -> Result<LoadedDiffusion, StageError> {
    let j: serde_json::Value = read_json(&dir.join("config.json"))?;
    let bad = |f: &str, e: serde_json::Error| {
        StageError::input(format!("'{}': {f}: {e}", dir.join("config.json").display()))
    };
    let cfg: DitConfig = serde_json::from_value(j["model"].clone()).map_err(|e| bad("model", e))?;
    let method: Method =
        serde_json::from_value(j["method"].clone()).map_err(|e| bad("method", e))?;
    let schedule: DdpmSchedule =
        serde_json::from_value(j["schedule"].clone()).map_err(|e| bad("schedule", e))?;
    let scale_factor = j["scale_factor"]
        .as_f64()
        .ok_or_else(|| StageError::input(format!("'{}' has no scale_factor", dir.display())))?;
    let image_spacing =
        serde_json::from_value::<[f64; 3]>(j["image_spacing"].clone()).unwrap_or([1.5; 3]);
    let mut vs = VarStore::new(dev);
    let model = Dit::new(&vs.root(), &cfg).map_err(fail)?;
    let file = match weights {
        WeightsChoice::Ema => dir.join("ema.safetensors"),
        WeightsChoice::Model => dir.join("model.safetensors"),
        WeightsChoice::Snapshot(k) => {
            let file = dir.join(snapshot_file(k));
            if !file.is_file() {
                return Err(StageError::input(format!(
                    "snapshot: the model has no snapshot after {k} steps (its snapshot_steps: {})",
                    j["training"]["snapshot_steps"]
                )));
            }
            file
        }
    };
    load_frozen(&mut vs, &file)?;
    Ok(LoadedDiffusion {
        vs,
        model,
        method,
        schedule,
        scale_factor,
        image_spacing,
    })
}

/// Middle slices of a `[X, Y, Z]` volume (C order): axial (z), coronal (y), sagittal (x),
/// superior and anterior up.
pub fn orthogonal_slices(v: &Volume, title: &str, lo: f32, hi: f32) -> Vec<GrayImage> {
    let [nx, ny, nz] = v.shape;
    let at = |x: usize, y: usize, z: usize| v.data[(x * ny + y) * nz + z];
    let (cx, cy, cz) = (nx / 2, ny / 2, nz / 2);
    let axial: Vec<f32> = (0..ny)
        .flat_map(|r| (0..nx).map(move |c| (c, ny - 1 - r)))
        .map(|(x, y)| at(x, y, cz))
        .collect();
    let coronal: Vec<f32> = (0..nz)
        .flat_map(|r| (0..nx).map(move |c| (c, nz - 1 - r)))
        .map(|(x, z)| at(x, cy, z))
        .collect();
    let sagittal: Vec<f32> = (0..nz)
        .flat_map(|r| (0..ny).map(move |c| (c, nz - 1 - r)))
        .map(|(y, z)| at(cx, y, z))
        .collect();
    let img = |name: &str, w: usize, h: usize, px: Vec<f32>| GrayImage {
        title: format!("{title} {name}"),
        width: w,
        height: h,
        pixels: px,
        lo,
        hi,
    };
    vec![
        img("axial", nx, ny, axial),
        img("coronal", nx, nz, coronal),
        img("sagittal", ny, nz, sagittal),
    ]
}

/// Picks `n` rows: the given subjects cycled, or uniformly at random with replacement.
fn pick_rows(
    bank: &ConditionBank,
    from: &[String],
    n: usize,
    rng: &mut impl Rng,
    what: &str,
) -> Result<Vec<usize>, StageError> {
    if from.is_empty() {
        if bank.subjects.is_empty() {
            return Err(StageError::input(format!(
                "{what}: the condition bank is empty"
            )));
        }
        return Ok((0..n)
            .map(|_| rng.random_range(0..bank.subjects.len()))
            .collect());
    }
    let rows: Vec<usize> = from
        .iter()
        .map(|s| {
            bank.row(s).ok_or_else(|| {
                StageError::input(format!(
                    "{what}: subject '{s}' is not in the condition bank (known: {})",
                    bank.subjects.join(", ")
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((0..n).map(|i| rows[i % rows.len()]).collect())
}

/// Draws latents from a loaded model with dual classifier-free guidance: the sampler of a
/// `sample` request resolved for the model (DDPM for DiT, SDE or ODE for SiT).
pub struct LatentSampler<'a> {
    ld: &'a LoadedDiffusion,
    p: &'a SampleParams,
    pub sampler: Sampler,
    ddpm: Option<GaussianDiffusion>,
}

impl<'a> LatentSampler<'a> {
    /// Resolves `p.sampler` (`auto`: DDPM for DiT, SDE for SiT) and the respaced DDPM
    /// schedule; the sampler settings (steps, variance, ODE method, SDE step) come from `p`.
    pub fn new(ld: &'a LoadedDiffusion, p: &'a SampleParams) -> Result<Self, StageError> {
        let sampler = match (p.sampler, ld.method) {
            (Sampler::Auto, Method::Dit) => Sampler::Ddpm,
            (Sampler::Auto, Method::Sit) => Sampler::Sde,
            (Sampler::Ddpm, Method::Sit) | (Sampler::Sde | Sampler::Ode, Method::Dit) => {
                return Err(StageError::input(format!(
                    "sampler: {:?} does not fit a {:?} model (ddpm: dit; sde, ode: sit)",
                    p.sampler, ld.method
                )))
            }
            (s, _) => s,
        };
        let ddpm = if sampler == Sampler::Ddpm {
            Some(
                GaussianDiffusion::linear(
                    ld.schedule.timesteps,
                    ld.schedule.beta_start,
                    ld.schedule.beta_end,
                )
                .respaced(p.steps)
                .map_err(|e| StageError::input(format!("steps: {e}")))?,
            )
        } else {
            None
        };
        Ok(Self {
            ld,
            p,
            sampler,
            ddpm,
        })
    }

    /// `b` latents (`[b, C, input_size]`, in the VAE's latent units: divided by the scale
    /// factor) for the conditions `cond` (rows for `b` samples), with the starting noise
    /// seeded by `seed`. `progress` gets the number of steps done.
    pub fn sample(
        &self,
        cond: &Cond,
        b: usize,
        guidance: &GuidanceParams,
        seed: u64,
        progress: impl FnMut(usize) -> Result<(), StageError>,
    ) -> Result<Tensor, StageError> {
        let ld = self.ld;
        let emb = ld.model.embed(cond, &[]).map_err(fail)?;
        let null = ld.model.null_embed(b as i64);
        let model_fn = |xt: &Tensor, t: &Tensor| -> Result<Tensor, StageError> {
            guided_output(&ld.model, xt, t, &emb, &null, guidance).map_err(fail)
        };
        self.sample_with(b, seed, model_fn, progress)
    }

    /// `b` latents drawn with the network output `model_fn(x_t, t)` (a guided output), the
    /// starting noise seeded by `seed`; divided by the scale factor.
    pub fn sample_with(
        &self,
        b: usize,
        seed: u64,
        model_fn: impl FnMut(&Tensor, &Tensor) -> Result<Tensor, StageError>,
        progress: impl FnMut(usize) -> Result<(), StageError>,
    ) -> Result<Tensor, StageError> {
        let (ld, p) = (self.ld, self.p);
        let cfg = ld.model.config();
        let dev = ld.vs.device();
        tch::manual_seed(seed as i64);
        let [x, y, z] = cfg.input_size;
        let init = Tensor::randn([b as i64, cfg.in_chans, x, y, z], (Kind::Float, dev));
        let latents = match self.sampler {
            Sampler::Ddpm => self.ddpm.as_ref().expect("ddpm").sample_loop(
                &init,
                p.ddpm_variance,
                model_fn,
                progress,
            )?,
            Sampler::Sde => transport::sample_sde(
                &init,
                p.steps,
                p.last_step_size,
                p.diffusion_norm,
                model_fn,
                progress,
            )?,
            Sampler::Ode => {
                transport::sample_ode(&init, p.steps, p.ode_method, model_fn, progress)?
            }
            Sampler::Auto => unreachable!("resolved in new"),
        };
        Ok(latents / ld.scale_factor)
    }
}

/// Decodes one latent `[1, C, x, y, z]` with the VAE (whole, or in overlapping tiles of
/// `tile` latent voxels when `tile > 0`) into a volume on the CPU with `affine`.
pub fn decode_to_volume(
    vae: &AutoencoderKlMaisi,
    z: &Tensor,
    tile: i64,
    affine: [[f64; 4]; 4],
) -> Result<Volume, StageError> {
    let f = vae.config().downsample_factor();
    let img = if tile == 0 {
        vae.decode(z).map_err(fail)?.to_device(Device::Cpu)
    } else {
        decode_tiled(
            vae,
            &z.to_device(Device::Cpu),
            &TileConfig {
                tile: [tile * f; 3],
                overlap: (tile / 4).max(1) * f,
                norm: TileNorm::PerTile,
            },
        )
        .map_err(fail)?
    };
    let img = img.to_kind(Kind::Float).squeeze().contiguous();
    let s: Vec<usize> = img.size().iter().map(|&v| v as usize).collect();
    VolumeOf::from_parts(
        Vec::<f32>::try_from(img.view([-1])).map_err(fail)?,
        [s[0], s[1], s[2]],
        affine,
    )
    .map_err(fail)
}

pub fn sample(_: &Sample, p: &SampleParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let dev = device(ctx);
    let model_dir = ctx.input("model")?.dir.clone();
    let vae_dir = ctx.input("vae")?.dir.clone();
    let ld = load_diffusion(&model_dir, WeightsChoice::of(p.snapshot, p.weights), dev)?;
    // What made these samples, carried by every item (synthesis_metrics and
    // synthesis_curve read it).
    let trained: serde_json::Value = read_json(&model_dir.join("config.json"))?;
    let training_step = p
        .snapshot
        .or_else(|| trained["training"]["steps"].as_u64())
        .unwrap_or(0);
    let trained_init = trained["training"]["init"].clone();
    let cfg = ld.model.config().clone();
    let bank = match ctx.inputs("factors").first() {
        Some(f) if cfg.condition == ConditionMode::Factors => ConditionBank::from_factors(&f.dir)?,
        Some(_) => {
            return Err(StageError::input(
                "the 'factors' input is only used by models conditioned on factors",
            ))
        }
        None => ConditionBank::load(&model_dir)?,
    };
    bank.check_fits(&cfg)?;
    let gen = LatentSampler::new(&ld, p)?;
    let sampler = gen.sampler;
    let n = p.num_samples;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
    let (c_rows, s_rows) = match cfg.condition {
        ConditionMode::None => (vec![0; n], vec![0; n]),
        _ => {
            let c = pick_rows(&bank, &p.content_from, n, &mut rng, "content_from")?;
            let s = if cfg.condition == ConditionMode::Factors {
                pick_rows(&bank, &p.style_from, n, &mut rng, "style_from")?
            } else {
                c.clone()
            };
            (c, s)
        }
    };
    let (vae_vs, vae) = super::vae::load_vae(&vae_dir, dev)?;
    let _ng = tch::no_grad_guard();
    let batches = n.div_ceil(p.batch_size);
    let bar = ctx.progress((batches * p.steps) as u64, "sampling steps");
    let vol_root = ctx.output_dir("samples")?;
    let mut records = Vec::new();
    let mut montage_rows = Vec::new();
    let [sx, sy, sz] = ld.image_spacing;
    let affine = [
        [sx, 0.0, 0.0, 0.0],
        [0.0, sy, 0.0, 0.0],
        [0.0, 0.0, sz, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let mut done_steps = 0u64;
    for (bi, chunk_start) in (0..n).step_by(p.batch_size).enumerate() {
        ctx.check_cancelled()?;
        let b = p.batch_size.min(n - chunk_start);
        let conds = bank.gather(
            cfg.condition,
            &c_rows[chunk_start..chunk_start + b],
            &s_rows[chunk_start..chunk_start + b],
            dev,
        );
        let cond = Cond::of(cfg.condition, &conds);
        let cancel = ctx.cancel_flag().clone();
        let progress = |k: usize| -> Result<(), StageError> {
            if cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            bar.set_position(done_steps + k.min(p.steps) as u64);
            Ok(())
        };
        let latents = gen.sample(
            &cond,
            b,
            &p.guidance,
            step_seed(p.seed, bi as u64),
            progress,
        )?;
        done_steps += p.steps as u64;
        for k in 0..b {
            let i = chunk_start + k;
            let zk = latents.narrow(0, k as i64, 1);
            let vol = decode_to_volume(&vae, &zk, p.decode_tile, affine)?;
            let s = vol.shape;
            let id = format!("sample_{i:03}");
            let (cs, ss) = (
                bank.subjects.get(c_rows[i]).cloned(),
                bank.subjects.get(s_rows[i]).cloned(),
            );
            let mut attrs = BTreeMap::new();
            attrs.insert("subject".into(), serde_json::json!(id));
            if cfg.condition != ConditionMode::None {
                attrs.insert("content_subject".into(), serde_json::json!(cs));
            }
            if cfg.condition == ConditionMode::Factors {
                attrs.insert("style_subject".into(), serde_json::json!(ss));
            }
            attrs.insert("method".into(), serde_json::json!(ld.method));
            attrs.insert("init".into(), trained_init.clone());
            attrs.insert("training_step".into(), serde_json::json!(training_step));
            let item_dir = ctx.emit_item("volumes", &id, attrs.clone())?;
            let extra: Attrs = attrs.clone().into_iter().collect();
            write_zarr(&item_dir.join(IMAGE_ZARR), &vol, &extra).map_err(fail)?;
            let nii = vol_root.join(format!("{id}.nii.gz"));
            write_nifti(&nii, &vol, NiftiDtype::Float32).map_err(fail)?;
            let (mn, mx) = vol
                .data
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            records.push(serde_json::json!({
                "id": id, "content_subject": cs, "style_subject": ss, "shape": s,
                "min": mn, "max": mx,
            }));
            if montage_rows.len() < p.montage {
                montage_rows.push(orthogonal_slices(&vol, &id, 0.0, 1.0));
            }
        }
    }
    bar.finish_and_clear();
    drop(vae_vs);
    if !montage_rows.is_empty() {
        montage(
            &vol_root.join("montage.png"),
            &format!(
                "{} samples ({}, {} steps, w_c {} w_s {})",
                ld.method.label(),
                sampler.label(),
                p.steps,
                p.guidance.content,
                p.guidance.style
            ),
            &montage_rows,
            160,
        )
        .map_err(fail)?;
    }
    write_json(
        &vol_root.join("samples.json"),
        &serde_json::json!({
            "samples": records, "sampler": sampler, "method": ld.method, "steps": p.steps,
            "guidance": p.guidance, "condition": cfg.condition, "scale_factor": ld.scale_factor,
            "weights": p.weights, "seed": p.seed, "latent_size": cfg.input_size,
            "init": trained_init, "training_step": training_step, "snapshot": p.snapshot,
        }),
    )?;
    ctx.set_metric("samples", n);
    Ok(())
}
