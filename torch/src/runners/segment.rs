//! `segment_train` and `segment_eval` (declared in `meduet_stages::kinds::segment`).
//!
//! Training: the splits of the subjects are made and recorded, the labelled training
//! subjects are read (image and label for the U-Net; latent and label for UNETR), crops
//! are drawn per step with foreground oversampling and augmentation (seeded by step), the
//! network's logits on the label grid are scored with DiceCE (deep supervision for the
//! U-Net: one term per decoder resolution, nnU-Net's weights), and AdamW or SGD takes a
//! step under the warmup + cosine or poly schedule (fp16 autocast with loss scaling only
//! on CUDA). Every `val_every` steps the validation subjects are segmented whole (sliding
//! window) and their mean foreground Dice logged. Checkpoints (weights, optimiser,
//! loss scale) make a killed run resume with the same losses.
//!
//! Evaluation: sliding-window inference on whole volumes (Gaussian blending, batched
//! windows), argmax, per-class Dice and HD95 against the reference, for the in-domain
//! test subjects and the subjects of unseen domains, written as nnU-Net's `summary.json`
//! plus NIfTI predictions on the input volume's grid and affine; with the `originals`
//! input, also mapped back to each original scan's grid and scored against its label.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use meduet_engine::{Item, StageContext, StageError};
use meduet_stages::data::array_store::read_array_f32;
use meduet_stages::data::nifti_io::{read_nifti_labels, write_nifti_labels};
use meduet_stages::data::resample::map_onto_grid;
use meduet_stages::data::volume::{LabelVolume, Volume};
use meduet_stages::data::zarr_store::read_zarr;
use meduet_stages::kinds::resample::{IMAGE_ZARR, LABEL_ZARR};
use meduet_stages::kinds::segment::*;
use meduet_stages::kinds::subject::SubjectRecord;
use meduet_stages::kinds::vae::{LATENT_ZARR, VAE_CONFIG, VAE_WEIGHTS};
use meduet_stages::plot::{line_plot, Series};
use meduet_stages::sampling::CropSource;
use meduet_stages::segmentation::metrics::{per_class, ClassMetrics};
use meduet_stages::segmentation::planner::{median_shape, plan_unet, UnetPlan};
use meduet_stages::segmentation::sampler::{SegSampler, SegSource};
use meduet_stages::segmentation::splits::{make_splits, SplitConfig, Splits};
use meduet_stages::segmentation::style_augment::AugmentedTask;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::common::{
    batch_tensor, device, fail, load_frozen, read_json, trainable_parameters, write_json,
};
use super::style_augment::{kl_consistency, StyleAugmenter};
use crate::inference::{sliding_window, SlidingWindow};
use crate::models::meduet::Config as MeduetConfig;
use crate::models::unet::{Unet, UnetConfig};
use crate::models::unetr::{default_skips, PosEmbedInit, Unetr, UnetrConfig, UnetrHead};
use crate::models::vae::{AutoencoderKlMaisi, Config as VaeConfig};
use crate::train::log::JsonlLog;
use crate::train::seg_loss::{deep_supervision_weights, dice_ce, downsample_labels};
use crate::train::trainer::{self, Learner, Step, StepOutput, TrainingTask};

/// Weights file of a `segmenter` / `classifier`.
pub const WEIGHTS: &str = "weights.safetensors";

/// `config.json` of a segmenter: everything needed to rebuild and apply the network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmenterConfig {
    pub network: Network,
    /// Label value of each foreground class (class `c` = `labels[c - 1]`).
    pub labels: Vec<u8>,
    /// Label voxels per input voxel (UNETR on latents: 4; U-Net: 1).
    pub scale: i64,
    /// Training crop / inference window on the input grid.
    pub roi: [i64; 3],
    pub unetr: Option<UnetrConfig>,
    pub unet: Option<UnetConfig>,
    pub plan: Option<UnetPlan>,
    /// The VAE decoder head (`unetr.output = "vae_decoder"`).
    pub vae_decoder: Option<VaeConfig>,
    pub training: SegmentTrainParams,
    pub trainable_parameters: i64,
}

/// The network of a segmenter.
pub enum Net {
    Unetr {
        net: Unetr,
        decoder: Option<AutoencoderKlMaisi>,
        scale: i64,
    },
    Unet(Unet),
}

impl Net {
    /// Builds the network of `cfg` under `vs`.
    pub fn build(vs: &tch::nn::Path, cfg: &SegmenterConfig) -> Result<Self, String> {
        match cfg.network {
            Network::Unetr => {
                let u = cfg
                    .unetr
                    .as_ref()
                    .ok_or("config: network unetr without 'unetr'")?;
                let net = Unetr::new(vs, u)?;
                let decoder = match &cfg.vae_decoder {
                    Some(v) => Some(
                        AutoencoderKlMaisi::new(vs / "vae_decoder", v)
                            .map_err(|e| e.to_string())?,
                    ),
                    None => None,
                };
                Ok(Net::Unetr {
                    net,
                    decoder,
                    scale: cfg.scale,
                })
            }
            Network::Unet => Ok(Net::Unet(Unet::new(
                vs,
                cfg.unet
                    .as_ref()
                    .ok_or("config: network unet without 'unet'")?,
            )?)),
        }
    }

    /// Training outputs: logits on the label grid first, then deep-supervision logits.
    ///
    /// # Shapes
    /// `x`: `[b, C, roi]` -> `[b, K, roi * scale]`, ...
    pub fn outputs(&self, x: &Tensor) -> Result<Vec<Tensor>, String> {
        match self {
            Net::Unet(u) => Ok(u.forward(x)),
            Net::Unetr {
                net,
                decoder,
                scale,
            } => {
                let y = net.forward(x);
                match decoder {
                    Some(d) => Ok(vec![d.decode(&y).map_err(|e| e.to_string())?]),
                    None => {
                        let s = x.size();
                        Ok(vec![y.upsample_trilinear3d(
                            [s[2] * scale, s[3] * scale, s[4] * scale],
                            false,
                            None,
                            None,
                            None,
                        )])
                    }
                }
            }
        }
    }

    /// Full-resolution logits.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor, String> {
        Ok(self.outputs(x)?.swap_remove(0))
    }
}

/// One subject's arrays.
pub struct Case {
    pub id: String,
    pub domain: String,
    pub image: Volume,
    /// Class indices `0..=K` on the image grid.
    pub classes: Vec<u8>,
    /// `[C, X, Y, Z]` latent (UNETR).
    pub latent: Option<(Arc<Vec<f32>>, [usize; 4])>,
}

