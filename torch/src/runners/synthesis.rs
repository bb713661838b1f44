//! `synthesis_metrics`: FID and MMD between real and generated volumes on whole-volume
//! features of a pretrained 3-D network, and MS-SSIM diversity over pairs of generated
//! volumes (method.md section 8, protocol A).
//!
//! Each volume is clipped to [0, 1] (the HU window of the data), optionally resized
//! (trilinear) and z-scored (`normalization`), then goes through the feature network
//! (global-average-pooled layer4). FID uses the Fréchet formula on the feature means and
//! covariances, MMD the unbiased Gaussian-kernel estimate with the median-heuristic
//! bandwidth (`meduet_stages::analysis::synthesis`). MS-SSIM (kernel 7, sigma 1.5, data
//! range 1, MONAI's weights) is averaged over ordered pairs `i != j` of generated volumes.
//! The network, its weight digest and the preprocessing are written with the values.

use meduet_engine::{StageContext, StageError};
use meduet_stages::analysis::synthesis::{fid, median_bandwidth, mmd2_gaussian};
use meduet_stages::analysis::Matrix;
use meduet_stages::data::zarr_store::read_zarr;
use meduet_stages::kinds::diffusion::*;
use meduet_stages::kinds::resample::IMAGE_ZARR;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::common::{device, fail, write_json};
use crate::models::resnet3d::MedicalNet;

/// MONAI's MS-SSIM scale weights.
pub const MS_SSIM_WEIGHTS: [f64; 5] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333];

fn gaussian(size: i64, sigma: f64, dev: Device) -> Tensor {
    let c = (size - 1) as f64 / 2.0;
    let v: Vec<f64> = (0..size)
        .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = v.iter().sum();
    Tensor::from_slice(&v.iter().map(|x| (x / s) as f32).collect::<Vec<_>>()).to_device(dev)
}

fn filt(x: &Tensor, k: &Tensor) -> Tensor {
    let n = k.size()[0];
    let mut y = x.shallow_clone();
    for shape in [[1, 1, n, 1, 1], [1, 1, 1, n, 1], [1, 1, 1, 1, n]] {
        y = y.conv3d(&k.view(shape), None::<Tensor>, [1; 3], [0; 3], [1; 3], 1);
    }
    y
}

/// 3-D MS-SSIM of two `[1, 1, D, H, W]` volumes as MONAI's `MultiScaleSSIMMetric`
/// (Gaussian kernel `kernel`, sigma 1.5, k1 0.01, k2 0.03, `scales` levels with 2x average
/// pooling between them, the first `scales` of MONAI's weights).
pub fn ms_ssim_3d(x: &Tensor, y: &Tensor, data_range: f64, kernel: i64, scales: usize) -> f64 {
    let k = gaussian(kernel, 1.5, x.device());
    let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
    let (mut x, mut y) = (x.to_kind(Kind::Float), y.to_kind(Kind::Float));
    let mut acc = 1.0;
    for (i, w) in MS_SSIM_WEIGHTS.iter().take(scales).enumerate() {
        let (mx, my) = (filt(&x, &k), filt(&y, &k));
        let sxx = filt(&(&x * &x), &k) - &mx * &mx;
        let syy = filt(&(&y * &y), &k) - &my * &my;
        let sxy = filt(&(&x * &y), &k) - &mx * &my;
        let cs = (&sxy * 2.0 + c2) / (&sxx + &syy + c2);
        let v = if i + 1 < scales {
            let v = cs.mean(Kind::Float).double_value(&[]);
            x = x.avg_pool3d([2; 3], [2; 3], [0; 3], false, true, None::<i64>);
            y = y.avg_pool3d([2; 3], [2; 3], [0; 3], false, true, None::<i64>);
            v
        } else {
            let l = (&mx * &my * 2.0 + c1) / (&mx * &mx + &my * &my + c1);
            (l * cs).mean(Kind::Float).double_value(&[])
        };
        acc *= v.max(0.0).powf(*w);
    }
    acc
}

fn read_volumes(
    items: &[meduet_engine::Item],
) -> Result<Vec<(String, Vec<f32>, [usize; 3])>, StageError> {
    items
        .iter()
        .map(|it| {
            let (v, _) = read_zarr::<f32>(&it.dir.join(IMAGE_ZARR)).map_err(StageError::input)?;
            Ok((it.id.clone(), v.data, v.shape))
        })
        .collect()
}

fn prep(data: &[f32], shape: [usize; 3], p: &SynthesisMetricsParams, dev: Device) -> Tensor {
    let s = shape.map(|v| v as i64);
    let mut t = Tensor::from_slice(data)
        .view([1, 1, s[0], s[1], s[2]])
        .to_device(dev)
        .clamp(0.0, 1.0);
    if let Some(r) = p.resize {
        t = t.upsample_trilinear3d(r.map(|v| v as i64), false, None, None, None);
    }
    if p.normalization == FeatureNorm::Zscore {
        let m = t.mean(Kind::Float);
        let sd = t.std(true);
        t = (t - m) / (sd + 1e-5);
    }
    t
}

