//! The method's per-volume preprocessing chain (method.md 1.1 steps 1-5), in its order:
//!
//! 1. reorient to RAS ([`crate::data::orientation`]);
//! 2. intensity: CT window HU `[-175, 250] -> [0, 1]` clipped, or MRI percentiles, or none
//!    ([`crate::data::intensity`]) -- **before** resampling, as in the authors' code;
//! 3. resample to `spacing` (default 1.5 mm isotropic): trilinear for the image, nearest
//!    for the label, on the same grid ([`crate::data::resample`]);
//! 4. crop to the image foreground (value `> 0`), the label with the same box;
//! 5. centre crop to `max_size` (default `[512, 512, 768]`), pad symmetrically to
//!    `min_size` (default 96 per axis) and then to a multiple of `divisible` (default 4),
//!    padding with 0 ([`crate::data::croppad`]).
//!
//! Every step updates the affine exactly, so the result's affine still maps its voxels to
//! the same world positions as the input's.

use serde::{Deserialize, Serialize};

use crate::data::croppad::{
    center_crop_box, crop, divisible_target, foreground_box, symmetric_pad, VoxelBox,
};
use crate::data::error::DataError;
use crate::data::intensity::{percentile_normalize, window};
use crate::data::resample::{ras_grid, resample_linear, resample_nearest};
use crate::data::volume::{check_same_grid, spacing_of, LabelVolume, Volume};

/// How intensities are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IntensityMode {
    /// Fixed window (`window`, in HU) mapped onto `output_range`.
    #[default]
    Ct,
    /// Window = the `percentiles` of the volume, mapped onto `output_range`.
    Mri,
    /// Values kept as they are.
    None,
}

/// Parameters of the chain (the `resample` stage kind's parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// Target spacing in mm.
    pub spacing: [f64; 3],
    /// `"ct"`, `"mri"` or `"none"`.
    pub mode: IntensityMode,
    /// CT window `[a_min, a_max]` (HU).
    pub window: [f64; 2],
    /// MRI percentiles `[lower, upper]` (0..100).
    pub percentiles: [f64; 2],
    /// MRI: percentiles over non-zero voxels only.
    pub percentiles_nonzero: bool,
    /// `[b_min, b_max]` the window maps onto.
    pub output_range: [f64; 2],
    /// Clip to `output_range`.
    pub clip: bool,
    /// Crop to the image foreground (value > 0).
    pub crop_foreground: bool,
    /// Centre crop to at most this size (MONAI `CenterSpatialCrop`); 0 on an axis: no limit.
    pub max_size: [usize; 3],
    /// Pad symmetrically to at least this size.
    pub min_size: [usize; 3],
    /// Pad symmetrically to a multiple of this (1: none).
    pub divisible: usize,
    /// Largest image/label affine difference accepted (mm at a grid corner).
    pub geometry_tolerance_mm: f64,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            spacing: [1.5, 1.5, 1.5],
            mode: IntensityMode::Ct,
            window: [-175.0, 250.0],
            percentiles: [0.5, 99.5],
            percentiles_nonzero: false,
            output_range: [0.0, 1.0],
            clip: true,
            crop_foreground: true,
            max_size: [512, 512, 768],
            min_size: [96, 96, 96],
            divisible: 4,
            geometry_tolerance_mm: 1e-3,
        }
    }
}

impl PreprocessConfig {
    /// Checks ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if self.spacing.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err(format!("spacing must be positive, got {:?}", self.spacing));
        }
        if self.window[1].is_nan() || self.window[0].is_nan() || self.window[1] <= self.window[0] {
            return Err(format!(
                "window must be [low, high] with low < high, got {:?}",
                self.window
            ));
        }
        let [lo, hi] = self.percentiles;
        if !(0.0..=100.0).contains(&lo) || !(0.0..=100.0).contains(&hi) || lo >= hi {
            return Err(format!(
                "percentiles must be [lower, upper] in 0..=100 with lower < upper, got {:?}",
                self.percentiles
            ));
        }
        if self.divisible == 0 {
            return Err("divisible must be at least 1".into());
        }
        if self.geometry_tolerance_mm.is_nan() || self.geometry_tolerance_mm < 0.0 {
            return Err("geometry_tolerance_mm must be >= 0".into());
        }
        Ok(())
    }
}

