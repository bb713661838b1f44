//! `vae_train`, `vae_import`, `vae_encode`, `vae_decode`.
//!
//! Training: random crops of the preprocessed volumes (seeded by step), L1 reconstruction
//! of a posterior sample plus the KL term, optionally an LSGAN patch-adversarial term
//! against a 3-D `PatchDiscriminator`; AdamW with warmup + cosine, gradient clipping, fp16
//! autocast with loss scaling on CUDA; resumable checkpoints; the loss curve as JSONL and
//! PNG; PSNR and SSIM of whole held-out volumes (posterior mean, decoded) and a montage
//! of their central slices.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

use crate::models::vae::{
    decode_tiled, encode_tiled_latent, load_vae_safetensors, AutoencoderKlMaisi,
    Config as VaeConfig, EncodeMode, TileConfig, TileNorm,
};
use meduet_engine::{StageContext, StageError};
use meduet_stages::data::array_store::{read_array_f32, write_array_f32};
use meduet_stages::data::volume::{affine_from_json, affine_to_json, mat_mul, VolumeOf};
use meduet_stages::data::zarr_store::{read_zarr, write_zarr, Attrs};
use meduet_stages::kinds::resample::IMAGE_ZARR;
use meduet_stages::kinds::vae::*;
use meduet_stages::plot::{montage, GrayImage};
use meduet_stages::sampling::CropSampler;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::common::{
    batch_tensor, device, fail, read_json, step_seed, trainable_parameters, volume_sources,
    write_json, CropBatches,
};
use crate::models::discriminator::PatchDiscriminator;
use crate::quality::{psnr, ssim_3d};
use crate::train::trainer::{self, Learner, Step, StepOutput, TrainingTask};

/// Loads the VAE of a `vae` artifact folder onto `dev`.
pub fn load_vae(
    dir: &Path,
    dev: tch::Device,
) -> Result<(VarStore, AutoencoderKlMaisi), StageError> {
    let cfg: VaeConfig = read_json(&dir.join(VAE_CONFIG))?;
    let mut vs = VarStore::new(dev);
    let vae = AutoencoderKlMaisi::new(vs.root(), &cfg).map_err(fail)?;
    load_vae_safetensors(&dir.join(VAE_WEIGHTS), &mut vs)
        .map_err(|e| StageError::input(format!("'{}': {e}", dir.join(VAE_WEIGHTS).display())))?;
    vs.freeze();
    Ok((vs, vae))
}

/// KL divergence of the posterior from N(0, 1): sum over latent voxels, mean over the batch
/// (MONAI / MAISI `KL_loss`).
pub fn kl_loss(mu: &Tensor, sigma: &Tensor) -> Tensor {
    let var = sigma.pow_tensor_scalar(2);
    let kl = (mu.pow_tensor_scalar(2) + &var - (var + 1e-12).log() - 1.0) * 0.5;
    kl.sum(Kind::Float) / mu.size()[0] as f64
}

fn volume_tensor(v: &VolumeOf<f32>) -> Tensor {
    Tensor::from_slice(&v.data).view([
        1,
        1,
        v.shape[0] as i64,
        v.shape[1] as i64,
        v.shape[2] as i64,
    ])
}

fn slices(t: &Tensor, title: &str) -> Vec<GrayImage> {
    let t = t.squeeze().to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let s = t.size();
    let img = |m: Tensor, name: &str| {
        let (h, w) = (m.size()[0] as usize, m.size()[1] as usize);
        GrayImage {
            title: format!("{title} {name}"),
            width: w,
            height: h,
            pixels: Vec::<f32>::try_from(m.contiguous().view([-1])).unwrap_or_default(),
            lo: 0.0,
            hi: 1.0,
        }
    };
    // Axes are RAS: axial = fixed k (rows = j flipped so anterior is up), coronal = fixed j, sagittal = fixed i.
    vec![
        img(t.select(2, s[2] / 2).transpose(0, 1).flip([0]), "axial"),
        img(t.select(1, s[1] / 2).transpose(0, 1).flip([0]), "coronal"),
        img(t.select(0, s[0] / 2).transpose(0, 1).flip([0]), "sagittal"),
    ]
}

