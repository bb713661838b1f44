//! The nnU-Net planner for a 3-D full-resolution U-Net: patch size, number of stages,
//! per-stage pooling strides and convolution kernels, and feature widths, derived from the
//! dataset's median shape and spacing (nnU-Net v2 `ExperimentPlanner` and
//! `get_pool_and_conv_props`).
//!
//! 1. Initial patch: proportional to `1 / spacing` with the volume of a 256³ cube, then
//!    clipped to the median shape.
//! 2. Pooling: repeatedly halve every axis whose current size is at least
//!    `2 * min_feature_map` and whose current spacing is less than twice the smallest
//!    spacing of those axes (anisotropic axes wait until the others catch up); stop when no
//!    axis qualifies, when only one axis would be pooled and it is below `3 *
//!    min_feature_map`, or after `max_pools` poolings of an axis. Kernels are 3 on an axis
//!    once its spacing is within a factor 2 of the smallest, else 1; the bottleneck's 3.
//! 3. The patch is rounded up to a multiple of `2^pools` per axis.
//! 4. While the patch holds more than `max_patch_voxels` voxels (nnU-Net compares an
//!    estimate of GPU memory against a reference; here a voxel budget, a plain parameter),
//!    the axis with the largest patch / median ratio shrinks by its divisor and steps 2-3
//!    are redone.
//!
//! Feature widths are `min(base * 2^stage, max_features)` (32 ... 320 in nnU-Net).

use serde::{Deserialize, Serialize};

/// Planner inputs besides the data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlannerConfig {
    /// Largest patch, in voxels.
    pub max_patch_voxels: usize,
    /// Smallest edge of the bottleneck feature map (4).
    pub min_feature_map: usize,
    /// Most poolings of an axis.
    pub max_pools: usize,
    /// Features of the first stage (32).
    pub base_features: usize,
    /// Cap on the features of a stage (320).
    pub max_features: usize,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            max_patch_voxels: 128 * 128 * 128,
            min_feature_map: 4,
            max_pools: 5,
            base_features: 32,
            max_features: 320,
        }
    }
}

/// The planned network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnetPlan {
    pub median_shape: [usize; 3],
    pub spacing: [f64; 3],
    /// Training patch (voxels).
    pub patch: [usize; 3],
    /// Per stage: the stride of its first convolution (`[1, 1, 1]` for stage 0).
    pub strides: Vec<[usize; 3]>,
    /// Per stage: the convolution kernel.
    pub kernels: Vec<[usize; 3]>,
    /// Per stage: the feature width.
    pub features: Vec<usize>,
}

impl UnetPlan {
    pub fn stages(&self) -> usize {
        self.strides.len()
    }
    /// The patch must be a multiple of this per axis (the product of the strides).
    pub fn divisor(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.strides.iter().map(|s| s[a]).product())
    }
}

struct PoolProps {
    strides: Vec<[usize; 3]>,
    kernels: Vec<[usize; 3]>,
    patch: [usize; 3],
}

fn pool_and_conv_props(spacing: [f64; 3], patch: [usize; 3], cfg: &PlannerConfig) -> PoolProps {
    let mut cur_spacing = spacing;
    let mut cur_size = patch;
    let mut pools = [0usize; 3];
    let mut kernel = [1usize; 3];
    let mut strides = vec![[1usize; 3]];
    let mut kernels = Vec::new();
    loop {
        let mut valid: Vec<usize> = (0..3)
            .filter(|&a| cur_size[a] >= 2 * cfg.min_feature_map)
            .collect();
        if valid.is_empty() {
            break;
        }
        let min_sp = valid
            .iter()
            .map(|&a| cur_spacing[a])
            .fold(f64::INFINITY, f64::min);
        valid.retain(|&a| cur_spacing[a] / min_sp < 2.0 && pools[a] < cfg.max_pools);
        if valid.len() == 1 && cur_size[valid[0]] < 3 * cfg.min_feature_map {
            break;
        }
        if valid.is_empty() {
            break;
        }
        let min_all = cur_spacing.iter().cloned().fold(f64::INFINITY, f64::min);
        for a in 0..3 {
            if kernel[a] != 3 && cur_spacing[a] / min_all < 2.0 {
                kernel[a] = 3;
            }
        }
        let mut s = [1usize; 3];
        for &a in &valid {
            s[a] = 2;
            pools[a] += 1;
            cur_spacing[a] *= 2.0;
            cur_size[a] = cur_size[a].div_ceil(2);
        }
        strides.push(s);
        kernels.push(kernel);
    }
    kernels.push([3, 3, 3]);
    let div: [usize; 3] = std::array::from_fn(|a| 1usize << pools[a]);
    let patch = std::array::from_fn(|a| patch[a].div_ceil(div[a]) * div[a]);
    PoolProps {
        strides,
        kernels,
        patch,
    }
}

