//! `classify_train` and `classify_eval`: the paper's CC-CCII task (method.md 5) on a
//! volume-level label of the latents (phantoms: lesion present or absent).
//!
//! UNETR's trunk (scratch or MeDUET-initialised encoder) with its decoder features
//! mean-pooled into a linear layer ([`UnetrHead::Classification`]). Training draws random
//! latent crops (seeded by step; flips and rotations), cross-entropy, AdamW with warmup +
//! cosine; optional style augmentation through a pretrained MeDUET ([`super::style_augment`]);
//! checkpoints resume exactly. Evaluation averages the class probabilities of
//! the sliding windows covering each volume and reports accuracy and macro one-vs-rest AUC
//! for the in-domain test subjects and for the unseen domains.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use meduet_engine::{Item, StageContext, StageError};
use meduet_stages::analysis::metrics::{accuracy, macro_auc};
use meduet_stages::data::array_store::read_array_f32;
use meduet_stages::kinds::segment::*;
use meduet_stages::kinds::vae::LATENT_ZARR;
use meduet_stages::sampling::{CropSampler, CropSource, Sampling};
use meduet_stages::segmentation::sliding::{pad_to_window, window_starts};
use meduet_stages::segmentation::splits::Splits;
use meduet_stages::segmentation::style_augment::AugmentedTask;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

use super::common::{
    batch_tensor, device, fail, load_frozen, read_json, trainable_parameters, write_json,
};
use super::segment::{
    by_id, domain_of, meduet_model_config, subject_splits, unetr_config, WEIGHTS,
};
use super::style_augment::{kl_consistency, StyleAugmenter};
use crate::models::unetr::{PosEmbedInit, Unetr, UnetrConfig, UnetrHead};
use crate::train::trainer::{self, Learner, Step, StepOutput, TrainingTask};

/// `config.json` of a classifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub unetr: UnetrConfig,
    /// Class names (`"false"`/`"true"` for a boolean attribute, else the integer values).
    pub classes: Vec<String>,
    pub label_attr: String,
    pub training: ClassifyTrainParams,
    pub trainable_parameters: i64,
}

/// A subject's latent and class.
struct Sample {
    id: String,
    domain: String,
    source: CropSource,
    class: usize,
}

/// The class value of a latent's attribute: bools as 0/1, non-negative integers as is.
fn class_value(
    id: &str,
    attrs: &serde_json::Map<String, serde_json::Value>,
    attr: &str,
) -> Result<i64, StageError> {
    match attrs.get(attr) {
        Some(serde_json::Value::Bool(b)) => Ok(*b as i64),
        Some(v) if v.as_i64().is_some_and(|x| x >= 0) => Ok(v.as_i64().expect("checked")),
        Some(v) => Err(StageError::input(format!("latent of '{id}': attribute '{attr}' is {v}, expected a bool or a non-negative integer"))),
        None => Err(StageError::input(format!(
            "latent of '{id}' has no attribute '{attr}' (phantoms carry 'has_lesion'; set label_attr)"
        ))),
    }
}

fn read_samples(
    items: &[Item],
    ids: &[String],
    attr: &str,
    values: &[i64],
) -> Result<Vec<Sample>, StageError> {
    let m = by_id(items);
    ids.iter()
        .map(|id| {
            let it = &m[id];
            let (d, s, attrs) =
                read_array_f32(&it.dir.join(LATENT_ZARR)).map_err(StageError::input)?;
            if s.len() != 4 {
                return Err(StageError::input(format!(
                    "latent of '{id}' has shape {s:?}, expected [C, X, Y, Z]"
                )));
            }
            let v = class_value(id, &attrs, attr)?;
            let class = values.iter().position(|&x| x == v).ok_or_else(|| {
                StageError::input(format!(
                    "'{id}': class value {v} was not seen among the training subjects ({values:?})"
                ))
            })?;
            Ok(Sample {
                id: id.clone(),
                domain: domain_of(it),
                source: CropSource {
                    id: id.clone(),
                    domain_id: 0,
                    shape: [s[0], s[1], s[2], s[3]],
                    data: Arc::new(d),
                },
                class,
            })
        })
        .collect()
}

