//! `synthesis_metrics`: FID and MMD between real and generated volumes on whole-volume
//! features of a pretrained 3-D network ([`super::volume_features`]), and MS-SSIM diversity
//! over pairs of generated volumes (method.md section 8, protocol A). The real side is
//! featurised here (`real`) or read from a `volume_features` stage (`real_features`), which
//! must have used the same network, weights and preprocessing.
//!
//! FID uses the Fréchet formula on the feature means and
//! covariances, MMD the unbiased Gaussian-kernel estimate with the median-heuristic
//! bandwidth (`meduet_stages::analysis::synthesis`). MS-SSIM (kernel 7, sigma 1.5, data
//! range 1, MONAI's weights) is averaged over ordered pairs `i != j` of generated volumes.
//! The network, its weight digest and the preprocessing are written with the values.

use meduet_engine::{StageContext, StageError};
use meduet_stages::analysis::synthesis::{fid, median_bandwidth, mmd2_gaussian};
use meduet_stages::kinds::diffusion::*;
use tch::{Device, Kind, Tensor};

use super::common::{device, write_json};
use super::volume_features::{
    random_crops, read_volumes, FeatureExtractor, NamedVolume, StoredFeatures,
};

/// The real side of the comparison: volumes to featurise here, or features computed once
/// by a `volume_features` stage.
enum RealSide {
    Volumes((Vec<NamedVolume>, Option<[f64; 2]>)),
    Stored(Box<StoredFeatures>),
}

impl RealSide {
    fn volumes_to_featurise(&self, crops_per_volume: usize) -> usize {
        match self {
            RealSide::Volumes((v, _)) => v.len() * crops_per_volume.max(1),
            RealSide::Stored(_) => 0,
        }
    }
}

/// Stored real features are comparable only when made by the same network and weights,
/// with the same preprocessing, and (for crops) of the generated volumes' shape.
fn check_stored(
    stored: &StoredFeatures,
    p: &SynthesisMetricsParams,
    network: &serde_json::Value,
    prep: &serde_json::Value,
    gen_shape: impl FnOnce() -> Result<[usize; 3], StageError>,
) -> Result<(), StageError> {
    if p.real_crops_per_volume > 0 {
        return Err(StageError::input(
            "real_crops_per_volume: with `real_features` the crops are its volume_features              stage's (`crop`, `crops_per_volume`); set them there",
        ));
    }
    for key in ["network", "weights_digest"] {
        if stored.feature_network[key] != network[key] {
            return Err(StageError::input(format!(
                "real_features: made with {key} {}, this stage uses {}",
                stored.feature_network[key], network[key]
            )));
        }
    }
    let own = prep.as_object().expect("preprocessing is an object");
    for (key, want) in own {
        if &stored.preprocessing[key] != want {
            let hint = if key == "data_hu_window" {
                " (give hu_window to one or both)"
            } else {
                ""
            };
            return Err(StageError::input(format!(
                "real_features: made with preprocessing {key} = {}, this stage uses {want}{hint}",
                stored.preprocessing[key]
            )));
        }
    }
    if let Some(crop) = stored.preprocessing["crop"]
        .as_array()
        .filter(|c| !c.is_empty())
    {
        let shape = gen_shape()?;
        let crop: Vec<u64> = crop.iter().filter_map(|v| v.as_u64()).collect();
        if crop != shape.map(|v| v as u64) {
            return Err(StageError::input(format!(
                "real_features: crops of {crop:?}, the generated volumes are {shape:?} (set its volume_features stage's crop)"
            )));
        }
    }
    Ok(())
}

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

/// A volume's per-scale quantities that MS-SSIM reuses across every pair it is in: the
/// volume at each scale, its local means and variances under the Gaussian window.
pub struct MsSsimStats {
    kernel: Tensor,
    /// Per scale: (volume, local mean, local variance).
    levels: Vec<(Tensor, Tensor, Tensor)>,
}

impl MsSsimStats {
    /// `x` is `[1, 1, D, H, W]`; Gaussian window of size `kernel`, sigma 1.5; `scales` levels
    /// with 2x average pooling between them.
    pub fn new(x: &Tensor, kernel: i64, scales: usize) -> Self {
        let k = gaussian(kernel, 1.5, x.device());
        let mut x = x.to_kind(Kind::Float);
        let mut levels = Vec::with_capacity(scales);
        for i in 0..scales {
            let mu = filt(&x, &k);
            let var = filt(&(&x * &x), &k) - &mu * &mu;
            let next = (i + 1 < scales)
                .then(|| x.avg_pool3d([2; 3], [2; 3], [0; 3], false, true, None::<i64>));
            levels.push((x.shallow_clone(), mu, var));
            if let Some(n) = next {
                x = n;
            }
        }
        Self { kernel: k, levels }
    }