/// Plans the U-Net for data of `median_shape` voxels at `spacing` mm.
pub fn plan_unet(
    median_shape: [usize; 3],
    spacing: [f64; 3],
    cfg: &PlannerConfig,
) -> Result<UnetPlan, String> {
    if median_shape.iter().any(|&n| n == 0) || spacing.iter().any(|&s| !(s > 0.0)) {
        return Err(format!(
            "planner: median shape {median_shape:?} and spacing {spacing:?} must be positive"
        ));
    }
    if cfg.min_feature_map == 0 || cfg.base_features == 0 || cfg.max_features < cfg.base_features {
        return Err("planner: min_feature_map and base_features must be positive, max_features >= base_features".into());
    }
    let inv = spacing.map(|s| 1.0 / s);
    let k = (256f64.powi(3) / inv.iter().product::<f64>()).cbrt();
    let mut patch: [usize; 3] =
        std::array::from_fn(|a| ((inv[a] * k).round() as usize).clamp(1, median_shape[a]));
    let mut props = pool_and_conv_props(spacing, patch, cfg);
    while props.patch.iter().product::<usize>() > cfg.max_patch_voxels {
        let div: [usize; 3] = std::array::from_fn(|a| props.strides.iter().map(|s| s[a]).product());
        let axis = (0..3)
            .max_by(|&a, &b| {
                let ra = props.patch[a] as f64 / median_shape[a] as f64;
                let rb = props.patch[b] as f64 / median_shape[b] as f64;
                ra.total_cmp(&rb)
            })
            .expect("3 axes");
        if props.patch[axis] <= div[axis] {
            return Err(format!(
                "planner: cannot fit a patch into {} voxels (patch {:?})",
                cfg.max_patch_voxels, props.patch
            ));
        }
        patch = props.patch;
        patch[axis] -= div[axis];
        props = pool_and_conv_props(spacing, patch, cfg);
    }
    let features = (0..props.strides.len())
        .map(|s| (cfg.base_features << s.min(20)).min(cfg.max_features))
        .collect();
    Ok(UnetPlan {
        median_shape,
        spacing,
        patch: props.patch,
        strides: props.strides,
        kernels: props.kernels,
        features,
    })
}

/// The median shape of a set of volume shapes (per axis; the lower middle for even counts,
/// as `np.median` rounds down after averaging integer halves).
pub fn median_shape(shapes: &[[usize; 3]]) -> Option<[usize; 3]> {
    if shapes.is_empty() {
        return None;
    }
    Some(std::array::from_fn(|a| {
        let mut v: Vec<usize> = shapes.iter().map(|s| s[a]).collect();
        v.sort_unstable();
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isotropic_abdomen() {
        // A 1.5 mm isotropic CT of median 240 x 240 x 200 voxels: initial patch 256 clipped
        // to the median, pools every axis 5 times (240 -> 8 >= 4), rounded to multiples of 32.
        let cfg = PlannerConfig {
            max_patch_voxels: usize::MAX,
            ..Default::default()
        };
        let p = plan_unet([240, 240, 200], [1.5; 3], &cfg).unwrap();
        assert_eq!(p.patch, [256, 256, 224]);
        assert_eq!(p.stages(), 6);
        assert_eq!(p.divisor(), [32, 32, 32]);
        assert_eq!(p.features, vec![32, 64, 128, 256, 320, 320]);
        assert!(p.kernels.iter().all(|k| *k == [3, 3, 3]));
        // With a budget the largest patch / median axis shrinks first.
        let small = plan_unet([240, 240, 200], [1.5; 3], &PlannerConfig::default()).unwrap();
        assert!(small.patch.iter().product::<usize>() <= 128 * 128 * 128);
        assert!(small
            .patch
            .iter()
            .zip(small.divisor())
            .all(|(p, d)| p % d == 0));
    }

    #[test]
    fn anisotropic_axis_pools_later() {
        // 0.8 x 0.8 x 3 mm (z coarse): z gets kernel 1 and stride 1 in the first stage; after
        // one pooling x/y are at 1.6 mm, within a factor 2 of z, and every axis pools.
        let cfg = PlannerConfig {
            max_patch_voxels: usize::MAX,
            ..Default::default()
        };
        let p = plan_unet([512, 512, 100], [0.8, 0.8, 3.0], &cfg).unwrap();
        assert_eq!(p.kernels[0], [3, 3, 1]);
        assert_eq!(p.strides[1], [2, 2, 1]);
        assert_eq!(p.strides[2], [2, 2, 2], "{p:?}");
        assert_eq!(p.kernels[1], [3, 3, 3]);
        let d = p.divisor();
        assert!(d[2] < d[0]);
    }

    #[test]
    fn tiny_volumes_give_shallow_networks() {
        let p = plan_unet([32, 32, 24], [3.0; 3], &PlannerConfig::default()).unwrap();
        // 32 -> 16 -> 8 -> 4: three poolings on x/y; z 24 -> 12 -> 6 stops (6 < 8).
        assert_eq!(p.strides.len(), 4, "{p:?}");
        assert_eq!(p.strides[3], [2, 2, 1]);
        assert_eq!(p.patch, [32, 32, 24]);
        assert_eq!(
            median_shape(&[[10, 4, 3], [12, 6, 9], [11, 5, 1]]),
            Some([11, 5, 3])
        );
        assert_eq!(median_shape(&[[10, 4, 3], [12, 6, 9]]), Some([11, 5, 6]));
        assert!(plan_unet([0, 3, 3], [1.0; 3], &PlannerConfig::default()).is_err());
    }
}
