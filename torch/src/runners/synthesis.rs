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
use crate::models::resnet3d::ResNet3d;

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

/// The volumes, and the HU window their intensities were mapped from when every one
/// records the same (`resample`'s `intensity.window`).
fn read_volumes(
    items: &[meduet_engine::Item],
) -> Result<(Vec<NamedVolume>, Option<[f64; 2]>), StageError> {
    let mut windows = Vec::new();
    let vols = items
        .iter()
        .map(|it| {
            let (v, attrs) =
                read_zarr::<f32>(&it.dir.join(IMAGE_ZARR)).map_err(StageError::input)?;
            windows.push(
                attrs
                    .get("intensity")
                    .and_then(|i| i.get("window"))
                    .and_then(|w| serde_json::from_value::<[f64; 2]>(w.clone()).ok()),
            );
            Ok((it.id.clone(), v.data, v.shape))
        })
        .collect::<Result<Vec<_>, StageError>>()?;
    let window = match windows.first() {
        Some(Some(w)) if windows.iter().all(|v| v.as_ref() == Some(w)) => Some(*w),
        _ => None,
    };
    Ok((vols, window))
}

/// Maps [0, 1] intensities made from the HU window `from` onto [0, 1] of the window `to`.
fn rewindow(t: Tensor, from: [f64; 2], to: [f64; 2]) -> Tensor {
    let hu = t * (from[1] - from[0]) + from[0];
    ((hu - to[0]) / (to[1] - to[0])).clamp(0.0, 1.0)
}

fn prep(
    data: &[f32],
    shape: [usize; 3],
    p: &SynthesisMetricsParams,
    rewindow_from: Option<[f64; 2]>,
    dev: Device,
) -> Tensor {
    let s = shape.map(|v| v as i64);
    let mut t = Tensor::from_slice(data)
        .view([1, 1, s[0], s[1], s[2]])
        .to_device(dev)
        .clamp(0.0, 1.0);
    if let (Some(from), Some(to)) = (rewindow_from, p.network.input_hu_window()) {
        t = rewindow(t, from, to);
    }
    if let Some(r) = p.resize {
        t = t.upsample_trilinear3d(r.map(|v| v as i64), false, None, None, None);
    }
    if p.normalization() == FeatureNorm::Zscore {
        let m = t.mean(Kind::Float);
        let sd = t.std(true);
        t = (t - m) / (sd + 1e-5);
    }
    t
}

type NamedVolume = (String, Vec<f32>, [usize; 3]);