pub fn train(_: &VaeTrain, p: &VaeTrainParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let dev = device(ctx);
    let training = p.training().map_err(StageError::input)?;
    let cfg = vae_config(p.preset, &p.model).map_err(StageError::input)?;
    let mut items = ctx.input("volumes")?.items.clone();
    if items.len() < p.heldout + 1 {
        return Err(StageError::input(format!(
            "{} volumes: need more than the {} held out",
            items.len(),
            p.heldout
        )));
    }
    items.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(p.seed));
    let heldout: Vec<_> = items.split_off(items.len() - p.heldout);
    let sources = volume_sources(&items)?;
    let sampler = Arc::new(
        CropSampler::new(
            sources,
            p.crop,
            p.augment,
            meduet_stages::sampling::Sampling::Shuffled,
            p.seed,
        )
        .map_err(StageError::input)?,
    );
    tch::manual_seed(p.seed as i64);
    let vs = VarStore::new(dev);
    let vae = AutoencoderKlMaisi::new(vs.root(), &cfg).map_err(fail)?;
    let dvs = VarStore::new(dev);
    let disc = PatchDiscriminator::new(&dvs.root(), cfg.out_channels, 32, 3);
    let n_params = trainable_parameters(&vs);
    tracing::info!("VAE {:?} ({:.2} M parameters), {} training and {} held-out volumes, {} steps of {} crops {:?} on {dev:?}", cfg.num_channels, n_params as f64 / 1e6, items.len(), heldout.len(), p.steps, p.batch_size, p.crop);
    let mut task = VaeTask {
        p,
        dev,
        learner: Learner::new(&vs, &training),
        disc_learner: Learner::new(&dvs, &training),
        vs,
        dvs,
        vae,
        disc,
        batches: CropBatches::new(sampler, p.steps, p.batch_size),
    };
    let trained = trainer::run(ctx, &training, &mut task)?;
    let (vs, vae) = (task.vs, task.vae);
    let HeldoutEval {
        psnr: ps,
        ssim: ss,
        psnr_constant: pcs,
        per_subject,
        rows,
    } = evaluate_heldout(&vae, &cfg, &heldout, dev)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let out = ctx.output_dir("vae")?;
    vs.save(out.join(VAE_WEIGHTS)).map_err(fail)?;
    write_json(&out.join(VAE_CONFIG), &cfg)?;
    trainer::finish(
        &trained,
        &out,
        "VAE training losses",
        &["total", "l1", "g_adv", "d_loss"],
    )?;
    write_json(
        &out.join("eval.json"),
        &serde_json::json!({ "heldout": per_subject, "psnr": mean(&ps), "ssim": mean(&ss), "psnr_constant": mean(&pcs), "data_range": 1.0, "ssim_kernel": 7 }),
    )?;
    if !rows.is_empty() {
        montage(
            &out.join("recon.png"),
            "held-out volumes and reconstructions (axial, coronal, sagittal)",
            &rows,
            160,
        )
        .map_err(fail)?;
    }
    ctx.set_metric("heldout_psnr", mean(&ps));
    ctx.set_metric("heldout_ssim", mean(&ss));
    ctx.set_metric("heldout_psnr_constant", mean(&pcs));
    ctx.set_metric("parameters", n_params);
    let l1 = crate::train::log::read_column(&out.join("losses.jsonl"), "l1");
    if let (Some(a), Some(b)) = (l1.first(), l1.last()) {
        ctx.set_metric("l1_first", a.1);
        ctx.set_metric("l1_last", b.1);
    }
    tracing::info!("held-out PSNR {:.2} dB, SSIM {:.4}", mean(&ps), mean(&ss));
    Ok(())
}