impl Case {
    /// The network input `[1, C, ...]` on `dev`.
    pub fn input(&self, dev: Device) -> Tensor {
        match &self.latent {
            Some((d, s)) => {
                Tensor::from_slice(d).view([1, s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64])
            }
            None => {
                let s = self.image.shape.map(|n| n as i64);
                Tensor::from_slice(&self.image.data).view([1, 1, s[0], s[1], s[2]])
            }
        }
        .to_device(dev)
    }
}

/// The subject's domain name (item attribute `domain`, else `domain_id`).
pub fn domain_of(it: &Item) -> String {
    it.attr_str("domain")
        .map(str::to_string)
        .or_else(|| it.attr_i64("domain_id").map(|d| format!("domain_{d}")))
        .unwrap_or_else(|| "unknown".into())
}

/// Reads a subject: image, label (mapped through `lut`), latent when `latents` has it.
pub fn read_case(
    it: &Item,
    latents: Option<&BTreeMap<String, Item>>,
    lut: &[u8; 256],
) -> Result<Case, StageError> {
    let (image, _) = read_zarr::<f32>(&it.dir.join(IMAGE_ZARR)).map_err(StageError::input)?;
    let lp = it.dir.join(LABEL_ZARR);
    if !lp.join("zarr.json").is_file() {
        return Err(StageError::input(format!(
            "subject '{}' has no label ({}): segmentation needs labelled volumes",
            it.id,
            lp.display()
        )));
    }
    let (label, _) = read_zarr::<u8>(&lp).map_err(StageError::input)?;
    if label.shape != image.shape {
        return Err(StageError::input(format!(
            "subject '{}': label shape {:?} differs from image {:?}",
            it.id, label.shape, image.shape
        )));
    }
    let off = (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (label.affine[r][c] - image.affine[r][c]).abs())
        .fold(0.0f64, f64::max);
    if off > 1e-4 {
        return Err(StageError::input(format!(
            "subject '{}': the label's affine {:?} differs from the image's {:?} (the mask must \
             lie on the image grid)",
            it.id, label.affine, image.affine
        )));
    }
    let latent = match latents {
        None => None,
        Some(m) => {
            let li = m.get(&it.id).ok_or_else(|| {
                StageError::input(format!("subject '{}' has volumes but no latent (the latents must encode the same volumes)", it.id))
            })?;
            let (d, s, _) = read_array_f32(&li.dir.join(LATENT_ZARR)).map_err(StageError::input)?;
            if s.len() != 4 {
                return Err(StageError::input(format!(
                    "latent of '{}' has shape {s:?}, expected [C, X, Y, Z]",
                    it.id
                )));
            }
            Some((Arc::new(d), [s[0], s[1], s[2], s[3]]))
        }
    };
    Ok(Case {
        id: it.id.clone(),
        domain: domain_of(it),
        classes: label.data.iter().map(|&v| lut[v as usize]).collect(),
        image,
        latent,
    })
}

/// Label value -> class index (0 for values not segmented).
pub fn label_lut(labels: &[u8]) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (c, &v) in labels.iter().enumerate() {
        lut[v as usize] = c as u8 + 1;
    }
    lut
}

/// The integer label-grid scale of a case's latent, checked.
pub fn latent_scale(c: &Case) -> Result<i64, StageError> {
    let (_, s) = c.latent.as_ref().expect("latent");
    let sc: Vec<usize> = (0..3).map(|a| c.image.shape[a] / s[a + 1].max(1)).collect();
    if (0..3).any(|a| s[a + 1] * sc[a] != c.image.shape[a])
        || sc[0] != sc[1]
        || sc[1] != sc[2]
        || sc[0] == 0
    {
        return Err(StageError::input(format!(
            "'{}': latent grid {:?} is not the image grid {:?} divided by one integer factor",
            c.id,
            &s[1..],
            c.image.shape
        )));
    }
    Ok(sc[0] as i64)
}