pub fn train(
    _: &ClassifyTrain,
    p: &ClassifyTrainParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let training = p.training().map_err(StageError::input)?;
    let items = ctx.input("latents")?.items.clone();
    let meduet_dir = ctx.inputs("meduet").first().map(|m| m.dir.clone());
    if p.unetr.init == Init::Meduet && meduet_dir.is_none() {
        return Err(StageError::input(
            "unetr.init = \"meduet\" needs a 'meduet' input",
        ));
    }
    let splits = subject_splits(&items, &p.split, p.seed)?;
    let (values, classes) = class_values(&items, &p.label_attr)?;
    let train = read_samples(&items, &splits.train, &p.label_attr, &values)?;
    let in_ch = train[0].source.shape[0] as i64;
    let mcfg = match &meduet_dir {
        Some(d) if p.unetr.init == Init::Meduet => Some(meduet_model_config(d)?),
        _ => None,
    };
    let ucfg = unetr_config(
        &p.unetr,
        in_ch,
        values.len() as i64,
        UnetrHead::Classification,
        mcfg.as_ref(),
    )
    .map_err(StageError::input)?;
    tch::manual_seed(p.seed as i64);
    let mut vs = VarStore::new(dev);
    let net = Unetr::new(&vs.root(), &ucfg).map_err(StageError::input)?;
    if let (Some(d), Some(m)) = (&meduet_dir, &mcfg) {
        let pos = match p.unetr.pos_embed {
            PosEmbed::Skip => PosEmbedInit::Skip,
            PosEmbed::Interpolate => PosEmbedInit::Interpolate,
        };
        let t = net
            .load_meduet(&mut vs, &d.join("student.safetensors"), pos, m.grid())
            .map_err(StageError::input)?;
        tracing::info!(
            "classifier initialised from MeDUET: {} tensors",
            t.copied.len()
        );
    }
    let augmenter = StyleAugmenter::for_training(
        &p.style_augment,
        &p.split.label_fraction,
        AugmentedTask::Classification,
        meduet_dir.as_deref(),
        p.unetr.crop,
        in_ch,
        dev,
    )?;
    let crop = p.unetr.crop;
    let sampler = CropSampler::new(
        train.iter().map(|s| s.source.clone()).collect(),
        [crop; 3],
        meduet_stages::sampling::Augment {
            flip_p: p.augment.flip_p,
            rot90_p: p.augment.rot90_p,
        },
        Sampling::Shuffled,
        p.seed,
    )
    .map_err(StageError::input)?;
    let n_params = trainable_parameters(&vs);
    tracing::info!(
        "classifier on '{}' ({classes:?}): {} training subjects, {:.2} M parameters, {} steps of batch {}",
        p.label_attr,
        train.len(),
        n_params as f64 / 1e6,
        p.steps,
        p.batch_size
    );
    let mut task = ClassifyTask {
        p,
        dev,
        learner: Learner::new(&vs, &training),
        vs,
        net,
        sampler,
        labels: train.iter().map(|s| (s.id.clone(), s.class)).collect(),
        augmenter,
        splits: &splits,
        latent_items: by_id(&items),
    };
    let trained = trainer::run(ctx, &training, &mut task)?;
    let out = ctx.output_dir("model")?;
    task.vs.save(out.join(WEIGHTS)).map_err(fail)?;
    trainer::finish(
        &trained,
        &out,
        "classification loss (cross-entropy)",
        &["loss"],
    )?;
    write_json(&out.join("splits.json"), &splits)?;
    let cfg = ClassifierConfig {
        unetr: ucfg,
        classes,
        label_attr: p.label_attr.clone(),
        training: p.clone(),
        trainable_parameters: n_params,
    };
    write_json(
        &out.join("config.json"),
        &serde_json::json!({"classifier": cfg, "values": values}),
    )?;
    ctx.set_metric("trainable_parameters", n_params);
    Ok(())
}

/// The class values of attribute `attr` among all subjects (so evaluation knows them all),
/// sorted, and their display names.
fn class_values(items: &[Item], attr: &str) -> Result<(Vec<i64>, Vec<String>), StageError> {
    let mut values: Vec<i64> = Vec::new();
    let mut is_bool = true;
    for it in items {
        let (_, _, attrs) = read_array_f32(&it.dir.join(LATENT_ZARR)).map_err(StageError::input)?;
        is_bool &= matches!(attrs.get(attr), Some(serde_json::Value::Bool(_)));
        let v = class_value(&it.id, &attrs, attr)?;
        if !values.contains(&v) {
            values.push(v);
        }
    }
    values.sort_unstable();
    if is_bool {
        values = vec![0, 1];
    }
    if values.len() < 2 {
        return Err(StageError::input(format!(
            "attribute '{attr}' takes a single value ({values:?}): nothing to classify"
        )));
    }
    let classes = values
        .iter()
        .map(|&v| {
            if is_bool {
                (v == 1).to_string()
            } else {
                v.to_string()
            }
        })
        .collect();
    Ok((values, classes))
}