    /// MS-SSIM against `other` (same shape, kernel and scales), as MONAI's
    /// `MultiScaleSSIMMetric` (k1 0.01, k2 0.03, the first `scales` of MONAI's weights).
    /// Symmetric: `a.ms_ssim(b) == b.ms_ssim(a)`.
    pub fn ms_ssim(&self, other: &MsSsimStats, data_range: f64) -> f64 {
        let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
        let scales = self.levels.len();
        let mut acc = 1.0;
        for (i, ((x, mx, sxx), (y, my, syy))) in self.levels.iter().zip(&other.levels).enumerate() {
            let sxy = filt(&(x * y), &self.kernel) - mx * my;
            let cs = (&sxy * 2.0 + c2) / (sxx + syy + c2);
            let v = if i + 1 < scales {
                cs.mean(Kind::Float).double_value(&[])
            } else {
                let l = (mx * my * 2.0 + c1) / (mx * mx + my * my + c1);
                (l * cs).mean(Kind::Float).double_value(&[])
            };
            acc *= v.max(0.0).powf(MS_SSIM_WEIGHTS[i]);
        }
        acc
    }
}

/// 3-D MS-SSIM of two `[1, 1, D, H, W]` volumes as MONAI's `MultiScaleSSIMMetric`
/// (Gaussian kernel `kernel`, sigma 1.5, k1 0.01, k2 0.03, `scales` levels with 2x average
/// pooling between them, the first `scales` of MONAI's weights).
pub fn ms_ssim_3d(x: &Tensor, y: &Tensor, data_range: f64, kernel: i64, scales: usize) -> f64 {
    MsSsimStats::new(x, kernel, scales).ms_ssim(&MsSsimStats::new(y, kernel, scales), data_range)
}