/// One VAE training run as the shared loop sees it.
struct VaeTask<'a> {
    p: &'a VaeTrainParams,
    dev: tch::Device,
    vs: VarStore,
    dvs: VarStore,
    vae: AutoencoderKlMaisi,
    disc: PatchDiscriminator,
    learner: Learner,
    disc_learner: Learner,
    batches: CropBatches,
}

impl TrainingTask for VaeTask<'_> {
    fn stores(&mut self) -> Vec<(&'static str, &mut VarStore)> {
        vec![
            (VAE_WEIGHTS, &mut self.vs),
            ("discriminator.safetensors", &mut self.dvs),
        ]
    }
    fn learners(&mut self) -> Vec<(&'static str, &mut Learner)> {
        vec![
            ("optimizer", &mut self.learner),
            ("disc_optimizer", &mut self.disc_learner),
        ]
    }
    fn start(&mut self, first_step: u64) -> Result<(), StageError> {
        self.batches.start(first_step);
        Ok(())
    }
    fn step(&mut self, s: &Step) -> Result<StepOutput, StageError> {
        let (p, dev) = (self.p, self.dev);
        let b = self.batches.next()?;
        let x = batch_tensor(&b.data, &b.shape).to_device(dev);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
        let use_adv = p.adversarial_weight > 0.0 && s.step >= p.adversarial_start;
        let amp = self.learner.autocast();
        let (recon, l1, kl, g_adv) = tch::autocast(amp, || -> Result<_, StageError> {
            let (recon, mu, sigma) = self.vae.forward_sampled(&x, &mut rng).map_err(fail)?;
            let recon = recon.to_kind(Kind::Float);
            let l1 = (&recon - &x).abs().mean(Kind::Float);
            let kl = kl_loss(&mu.to_kind(Kind::Float), &sigma.to_kind(Kind::Float));
            let g_adv = if use_adv {
                (self.disc.forward(&recon).to_kind(Kind::Float) - 1.0)
                    .pow_tensor_scalar(2)
                    .mean(Kind::Float)
            } else {
                Tensor::zeros([], (Kind::Float, dev))
            };
            Ok((recon, l1, kl, g_adv))
        })?;
        let total = &l1 + &kl * p.kl_weight + &g_adv * p.adversarial_weight;
        let (grad_norm, stepped) = self.learner.minimize(&total, s)?;
        let mut d_loss = 0.0;
        if use_adv {
            let dl = tch::autocast(amp, || {
                let real = (self.disc.forward(&x).to_kind(Kind::Float) - 1.0)
                    .pow_tensor_scalar(2)
                    .mean(Kind::Float);
                let fake = self
                    .disc
                    .forward(&recon.detach())
                    .to_kind(Kind::Float)
                    .pow_tensor_scalar(2)
                    .mean(Kind::Float);
                (real + fake) * 0.5
            });
            d_loss = dl.double_value(&[]);
            self.disc_learner.minimize(&dl, s)?;
        }
        let rec = serde_json::json!({ "total": total.double_value(&[]), "l1": l1.double_value(&[]), "kl": kl.double_value(&[]), "g_adv": g_adv.double_value(&[]), "d_loss": d_loss, "grad_norm": grad_norm });
        Ok(StepOutput {
            record: rec.as_object().expect("object").clone(),
            stepped,
        })
    }
}

/// Held-out evaluation on whole volumes: PSNR and SSIM of the decoded posterior mean,
/// beside the PSNR of the constant (mean) image, and a montage of central slices.
struct HeldoutEval {
    psnr: Vec<f64>,
    ssim: Vec<f64>,
    psnr_constant: Vec<f64>,
    per_subject: Vec<serde_json::Value>,
    rows: Vec<Vec<GrayImage>>,
}