/// Sliding-window class map of a case: class indices on the image grid.
pub fn segment_case(
    net: &Net,
    case: &Case,
    sw: &SlidingWindow,
    dev: Device,
) -> Result<(Vec<u8>, usize), StageError> {
    let _ng = tch::no_grad_guard();
    let x = case.input(dev);
    let (prob, windows) = sliding_window(&x, sw, &mut |b| net.predict(b)).map_err(fail)?;
    let idx = prob
        .argmax(1, false)
        .squeeze_dim(0)
        .to_kind(Kind::Uint8)
        .to_device(Device::Cpu)
        .contiguous();
    let v = Vec::<u8>::try_from(idx.view([-1])).map_err(fail)?;
    if v.len() != case.classes.len() {
        return Err(fail(format!(
            "'{}': prediction has {} voxels, the label {}",
            case.id,
            v.len(),
            case.classes.len()
        )));
    }
    Ok((v, windows))
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// Mean foreground Dice of cases (classes undefined in a case are left out).
fn mean_dice(metrics: &[Vec<ClassMetrics>]) -> Option<f64> {
    mean(metrics.iter().flat_map(|m| m.iter().filter_map(|c| c.dice)))
}

/// Items by id.
pub fn by_id(items: &[Item]) -> BTreeMap<String, Item> {
    items.iter().map(|i| (i.id.clone(), i.clone())).collect()
}

/// The UNETR sizes: from the MeDUET checkpoint (`meduet` init) or the preset.
pub fn unetr_config(
    p: &UnetrParams,
    in_channels: i64,
    out_channels: i64,
    head: UnetrHead,
    meduet: Option<&MeduetConfig>,
) -> Result<UnetrConfig, String> {
    let m = match meduet {
        Some(m) => m.clone(),
        None => p.preset.config(),
    };
    if m.in_chans != in_channels {
        return Err(format!(
            "the latents have {in_channels} channels, the MeDUET encoder expects {}",
            m.in_chans
        ));
    }
    let skips = if p.skips.is_empty() {
        default_skips(m.depth)
    } else {
        [p.skips[0], p.skips[1], p.skips[2]]
    };
    let cfg = UnetrConfig {
        in_channels,
        out_channels,
        img_size: p.crop as i64,
        patch: m.patch,
        hidden_size: m.embed_dim,
        mlp_dim: (m.embed_dim as f64 * m.mlp_ratio) as i64,
        num_layers: m.depth,
        num_heads: m.num_heads,
        feature_size: p.feature_size,
        qkv_bias: true,
        skips,
        head,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Reads a MeDUET artifact's model config.
pub fn meduet_model_config(dir: &Path) -> Result<MeduetConfig, StageError> {
    let j: serde_json::Value = read_json(&dir.join("config.json"))?;
    serde_json::from_value(j["model"].clone()).map_err(|e| {
        StageError::input(format!(
            "'{}': model config: {e}",
            dir.join("config.json").display()
        ))
    })
}

/// Copies a VAE's decoder (all but its last convolution) into the segmenter's
/// `vae_decoder.*` variables and freezes the unused encoder half.
fn load_vae_decoder(vs: &mut VarStore, vae_dir: &Path) -> Result<usize, StageError> {
    let path = vae_dir.join(VAE_WEIGHTS);
    let src: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .map_err(|e| StageError::input(format!("'{}': {e}", path.display())))?
        .into_iter()
        .collect();
    let mut n = 0;
    let mut vars = vs.variables();
    tch::no_grad(|| {
        for (name, v) in vars.iter_mut() {
            let Some(rest) = name.strip_prefix("vae_decoder.") else {
                continue;
            };
            if rest.starts_with("encoder.") || rest.starts_with("quant_conv") {
                let _ = v.set_requires_grad(false);
                continue;
            }
            if let Some(t) = src.get(rest) {
                if t.size() == v.size() {
                    v.copy_(&t.to_kind(v.kind()));
                    n += 1;
                }
            }
        }
    });
    Ok(n)
}

pub fn train(
    _: &SegmentTrain,
    p: &SegmentTrainParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let training = p.training().map_err(StageError::input)?;
    let vol_items = ctx.input("volumes")?.items.clone();
    let latents = ctx.inputs("latents").first().map(|l| by_id(&l.items));
    let meduet_dir = ctx.inputs("meduet").first().map(|m| m.dir.clone());
    let vae_dir = ctx.inputs("vae").first().map(|m| m.dir.clone());
    check_inputs(
        p,
        latents.is_some(),
        meduet_dir.is_some(),
        vae_dir.is_some(),
    )?;
    let splits = subject_splits(&vol_items, &p.split, p.seed)?;
    tracing::info!(
        "splits ({}): {} labelled training, {} unlabelled, {} validation, {} test subjects; {} held out from {:?}",
        splits.label_fraction,
        splits.train.len(),
        splits.unlabelled.len(),
        splits.val.len(),
        splits.test.len(),
        splits.heldout.len(),
        splits.heldout_domains
    );
    let items = by_id(&vol_items);
    let labels = segmented_labels(p, &splits, &items)?;
    let lut = label_lut(&labels);
    let k = labels.len() as i64 + 1;
    let lat = if p.network == Network::Unetr {
        latents.as_ref()
    } else {
        None
    };
    let read = |ids: &[String]| -> Result<Vec<Case>, StageError> {
        ids.iter()
            .map(|id| read_case(&items[id], lat, &lut))
            .collect()
    };
    let mut train_cases = if p.synthetic.with_real {
        read(&splits.train)?
    } else {
        Vec::new()
    };
    let synthetic = synthetic_cases(p, ctx, &splits, &lut)?;
    let synthetic_ids: Vec<String> = synthetic.iter().map(|c| c.id.clone()).collect();
    train_cases.extend(synthetic);
    if train_cases.is_empty() {
        return Err(StageError::input(
            "synthetic: with_real = false and no synthetic pair is left: nothing to train on",
        ));
    }
    let val_cases = read(&splits.val)?;
    let layout = match p.network {
        Network::Unetr => unetr_layout(
            p,
            &train_cases,
            k,
            meduet_dir.as_deref(),
            vae_dir.as_deref(),
        )?,
        Network::Unet => unet_layout(p, &train_cases, &vol_items, &splits, k)?,
    };
    tch::manual_seed(p.seed as i64);
    let mut vs = VarStore::new(dev);
    let mut config = SegmenterConfig {
        network: p.network,
        labels: labels.clone(),
        scale: layout.scale,
        roi: layout.roi,
        unetr: layout.unetr,
        unet: layout.unet,
        plan: layout.plan,
        vae_decoder: layout.vae_decoder,
        training: p.clone(),
        trainable_parameters: 0,
    };
    let net = Net::build(&vs.root(), &config).map_err(StageError::input)?;
    let transfer = initialise(
        p,
        &net,
        &mut vs,
        &config,
        meduet_dir.as_deref(),
        vae_dir.as_deref(),
        k,
    )?;
    let augmenter = StyleAugmenter::for_training(
        &p.style_augment,
        &p.split.label_fraction,
        AugmentedTask::Segmentation,
        meduet_dir.as_deref(),
        p.unetr.crop,
        train_cases[0].latent.as_ref().map_or(0, |l| l.1[0] as i64),
        dev,
    )?;
    let n_params = trainable_parameters(&vs);
    config.trainable_parameters = n_params;
    let crop = layout.roi.map(|v| v as usize);
    let sampler = SegSampler::new(layout.sources, crop, p.fg_fraction(), p.augment, p.seed)
        .map_err(StageError::input)?;
    tracing::info!(
        "{:?}: {} classes (labels {:?}), {:.2} M trainable parameters, crops {:?} (x{} to the label grid), {} steps of batch {} with {:?} lr {} ({:?}) on {dev:?}",
        p.network,
        k - 1,
        labels,
        n_params as f64 / 1e6,
        crop,
        layout.scale,
        p.steps,
        p.batch_size,
        training.optim.kind,
        training.optim.lr,
        training.schedule.kind
    );
    let ds_weights = match &net {
        Net::Unet(u) => deep_supervision_weights(u.config().deep_supervision + 1),
        _ => vec![1.0],
    };
    let scratch = ctx.scratch_dir()?;
    let mut task = SegmentTask {
        p,
        dev,
        learner: Learner::new(&vs, &training),
        vs,
        net,
        sampler,
        ds_weights,
        augmenter,
        splits: &splits,
        latents: latents.as_ref(),
        val_cases,
        window: SlidingWindow {
            roi: layout.roi,
            overlap: 0.5,
            batch: 4,
            scale: layout.scale,
            sigma_scale: 0.125,
        },
        classes: (k - 1) as u8,
        val_log: None,
        val_path: scratch.join("val_dice.jsonl"),
        last_loss: f64::NAN,
    };
    let t0 = Instant::now();
    let trained = trainer::run(ctx, &training, &mut task)?;
    write_segmenter(ctx, &task, &trained, &splits, &config, &transfer)?;
    if ctx.inputs("synthetic").first().is_some() {
        let out = ctx.output_dir("model")?;
        write_json(
            &out.join("synthetic.json"),
            &serde_json::json!({ "used": synthetic_ids, "with_real": p.synthetic.with_real }),
        )?;
        ctx.set_metric("synthetic_pairs", synthetic_ids.len());
    }
    ctx.set_metric("train_seconds", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Writes the trained segmenter (weights, loss and validation curves, splits, config) and
/// its metrics.
fn write_segmenter(
    ctx: &mut StageContext,
    task: &SegmentTask,
    trained: &trainer::Trained,
    splits: &Splits,
    config: &SegmenterConfig,
    transfer: &Option<crate::models::unetr::Transfer>,
) -> Result<(), StageError> {
    let out = ctx.output_dir("model")?;
    task.vs.save(out.join(WEIGHTS)).map_err(fail)?;
    trainer::finish(
        trained,
        &out,
        "segmentation training loss (DiceCE)",
        &["loss", "dice_loss", "ce"],
    )?;
    std::fs::copy(&task.val_path, out.join("val_dice.jsonl"))
        .map_err(|e| StageError::io(&task.val_path, e))?;
    write_json(&out.join("splits.json"), splits)?;
    let mut cj = serde_json::to_value(config).expect("json");
    cj["meduet_transfer"] = serde_json::to_value(transfer).expect("json");
    write_json(&out.join("config.json"), &cj)?;
    let vpts = plot_validation(&out)?;
    let losses = crate::train::log::read_column(&out.join("losses.jsonl"), "loss");
    if let (Some(a), Some(b)) = (losses.first(), losses.last()) {
        ctx.set_metric("loss_first", a.1);
        ctx.set_metric("loss_last", b.1);
    }
    if let Some(v) = vpts.last() {
        ctx.set_metric("val_dice_last", v.1);
    }
    ctx.set_metric("train_subjects", splits.train.len());
    ctx.set_metric("trainable_parameters", config.trainable_parameters);
    Ok(())
}

/// The splits of the subjects of `items` (by their domains), for segmentation and
/// classification.
pub fn subject_splits(
    items: &[Item],
    split: &SplitParams,
    seed: u64,
) -> Result<Splits, StageError> {
    let subjects: Vec<(String, String)> =
        items.iter().map(|i| (i.id.clone(), domain_of(i))).collect();
    make_splits(
        &subjects,
        &SplitConfig {
            train_domains: split.train_domains.clone(),
            test_fraction: split.test_fraction,
            val_fraction: split.val_fraction,
            split_seed: split.split_seed,
            label_fraction: split.label_fraction.clone(),
            seed,
        },
    )
    .map_err(StageError::input)
}

/// The synthetic image + label pairs that join training (the `synthetic` input): those
/// made from the masks of labelled training subjects (pairs from a validation, test,
/// held-out or unlabelled subject's mask are left out), `p.synthetic`'s count of them in a
/// draw seeded by `p.seed`.
fn synthetic_cases(
    p: &SegmentTrainParams,
    ctx: &StageContext,
    splits: &Splits,
    lut: &[u8; 256],
) -> Result<Vec<Case>, StageError> {
    let Some(input) = ctx.inputs("synthetic").first() else {
        if !p.synthetic.is_default() {
            return Err(StageError::input(
                "synthetic: set, but no 'synthetic' input is connected (a controlnet_sample's volumes)",
            ));
        }
        return Ok(Vec::new());
    };
    if p.network != Network::Unet {
        return Err(StageError::input(
            "synthetic: synthetic pairs are images; they train network = \"unet\" (UNETR reads latents)",
        ));
    }
    let train: std::collections::BTreeSet<&String> = splits.train.iter().collect();
    let (mut eligible, mut left_out) = (Vec::new(), Vec::new());
    for it in &input.items {
        match it.attr_str("mask_subject") {
            Some(m) if !train.contains(&m.to_string()) => left_out.push(it.id.clone()),
            _ => eligible.push(it),
        }
    }
    if !left_out.is_empty() {
        tracing::warn!(
            "synthetic: {} pair(s) made from masks of subjects outside this model's labelled training set are left out (first: {})",
            left_out.len(),
            left_out[0]
        );
    }
    let n = p.synthetic.how_many(eligible.len(), splits.train.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed ^ 0x5_1A7E);
    eligible.shuffle(&mut rng);
    let mut chosen: Vec<&Item> = eligible.into_iter().take(n).collect();
    chosen.sort_by(|a, b| a.id.cmp(&b.id));
    tracing::info!(
        "synthetic: {n} pair(s) join {} labelled real subject(s)",
        if p.synthetic.with_real {
            splits.train.len()
        } else {
            0
        }
    );
    chosen.iter().map(|it| read_case(it, None, lut)).collect()
}

/// Refuses a network setting whose input is not connected.
fn check_inputs(
    p: &SegmentTrainParams,
    latents: bool,
    meduet: bool,
    vae: bool,
) -> Result<(), StageError> {
    if p.network != Network::Unetr {
        return Ok(());
    }
    if !latents {
        return Err(StageError::input("network \"unetr\" works on latents: connect a 'latents' input (vae_encode of the same volumes)"));
    }
    if p.unetr.init == Init::Meduet && !meduet {
        return Err(StageError::input(
            "unetr.init = \"meduet\" needs a 'meduet' input (a pretrain stage's model)",
        ));
    }
    if p.unetr.output == UnetrOutput::VaeDecoder && !vae {
        return Err(StageError::input(
            "unetr.output = \"vae_decoder\" needs a 'vae' input (the VAE of the latents)",
        ));
    }
    Ok(())
}

/// The label values segmented, in class order: the listed ones, or every value in the
/// training labels.
fn segmented_labels(
    p: &SegmentTrainParams,
    splits: &Splits,
    items: &BTreeMap<String, Item>,
) -> Result<Vec<u8>, StageError> {
    label_values(&p.labels, &splits.train, items)
}

/// `explicit` label values, or (when empty) every non-zero value in the labels of the
/// subjects `ids`; an error when there is no foreground.
pub fn label_values(
    explicit: &[u8],
    ids: &[String],
    items: &BTreeMap<String, Item>,
) -> Result<Vec<u8>, StageError> {
    let labels: Vec<u8> = if explicit.is_empty() {
        let mut seen = [false; 256];
        for id in ids {
            let (l, _) =
                read_zarr::<u8>(&items[id].dir.join(LABEL_ZARR)).map_err(StageError::input)?;
            l.data.iter().for_each(|&v| seen[v as usize] = true);
        }
        (1..=255u8).filter(|&v| seen[v as usize]).collect()
    } else {
        explicit.to_vec()
    };
    if labels.is_empty() {
        return Err(StageError::input(
            "the training labels have no foreground: nothing to segment",
        ));
    }
    Ok(labels)
}

/// The network's configuration, its input grid and the training crops' sources.
struct Layout {
    unetr: Option<UnetrConfig>,
    unet: Option<UnetConfig>,
    plan: Option<UnetPlan>,
    vae_decoder: Option<VaeConfig>,
    /// Label voxels per input voxel.
    scale: i64,
    /// Training crop / inference window on the input grid.
    roi: [i64; 3],
    sources: Vec<SegSource>,
}

/// UNETR on the latents (optionally with the VAE decoder as its output head).
fn unetr_layout(
    p: &SegmentTrainParams,
    train_cases: &[Case],
    k: i64,
    meduet_dir: Option<&Path>,
    vae_dir: Option<&Path>,
) -> Result<Layout, StageError> {
    let c0 = &train_cases[0];
    let scale = latent_scale(c0)?;
    let in_ch = c0.latent.as_ref().expect("latent").1[0] as i64;
    let mcfg = match (p.unetr.init, meduet_dir) {
        (Init::Meduet, Some(d)) => Some(meduet_model_config(d)?),
        _ => None,
    };
    let vae_decoder = match (p.unetr.output, vae_dir) {
        (UnetrOutput::VaeDecoder, Some(d)) => {
            let mut v: VaeConfig = read_json(&d.join(VAE_CONFIG))?;
            if v.downsample_factor() != scale {
                return Err(StageError::input(format!(
                    "the VAE downsamples by {}, the latents are {scale}x coarser than the labels",
                    v.downsample_factor()
                )));
            }
            v.out_channels = k;
            Some(v)
        }
        _ => None,
    };
    let out = if vae_decoder.is_some() { in_ch } else { k };
    let unetr = unetr_config(&p.unetr, in_ch, out, UnetrHead::Segmentation, mcfg.as_ref())
        .map_err(StageError::input)?;
    let sources = latent_seg_sources(train_cases, scale)?;
    Ok(Layout {
        unetr: Some(unetr),
        unet: None,
        plan: None,
        vae_decoder,
        scale,
        roi: [p.unetr.crop as i64; 3],
        sources,
    })
}

/// Training-crop sources of cases read with their latents: each latent paired with its
/// class map, which must be `scale` times finer on every axis.
pub fn latent_seg_sources(cases: &[Case], scale: i64) -> Result<Vec<SegSource>, StageError> {
    cases
        .iter()
        .map(|c| {
            let (d, s) = c.latent.clone().ok_or_else(|| {
                StageError::input(format!("'{}' has no latent (connect 'latents')", c.id))
            })?;
            if latent_scale(c)? != scale {
                return Err(StageError::input(format!(
                    "'{}': its latent grid is not {scale}x coarser than its label, as the others'",
                    c.id
                )));
            }
            SegSource::new(
                CropSource {
                    id: c.id.clone(),
                    domain_id: 0,
                    shape: s,
                    data: d,
                },
                c.classes.clone(),
                c.image.shape,
                scale as usize,
            )
            .map_err(StageError::input)
        })
        .collect()
}

/// The nnU-Net-style U-Net on the image grid, planned from the training domains' volumes.
fn unet_layout(
    p: &SegmentTrainParams,
    train_cases: &[Case],
    vol_items: &[Item],
    splits: &Splits,
    k: i64,
) -> Result<Layout, StageError> {
    // Every subject's shape, not only the labelled.
    let shapes: Vec<[usize; 3]> = vol_items
        .iter()
        .filter(|i| !splits.heldout.contains(&i.id))
        .map(|i| read_zarr::<u8>(&i.dir.join(LABEL_ZARR)).map(|(l, _)| l.shape))
        .collect::<Result<_, _>>()
        .map_err(StageError::input)?;
    let med = median_shape(&shapes).expect("subjects");
    let spacing = train_cases[0].image.spacing();
    let mut pl = plan_unet(med, spacing, &p.unet.planner).map_err(StageError::input)?;
    if let Some(patch) = p.unet.patch {
        let d = pl.divisor();
        if (0..3).any(|a| patch[a] == 0 || patch[a] % d[a] != 0) {
            return Err(StageError::input(format!(
                "unet.patch {patch:?} must be positive multiples of the planned divisor {d:?}"
            )));
        }
        pl.patch = patch;
    }
    tracing::info!("nnU-Net plan: median shape {med:?} at {spacing:?} mm -> patch {:?}, {} stages, strides {:?}, features {:?}", pl.patch, pl.stages(), pl.strides, pl.features);
    let s = pl.stages();
    let unet = UnetConfig {
        in_channels: 1,
        out_channels: k,
        kernels: pl.kernels.iter().map(|x| x.map(|v| v as i64)).collect(),
        strides: pl.strides.iter().map(|x| x.map(|v| v as i64)).collect(),
        features: pl.features.iter().map(|&f| f as i64).collect(),
        deep_supervision: if p.unet.deep_supervision {
            s.saturating_sub(2)
        } else {
            0
        },
    };
    let sources = train_cases
        .iter()
        .map(|c| {
            SegSource::new(
                CropSource {
                    id: c.id.clone(),
                    domain_id: 0,
                    shape: [1, c.image.shape[0], c.image.shape[1], c.image.shape[2]],
                    data: Arc::new(c.image.data.clone()),
                },
                c.classes.clone(),
                c.image.shape,
                1,
            )
            .map_err(StageError::input)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Layout {
        unetr: None,
        unet: Some(unet),
        roi: pl.patch.map(|v| v as i64),
        plan: Some(pl),
        vae_decoder: None,
        scale: 1,
        sources,
    })
}

/// Copies a pretrained MeDUET encoder into UNETR and the VAE's decoder into its head, as
/// the parameters ask; returns what was copied from MeDUET.
fn initialise(
    p: &SegmentTrainParams,
    net: &Net,
    vs: &mut VarStore,
    config: &SegmenterConfig,
    meduet_dir: Option<&Path>,
    vae_dir: Option<&Path>,
    k: i64,
) -> Result<Option<crate::models::unetr::Transfer>, StageError> {
    let mut transfer = None;
    if let (Net::Unetr { net: u, .. }, Some(d), Init::Meduet) = (net, meduet_dir, p.unetr.init) {
        let m = meduet_model_config(d)?;
        let pos = match p.unetr.pos_embed {
            PosEmbed::Skip => PosEmbedInit::Skip,
            PosEmbed::Interpolate => PosEmbedInit::Interpolate,
        };
        let t = u
            .load_meduet(vs, &d.join("student.safetensors"), pos, m.grid())
            .map_err(StageError::input)?;
        tracing::info!(
            "UNETR initialised from MeDUET: {} tensors copied, position embedding {}",
            t.copied.len(),
            if t.pos_embed {
                "interpolated"
            } else {
                "not transferred (authors' code)"
            }
        );
        transfer = Some(t);
    }
    if let (Some(d), Some(_)) = (vae_dir, &config.vae_decoder) {
        let n = load_vae_decoder(vs, d)?;
        tracing::info!("VAE decoder head: {n} tensors copied from the VAE (its last convolution starts fresh for {k} classes)");
    }
    Ok(transfer)
}

/// Plots `val_dice.jsonl` of the output folder to `val_dice.png`; returns its points.
fn plot_validation(out: &Path) -> Result<Vec<(f64, f64)>, StageError> {
    let vpts: Vec<(f64, f64)> = std::fs::read_to_string(out.join("val_dice.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| Some((r["step"].as_f64()? + 1.0, r["val_dice"].as_f64()?)))
        .collect();
    line_plot(
        &out.join("val_dice.png"),
        "validation mean foreground Dice",
        "step",
        "Dice",
        &[Series {
            name: "validation Dice".into(),
            points: vpts.clone(),
        }],
        false,
    )
    .map_err(fail)?;
    Ok(vpts)
}

/// One segmentation training run as the shared loop sees it.
struct SegmentTask<'a> {
    p: &'a SegmentTrainParams,
    dev: Device,
    vs: VarStore,
    net: Net,
    learner: Learner,
    sampler: SegSampler,
    /// Deep-supervision weights, one per output resolution.
    ds_weights: Vec<f64>,
    augmenter: Option<StyleAugmenter>,
    splits: &'a Splits,
    latents: Option<&'a BTreeMap<String, Item>>,
    val_cases: Vec<Case>,
    window: SlidingWindow,
    /// Foreground classes.
    classes: u8,
    val_log: Option<JsonlLog>,
    val_path: std::path::PathBuf,
    last_loss: f64,
}

impl SegmentTask<'_> {
    /// DiceCE summed over the output resolutions (deep supervision); the full-resolution
    /// Dice and cross-entropy terms.
    fn dice_ce_loss(&self, outs: &[Tensor], y: &Tensor) -> (Tensor, f64, f64) {
        let mut total = Tensor::zeros([], (Kind::Float, self.dev));
        let (mut dice_v, mut ce_v) = (0.0, 0.0);
        for (i, out) in outs.iter().enumerate() {
            let os = out.size();
            let yi = downsample_labels(y, [os[2], os[3], os[4]]);
            let l = dice_ce(out, &yi);
            if i == 0 {
                dice_v = l.dice.double_value(&[]);
                ce_v = l.ce.double_value(&[]);
            }
            total = total + l.total * self.ds_weights[i];
        }
        (total, dice_v, ce_v)
    }
}

impl TrainingTask for SegmentTask<'_> {
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
    fn start(&mut self, first_step: u64) -> Result<(), StageError> {
        self.val_log = Some(
            JsonlLog::open(&self.val_path, first_step)
                .map_err(|e| StageError::io(&self.val_path, e))?,
        );
        Ok(())
    }
    fn step(&mut self, s: &Step) -> Result<StepOutput, StageError> {
        let (p, dev) = (self.p, self.dev);
        let b = self.sampler.batch(s.step, p.batch_size);
        let x = batch_tensor(&b.input, &b.input_shape).to_device(dev);
        let ls: Vec<i64> = b.label_shape.iter().map(|&v| v as i64).collect();
        let y = Tensor::from_slice(&b.label)
            .view(ls.as_slice())
            .to_kind(Kind::Int64)
            .to_device(dev);
        let amp = self.learner.autocast();
        let outs = tch::autocast(amp, || self.net.outputs(&x)).map_err(fail)?;
        let (mut total, dice_v, ce_v) = self.dice_ce_loss(&outs, &y);
        let mut record = serde_json::Map::new();
        if let (Some(a), Some(lat)) = (self.augmenter.as_mut(), self.latents) {
            a.refresh(s.step, self.splits, p.seed, lat)?;
        }
        let draw = self
            .augmenter
            .as_ref()
            .and_then(|a| a.settings.draw(p.seed, s.step).map(|alpha| (a, alpha)));
        if let (Some((a, alpha)), Some(_)) = (draw, self.latents) {
            let xa = a.augment(&x, alpha)?;
            let outs_a = tch::autocast(amp, || self.net.outputs(&xa)).map_err(fail)?;
            let (aug_total, _, _) = self.dice_ce_loss(&outs_a, &y);
            record.insert("style_alpha".into(), alpha.into());
            record.insert("aug_loss".into(), aug_total.double_value(&[]).into());
            total = total + aug_total * a.settings.weight;
            if a.settings.kl_weight > 0.0 {
                let kl = kl_consistency(&outs[0], &outs_a[0]);
                record.insert("kl".into(), kl.double_value(&[]).into());
                total = total + kl * a.settings.kl_weight;
            }
        }
        let (grad_norm, stepped) = self.learner.minimize(&total, s)?;
        self.last_loss = total.double_value(&[]);
        record.insert("loss".into(), self.last_loss.into());
        record.insert("dice_loss".into(), dice_v.into());
        record.insert("ce".into(), ce_v.into());
        record.insert("grad_norm".into(), grad_norm.into());
        record.insert("stepped".into(), stepped.into());
        Ok(StepOutput { record, stepped })
    }
    fn after_step(&mut self, done: u64) -> Result<(), StageError> {
        let p = self.p;
        if p.val_every == 0
            || self.val_cases.is_empty()
            || !(done % p.val_every == 0 || done == p.steps)
        {
            return Ok(());
        }
        let m: Vec<Vec<ClassMetrics>> = self
            .val_cases
            .iter()
            .map(|c| {
                let (pred, _) = segment_case(&self.net, c, &self.window, self.dev)?;
                Ok(per_class(
                    &pred,
                    &c.classes,
                    c.image.shape,
                    c.image.spacing(),
                    self.classes,
                ))
            })
            .collect::<Result<_, StageError>>()?;
        let d = mean_dice(&m);
        tracing::info!(
            "step {done}: loss {:.4}, validation Dice {}",
            self.last_loss,
            d.map_or("undefined".into(), |d| format!("{d:.4}"))
        );
        self.val_log
            .as_mut()
            .expect("started")
            .write(&serde_json::json!({"step": done - 1, "val_dice": d}))
            .map_err(|e| StageError::io(&self.val_path, e))
    }
}

/// Loads a segmenter artifact onto `dev`.
pub fn load_segmenter(
    dir: &Path,
    dev: Device,
) -> Result<(VarStore, Net, SegmenterConfig, Splits), StageError> {
    let cfg: SegmenterConfig = read_json(&dir.join("config.json"))?;
    let splits: Splits = read_json(&dir.join("splits.json"))?;
    let mut vs = VarStore::new(dev);
    let net = Net::build(&vs.root(), &cfg).map_err(StageError::input)?;
    load_frozen(&mut vs, &dir.join(WEIGHTS))?;
    Ok((vs, net, cfg, splits))
}

/// The model's name in tables: `unet`, `unetr_scratch`, `unetr_meduet` (+ `+interp` for
/// the interpolated position table, `+vae_dec` for the VAE-decoder head, `+style` with
/// style augmentation).
pub fn model_name(cfg: &SegmenterConfig) -> String {
    match cfg.network {
        Network::Unet => "unet".into(),
        Network::Unetr => {
            let u = &cfg.training.unetr;
            let mut s = match u.init {
                Init::Scratch => "unetr_scratch".to_string(),
                Init::Meduet => "unetr_meduet".to_string(),
            };
            if u.init == Init::Meduet && u.pos_embed == PosEmbed::Interpolate {
                s.push_str("+interp");
            }
            if u.output == UnetrOutput::VaeDecoder {
                s.push_str("+vae_dec");
            }
            if cfg.training.style_augment.enabled {
                s.push_str("+style");
            }
            s
        }
    }
}

pub fn summary_means(cases: &[(String, Vec<ClassMetrics>)], labels: &[u8]) -> serde_json::Value {
    let mut per = serde_json::Map::new();
    for (c, v) in labels.iter().enumerate() {
        let d = mean(cases.iter().filter_map(|(_, m)| m[c].dice));
        let h = mean(cases.iter().filter_map(|(_, m)| m[c].hd95));
        per.insert(v.to_string(), serde_json::json!({"Dice": d, "HD95": h}));
    }
    let fd = mean(
        cases
            .iter()
            .flat_map(|(_, m)| m.iter().filter_map(|c| c.dice)),
    );
    let fh = mean(
        cases
            .iter()
            .flat_map(|(_, m)| m.iter().filter_map(|c| c.hd95)),
    );
    let undefined_hd = cases
        .iter()
        .flat_map(|(_, m)| m.iter())
        .filter(|c| c.hd95.is_none() && c.n_ref + c.n_pred > 0)
        .count();
    serde_json::json!({
        "cases": cases.len(),
        "mean": per,
        "foreground_mean": {"Dice": fd, "HD95": fh},
        "hd95_undefined": undefined_hd,
    })
}

/// Maps a prediction (label values on the resampled grid) onto the subject's original scan
/// grid (nearest neighbour through world coordinates; background outside the resampled
/// field of view) and, when the subject has an original label, scores it there.
fn score_on_original_grid(
    ctx: &StageContext,
    original: &Item,
    prediction: &LabelVolume,
    lut: &[u8; 256],
    k: u8,
) -> Result<(Option<Vec<ClassMetrics>>, LabelVolume), StageError> {
    let rec = SubjectRecord::read(&original.dir)?;
    let h = &rec.image.header;
    let mapped = map_onto_grid(prediction, h.shape, &h.affine)
        .map_err(|e| StageError::input(format!("subject '{}': {e}", rec.id)))?;
    let Some(lf) = &rec.label else {
        return Ok((None, mapped));
    };
    let (label, _) = read_nifti_labels(&ctx.locate(&lf.digest)?).map_err(StageError::input)?;
    if label.shape != mapped.shape {
        return Err(StageError::input(format!(
            "subject '{}': original label shape {:?} differs from its image {:?}",
            rec.id, label.shape, mapped.shape
        )));
    }
    let pred: Vec<u8> = mapped.data.iter().map(|&v| lut[v as usize]).collect();
    let refc: Vec<u8> = label.data.iter().map(|&v| lut[v as usize]).collect();
    Ok((
        Some(per_class(&pred, &refc, mapped.shape, mapped.spacing(), k)),
        mapped,
    ))
}

pub fn eval(
    _: &SegmentEval,
    p: &SegmentEvalParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let model_dir = ctx.input("model")?.dir.clone();
    let (_vs, net, cfg, splits) = load_segmenter(&model_dir, dev)?;
    let items = by_id(&ctx.input("volumes")?.items);
    let latents = ctx.inputs("latents").first().map(|l| by_id(&l.items));
    if cfg.network == Network::Unetr && latents.is_none() {
        return Err(StageError::input(
            "this segmenter is a UNETR on latents: connect a 'latents' input",
        ));
    }
    let lat = if cfg.network == Network::Unetr {
        latents.as_ref()
    } else {
        None
    };
    let lut = label_lut(&cfg.labels);
    let k = cfg.labels.len() as u8;
    let sw = SlidingWindow {
        roi: cfg.roi,
        overlap: p.overlap,
        batch: p.sw_batch,
        scale: cfg.scale,
        sigma_scale: p.sigma_scale,
    };
    let mut sets: Vec<(&str, &Vec<String>)> =
        vec![("test", &splits.test), ("heldout", &splits.heldout)];
    if p.include_train {
        sets.push(("train", &splits.train));
    }
    let originals = ctx.inputs("originals").first().map(|o| by_id(&o.items));
    let out = ctx.output_dir("report")?;
    let pred_dir = out.join("predictions");
    let orig_dir = out.join("predictions_original");
    if p.export_predictions {
        std::fs::create_dir_all(&pred_dir).map_err(|e| StageError::io(&pred_dir, e))?;
        if originals.is_some() {
            std::fs::create_dir_all(&orig_dir).map_err(|e| StageError::io(&orig_dir, e))?;
        }
    }
    let mut by_set_original: BTreeMap<&str, Vec<(String, Vec<ClassMetrics>)>> = BTreeMap::new();
    let n_cases: usize = sets.iter().map(|s| s.1.len()).sum();
    let bar = ctx.progress(n_cases as u64, "cases");
    let mut per_case = Vec::new();
    let mut by_set: BTreeMap<&str, Vec<(String, Vec<ClassMetrics>)>> = BTreeMap::new();
    let mut csv = String::from("subject,domain,set,label,dice,hd95,n_pred,n_ref\n");
    let (mut voxels, mut windows, t0) = (0usize, 0usize, Instant::now());
    for (set, ids) in &sets {
        for id in ids.iter() {
            ctx.check_cancelled()?;
            let it = items.get(id).ok_or_else(|| {
                StageError::input(format!("subject '{id}' of the segmenter's {set} split is not among the volumes (evaluate on the data it was trained on)"))
            })?;
            let case = read_case(it, lat, &lut)?;
            let (pred, w) = segment_case(&net, &case, &sw, dev)?;
            windows += w;
            voxels += pred.len();
            let m = per_class(
                &pred,
                &case.classes,
                case.image.shape,
                case.image.spacing(),
                k,
            );
            let mut file = serde_json::Value::Null;
            let values: Vec<u8> = pred
                .iter()
                .map(|&c| {
                    if c == 0 {
                        0
                    } else {
                        cfg.labels[c as usize - 1]
                    }
                })
                .collect();
            let v = LabelVolume::from_parts(values, case.image.shape, case.image.affine)
                .map_err(fail)?;
            if p.export_predictions {
                let f = pred_dir.join(format!("{id}.nii.gz"));
                write_nifti_labels(&f, &v).map_err(fail)?;
                file = format!("predictions/{id}.nii.gz").into();
            }
            let mut original = serde_json::Value::Null;
            if let Some(o) = &originals {
                let it = o.get(id).ok_or_else(|| {
                    StageError::input(format!(
                        "subject '{id}' is not among the 'originals' (connect the subjects these volumes were resampled from)"
                    ))
                })?;
                let (om, ofile) = score_on_original_grid(ctx, it, &v, &lut, k)?;
                if p.export_predictions {
                    let f = orig_dir.join(format!("{id}.nii.gz"));
                    write_nifti_labels(&f, &ofile).map_err(fail)?;
                }
                let mut mo = serde_json::Map::new();
                if let Some(m) = &om {
                    for (c, cm) in m.iter().enumerate() {
                        mo.insert(
                            cfg.labels[c].to_string(),
                            serde_json::json!({"Dice": cm.dice, "HD95": cm.hd95}),
                        );
                    }
                    by_set_original
                        .entry(set)
                        .or_default()
                        .push((id.clone(), m.clone()));
                }
                original = serde_json::json!({
                    "prediction_file": if p.export_predictions { serde_json::json!(format!("predictions_original/{id}.nii.gz")) } else { serde_json::Value::Null },
                    "shape": ofile.shape,
                    "metrics": if om.is_some() { serde_json::Value::Object(mo) } else { serde_json::Value::Null },
                });
            }
            let mut metrics = serde_json::Map::new();
            for (c, cm) in m.iter().enumerate() {
                let v = cfg.labels[c];
                metrics.insert(v.to_string(), serde_json::json!({"Dice": cm.dice, "HD95": cm.hd95, "n_pred": cm.n_pred, "n_ref": cm.n_ref}));
                let f = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.6}"));
                csv.push_str(&format!(
                    "{id},{},{set},{v},{},{},{},{}\n",
                    case.domain,
                    f(cm.dice),
                    f(cm.hd95),
                    cm.n_pred,
                    cm.n_ref
                ));
            }
            per_case.push(serde_json::json!({"subject": id, "domain": case.domain, "set": set, "prediction_file": file, "metrics": metrics, "original_grid": original}));
            by_set.entry(set).or_default().push((id.clone(), m));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let all: Vec<(String, Vec<ClassMetrics>)> = by_set.values().flatten().cloned().collect();
    let overall = summary_means(&all, &cfg.labels);
    let in_domain = summary_means(
        by_set.get("test").map(Vec::as_slice).unwrap_or(&[]),
        &cfg.labels,
    );
    let unseen = summary_means(
        by_set.get("heldout").map(Vec::as_slice).unwrap_or(&[]),
        &cfg.labels,
    );
    let original_grid = originals.as_ref().map(|_| {
        let part = |s: &str| {
            summary_means(
                by_set_original.get(s).map(Vec::as_slice).unwrap_or(&[]),
                &cfg.labels,
            )
        };
        serde_json::json!({"in_domain": part("test"), "unseen_domain": part("heldout")})
    });
    let summary = serde_json::json!({
        "model": model_name(&cfg),
        "network": cfg.network,
        "label_fraction": splits.label_fraction,
        "train_domains": splits.train_domains,
        "heldout_domains": splits.heldout_domains,
        "labels": cfg.labels,
        "metric_per_case": per_case,
        "mean": overall["mean"],
        "foreground_mean": overall["foreground_mean"],
        "in_domain": in_domain,
        "unseen_domain": unseen,
        "original_grid": original_grid,
        "inference": {"overlap": p.overlap, "sw_batch": p.sw_batch, "windows": windows, "seconds": secs, "voxels_per_second": voxels as f64 / secs.max(1e-9)},
    });
    write_json(&out.join("summary.json"), &summary)?;
    std::fs::write(out.join("per_case.csv"), csv)
        .map_err(|e| StageError::io(&out.join("per_case.csv"), e))?;
    ctx.set_metric(
        "dice_in_domain",
        in_domain["foreground_mean"]["Dice"].clone(),
    );
    ctx.set_metric(
        "dice_unseen_domain",
        unseen["foreground_mean"]["Dice"].clone(),
    );
    ctx.set_metric(
        "hd95_in_domain",
        in_domain["foreground_mean"]["HD95"].clone(),
    );
    ctx.set_metric("voxels_per_second", voxels as f64 / secs.max(1e-9));
    tracing::info!(
        "Dice in-domain {} ({} cases), unseen domains {} ({} cases); {windows} windows in {secs:.1}s",
        in_domain["foreground_mean"]["Dice"],
        in_domain["cases"],
        unseen["foreground_mean"]["Dice"],
        unseen["cases"]
    );
    Ok(())
}