pub fn run(
    _: &SynthesisMetrics,
    p: &SynthesisMetricsParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let gen_items = ctx.input("generated")?.items.clone();
    let real_items = ctx.inputs("real").first().map(|a| a.items.clone());
    let stored_dir = ctx.inputs("real_features").first().map(|a| a.dir.clone());
    let real_side = match (real_items, stored_dir) {
        (Some(items), None) => RealSide::Volumes(read_volumes(&items)?),
        (None, Some(dir)) => RealSide::Stored(Box::new(StoredFeatures::read(&dir)?)),
        (Some(_), Some(_)) => return Err(StageError::input(
            "inputs: give `real` (volumes) or `real_features` (a volume_features stage), not both",
        )),
        (None, None) => {
            return Err(StageError::input(
                "inputs: `real` (volumes) or `real_features` (a volume_features stage) is required",
            ))
        }
    };
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
    let recorded_window = match &real_side {
        RealSide::Volumes((_, w)) => *w,
        RealSide::Stored(s) => serde_json::from_value(s.preprocessing["data_hu_window"].clone())
            .ok()
            .flatten(),
    };
    let fx = FeatureExtractor::load(ctx, p.features(), recorded_window)?;
    let (network, mut prep) = fx.record();
    let gen_shape = |what: &str| -> Result<[usize; 3], StageError> {
        let shape = gen.first().map(|g| g.2).unwrap_or_default();
        match gen.iter().find(|g| g.2 != shape) {
            Some(g) => Err(StageError::input(format!(
                "{what}: the generated volumes differ in shape ('{}' {:?}, '{}' {:?})",
                gen[0].0, shape, g.0, g.2
            ))),
            None => Ok(shape),
        }
    };
    let bar = ctx.progress(
        (gen.len() + real_side.volumes_to_featurise(p.real_crops_per_volume)) as u64,
        "volumes",
    );
    let fr = match real_side {
        RealSide::Volumes((mut real, _)) => {
            if p.real_crops_per_volume > 0 {
                let shape = gen_shape("real_crops_per_volume")?;
                real = random_crops(&real, shape, p.real_crops_per_volume, p.seed)?;
            }
            prep["real_crops_per_volume"] = serde_json::json!(p.real_crops_per_volume);
            prep["seed"] = serde_json::json!(p.seed);
            fx.features(&real, ctx, &bar)?
        }
        RealSide::Stored(stored) => {
            check_stored(&stored, p, &network, &prep, || gen_shape("real_features"))?;
            prep["real_features"] = stored.preprocessing.clone();
            stored.features
        }
    };
    let fg = fx.features(&gen, ctx, &bar)?;
    bar.finish_and_clear();
    if gen.len() < 2 || fr.rows < 2 {
        return Err(StageError::input(format!(
            "FID and MMD need at least 2 volumes per set (generated {}, real {})",
            gen.len(),
            fr.rows
        )));
    }
    let fid_v = fid(&fr, &fg);
    let h = median_bandwidth(&fr, &fg);
    let mmd = mmd2_gaussian(&fr, &fg, h);
    // MS-SSIM over unordered pairs of generated volumes (it is symmetric), each volume's
    // windowed statistics computed once.
    let min_axis = (p.ms_ssim_kernel - 1) << (p.ms_ssim_scales - 1);
    if let Some(a) = gen
        .iter()
        .find(|a| a.2 != gen[0].2 || a.2.iter().any(|&v| v <= min_axis))
    {
        return Err(StageError::input(format!(
            "MS-SSIM: the generated volumes must have equal shapes above {min_axis} per axis              ('{}' {:?}, '{}' {:?}; kernel {}, {} scales; lower ms_ssim_scales)",
            gen[0].0, gen[0].2, a.0, a.2, p.ms_ssim_kernel, p.ms_ssim_scales
        )));
    }
    let mut pairs = Vec::new();
    for i in 0..gen.len() {
        for j in i + 1..gen.len() {
            if p.ms_ssim_max_pairs == 0 || pairs.len() < p.ms_ssim_max_pairs {
                pairs.push((i, j));
            }
        }
    }
    let mut stats: Vec<Option<MsSsimStats>> = (0..gen.len()).map(|_| None).collect();
    for &(i, j) in &pairs {
        for k in [i, j] {
            if stats[k].is_none() {
                let (_, data, shape) = &gen[k];
                let s = shape.map(|x| x as i64);
                let t = Tensor::from_slice(data)
                    .view([1, 1, s[0], s[1], s[2]])
                    .to_device(dev)
                    .clamp(0.0, 1.0);
                stats[k] = Some(MsSsimStats::new(
                    &t,
                    p.ms_ssim_kernel as i64,
                    p.ms_ssim_scales,
                ));
            }
        }
    }
    let mut ms = Vec::with_capacity(pairs.len());
    for &(i, j) in &pairs {
        ctx.check_cancelled()?;
        let (a, b) = (stats[i].as_ref(), stats[j].as_ref());
        ms.push(a.expect("computed").ms_ssim(b.expect("computed"), 1.0));
    }
    let ms_mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    let out = ctx.output_dir("report")?;
    let report = serde_json::json!({
        "fid": fid_v, "mmd": mmd, "mmd_bandwidth": h, "ms_ssim": ms_mean, "ms_ssim_pairs": ms.len(),
        "generated": gen.len(), "real": fr.rows, "generated_from": generated_from,
        "feature_network": network,
        "preprocessing": prep,
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
            &network["weights_digest"].as_str().unwrap_or_default()[..12],
            fr.rows,
            gen.len(),
            p.resize,
            p.features().normalization
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
    use meduet_stages::analysis::Matrix;

    #[test]
    fn stored_features_must_match_network_preprocessing_and_shape() {
        let p: SynthesisMetricsParams = serde_json::from_value(serde_json::json!({
            "network": "medicalnet_resnet10", "weights": "w.safetensors",
        }))
        .unwrap();
        let network = serde_json::json!({"network": "medicalnet_resnet10", "weights_digest": "ab"});
        let prep =
            serde_json::json!({"clip": [0.0, 1.0], "resize": null, "normalization": "zscore"});
        let stored =
            |net: serde_json::Value, mut pre: serde_json::Value, crop: serde_json::Value| {
                pre["crop"] = crop;
                StoredFeatures {
                    features: Matrix::new(2, 1, vec![0.0, 1.0]),
                    ids: vec!["a".into(), "b".into()],
                    feature_network: net,
                    preprocessing: pre,
                }
            };
        let shape = || Ok([64, 64, 32]);
        let ok = stored(
            network.clone(),
            prep.clone(),
            serde_json::json!([64, 64, 32]),
        );
        check_stored(&ok, &p, &network, &prep, shape).unwrap();
        let err = |s: &StoredFeatures, p: &SynthesisMetricsParams| {
            check_stored(s, p, &network, &prep, shape)
                .unwrap_err()
                .to_string()
        };
        let other_net =
            serde_json::json!({"network": "medicalnet_resnet10", "weights_digest": "cd"});
        let e = err(
            &stored(other_net, prep.clone(), serde_json::Value::Null),
            &p,
        );
        assert!(e.contains("weights_digest"), "{e}");
        let mut unit = prep.clone();
        unit["normalization"] = "unit".into();
        let e = err(&stored(network.clone(), unit, serde_json::Value::Null), &p);
        assert!(e.contains("normalization"), "{e}");
        let e = err(
            &stored(
                network.clone(),
                prep.clone(),
                serde_json::json!([32, 32, 32]),
            ),
            &p,
        );
        assert!(e.contains("crops of [32, 32, 32]"), "{e}");
        let crops = SynthesisMetricsParams {
            real_crops_per_volume: 2,
            ..p.clone()
        };
        let e = err(&ok, &crops);
        assert!(e.contains("real_crops_per_volume"), "{e}");
    }
}