fn evaluate_heldout(
    vae: &AutoencoderKlMaisi,
    cfg: &VaeConfig,
    heldout: &[meduet_engine::Item],
    dev: tch::Device,
) -> Result<HeldoutEval, StageError> {
    // Held-out evaluation on whole volumes.
    let _ng = tch::no_grad_guard();
    let (mut ps, mut ss, mut pcs) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = Vec::new();
    let mut per_subject = Vec::new();
    for it in heldout {
        let (v, _) = read_zarr::<f32>(&it.dir.join(IMAGE_ZARR)).map_err(StageError::input)?;
        let f = cfg.downsample_factor();
        let x = volume_tensor(&v);
        let tiles = TileConfig {
            tile: [128, 128, 128],
            overlap: 32,
            norm: TileNorm::Global,
        };
        let mu = encode_tiled_latent(vae, &x, &tiles, EncodeMode::Mean).map_err(fail)?;
        let recon = if v.shape.iter().product::<usize>() <= 160 * 160 * 160 {
            vae.decode(&mu.to_device(dev))
                .map_err(fail)?
                .to_device(tch::Device::Cpu)
        } else {
            decode_tiled(
                vae,
                &mu,
                &TileConfig {
                    tile: [128, 128, 128],
                    overlap: 32,
                    norm: TileNorm::PerTile,
                },
            )
            .map_err(fail)?
        };
        let s = x.size();
        let (nx, ny, nz) = ((s[2] / f) * f, (s[3] / f) * f, (s[4] / f) * f);
        let xc = x.narrow(2, 0, nx).narrow(3, 0, ny).narrow(4, 0, nz);
        let rc = recon
            .to_kind(Kind::Float)
            .clamp(0.0, 1.0)
            .narrow(2, 0, nx)
            .narrow(3, 0, ny)
            .narrow(4, 0, nz);
        let (pv, sv) = (psnr(&rc, &xc, 1.0), ssim_3d(&rc, &xc, 1.0, 7, 1.5));
        // What a reconstruction that knows nothing but the volume's mean scores: the
        // floor that puts the PSNR in context.
        let pc = psnr(&xc.mean(Kind::Float).expand_as(&xc), &xc, 1.0);
        ps.push(pv);
        ss.push(sv);
        pcs.push(pc);
        per_subject.push(
            serde_json::json!({ "subject": it.id, "psnr": pv, "ssim": sv, "psnr_constant": pc }),
        );
        if rows.len() < 4 {
            rows.push(
                slices(&xc, &it.id)
                    .into_iter()
                    .chain(slices(&rc, "recon"))
                    .collect::<Vec<_>>(),
            );
        }
    }
    Ok(HeldoutEval {
        psnr: ps,
        ssim: ss,
        psnr_constant: pcs,
        per_subject,
        rows,
    })
}

pub fn import(
    _: &VaeImport,
    p: &VaeImportParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let cfg = vae_config(p.preset, &p.model).map_err(StageError::input)?;
    let tree = ctx.source(&p.weights)?.clone();
    if tree.files.len() != 1 {
        return Err(StageError::input(format!(
            "weights '{}' must be one .safetensors file, found {} files",
            p.weights.as_str(),
            tree.files.len()
        )));
    }
    let path = tree.path_of(&tree.files[0].path);
    let mut vs = VarStore::new(tch::Device::Cpu);
    let _vae = AutoencoderKlMaisi::new(vs.root(), &cfg).map_err(fail)?;
    let n = load_vae_safetensors(&path, &mut vs)
        .map_err(|e| StageError::input(format!("'{}': {e}", path.display())))?;
    let out = ctx.output_dir("vae")?;
    vs.save(out.join(VAE_WEIGHTS)).map_err(fail)?;
    write_json(&out.join(VAE_CONFIG), &cfg)?;
    ctx.set_metric("tensors", n);
    Ok(())
}