/// One classifier training run as the shared loop sees it.
struct ClassifyTask<'a> {
    p: &'a ClassifyTrainParams,
    dev: Device,
    vs: VarStore,
    net: Unetr,
    learner: Learner,
    sampler: CropSampler,
    /// Subject id -> class index.
    labels: BTreeMap<String, usize>,
    augmenter: Option<StyleAugmenter>,
    splits: &'a Splits,
    latent_items: BTreeMap<String, Item>,
}

impl TrainingTask for ClassifyTask<'_> {
    fn stores(&mut self) -> Vec<(&'static str, &mut VarStore)> {
        vec![(WEIGHTS, &mut self.vs)]
    }
    fn learners(&mut self) -> Vec<(&'static str, &mut Learner)> {
        vec![("optimizer", &mut self.learner)]
    }
    fn save_extra(&self, dir: &Path) -> Result<serde_json::Value, String> {
        StyleAugmenter::save_optional(&self.augmenter, dir)
    }
    fn load_extra(&mut self, dir: &Path, _state: &serde_json::Value) -> Result<(), StageError> {
        StyleAugmenter::load_optional(&mut self.augmenter, dir)
    }
    fn step(&mut self, s: &Step) -> Result<StepOutput, StageError> {
        let p = self.p;
        let b = self.sampler.batch(s.step, p.batch_size);
        let x = batch_tensor(&b.data, &b.shape).to_device(self.dev);
        let y: Vec<i64> = b.ids.iter().map(|id| self.labels[id] as i64).collect();
        let y = Tensor::from_slice(&y).to_device(self.dev);
        let amp = self.learner.autocast();
        let logits = tch::autocast(amp, || self.net.forward(&x)).to_kind(Kind::Float);
        let mut loss = logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0);
        let mut record = serde_json::Map::new();
        if let Some(a) = self.augmenter.as_mut() {
            a.refresh(s.step, self.splits, p.seed, &self.latent_items)?;
            if let Some(alpha) = a.settings.draw(p.seed, s.step) {
                let xa = a.augment(&x, alpha)?;
                let la = tch::autocast(amp, || self.net.forward(&xa)).to_kind(Kind::Float);
                let aug = la.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0);
                record.insert("style_alpha".into(), alpha.into());
                record.insert("aug_loss".into(), aug.double_value(&[]).into());
                loss = loss + aug * a.settings.weight;
                if a.settings.kl_weight > 0.0 {
                    let kl = kl_consistency(&logits, &la);
                    record.insert("kl".into(), kl.double_value(&[]).into());
                    loss = loss + kl * a.settings.kl_weight;
                }
            }
        }
        let (grad_norm, stepped) = self.learner.minimize(&loss, s)?;
        record.insert("loss".into(), loss.double_value(&[]).into());
        record.insert("grad_norm".into(), grad_norm.into());
        record.insert("stepped".into(), stepped.into());
        Ok(StepOutput { record, stepped })
    }
}

/// A `classifier` artifact loaded for inference.
pub struct Classifier {
    pub vs: VarStore,
    pub net: Unetr,
    pub config: ClassifierConfig,
    /// The attribute value of each class.
    pub values: Vec<i64>,
    pub splits: Splits,
}

/// Loads a `classifier` artifact onto `dev`.
pub fn load_classifier(dir: &Path, dev: Device) -> Result<Classifier, StageError> {
    let j: serde_json::Value = read_json(&dir.join("config.json"))?;
    let config: ClassifierConfig = serde_json::from_value(j["classifier"].clone()).map_err(fail)?;
    let values: Vec<i64> = serde_json::from_value(j["values"].clone()).map_err(fail)?;
    let splits: Splits = read_json(&dir.join("splits.json"))?;
    let mut vs = VarStore::new(dev);
    let net = Unetr::new(&vs.root(), &config.unetr).map_err(StageError::input)?;
    load_frozen(&mut vs, &dir.join(WEIGHTS))?;
    Ok(Classifier {
        vs,
        net,
        config,
        values,
        splits,
    })
}