/// `per_volume` seeded random crops of every real volume, of the generated volumes' (common)
/// shape.
fn random_crops(
    real: &[NamedVolume],
    gen: &[NamedVolume],
    per_volume: usize,
    seed: u64,
) -> Result<Vec<NamedVolume>, StageError> {
    use rand::{Rng, SeedableRng};
    let shape = gen[0].2;
    if let Some(g) = gen.iter().find(|g| g.2 != shape) {
        return Err(StageError::input(format!(
            "real_crops_per_volume: the generated volumes differ in shape ('{}' {:?}, '{}' {:?})",
            gen[0].0, shape, g.0, g.2
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(real.len() * per_volume);
    for (id, data, s) in real {
        if (0..3).any(|a| s[a] < shape[a]) {
            return Err(StageError::input(format!(
                "real_crops_per_volume: real volume '{id}' {s:?} is smaller than the generated {shape:?}"
            )));
        }
        for k in 0..per_volume {
            let o: Vec<usize> = (0..3)
                .map(|a| rng.random_range(0..=s[a] - shape[a]))
                .collect();
            let mut crop = Vec::with_capacity(shape.iter().product());
            for x in 0..shape[0] {
                for y in 0..shape[1] {
                    let row = ((o[0] + x) * s[1] + o[1] + y) * s[2] + o[2];
                    crop.extend_from_slice(&data[row..row + shape[2]]);
                }
            }
            out.push((format!("{id}#crop{k}"), crop, shape));
        }
    }
    Ok(out)
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
    let net = ResNet3d::new(&vs.root(), p.network);
    vs.load(&wfile).map_err(|e| {
        StageError::input(format!(
            "weights '{}' do not fit {:?} (hint: make them with {}): {e}",
            wfile.display(),
            p.network,
            p.network.converter()
        ))
    })?;
    vs.freeze();
    let _ng = tch::no_grad_guard();
    // What made the generated volumes (the `sample` stage's item attributes), when they
    // agree across items: synthesis_curve plots the metric against it.
    let from = |key: &str| -> serde_json::Value {
        let vals: Vec<&serde_json::Value> =
            gen_items.iter().filter_map(|i| i.attrs.get(key)).collect();
        match vals.first() {
            Some(v) if vals.len() == gen_items.len() && vals.iter().all(|w| w == v) => (*v).clone(),
            _ => serde_json::Value::Null,
        }
    };
    let generated_from = serde_json::json!({
        "method": from("method"), "init": from("init"), "training_step": from("training_step"),
    });
    let (gen, _) = read_volumes(&gen_items)?;
    let (mut real, real_window) = read_volumes(&real_items)?;
    let data_window = p.hu_window.or(real_window);
    if p.network.input_hu_window().is_some() && data_window.is_none() {
        return Err(StageError::input(format!(
            "hu_window: {:?} expects intensities from the HU window {:?}, and the real volumes \
             record no common `intensity.window`: give hu_window = [low, high]",
            p.network,
            p.network.input_hu_window().unwrap()
        )));
    }
    if p.real_crops_per_volume > 0 {
        real = random_crops(&real, &gen, p.real_crops_per_volume, p.seed)?;
    }
    let bar = ctx.progress((gen.len() + real.len()) as u64, "volumes");
    let feats = |set: &[NamedVolume]| -> Result<Matrix, StageError> {
        let mut rows = Vec::new();
        for (_, d, s) in set {
            ctx.check_cancelled()?;
            let f = net
                .features(&prep(d, *s, p, data_window, dev))
                .to_kind(Kind::Double);
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
        let t = |v: &NamedVolume| {
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
        "generated": gen.len(), "real": real.len(), "generated_from": generated_from,
        "feature_network": {
            "network": p.network, "weights_digest": src.digest.to_hex(),
            "feature_dim": net.feature_dim, "pooling": "global average of layer4",
        },
        "preprocessing": {
            "clip": [0.0, 1.0], "resize": p.resize, "normalization": p.normalization(),
            "real_crops_per_volume": p.real_crops_per_volume, "seed": p.seed,
            "data_hu_window": data_window,
            "rewindowed_to": p.network.input_hu_window().filter(|_| data_window.is_some()),
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
            p.normalization()
        ),
    )
    .map_err(|e| StageError::io(&out, e))?;
    ctx.set_metric("fid", fid_v);
    ctx.set_metric("mmd", mmd);
    ctx.set_metric("ms_ssim", ms_mean);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewindow_maps_between_hu_windows() {
        // [0, 1] from [-175, 250] HU onto Merlin's [-1000, 1000]: -175 HU -> 0.4125,
        // 250 HU -> 0.625, and back to the identity for equal windows.
        let t = Tensor::from_slice(&[0.0f32, 0.5, 1.0]);
        let got = Vec::<f32>::try_from(rewindow(
            t.shallow_clone(),
            [-175.0, 250.0],
            [-1000.0, 1000.0],
        ))
        .unwrap();
        for (g, w) in got.iter().zip([0.4125f32, 0.51875, 0.625]) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // A narrower target window clips.
        let got = Vec::<f32>::try_from(rewindow(
            t.shallow_clone(),
            [-1000.0, 1000.0],
            [-100.0, 100.0],
        ))
        .unwrap();
        assert_eq!(got, vec![0.0, 0.5, 1.0]);
        let same = Vec::<f32>::try_from(rewindow(t, [-175.0, 250.0], [-175.0, 250.0])).unwrap();
        assert_eq!(same, vec![0.0, 0.5, 1.0]);
    }
}