/// The result of the chain.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    pub image: Volume,
    pub label: Option<LabelVolume>,
    /// The intensity window actually applied (`None` in mode `none`).
    pub window: Option<[f64; 2]>,
    /// The foreground box on the resampled grid (`None`: no crop, or no foreground).
    pub foreground: Option<VoxelBox>,
}

/// Runs the chain on an image and its optional label (which must share its grid).
pub fn preprocess(
    image: &Volume,
    label: Option<&LabelVolume>,
    cfg: &PreprocessConfig,
) -> Result<Preprocessed, DataError> {
    cfg.validate().map_err(DataError::Invalid)?;
    if let Some(l) = label {
        check_same_grid(
            image.shape,
            &image.affine,
            l.shape,
            &l.affine,
            cfg.geometry_tolerance_mm,
        )
        .map_err(|m| DataError::Invalid(format!("label does not match image: {m}")))?;
    }
    // 2. intensity (on a copy; the reorientation of step 1 is folded into step 3's grid)
    let mut img = image.clone();
    let applied = match cfg.mode {
        IntensityMode::Ct => {
            window(&mut img, cfg.window, cfg.output_range, cfg.clip);
            Some(cfg.window)
        }
        IntensityMode::Mri => Some(percentile_normalize(
            &mut img,
            cfg.percentiles[0],
            cfg.percentiles[1],
            cfg.output_range,
            cfg.clip,
            cfg.percentiles_nonzero,
        )),
        IntensityMode::None => None,
    };
    // 1 + 3. RAS and spacing: one resampling onto the reoriented, rescaled grid, whose
    // size is checked before anything is allocated: a grid with more voxels than
    // `max_size` holds would be mostly cropped away (a wrong spacing in the header).
    let grid = ras_grid(img.shape, &img.affine, cfg.spacing);
    let voxels: f64 = grid.shape.iter().map(|&n| n as f64).product();
    let limit: f64 = cfg.max_size.iter().map(|&n| n as f64).product();
    if voxels > limit {
        return Err(DataError::Invalid(format!(
            "resampling the {:?} image of spacing {:?} mm (from its affine) to {:?} mm gives a {:?} grid ({voxels:.3e} voxels), more than max_size {:?} holds ({limit:.3e}): is the header's spacing right? (or raise max_size)",
            image.shape,
            spacing_of(&image.affine),
            cfg.spacing,
            grid.shape,
            cfg.max_size
        )));
    }
    let mut img = resample_linear(&img, &grid);
    if cfg.clip && applied.is_some() {
        // Interpolation is a convex combination, but f32 rounding can step an ulp outside.
        let (lo, hi) = (
            cfg.output_range[0].min(cfg.output_range[1]) as f32,
            cfg.output_range[0].max(cfg.output_range[1]) as f32,
        );
        img.data.iter_mut().for_each(|x| *x = x.clamp(lo, hi));
    }
    let mut lab = label.map(|l| resample_nearest(l, &grid));
    // 4. foreground
    let mut fg = None;
    if cfg.crop_foreground {
        fg = foreground_box(&img);
        if let Some(b) = &fg {
            img = crop(&img, b);
            lab = lab.map(|l| crop(&l, b));
        }
    }
    // 5. centre crop, pad to the minimum size, pad to a multiple of k
    let b = center_crop_box(img.shape, cfg.max_size);
    img = crop(&img, &b);
    lab = lab.map(|l| crop(&l, &b));
    img = symmetric_pad(&img, cfg.min_size, 0.0);
    lab = lab.map(|l| symmetric_pad(&l, cfg.min_size, 0));
    let target = divisible_target(img.shape, cfg.divisible);
    img = symmetric_pad(&img, target, 0.0);
    lab = lab.map(|l| symmetric_pad(&l, target, 0));
    Ok(Preprocessed {
        image: img,
        label: lab,
        window: applied,
        foreground: fg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::apply_affine;

    #[test]
    fn chain_shapes_and_world_positions() {
        // An LPS volume at 0.75 x 0.75 x 3 mm with a bright cube of label 2.
        let shape = [64, 60, 12];
        let affine = [
            [-0.75, 0.0, 0.0, 20.0],
            [0.0, -0.75, 0.0, 30.0],
            [0.0, 0.0, 3.0, -10.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let mut img = Volume::filled(shape, affine, -1000.0);
        let mut lab = LabelVolume::filled(shape, affine, 0);
        for i in 20..40 {
            for j in 10..30 {
                for k in 3..9 {
                    let x = img.index(i, j, k);
                    img.data[x] = 100.0;
                    lab.data[x] = 2;
                }
            }
        }
        let cfg = PreprocessConfig {
            min_size: [16, 16, 16],
            ..Default::default()
        };
        let out = preprocess(&img, Some(&lab), &cfg).unwrap();
        let l = out.label.unwrap();
        assert_eq!(out.image.shape, l.shape);
        assert!(out.image.shape.iter().all(|&n| n % 4 == 0 && n >= 16));
        assert_eq!(crate::data::orientation::axcodes(&out.image.affine), "RAS");
        // The label's centre of mass keeps its world position within half an output voxel
        // (nearest-neighbour ties at x.5 shift an even span by at most that).
        let com = |v: &LabelVolume| {
            let mut s = [0.0; 3];
            let mut n = 0.0;
            for i in 0..v.shape[0] {
                for j in 0..v.shape[1] {
                    for k in 0..v.shape[2] {
                        if v.get(i, j, k) == 2 {
                            let p = apply_affine(&v.affine, [i as f64, j as f64, k as f64]);
                            (0..3).for_each(|d| s[d] += p[d]);
                            n += 1.0;
                        }
                    }
                }
            }
            s.map(|x| x / n)
        };
        let (a, b) = (com(&lab), com(&l));
        for d in 0..3 {
            assert!((a[d] - b[d]).abs() <= 0.75 + 1e-9, "{a:?} vs {b:?}");
        }
        // Windowed intensities: (100 + 175) / 425 inside, 0 outside.
        let max = out.image.data.iter().cloned().fold(f32::MIN, f32::max);
        assert!((max - 275.0 / 425.0).abs() < 1e-5, "{max}");
        assert_eq!(out.window, Some([-175.0, 250.0]));
    }

    #[test]
    fn mri_mode_maps_percentiles_to_the_output_range() {
        let shape = [20, 20, 20];
        let mut img = Volume::filled(shape, crate::data::volume::IDENTITY, 0.0);
        for (n, x) in img.data.iter_mut().enumerate() {
            *x = (n % 1000) as f32; // uniform 0..999
        }
        let cfg = PreprocessConfig {
            mode: IntensityMode::Mri,
            spacing: [1.0, 1.0, 1.0],
            crop_foreground: false,
            min_size: [1, 1, 1],
            divisible: 1,
            ..Default::default()
        };
        let out = preprocess(&img, None, &cfg).unwrap();
        // numpy: np.percentile(np.arange(8000) % 1000, [0.5, 99.5]) = [4.995, 994.005]
        let w = out.window.unwrap();
        assert!(
            (w[0] - 4.995).abs() < 1e-9 && (w[1] - 994.005).abs() < 1e-9,
            "{w:?}"
        );
        let below = out.image.data.iter().filter(|&&x| x == 0.0).count();
        let above = out.image.data.iter().filter(|&&x| x == 1.0).count();
        assert_eq!((below, above), (5 * 8, 5 * 8)); // values 0..=4 and 995..=999
    }

    /// A header spacing that resampling would blow up (here 40 mm on a 64^3 volume:
    /// a 1681^3 grid, 19 GB of float32) is refused before the grid is allocated.
    #[test]
    fn a_target_grid_larger_than_max_size_is_refused_before_allocating() {
        let mut affine = crate::data::volume::IDENTITY;
        for (a, row) in affine.iter_mut().take(3).enumerate() {
            row[a] = 40.0;
        }
        let img = Volume::filled([64, 64, 64], affine, 0.0);
        let e = preprocess(&img, None, &PreprocessConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spacing [40.0, 40.0, 40.0] mm (from its affine) to [1.5, 1.5, 1.5] mm gives a [1681, 1681, 1681] grid")
                && e.contains("more than max_size [512, 512, 768] holds"),
            "{e}"
        );
        // At max_size exactly it is not refused.
        let cfg = PreprocessConfig {
            spacing: [40.0, 40.0, 40.0],
            ..Default::default()
        };
        assert!(preprocess(&img, None, &cfg).is_ok());
    }

    #[test]
    fn mismatched_label_is_rejected() {
        let img = Volume::filled([4, 4, 4], crate::data::volume::IDENTITY, 0.0);
        let lab = LabelVolume::filled([4, 4, 5], crate::data::volume::IDENTITY, 0);
        let e = preprocess(&img, Some(&lab), &PreprocessConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("label does not match image: shape [4, 4, 5]"),
            "{e}"
        );
    }
}