/// Mean class probabilities over the windows covering a latent.
pub fn classify_volume(
    net: &Unetr,
    s: &CropSource,
    roi: i64,
    overlap: f64,
    batch: usize,
    dev: Device,
) -> Result<Vec<f64>, StageError> {
    let _ng = tch::no_grad_guard();
    let sh = s.shape;
    let x = Tensor::from_slice(&s.data)
        .view(sh.map(|v| v as i64))
        .unsqueeze(0)
        .to_device(dev);
    let shape = [sh[1], sh[2], sh[3]];
    let r = [roi as usize; 3];
    let pad = pad_to_window(shape, r);
    let x = x.constant_pad_nd([
        pad[2].0 as i64,
        pad[2].1 as i64,
        pad[1].0 as i64,
        pad[1].1 as i64,
        pad[0].0 as i64,
        pad[0].1 as i64,
    ]);
    let ps: [usize; 3] = std::array::from_fn(|a| shape[a] + pad[a].0 + pad[a].1);
    let starts = window_starts(ps, r, overlap);
    let mut sum: Option<Tensor> = None;
    for chunk in starts.chunks(batch.max(1)) {
        let crops: Vec<Tensor> = chunk
            .iter()
            .map(|o| {
                x.narrow(2, o[0] as i64, roi)
                    .narrow(3, o[1] as i64, roi)
                    .narrow(4, o[2] as i64, roi)
            })
            .collect();
        let p = net
            .forward(&Tensor::cat(&crops, 0))
            .to_kind(Kind::Float)
            .softmax(1, Kind::Float)
            .sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        sum = Some(match sum {
            Some(s) => s + p,
            None => p,
        });
    }
    let mean = sum.ok_or_else(|| fail("no windows"))? / starts.len() as f64;
    Vec::<f64>::try_from(mean.to_kind(Kind::Double).to_device(Device::Cpu)).map_err(fail)
}

pub fn eval(
    _: &ClassifyEval,
    p: &ClassifyEvalParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let dir = ctx.input("model")?.dir.clone();
    let Classifier {
        vs: _vs,
        net,
        config: cfg,
        values,
        splits,
    } = load_classifier(&dir, dev)?;
    let items = ctx.input("latents")?.items.clone();
    let k = values.len();
    let mut report = serde_json::Map::new();
    let mut csv = String::from("subject,domain,set,truth,prediction");
    for c in &cfg.classes {
        csv.push_str(&format!(",p_{c}"));
    }
    csv.push('\n');
    for (set, name, ids) in [
        ("test", "in_domain", &splits.test),
        ("heldout", "unseen_domain", &splits.heldout),
    ] {
        let samples = read_samples(&items, ids, &cfg.label_attr, &values)?;
        let mut probs = Vec::new();
        let mut truth = Vec::new();
        let mut pred = Vec::new();
        for s in &samples {
            ctx.check_cancelled()?;
            let pr = classify_volume(
                &net,
                &s.source,
                cfg.unetr.img_size,
                p.overlap,
                p.sw_batch,
                dev,
            )?;
            let arg = (0..k)
                .max_by(|&a, &b| pr[a].total_cmp(&pr[b]))
                .expect("classes");
            csv.push_str(&format!(
                "{},{},{set},{},{}",
                s.id, s.domain, cfg.classes[s.class], cfg.classes[arg]
            ));
            for v in &pr {
                csv.push_str(&format!(",{v:.6}"));
            }
            csv.push('\n');
            probs.push(pr);
            truth.push(s.class);
            pred.push(arg);
        }
        let acc = accuracy(&pred, &truth);
        let auc = macro_auc(&probs, &truth, k);
        let num = |x: f64| {
            if x.is_finite() {
                serde_json::json!(x)
            } else {
                serde_json::Value::Null
            }
        };
        report.insert(name.into(), serde_json::json!({"cases": samples.len(), "accuracy": num(acc), "macro_auc": num(auc)}));
        ctx.set_metric(&format!("accuracy_{name}"), num(acc));
        ctx.set_metric(&format!("auc_{name}"), num(auc));
    }
    let out = ctx.output_dir("report")?;
    report.insert("label_attr".into(), cfg.label_attr.clone().into());
    report.insert("classes".into(), serde_json::json!(cfg.classes));
    report.insert(
        "label_fraction".into(),
        splits.label_fraction.clone().into(),
    );
    write_json(&out.join("classification.json"), &report)?;
    std::fs::write(out.join("per_case.csv"), csv)
        .map_err(|e| StageError::io(&out.join("per_case.csv"), e))?;
    Ok(())
}
