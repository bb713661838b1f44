//! Whole-volume features on a pretrained 3-D CT network, the input of FID and MMD
//! (method.md section 8, protocol A), and the `volume_features` stage that computes the real
//! side once for every `synthesis_metrics` stage comparing samples with the same volumes.
//!
//! Each volume is clipped to [0, 1] (the HU window of the data), re-windowed when the
//! network was trained on another HU window, optionally resized (trilinear) and z-scored
//! (`normalization`), then goes through the feature network (global-average-pooled layer4).
//! Crops are seeded: with equal seeds and counts, `volume_features`' crops are those of
//! `synthesis_metrics`' `real_crops_per_volume`, so both paths give equal features.

use std::path::Path;

use meduet_engine::{Item, StageContext, StageError};
use meduet_stages::analysis::Matrix;
use meduet_stages::data::zarr_store::read_zarr;
use meduet_stages::kinds::diffusion::*;
use meduet_stages::kinds::resample::IMAGE_ZARR;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::common::{device, fail, read_json, write_json};
use crate::models::resnet3d::ResNet3d;

/// An id, the intensities and the shape of a volume.
pub type NamedVolume = (String, Vec<f32>, [usize; 3]);

/// The files of a `volume_features` artifact.
pub const FEATURES_FILE: &str = "features.safetensors";
pub const FEATURES_RECORD: &str = "features.json";

