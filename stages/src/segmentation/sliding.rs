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
//! - Each window's prediction is weighted by a Gaussian importance map
//!   ([`gaussian_importance`], sigma = `sigma_scale * roi` per axis, centred on voxel
//!   `roi / 2`, maximum 1, values below the smallest positive one raised to it), summed,
//!   and divided by the summed weights.

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

/// The Gaussian importance map of a window, C order `[roi[0], roi[1], roi[2]]`.
pub fn gaussian_importance(roi: [usize; 3], sigma_scale: f64) -> Vec<f32> {
    let axis = |a: usize| -> Vec<f64> {
        let c = (roi[a] / 2) as f64;
        let s = (sigma_scale * roi[a] as f64).max(1e-6);
        (0..roi[a])
            .map(|i| (-(i as f64 - c).powi(2) / (2.0 * s * s)).exp())
            .collect()
    };
    let (gx, gy, gz) = (axis(0), axis(1), axis(2));
    let mut w = Vec::with_capacity(roi.iter().product());
    for a in &gx {
        for b in &gy {
            for c in &gz {
                w.push((a * b * c) as f32);
            }
        }
    }
    let max = w.iter().cloned().fold(0.0f32, f32::max);
    w.iter_mut().for_each(|x| *x /= max);
    let min_pos = w
        .iter()
        .cloned()
        .filter(|&x| x > 0.0)
        .fold(f32::INFINITY, f32::min);
    w.iter_mut().for_each(|x| *x = x.max(min_pos));
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
        // Maximum 1 at the centre voxel (4, 4, 4); positive everywhere; symmetric about it.
        assert_eq!(w[(4 * 8 + 4) * 9 + 4], 1.0);
        assert!(w.iter().all(|&x| x > 0.0 && x <= 1.0));
        assert_eq!(w[(3 * 8 + 4) * 9 + 4], w[(5 * 8 + 4) * 9 + 4]);
        // sigma = 1 voxel: one voxel off-centre is exp(-1/2).
        let e = w[(3 * 8 + 4) * 9 + 4] as f64;
        assert!((e - (-0.5f64).exp()).abs() < 1e-6, "{e}");
    }
}