thread_local! {
    /// The VAE of the running stage (fan-out items reuse it).
    static LOADED: RefCell<Option<(String, tch::Device, VarStore, AutoencoderKlMaisi)>> = const { RefCell::new(None) };
}

fn with_vae<T>(
    dir: &Path,
    dev: tch::Device,
    f: impl FnOnce(&AutoencoderKlMaisi) -> Result<T, StageError>,
) -> Result<T, StageError> {
    let key = dir.to_string_lossy().into_owned();
    LOADED.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((k, d, _, _)) if *k == key && *d == dev) {
            let (vs, vae) = load_vae(dir, dev)?;
            *slot = Some((key, dev, vs, vae));
        }
        f(&slot.as_ref().expect("loaded").3)
    })
}

/// The affine of the latent grid: latent voxel `u` covers image voxels `f*u .. f*u+f-1`,
/// its centre at image voxel `f*u + (f-1)/2`.
pub fn latent_affine(image: &[[f64; 4]; 4], f: f64) -> [[f64; 4]; 4] {
    let c = (f - 1.0) / 2.0;
    let s = [
        [f, 0.0, 0.0, c],
        [0.0, f, 0.0, c],
        [0.0, 0.0, f, c],
        [0.0, 0.0, 0.0, 1.0],
    ];
    mat_mul(image, &s)
}

pub fn encode(
    _: &VaeEncode,
    p: &VaeEncodeParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let vae_in = ctx.input("vae")?.clone();
    let item = ctx.item()?.clone();
    let (v, img_attrs) = read_zarr::<f32>(&item.dir.join(IMAGE_ZARR)).map_err(StageError::input)?;
    let x = volume_tensor(&v);
    let tiles = TileConfig {
        tile: p.tile,
        overlap: p.overlap,
        norm: match p.tiling {
            Tiling::Global => TileNorm::Global,
            Tiling::PerTile => TileNorm::PerTile,
        },
    };
    // Each subject's noise is seeded from the base seed and its content digest.
    let seed = step_seed(
        p.seed,
        u64::from_le_bytes(item.digest.as_bytes()[..8].try_into().expect("8 bytes")),
    );
    let mode = match p.mode {
        LatentMode::Sample => EncodeMode::Sample { seed },
        LatentMode::Mean => EncodeMode::Mean,
    };
    let fits = v.shape.iter().zip(p.tile).all(|(&n, t)| n as i64 <= t);
    let (z, f) = with_vae(&vae_in.dir, dev, |vae| {
        let z = if fits {
            // One tile covers the volume: whole-volume encoding (exact, one pass).
            let _ng = tch::no_grad_guard();
            let (mu, sigma) = vae.encode(&x.to_device(dev)).map_err(fail)?;
            match mode {
                EncodeMode::Mean => mu,
                EncodeMode::Sample { seed } => {
                    AutoencoderKlMaisi::sample_seeded(&mu, &sigma, seed).map_err(fail)?
                }
            }
        } else {
            encode_tiled_latent(vae, &x, &tiles, mode).map_err(fail)?
        };
        Ok((z, vae.config().downsample_factor()))
    })?;
    let z = z
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .squeeze_dim(0)
        .contiguous();
    let shape: Vec<usize> = z.size().iter().map(|&s| s as usize).collect();
    let data = Vec::<f32>::try_from(z.view([-1])).map_err(fail)?;
    let mut attrs = Attrs::new();
    for k in [
        "subject",
        "dataset",
        "case",
        "domain",
        "domain_id",
        "original_spacing",
        "has_lesion",
    ] {
        if let Some(v) = img_attrs.get(k) {
            attrs.insert(k.into(), v.clone());
        }
    }
    let lat_aff = latent_affine(&v.affine, f as f64);
    attrs.insert("affine".into(), affine_to_json(&lat_aff));
    attrs.insert(
        "spacing".into(),
        serde_json::json!(meduet_stages::data::volume::spacing_of(&lat_aff)),
    );
    attrs.insert("image_affine".into(), affine_to_json(&v.affine));
    attrs.insert("image_shape".into(), serde_json::json!(v.shape));
    attrs.insert("vae_digest".into(), vae_in.digest.to_hex().into());
    attrs.insert("mode".into(), serde_json::to_value(p.mode).expect("json"));
    attrs.insert(
        "seed".into(),
        if p.mode == LatentMode::Sample {
            seed.into()
        } else {
            serde_json::Value::Null
        },
    );
    attrs.insert("scale_factor".into(), 1.0.into());
    attrs.insert("source_digest".into(), item.digest.to_hex().into());
    let out = ctx.output_dir("latents")?.join(LATENT_ZARR);
    write_array_f32(&out, &shape, &data, &["c", "i", "j", "k"], &attrs).map_err(fail)?;
    ctx.set_item_attr("latent_shape", serde_json::json!(shape));
    Ok(())
}

