//! Sliding-window tiling and Gaussian blending weights (MONAI `sliding_window_inference`).
//!
//! - A volume smaller than the window is first padded symmetrically to the window size
//!   ([`pad_to_window`]: `before = (roi - n) / 2`, the rest after), and the output cropped
//!   back afterwards.
//! - The scan interval per axis is `int(roi * (1 - overlap))` (at least 1), or the whole
//!   axis when the window equals it ([`scan_interval`]).
//! - Window starts per axis are `0, s, 2s, ...` until a window reaches the end; the last is
//!   moved back to end exactly at the edge ([`window_starts`], MONAI `dense_patch_slices`),
//!   so every voxel is covered and no window leaves the volume.
//! - Each window's prediction is weighted by MONAI's Gaussian importance map
//!   ([`gaussian_importance`], sigma = `sigma_scale * roi` per axis, centred at
//!   `(roi - 1) / 2`, at least 1e-3), summed, and divided by the summed weights.

/// Symmetric padding `(before, after)` per axis that brings `shape` up to `roi`.
pub fn pad_to_window(shape: [usize; 3], roi: [usize; 3]) -> [(usize, usize); 3] {
    std::array::from_fn(|a| {
        let diff = roi[a].saturating_sub(shape[a]);
        (diff / 2, diff - diff / 2)
    })
}

/// MONAI's `_get_scan_interval`.
pub fn scan_interval(shape: [usize; 3], roi: [usize; 3], overlap: f64) -> [usize; 3] {
    std::array::from_fn(|a| {
        if roi[a] == shape[a] {
            roi[a]
        } else {
            ((roi[a] as f64 * (1.0 - overlap)) as usize).max(1)
        }
    })
}

/// Window start positions along one axis of length `n >= roi` with interval `step`.
pub fn axis_starts(n: usize, roi: usize, step: usize) -> Vec<usize> {
    assert!(
        n >= roi && roi > 0,
        "axis of {n} voxels is smaller than the window {roi}"
    );
    let mut v = Vec::new();
    let mut i = 0;
    loop {
        let s = i * step;
        if s + roi >= n {
            v.push(n - roi);
            break;
        }
        v.push(s);
        i += 1;
    }
    v
}

/// Every window origin (x slowest) over a volume of `shape` (each axis at least `roi`).
pub fn window_starts(shape: [usize; 3], roi: [usize; 3], overlap: f64) -> Vec<[usize; 3]> {
    let step = scan_interval(shape, roi, overlap);
    let per: Vec<Vec<usize>> = (0..3)
        .map(|a| axis_starts(shape[a], roi[a], step[a]))
        .collect();
    let mut out = Vec::with_capacity(per[0].len() * per[1].len() * per[2].len());
    for &x in &per[0] {
        for &y in &per[1] {
            for &z in &per[2] {
                out.push([x, y, z]);
            }
        }
    }
    out
}

/// The Gaussian importance map of a window, C order `[roi[0], roi[1], roi[2]]`, exactly as
/// MONAI's `compute_importance_map(mode="gaussian")`: per axis
/// `exp(-(i - (n-1)/2)^2 / (2 (sigma_scale n)^2))` (centred between the middle voxels for
/// even sizes, not normalised), multiplied over the axes, then raised to at least
/// `max(min, 1e-3)`.
pub fn gaussian_importance(roi: [usize; 3], sigma_scale: f64) -> Vec<f32> {
    let axis = |a: usize| -> Vec<f32> {
        let c = (roi[a] as f64 - 1.0) / 2.0;
        let s = sigma_scale * roi[a] as f64;
        (0..roi[a])
            .map(|i| {
                let x = i as f64 - c;
                if s > 0.0 {
                    (-(x * x) / (2.0 * s * s)).exp() as f32
                } else {
                    f32::from(x == 0.0)
                }
            })
            .collect()
    };
    let (gx, gy, gz) = (axis(0), axis(1), axis(2));
    let mut w = Vec::with_capacity(roi.iter().product());
    for a in &gx {
        for b in &gy {
            for c in &gz {
                w.push(a * b * c);
            }
        }
    }
    let floor = w.iter().cloned().fold(f32::INFINITY, f32::min).max(1e-3);
    w.iter_mut().for_each(|x| *x = x.max(floor));
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_match_monai() {
        // MONAI dense_patch_slices for image 100, roi 48, overlap 0.5: interval 24,
        // starts 0, 24, 48, 72 -> 52 (the last moved back to end at the edge).
        assert_eq!(axis_starts(100, 48, 24), vec![0, 24, 48, 52]);
        assert_eq!(axis_starts(48, 48, 48), vec![0]);
        assert_eq!(axis_starts(96, 48, 24), vec![0, 24, 48]);
        assert_eq!(scan_interval([96, 48, 50], [48, 48, 48], 0.5), [24, 48, 24]);
        assert_eq!(scan_interval([96, 96, 96], [8, 8, 8], 0.99), [1, 1, 1]);
        assert_eq!(
            pad_to_window([20, 48, 47], [24, 24, 50]),
            [(2, 2), (0, 0), (1, 2)]
        );
    }

    #[test]
    fn every_voxel_is_covered_and_windows_stay_inside() {
        for (shape, roi, overlap) in [
            ([37, 24, 61], [16, 24, 20], 0.5),
            ([96, 96, 96], [96, 96, 96], 0.5),
            ([50, 33, 29], [12, 12, 12], 0.25),
            ([50, 33, 29], [12, 12, 12], 0.75),
        ] {
            let mut count = vec![0u32; shape.iter().product()];
            for s in window_starts(shape, roi, overlap) {
                for a in 0..3 {
                    assert!(s[a] + roi[a] <= shape[a]);
                }
                for i in 0..roi[0] {
                    for j in 0..roi[1] {
                        for k in 0..roi[2] {
                            count[((s[0] + i) * shape[1] + s[1] + j) * shape[2] + s[2] + k] += 1;
                        }
                    }
                }
            }
            assert!(count.iter().all(|&c| c > 0), "{shape:?} {roi:?} {overlap}");
        }
    }

    #[test]
    fn gaussian_map() {
        let w = gaussian_importance([8, 8, 9], 0.125);
        assert_eq!(w.len(), 8 * 8 * 9);
        let at = |i: usize, j: usize, k: usize| w[(i * 8 + j) * 9 + k] as f64;
        // Even axes are centred at 3.5 (sigma 1), the odd one at 4 (sigma 1.125).
        let want = (-0.125f64).exp().powi(2);
        assert!((at(3, 4, 4) - want).abs() < 1e-6, "{}", at(3, 4, 4));
        assert_eq!(at(3, 3, 4), at(4, 4, 4));
        assert_eq!(at(0, 2, 1), at(7, 5, 7));
        assert!(w.iter().all(|&x| x >= 1e-3 && x <= 1.0));
        // MONAI 1.x, compute_importance_map((48,)*3, "gaussian", 0.125): max 0.98964,
        // min clamped to 1e-3, [24, 24, :3] = [1e-3, 1e-3, 0.0016172].
        let m = gaussian_importance([48, 48, 48], 0.125);
        let max = m.iter().cloned().fold(0.0f32, f32::max);
        assert!((max - 0.989_637_4).abs() < 1e-6, "{max}");
        let row = &m[(24 * 48 + 24) * 48..][..3];
        assert!(
            (row[0] - 1e-3).abs() < 1e-9 && (row[2] - 0.001_617_16).abs() < 1e-7,
            "{row:?}"
        );
    }
}