pub fn run(
    _: &SynthesisMetrics,
    p: &SynthesisMetricsParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let gen_items = ctx.input("generated")?.items.clone();
    let real_items = ctx.input("real")?.items.clone();
    if gen_items.len() < 2 || real_items.len() < 2 {
        return Err(StageError::input(format!(
            "FID and MMD need at least 2 volumes per set (generated {}, real {})",
            gen_items.len(),
            real_items.len()
        )));
    }
    let src = ctx.source(&p.weights)?.clone();
    let wfile = src.root.clone();
    let mut vs = VarStore::new(dev);
    let net = MedicalNet::new(&vs.root(), p.network);
    vs.load(&wfile).map_err(|e| {
        StageError::input(format!(
            "weights '{}' do not fit {:?} (hint: convert MedicalNet .pth files with scripts/convert_medicalnet.py): {e}",
            wfile.display(),
            p.network
        ))
    })?;
    vs.freeze();
    let _ng = tch::no_grad_guard();
    let gen = read_volumes(&gen_items)?;
    let real = read_volumes(&real_items)?;
    let bar = ctx.progress((gen.len() + real.len()) as u64, "volumes");
    let feats = |set: &[(String, Vec<f32>, [usize; 3])]| -> Result<Matrix, StageError> {
        let mut rows = Vec::new();
        for (_, d, s) in set {
            ctx.check_cancelled()?;
            let f = net.features(&prep(d, *s, p, dev)).to_kind(Kind::Double);
            rows.extend(Vec::<f64>::try_from(f.view([-1]).to_device(Device::Cpu)).map_err(fail)?);
            bar.inc(1);
        }
        Ok(Matrix::new(set.len(), net.feature_dim as usize, rows))
    };
    let fr = feats(&real)?;
    let fg = feats(&gen)?;
    bar.finish_and_clear();
    let fid_v = fid(&fr, &fg);
    let h = median_bandwidth(&fr, &fg);
    let mmd = mmd2_gaussian(&fr, &fg, h);
    // MS-SSIM over ordered pairs of generated volumes.
    let min_axis = (p.ms_ssim_kernel - 1) << (p.ms_ssim_scales - 1);
    let mut pairs = Vec::new();
    for i in 0..gen.len() {
        for j in 0..gen.len() {
            if i != j && (p.ms_ssim_max_pairs == 0 || pairs.len() < p.ms_ssim_max_pairs) {
                pairs.push((i, j));
            }
        }
    }
    let mut ms = Vec::new();
    for &(i, j) in &pairs {
        let (a, b) = (&gen[i], &gen[j]);
        if a.2 != b.2 || a.2.iter().any(|&v| v <= min_axis) {
            return Err(StageError::input(format!(
                "MS-SSIM: '{}' {:?} and '{}' {:?} must have equal shapes above {min_axis} per axis \
                 (kernel {}, {} scales; lower ms_ssim_scales)",
                a.0, a.2, b.0, b.2, p.ms_ssim_kernel, p.ms_ssim_scales
            )));
        }
        let t = |v: &(String, Vec<f32>, [usize; 3])| {
            let s = v.2.map(|x| x as i64);
            Tensor::from_slice(&v.1)
                .view([1, 1, s[0], s[1], s[2]])
                .to_device(dev)
                .clamp(0.0, 1.0)
        };
        ms.push(ms_ssim_3d(
            &t(a),
            &t(b),
            1.0,
            p.ms_ssim_kernel as i64,
            p.ms_ssim_scales,
        ));
    }
    let ms_mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    let out = ctx.output_dir("report")?;
    let report = serde_json::json!({
        "fid": fid_v, "mmd": mmd, "mmd_bandwidth": h, "ms_ssim": ms_mean, "ms_ssim_pairs": ms.len(),
        "generated": gen.len(), "real": real.len(),
        "feature_network": {
            "network": p.network, "weights_digest": src.digest.to_hex(),
            "feature_dim": net.feature_dim, "pooling": "global average of layer4",
        },
        "preprocessing": {
            "clip": [0.0, 1.0], "resize": p.resize, "normalization": p.normalization,
        },
        "ms_ssim_settings": {"kernel": p.ms_ssim_kernel, "sigma": 1.5, "scales": p.ms_ssim_scales,
                              "data_range": 1.0, "weights": &MS_SSIM_WEIGHTS[..p.ms_ssim_scales]},
        "mmd_kernel": "gaussian, unbiased, bandwidth = median pooled pairwise distance",
    });
    write_json(&out.join("metrics.json"), &report)?;
    std::fs::write(
        out.join("metrics.md"),
        format!(
            "| metric | value |\n|---|---|\n| FID | {fid_v:.4} |\n| MMD^2 | {mmd:.5} |\n| MS-SSIM (generated pairs) | {ms_mean:.4} |\n\n\
             Features: {:?} (digest {}), {} real vs {} generated volumes, clip [0, 1], resize {:?}, {:?}.\n",
            p.network,
            &src.digest.to_hex()[..12],
            real.len(),
            gen.len(),
            p.resize,
            p.normalization
        ),
    )
    .map_err(|e| StageError::io(&out, e))?;
    ctx.set_metric("fid", fid_v);
    ctx.set_metric("mmd", mmd);
    ctx.set_metric("ms_ssim", ms_mean);
    Ok(())
}
