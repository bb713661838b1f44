//! Intensity normalisation.
//!
//! - [`window`]: MONAI `ScaleIntensityRanged(a_min, a_max, b_min, b_max, clip)`: a linear
//!   map of `[a_min, a_max]` onto `[b_min, b_max]`, optionally clipped. The CT default of
//!   the method is HU `[-175, 250] -> [0, 1]`, clipped (method.md 1.1 step 2).
//! - [`percentiles`] + [`window`]: MONAI `ScaleIntensityRangePercentilesd(lower, upper, ...)`
//!   for MRI: the window is the `lower`/`upper` percentiles of the volume (numpy's default
//!   linear interpolation between order statistics), optionally over non-zero voxels only.

use rayon::prelude::*;

use crate::data::volume::Volume;

/// Maps `[a_min, a_max]` linearly onto `[b_min, b_max]` in place; with `clip`, the result is
/// clamped to `[min(b), max(b)]`. A zero-width window maps everything to `b_min`.
pub fn window(v: &mut Volume, a: [f64; 2], b: [f64; 2], clip: bool) {
    let width = a[1] - a[0];
    let (lo, hi) = (b[0].min(b[1]) as f32, b[0].max(b[1]) as f32);
    if width == 0.0 {
        v.data.par_iter_mut().for_each(|x| *x = b[0] as f32);
        return;
    }
    let scale = ((b[1] - b[0]) / width) as f32;
    let shift = (b[0] - a[0] * (b[1] - b[0]) / width) as f32;
    v.data.par_iter_mut().for_each(|x| {
        let y = *x * scale + shift;
        *x = if clip { y.clamp(lo, hi) } else { y };
    });
}

/// The `q`-th percentiles (0..=100) of the voxel values, numpy-style (linear between order
/// statistics). With `nonzero`, only voxels that are not 0 count (all voxels if none is).
pub fn percentiles(v: &Volume, qs: &[f64], nonzero: bool) -> Vec<f64> {
    let mut vals: Vec<f32> = if nonzero {
        v.data.par_iter().copied().filter(|&x| x != 0.0).collect()
    } else {
        v.data.clone()
    };
    if vals.is_empty() {
        vals = v.data.clone();
    }
    if vals.is_empty() {
        return vec![0.0; qs.len()];
    }
    let n = vals.len();
    qs.iter()
        .map(|&q| {
            let pos = (q.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let f = pos - lo as f64;
            // Linear-time selection: the lo-th order statistic, then the smallest value
            // above it is the (lo + 1)-th.
            let (_, &mut v_lo, right) = vals.select_nth_unstable_by(lo, |a, b| a.total_cmp(b));
            let v_hi = right.iter().copied().fold(f32::INFINITY, f32::min);
            let v_hi = if v_hi.is_finite() { v_hi } else { v_lo };
            v_lo as f64 * (1.0 - f) + v_hi as f64 * f
        })
        .collect()
}

/// MRI normalisation: window = the `[lower, upper]` percentiles, mapped onto `b`.
/// Returns the window used.
pub fn percentile_normalize(
    v: &mut Volume,
    lower: f64,
    upper: f64,
    b: [f64; 2],
    clip: bool,
    nonzero: bool,
) -> [f64; 2] {
    let p = percentiles(v, &[lower, upper], nonzero);
    let a = [p[0], p[1]];
    window(v, a, b, clip);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(data: Vec<f32>) -> Volume {
        let n = data.len();
        Volume {
            data,
            shape: [n, 1, 1],
            affine: crate::data::volume::IDENTITY,
        }
    }

    #[test]
    fn ct_window_matches_monai_formula() {
        let mut v = vol(vec![-1000.0, -175.0, 37.5, 250.0, 3000.0]);
        window(&mut v, [-175.0, 250.0], [0.0, 1.0], true);
        let want = [0.0, 0.0, 0.5, 1.0, 1.0];
        for (x, w) in v.data.iter().zip(want) {
            assert!((x - w).abs() < 1e-6, "{:?}", v.data);
        }
        let mut v = vol(vec![-600.0]);
        window(&mut v, [-175.0, 250.0], [0.0, 1.0], false);
        assert!((v.data[0] + 1.0).abs() < 1e-6);
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy: np.percentile(np.arange(11), [0.5, 99.5, 50]) = [0.05, 9.95, 5.0]
        let v = vol((0..11).map(|x| x as f32).collect());
        let p = percentiles(&v, &[0.5, 99.5, 50.0], false);
        assert!((p[0] - 0.05).abs() < 1e-9 && (p[1] - 9.95).abs() < 1e-9 && p[2] == 5.0);
        let mut v = vol(vec![0.0, 0.0, 0.0, 10.0, 20.0, 30.0]);
        let w = percentile_normalize(&mut v, 0.0, 100.0, [0.0, 1.0], true, true);
        assert_eq!(w, [10.0, 30.0]);
        let want = [0.0, 0.0, 0.0, 0.0, 0.5, 1.0];
        for (x, w) in v.data.iter().zip(want) {
            assert!((x - w).abs() < 1e-6, "{:?}", v.data);
        }
    }
}
