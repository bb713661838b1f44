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
use meduet_stages::kinds::vae::{Amp, LATENT_ZARR, VAE_CONFIG, VAE_WEIGHTS};
use meduet_stages::plot::{line_plot, Series};
use meduet_stages::sampling::CropSource;
use meduet_stages::schedule::CosineLrScheduler;
use meduet_stages::segmentation::metrics::{per_class, ClassMetrics};
use meduet_stages::segmentation::planner::{median_shape, plan_unet, UnetPlan};
use meduet_stages::segmentation::sampler::{SegSampler, SegSource};
use meduet_stages::segmentation::splits::{make_splits, SplitConfig, Splits};
use meduet_stages::segmentation::style_augment::AugmentedTask;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::common::{device, fail, load_frozen, read_json, write_json};
use super::style_augment::{kl_consistency, StyleAugmenter, PROTOTYPE_FILE};
use crate::inference::{sliding_window, SlidingWindow};
use crate::models::meduet::Config as MeduetConfig;
use crate::models::unet::{Unet, UnetConfig};
use crate::models::unetr::{default_skips, PosEmbedInit, Unetr, UnetrConfig, UnetrHead};
use crate::models::vae::{AutoencoderKlMaisi, Config as VaeConfig};
use crate::train::amp::GradScaler;
use crate::train::checkpoint::Checkpoints;
use crate::train::log::{plot_jsonl, JsonlLog};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::seg_loss::{deep_supervision_weights, dice_ce, downsample_labels};
use crate::train::sgd::{Sgd, SgdConfig};

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
    pub optimisation: Optimisation,
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
fn latent_scale(c: &Case) -> Result<i64, StageError> {
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

enum Opt {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Opt {
    fn zero_grad(&mut self) {
        match self {
            Opt::AdamW(o) => o.zero_grad(),
            Opt::Sgd(o) => o.zero_grad(),
        }
    }
    fn save(&self, p: &Path) -> Result<(), String> {
        match self {
            Opt::AdamW(o) => o.save(p).map_err(|e| e.to_string()),
            Opt::Sgd(o) => o.save(p).map_err(|e| e.to_string()),
        }
    }
    fn load(&mut self, p: &Path) -> Result<(), String> {
        match self {
            Opt::AdamW(o) => o.load(p),
            Opt::Sgd(o) => o.load(p),
        }
    }
    /// Unscale, clip, skip on overflow, step (as [`GradScaler::step`], for either optimiser).
    fn scaled_step(&mut self, scaler: &mut GradScaler, lr: f64, max_norm: f64) -> (f64, bool) {
        if let Opt::AdamW(o) = self {
            return scaler.step(o, lr, max_norm);
        }
        let Opt::Sgd(o) = self else { unreachable!() };
        if scaler.enabled {
            o.scale_grads(1.0 / scaler.scale);
        }
        let norm = o.clip_grad_norm(if max_norm > 0.0 {
            max_norm
        } else {
            f64::INFINITY
        });
        if !norm.is_finite() {
            if scaler.enabled {
                scaler.scale /= 2.0;
                scaler.clean_steps = 0;
            }
            return (norm, false);
        }
        o.step(lr);
        if scaler.enabled {
            scaler.clean_steps += 1;
            if scaler.clean_steps >= scaler.growth_interval {
                scaler.scale *= 2.0;
                scaler.clean_steps = 0;
            }
        }
        (norm, true)
    }
}

/// The learning rate at `step`.
pub fn lr_at(o: &Optimisation, warmup: u64, steps: u64, step: u64) -> f64 {
    match o.schedule {
        LrSchedule::Cosine => CosineLrScheduler {
            base_lr: o.lr,
            warmup_t: warmup,
            warmup_lr_init: 1e-6f64.min(o.lr),
            t_initial: steps,
            lr_min: o.min_lr,
            warmup_prefix: false,
        }
        .lr(step),
        LrSchedule::Poly => o.lr * (1.0 - step as f64 / steps as f64).max(0.0).powf(0.9),
    }
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
    let vol_items = ctx.input("volumes")?.items.clone();
    let latents = match ctx.inputs("latents").first() {
        Some(l) => Some(by_id(&l.items)),
        None => None,
    };
    let meduet_dir = ctx.inputs("meduet").first().map(|m| m.dir.clone());
    let vae_dir = ctx.inputs("vae").first().map(|m| m.dir.clone());
    let unetr = p.network == Network::Unetr;
    if unetr && latents.is_none() {
        return Err(StageError::input("network \"unetr\" works on latents: connect a 'latents' input (vae_encode of the same volumes)"));
    }
    if unetr && p.unetr.init == Init::Meduet && meduet_dir.is_none() {
        return Err(StageError::input(
            "unetr.init = \"meduet\" needs a 'meduet' input (a pretrain stage's model)",
        ));
    }
    if unetr && p.unetr.output == UnetrOutput::VaeDecoder && vae_dir.is_none() {
        return Err(StageError::input(
            "unetr.output = \"vae_decoder\" needs a 'vae' input (the VAE of the latents)",
        ));
    }
    let subjects: Vec<(String, String)> = vol_items
        .iter()
        .map(|i| (i.id.clone(), domain_of(i)))
        .collect();
    let splits = make_splits(
        &subjects,
        &SplitConfig {
            train_domains: p.split.train_domains.clone(),
            test_fraction: p.split.test_fraction,
            val_fraction: p.split.val_fraction,
            split_seed: p.split.split_seed,
            label_fraction: p.split.label_fraction.clone(),
            seed: p.seed,
        },
    )
    .map_err(StageError::input)?;
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
    let lat = if unetr { latents.as_ref() } else { None };
    // Classes: the listed label values, or every value in the training labels.
    let labels: Vec<u8> = if p.labels.is_empty() {
        let mut seen = [false; 256];
        for id in &splits.train {
            let (l, _) =
                read_zarr::<u8>(&items[id].dir.join(LABEL_ZARR)).map_err(StageError::input)?;
            l.data.iter().for_each(|&v| seen[v as usize] = true);
        }
        (1..=255u8).filter(|&v| seen[v as usize]).collect()
    } else {
        p.labels.clone()
    };
    if labels.is_empty() {
        return Err(StageError::input(
            "the training labels have no foreground: nothing to segment",
        ));
    }
    let lut = label_lut(&labels);
    let k = labels.len() as i64 + 1;
    let read = |ids: &[String]| -> Result<Vec<Case>, StageError> {
        ids.iter()
            .map(|id| read_case(&items[id], lat, &lut))
            .collect()
    };
    let train_cases = read(&splits.train)?;
    let val_cases = read(&splits.val)?;
    let o = p.optimisation();

    // The network and its input grid.
    tch::manual_seed(p.seed as i64);
    let mut vs = VarStore::new(dev);
    let (cfg_unetr, cfg_unet, plan, vae_cfg, scale, roi, sources);
    if unetr {
        let c0 = &train_cases[0];
        scale = latent_scale(c0)?;
        let in_ch = c0.latent.as_ref().expect("latent").1[0] as i64;
        let mcfg = match (p.unetr.init, &meduet_dir) {
            (Init::Meduet, Some(d)) => Some(meduet_model_config(d)?),
            _ => None,
        };
        vae_cfg = match (p.unetr.output, &vae_dir) {
            (UnetrOutput::VaeDecoder, Some(d)) => {
                let mut v: VaeConfig = read_json(&d.join(VAE_CONFIG))?;
                if v.downsample_factor() != scale {
                    return Err(StageError::input(format!("the VAE downsamples by {}, the latents are {scale}x coarser than the labels", v.downsample_factor())));
                }
                v.out_channels = k;
                Some(v)
            }
            _ => None,
        };
        let out = if vae_cfg.is_some() { in_ch } else { k };
        cfg_unetr = Some(
            unetr_config(&p.unetr, in_ch, out, UnetrHead::Segmentation, mcfg.as_ref())
                .map_err(StageError::input)?,
        );
        cfg_unet = None;
        plan = None;
        roi = [p.unetr.crop as i64; 3];
        sources = train_cases
            .iter()
            .map(|c| {
                let (d, s) = c.latent.clone().expect("latent");
                if latent_scale(c)? != scale {
                    return Err(StageError::input(format!(
                        "'{}': its latent scale differs from the others'",
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
            .collect::<Result<Vec<_>, _>>()?;
    } else {
        scale = 1;
        vae_cfg = None;
        // Plan from the training domains' volumes (every subject's shape, not only the labelled).
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
        cfg_unet = Some(UnetConfig {
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
        });
        cfg_unetr = None;
        roi = pl.patch.map(|v| v as i64);
        plan = Some(pl);
        sources = train_cases
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
    }
    let mut config = SegmenterConfig {
        network: p.network,
        labels: labels.clone(),
        scale,
        roi,
        unetr: cfg_unetr,
        unet: cfg_unet,
        plan,
        vae_decoder: vae_cfg,
        optimisation: o,
        training: p.clone(),
        trainable_parameters: 0,
    };
    let net = Net::build(&vs.root(), &config).map_err(StageError::input)?;
    let mut transfer = None;
    if let (Net::Unetr { net: u, .. }, Some(d), Init::Meduet) = (&net, &meduet_dir, p.unetr.init) {
        let m = meduet_model_config(d)?;
        let pos = match p.unetr.pos_embed {
            PosEmbed::Skip => PosEmbedInit::Skip,
            PosEmbed::Interpolate => PosEmbedInit::Interpolate,
        };
        let t = u
            .load_meduet(&mut vs, &d.join("student.safetensors"), pos, m.grid())
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
    if let Some(d) = &vae_dir {
        if config.vae_decoder.is_some() {
            let n = load_vae_decoder(&mut vs, d)?;
            tracing::info!("VAE decoder head: {n} tensors copied from the VAE (its last convolution starts fresh for {k} classes)");
        }
    }
    let mut augmenter = StyleAugmenter::for_training(
        &p.style_augment,
        &p.split.label_fraction,
        AugmentedTask::Segmentation,
        meduet_dir.as_deref(),
        p.unetr.crop,
        train_cases[0].latent.as_ref().map_or(0, |l| l.1[0] as i64),
        dev,
    )?;
    let n_params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    config.trainable_parameters = n_params;
    let mut opt = match o.optimizer {
        Optimizer::Adamw => Opt::AdamW(AdamW::new(
            &vs,
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: o.weight_decay,
            },
        )),
        Optimizer::Sgd => Opt::Sgd(Sgd::new(
            &vs,
            SgdConfig {
                momentum: p.momentum,
                nesterov: true,
                weight_decay: o.weight_decay,
            },
        )),
    };
    let crop = roi.map(|v| v as usize);
    let sampler = SegSampler::new(sources, crop, o.fg_fraction, p.augment, p.seed)
        .map_err(StageError::input)?;
    let sw = SlidingWindow {
        roi,
        overlap: 0.5,
        batch: 4,
        scale,
        sigma_scale: 0.125,
    };
    tracing::info!(
        "{:?}: {} classes (labels {:?}), {:.2} M trainable parameters, crops {:?} (x{scale} to the label grid), {} steps of batch {} with {:?} lr {} ({:?}) on {dev:?}",
        p.network,
        k - 1,
        labels,
        n_params as f64 / 1e6,
        crop,
        p.steps,
        p.batch_size,
        o.optimizer,
        o.lr,
        o.schedule
    );

    let scratch = ctx.scratch_dir()?;
    let cps = Checkpoints::new(&scratch);
    let mut scaler = GradScaler::new(dev.is_cuda() && p.amp == Amp::Fp16);
    let mut start = 0;
    if let Some((step, dir)) = cps.latest() {
        Checkpoints::load_into(&dir, WEIGHTS, &mut vs).map_err(fail)?;
        opt.load(&dir.join("optimizer.safetensors")).map_err(fail)?;
        let st = Checkpoints::state(&dir).map_err(fail)?;
        scaler = serde_json::from_value(st["scaler"].clone()).map_err(fail)?;
        if let Some(a) = augmenter.as_mut() {
            a.load_state(&dir)?;
        }
        start = step;
        tracing::info!("resuming from the checkpoint at step {step}");
    }
    let log_path = scratch.join("losses.jsonl");
    let val_path = scratch.join("val_dice.jsonl");
    let mut log = JsonlLog::open(&log_path, start).map_err(|e| StageError::io(&log_path, e))?;
    let mut vlog = JsonlLog::open(&val_path, start).map_err(|e| StageError::io(&val_path, e))?;
    let ds_weights = match &net {
        Net::Unet(u) => deep_supervision_weights(u.config().deep_supervision + 1),
        _ => vec![1.0],
    };
    let bar = ctx.progress(p.steps, "steps");
    bar.set_position(start);
    let t0 = Instant::now();
    for step in start..p.steps {
        ctx.check_cancelled()?;
        let b = sampler.batch(step, p.batch_size);
        let s = b.input_shape.map(|v| v as i64);
        let x = Tensor::from_slice(&b.input).view(s).to_device(dev);
        let ls = b.label_shape.map(|v| v as i64);
        let y = Tensor::from_slice(&b.label)
            .view(ls)
            .to_kind(Kind::Int64)
            .to_device(dev);
        tch::manual_seed(super::common::step_seed(p.seed, step) as i64);
        let outs = tch::autocast(scaler.enabled, || net.outputs(&x)).map_err(fail)?;
        let mut total = Tensor::zeros([], (Kind::Float, dev));
        let (mut dice_v, mut ce_v) = (0.0, 0.0);
        for (i, out) in outs.iter().enumerate() {
            let os = out.size();
            let yi = downsample_labels(&y, [os[2], os[3], os[4]]);
            let l = dice_ce(out, &yi);
            if i == 0 {
                dice_v = l.dice.double_value(&[]);
                ce_v = l.ce.double_value(&[]);
            }
            total = total + l.total * ds_weights[i];
        }
        let mut aug_rec = serde_json::Map::new();
        if let (Some(a), Some(lat)) = (augmenter.as_mut(), &latents) {
            a.refresh(step, &splits, p.seed, lat)?;
            if let Some(alpha) = a.settings.draw(p.seed, step) {
                let xa = a.augment(&x, alpha)?;
                let outs_a = tch::autocast(scaler.enabled, || net.outputs(&xa)).map_err(fail)?;
                let mut aug_total = Tensor::zeros([], (Kind::Float, dev));
                for (i, out) in outs_a.iter().enumerate() {
                    let os = out.size();
                    let yi = downsample_labels(&y, [os[2], os[3], os[4]]);
                    aug_total = aug_total + dice_ce(out, &yi).total * ds_weights[i];
                }
                aug_rec.insert("style_alpha".into(), alpha.into());
                aug_rec.insert("aug_loss".into(), aug_total.double_value(&[]).into());
                total = total + aug_total * a.settings.weight;
                if a.settings.kl_weight > 0.0 {
                    let kl = kl_consistency(&outs[0], &outs_a[0]);
                    aug_rec.insert("kl".into(), kl.double_value(&[]).into());
                    total = total + kl * a.settings.kl_weight;
                }
            }
        }
        let loss = total.double_value(&[]);
        if !loss.is_finite() {
            return Err(fail(format!(
                "the loss is not finite at step {step}; nothing is committed (lower lr)"
            )));
        }
        opt.zero_grad();
        scaler.backward(&total);
        let lr = lr_at(&o, p.warmup_steps, p.steps, step);
        let (grad_norm, stepped) = opt.scaled_step(&mut scaler, lr, p.grad_clip);
        let mut rec = serde_json::json!({"step": step, "lr": lr, "loss": loss, "dice_loss": dice_v, "ce": ce_v, "grad_norm": grad_norm, "stepped": stepped});
        rec.as_object_mut().expect("object").extend(aug_rec);
        log.write(&rec).map_err(|e| StageError::io(&log_path, e))?;
        bar.inc(1);
        let done = step + 1;
        if p.val_every > 0 && !val_cases.is_empty() && (done % p.val_every == 0 || done == p.steps)
        {
            let m: Vec<Vec<ClassMetrics>> = val_cases
                .iter()
                .map(|c| {
                    let (pred, _) = segment_case(&net, c, &sw, dev)?;
                    Ok(per_class(
                        &pred,
                        &c.classes,
                        c.image.shape,
                        c.image.spacing(),
                        (k - 1) as u8,
                    ))
                })
                .collect::<Result<_, StageError>>()?;
            let d = mean_dice(&m);
            tracing::info!(
                "step {done}: loss {loss:.4}, validation Dice {}",
                d.map_or("undefined".into(), |d| format!("{d:.4}"))
            );
            vlog.write(&serde_json::json!({"step": step, "val_dice": d}))
                .map_err(|e| StageError::io(&val_path, e))?;
        }
        if p.checkpoint_every > 0 && done % p.checkpoint_every == 0 && done < p.steps {
            let write_opt = |path: &Path| opt.save(path);
            let write_proto = |path: &Path| match &augmenter {
                Some(a) => a.save(path),
                None => Ok(()),
            };
            cps.save(
                done,
                &[(WEIGHTS, &vs)],
                &[
                    ("optimizer.safetensors", &write_opt),
                    (PROTOTYPE_FILE, &write_proto),
                ],
                serde_json::json!({ "scaler": scaler }),
            )
            .map_err(fail)?;
        }
    }
    bar.finish_and_clear();
    let out = ctx.output_dir("model")?;
    vs.save(out.join(WEIGHTS)).map_err(fail)?;
    std::fs::copy(&log_path, out.join("losses.jsonl")).map_err(|e| StageError::io(&log_path, e))?;
    std::fs::copy(&val_path, out.join("val_dice.jsonl"))
        .map_err(|e| StageError::io(&val_path, e))?;
    write_json(&out.join("splits.json"), &splits)?;
    let mut cj = serde_json::to_value(&config).expect("json");
    cj["meduet_transfer"] = serde_json::to_value(&transfer).expect("json");
    write_json(&out.join("config.json"), &cj)?;
    plot_jsonl(
        &out.join("losses.jsonl"),
        &out.join("losses.png"),
        "segmentation training loss (DiceCE)",
        &["loss", "dice_loss", "ce"],
        true,
    )
    .map_err(fail)?;
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
    let losses = crate::train::log::read_column(&out.join("losses.jsonl"), "loss");
    if let (Some(a), Some(b)) = (losses.first(), losses.last()) {
        ctx.set_metric("loss_first", a.1);
        ctx.set_metric("loss_last", b.1);
    }
    if let Some(v) = vpts.last() {
        ctx.set_metric("val_dice_last", v.1);
    }
    ctx.set_metric("train_subjects", splits.train.len());
    ctx.set_metric("trainable_parameters", n_params);
    ctx.set_metric("train_seconds", t0.elapsed().as_secs_f64());
    Ok(())
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

fn summary_means(cases: &[(String, Vec<ClassMetrics>)], labels: &[u8]) -> serde_json::Value {
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