/// The volumes, and the HU window their intensities were mapped from when every one
/// records the same (`resample`'s `intensity.window`).
pub fn read_volumes(items: &[Item]) -> Result<(Vec<NamedVolume>, Option<[f64; 2]>), StageError> {
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
pub fn rewindow(t: Tensor, from: [f64; 2], to: [f64; 2]) -> Tensor {
    let hu = t * (from[1] - from[0]) + from[0];
    ((hu - to[0]) / (to[1] - to[0])).clamp(0.0, 1.0)
}

/// `per_volume` seeded random crops of `shape` from every volume (ids `<id>#crop<k>`).
pub fn random_crops(
    volumes: &[NamedVolume],
    shape: [usize; 3],
    per_volume: usize,
    seed: u64,
) -> Result<Vec<NamedVolume>, StageError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(volumes.len() * per_volume);
    for (id, data, s) in volumes {
        if (0..3).any(|a| s[a] < shape[a]) {
            return Err(StageError::input(format!(
                "crops: volume '{id}' {s:?} is smaller than the crop {shape:?}"
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

/// A loaded feature network with its preprocessing.
pub struct FeatureExtractor {
    net: ResNet3d,
    network: FeatureNetwork,
    normalization: FeatureNorm,
    resize: Option<[usize; 3]>,
    /// The HU window of the data's [0, 1] intensities (given, or recorded by the volumes).
    data_window: Option<[f64; 2]>,
    weights_digest: String,
    dev: Device,
    _vs: VarStore,
}

impl FeatureExtractor {
    /// Loads the network of `s`; `recorded_window` is the volumes' own HU window.
    pub fn load(
        ctx: &StageContext,
        s: FeatureSettings<'_>,
        recorded_window: Option<[f64; 2]>,
    ) -> Result<Self, StageError> {
        let dev = device(ctx);
        let data_window = s.hu_window.or(recorded_window);
        if let (Some(want), None) = (s.network.input_hu_window(), data_window) {
            return Err(StageError::input(format!(
                "hu_window: {:?} expects intensities from the HU window {want:?}, and the volumes \
                 record no common `intensity.window`: give hu_window = [low, high]",
                s.network
            )));
        }
        let src = ctx.source(s.weights)?;
        let mut vs = VarStore::new(dev);
        let net = ResNet3d::new(&vs.root(), s.network);
        vs.load(&src.root).map_err(|e| {
            StageError::input(format!(
                "weights '{}' do not fit {:?} (hint: make them with {}): {e}",
                src.root.display(),
                s.network,
                s.network.converter()
            ))
        })?;
        vs.freeze();
        Ok(Self {
            net,
            network: s.network,
            normalization: s.normalization,
            resize: s.resize,
            data_window,
            weights_digest: src.digest.to_hex(),
            dev,
            _vs: vs,
        })
    }

    pub fn feature_dim(&self) -> usize {
        self.net.feature_dim as usize
    }

    fn prep(&self, data: &[f32], shape: [usize; 3]) -> Tensor {
        let s = shape.map(|v| v as i64);
        let mut t = Tensor::from_slice(data)
            .view([1, 1, s[0], s[1], s[2]])
            .to_device(self.dev)
            .clamp(0.0, 1.0);
        if let (Some(from), Some(to)) = (self.data_window, self.network.input_hu_window()) {
            t = rewindow(t, from, to);
        }
        if let Some(r) = self.resize {
            t = t.upsample_trilinear3d(r.map(|v| v as i64), false, None, None, None);
        }
        if self.normalization == FeatureNorm::Zscore {
            let m = t.mean(Kind::Float);
            let sd = t.std(true);
            t = (t - m) / (sd + 1e-5);
        }
        t
    }

    /// One feature row per volume.
    pub fn features(
        &self,
        set: &[NamedVolume],
        ctx: &StageContext,
        bar: &indicatif::ProgressBar,
    ) -> Result<Matrix, StageError> {
        let _ng = tch::no_grad_guard();
        let mut rows = Vec::with_capacity(set.len() * self.feature_dim());
        for (_, d, s) in set {
            ctx.check_cancelled()?;
            let f = self.net.features(&self.prep(d, *s)).to_kind(Kind::Double);
            rows.extend(Vec::<f64>::try_from(f.view([-1]).to_device(Device::Cpu)).map_err(fail)?);
            bar.inc(1);
        }
        Ok(Matrix::new(set.len(), self.feature_dim(), rows))
    }

    /// The network and preprocessing, as reports and feature artifacts record them.
    pub fn record(&self) -> (serde_json::Value, serde_json::Value) {
        (
            serde_json::json!({
                "network": self.network, "weights_digest": self.weights_digest,
                "feature_dim": self.feature_dim(), "pooling": "global average of layer4",
            }),
            serde_json::json!({
                "clip": [0.0, 1.0], "resize": self.resize, "normalization": self.normalization,
                "data_hu_window": self.data_window,
                "rewindowed_to": self.network.input_hu_window().filter(|_| self.data_window.is_some()),
            }),
        )
    }
}

/// A `volume_features` artifact read back: the features and their record.
pub struct StoredFeatures {
    pub features: Matrix,
    pub ids: Vec<String>,
    /// `feature_network` (network, weights digest, ...) as [`FeatureExtractor::record`].
    pub feature_network: serde_json::Value,
    /// `preprocessing` as [`FeatureExtractor::record`], plus `crop`, `crops_per_volume`, `seed`.
    pub preprocessing: serde_json::Value,
}

impl StoredFeatures {
    pub fn read(dir: &Path) -> Result<Self, StageError> {
        let rec: serde_json::Value = read_json(&dir.join(FEATURES_RECORD))?;
        let path = dir.join(FEATURES_FILE);
        let t = Tensor::read_safetensors(&path)
            .map_err(|e| StageError::input(format!("'{}': {e}", path.display())))?
            .into_iter()
            .find(|(n, _)| n == "features")
            .map(|(_, t)| t)
            .ok_or_else(|| {
                StageError::input(format!("'{}' holds no 'features'", path.display()))
            })?;
        let (rows, cols) = match t.size()[..] {
            [r, c] => (r as usize, c as usize),
            ref s => {
                return Err(StageError::input(format!(
                    "'{}': features of shape {s:?}, expected [N, D]",
                    path.display()
                )))
            }
        };
        let data = Vec::<f64>::try_from(t.to_kind(Kind::Double).view([-1])).map_err(fail)?;
        let ids: Vec<String> = serde_json::from_value(rec["ids"].clone()).map_err(|e| {
            StageError::input(format!(
                "'{}': ids: {e}",
                dir.join(FEATURES_RECORD).display()
            ))
        })?;
        if ids.len() != rows {
            return Err(StageError::input(format!(
                "'{}': {} ids for {rows} feature rows",
                dir.display(),
                ids.len()
            )));
        }
        Ok(Self {
            features: Matrix::new(rows, cols, data),
            ids,
            feature_network: rec["feature_network"].clone(),
            preprocessing: rec["preprocessing"].clone(),
        })
    }
}

/// `volume_features`.
pub fn run(
    _: &VolumeFeatures,
    p: &VolumeFeaturesParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let items = ctx.input("volumes")?.items.clone();
    let (mut vols, window) = read_volumes(&items)?;
    let fx = FeatureExtractor::load(ctx, p.features(), window)?;
    if let Some(c) = p.crop {
        vols = random_crops(&vols, c, p.crops_per_volume, p.seed)?;
    }
    let bar = ctx.progress(vols.len() as u64, "volumes");
    let f = fx.features(&vols, ctx, &bar)?;
    bar.finish_and_clear();
    let out = ctx.output_dir("features")?;
    let t = Tensor::from_slice(&f.data).view([f.rows as i64, f.cols as i64]);
    let path = out.join(FEATURES_FILE);
    Tensor::write_safetensors(&[("features", &t)], &path)
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let (network, mut prep) = fx.record();
    prep["crop"] = serde_json::json!(p.crop);
    prep["crops_per_volume"] = serde_json::json!(p.crop.map(|_| p.crops_per_volume));
    prep["seed"] = serde_json::json!(p.seed);
    let ids: Vec<&str> = vols.iter().map(|v| v.0.as_str()).collect();
    write_json(
        &out.join(FEATURES_RECORD),
        &serde_json::json!({
            "ids": ids, "rows": f.rows, "feature_dim": f.cols,
            "feature_network": network, "preprocessing": prep,
        }),
    )?;
    ctx.set_metric("volumes", f.rows as u64);
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

    #[test]
    fn crops_are_seeded_and_cut_where_they_say() {
        // A 4 x 5 x 6 volume whose value is its flat index: every crop is a contiguous block.
        let v: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let vols = vec![("a".to_string(), v, [4, 5, 6])];
        let a = random_crops(&vols, [2, 3, 4], 3, 9).unwrap();
        let b = random_crops(&vols, [2, 3, 4], 3, 9).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        for (id, d, s) in &a {
            assert!(id.starts_with("a#crop"));
            assert_eq!(*s, [2, 3, 4]);
            let o = d[0] as usize;
            let (ox, oy, oz) = (o / 30, o / 6 % 5, o % 6);
            for x in 0..2 {
                for y in 0..3 {
                    for z in 0..4 {
                        let want = ((ox + x) * 5 + oy + y) * 6 + oz + z;
                        assert_eq!(d[(x * 3 + y) * 4 + z], want as f32);
                    }
                }
            }
        }
        assert!(random_crops(&vols, [5, 3, 4], 1, 0).is_err());
    }
}