pub fn decode(
    _: &VaeDecode,
    p: &VaeDecodeParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let vae_dir = ctx.input("vae")?.dir.clone();
    let item = ctx.item()?.clone();
    let (data, shape, attrs) =
        read_array_f32(&item.dir.join(LATENT_ZARR)).map_err(StageError::input)?;
    if shape.len() != 4 {
        return Err(StageError::input(format!(
            "latent of '{}' has shape {shape:?}, expected [C, X, Y, Z]",
            item.id
        )));
    }
    let z = Tensor::from_slice(&data).view([
        1,
        shape[0] as i64,
        shape[1] as i64,
        shape[2] as i64,
        shape[3] as i64,
    ]);
    let _ng = tch::no_grad_guard();
    let (img, f) = with_vae(&vae_dir, dev, |vae| {
        let f = vae.config().downsample_factor();
        let img = if p.tile == 0 {
            vae.decode(&z.to_device(dev))
                .map_err(fail)?
                .to_device(tch::Device::Cpu)
        } else {
            decode_tiled(
                vae,
                &z,
                &TileConfig {
                    tile: [p.tile * f; 3],
                    overlap: p.overlap * f,
                    norm: TileNorm::PerTile,
                },
            )
            .map_err(fail)?
        };
        Ok((img, f))
    })?;
    let img = img.to_kind(Kind::Float).squeeze().contiguous();
    let s: Vec<usize> = img.size().iter().map(|&v| v as usize).collect();
    let affine = attrs
        .get("image_affine")
        .and_then(affine_from_json)
        .unwrap_or_else(|| {
            let lat = attrs
                .get("affine")
                .and_then(affine_from_json)
                .unwrap_or(meduet_stages::data::volume::IDENTITY);
            let c = -(f as f64 - 1.0) / 2.0 / f as f64;
            let inv = [
                [1.0 / f as f64, 0.0, 0.0, c],
                [0.0, 1.0 / f as f64, 0.0, c],
                [0.0, 0.0, 1.0 / f as f64, c],
                [0.0, 0.0, 0.0, 1.0],
            ];
            mat_mul(&lat, &inv)
        });
    let vol = VolumeOf::from_parts(
        Vec::<f32>::try_from(img.view([-1])).map_err(fail)?,
        [s[0], s[1], s[2]],
        affine,
    )
    .map_err(fail)?;
    let mut extra = Attrs::new();
    for k in [
        "subject",
        "dataset",
        "case",
        "domain",
        "domain_id",
        "has_lesion",
    ] {
        if let Some(v) = attrs.get(k) {
            extra.insert(k.into(), v.clone());
        }
    }
    extra.insert("decoded_from".into(), item.digest.to_hex().into());
    write_zarr(&ctx.output_dir("volumes")?.join(IMAGE_ZARR), &vol, &extra).map_err(fail)?;
    ctx.set_item_attr("shape", serde_json::json!(s));
    Ok(())
}
