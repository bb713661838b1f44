//! Resampling to a target voxel spacing: trilinear for images, nearest for labels.
//!
//! # Grid convention (MONAI `Spacingd`, defaults `align_corners=False`, `scale_extent=False`)
//!
//! - The output keeps the input's axis directions: each affine column is rescaled from its
//!   spacing `s_in` to the target `s_out`, and the translation is unchanged, so the centre
//!   of output voxel `(0, 0, 0)` is the centre of input voxel `(0, 0, 0)`.
//! - Output size per axis: `N = round_half_even((n - 1) * s_in / s_out + 1)` (numpy's
//!   `np.round` in MONAI's `compute_shape_offset`): the output grid spans the same physical
//!   extent, centre of the first voxel to centre of the last, within half an output voxel.
//! - Output voxel `o` samples the input at voxel coordinate `x = o * s_out / s_in`;
//!   coordinates past the last input voxel centre are clamped to it (MONAI's default
//!   `padding_mode="border"`).
//!
//! So a world point keeps its world position: `out.affine * o == in.affine * x`. The volume
//! should be reoriented to RAS first (as method.md 1.1 does), but any orientation works
//! since the directions are kept.
//!
//! # Implementation
//!
//! Trilinear interpolation is separable for an axis-aligned scaling. Per output `(i, j)`
//! column we blend the four input rows `(i0|i1, j0|j1, :)` (contiguous in memory, so the
//! loop vectorises) into one row, then interpolate that row along `k`. Output slabs along
//! `i` run in parallel on the current rayon pool.

use rayon::prelude::*;

use crate::data::volume::{Affine, LabelVolume, Volume, VolumeOf};

/// The output grid of a resampling.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub shape: [usize; 3],
    pub affine: Affine,
    /// Input voxel coordinate per output voxel step, per axis (`s_out / s_in`).
    pub step: [f64; 3],
}

/// The output grid for resampling `shape`/`affine` to `spacing` (see the module docs).
pub fn target_grid(shape: [usize; 3], affine: &Affine, spacing: [f64; 3]) -> Grid {
    let s_in = crate::data::volume::spacing_of(affine);
    let mut out = *affine;
    let mut step = [1.0; 3];
    let mut out_shape = [1usize; 3];
    for c in 0..3 {
        step[c] = spacing[c] / s_in[c];
        for row in out.iter_mut().take(3) {
            row[c] = row[c] / s_in[c] * spacing[c];
        }
        let n = ((shape[c] as f64 - 1.0) / step[c] + 1.0).round_ties_even();
        out_shape[c] = (n as usize).max(1);
    }
    Grid {
        shape: out_shape,
        affine: out,
        step,
    }
}

/// Per output index: the lower input index and the weight of the upper one.
fn linear_taps(n_out: usize, n_in: usize, step: f64) -> Vec<(usize, f32)> {
    (0..n_out)
        .map(|o| {
            let x = (o as f64 * step).clamp(0.0, (n_in - 1) as f64);
            let i0 = (x.floor() as usize).min(n_in.saturating_sub(2));
            let w = if n_in < 2 {
                0.0
            } else {
                (x - i0 as f64) as f32
            };
            (i0, w)
        })
        .collect()
}

/// Per output index: the nearest input index.
fn nearest_taps(n_out: usize, n_in: usize, step: f64) -> Vec<usize> {
    (0..n_out)
        .map(|o| {
            let x = (o as f64 * step).clamp(0.0, (n_in - 1) as f64);
            ((x + 0.5).floor() as usize).min(n_in - 1)
        })
        .collect()
}

/// Trilinear resampling of an image onto `grid`.
pub fn resample_linear(v: &Volume, grid: &Grid) -> Volume {
    let [nx, ny, nz] = v.shape;
    let [ox, oy, oz] = grid.shape;
    let ti = linear_taps(ox, nx, grid.step[0]);
    let tj = linear_taps(oy, ny, grid.step[1]);
    let tk = linear_taps(oz, nz, grid.step[2]);
    let i1 = |i0: usize| (i0 + 1).min(nx - 1);
    let j1 = |j0: usize| (j0 + 1).min(ny - 1);
    let k1 = |k0: usize| (k0 + 1).min(nz - 1);
    let src = &v.data;
    let mut data = vec![0.0f32; ox * oy * oz];
    data.par_chunks_mut(oy * oz)
        .zip(ti.par_iter())
        .for_each(|(slab, &(a0, wa))| {
            let mut row = vec![0.0f32; nz];
            let (a1, wa0) = (i1(a0), 1.0 - wa);
            for (j, &(b0, wb)) in tj.iter().enumerate() {
                let (b1, wb0) = (j1(b0), 1.0 - wb);
                let r00 = &src[(a0 * ny + b0) * nz..][..nz];
                let r01 = &src[(a0 * ny + b1) * nz..][..nz];
                let r10 = &src[(a1 * ny + b0) * nz..][..nz];
                let r11 = &src[(a1 * ny + b1) * nz..][..nz];
                let (w00, w01, w10, w11) = (wa0 * wb0, wa0 * wb, wa * wb0, wa * wb);
                for (k, x) in row.iter_mut().enumerate() {
                    *x = w00 * r00[k] + w01 * r01[k] + w10 * r10[k] + w11 * r11[k];
                }
                let out = &mut slab[j * oz..][..oz];
                for (o, &(c0, wc)) in out.iter_mut().zip(tk.iter()) {
                    *o = row[c0] * (1.0 - wc) + row[k1(c0)] * wc;
                }
            }
        });
    Volume {
        data,
        shape: grid.shape,
        affine: grid.affine,
    }
}

/// Nearest-neighbour resampling (labels, or any voxel type) onto `grid`.
pub fn resample_nearest<T: Copy + Send + Sync + Default>(
    v: &VolumeOf<T>,
    grid: &Grid,
) -> VolumeOf<T> {
    let [nx, ny, nz] = v.shape;
    let [ox, oy, oz] = grid.shape;
    let ti = nearest_taps(ox, nx, grid.step[0]);
    let tj = nearest_taps(oy, ny, grid.step[1]);
    let tk = nearest_taps(oz, nz, grid.step[2]);
    let src = &v.data;
    let mut data = vec![T::default(); ox * oy * oz];
    data.par_chunks_mut(oy * oz)
        .zip(ti.par_iter())
        .for_each(|(slab, &a)| {
            for (j, &b) in tj.iter().enumerate() {
                let r = &src[(a * ny + b) * nz..][..nz];
                for (o, &c) in slab[j * oz..][..oz].iter_mut().zip(tk.iter()) {
                    *o = r[c];
                }
            }
        });
    VolumeOf {
        data,
        shape: grid.shape,
        affine: grid.affine,
    }
}

/// Resamples an image to `spacing` (trilinear).
pub fn resample_image(v: &Volume, spacing: [f64; 3]) -> Volume {
    resample_linear(v, &target_grid(v.shape, &v.affine, spacing))
}

/// Resamples a label map to `spacing` (nearest).
pub fn resample_labels(v: &LabelVolume, spacing: [f64; 3]) -> LabelVolume {
    resample_nearest(v, &target_grid(v.shape, &v.affine, spacing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::apply_affine;

    fn ramp(shape: [usize; 3], spacing: [f64; 3]) -> Volume {
        let mut affine = crate::data::volume::IDENTITY;
        for c in 0..3 {
            affine[c][c] = spacing[c];
            affine[c][3] = 10.0 * (c as f64 + 1.0);
        }
        let mut data = Vec::new();
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                for k in 0..shape[2] {
                    // Linear in world coordinates: trilinear interpolation is exact.
                    let p = apply_affine(&affine, [i as f64, j as f64, k as f64]);
                    data.push((0.5 * p[0] - 0.25 * p[1] + 0.125 * p[2]) as f32);
                }
            }
        }
        Volume {
            data,
            shape,
            affine,
        }
    }

    #[test]
    fn grid_follows_monai_spacing_convention() {
        let v = ramp([20, 20, 8], [0.7, 0.7, 2.5]);
        let g = target_grid(v.shape, &v.affine, [1.5, 1.5, 1.5]);
        // (20 - 1) * 0.7 / 1.5 + 1 = 9.87 -> 10; (8 - 1) * 2.5 / 1.5 + 1 = 12.67 -> 13.
        assert_eq!(g.shape, [10, 10, 13]);
        assert_eq!(g.affine[0][0], 1.5);
        assert_eq!(g.affine[2][3], v.affine[2][3]);
    }

    #[test]
    fn linear_is_exact_on_linear_fields_inside_the_grid() {
        let v = ramp([20, 17, 8], [0.7, 0.8, 2.5]);
        let out = resample_image(&v, [1.5, 1.5, 1.5]);
        let mut worst = 0.0f64;
        for i in 0..out.shape[0] {
            for j in 0..out.shape[1] {
                for k in 0..out.shape[2] {
                    let p = apply_affine(&out.affine, [i as f64, j as f64, k as f64]);
                    // Skip voxels past the last input centre (border clamp).
                    let x = [i as f64 * 1.5 / 0.7, j as f64 * 1.5 / 0.8, k as f64 * 0.6];
                    if x[0] > 19.0 || x[1] > 16.0 || x[2] > 7.0 {
                        continue;
                    }
                    let want = 0.5 * p[0] - 0.25 * p[1] + 0.125 * p[2];
                    worst = worst.max((out.get(i, j, k) as f64 - want).abs());
                }
            }
        }
        assert!(worst < 1e-4, "max error {worst}");
    }

    #[test]
    fn nearest_keeps_label_values_and_identity_spacing_is_a_copy() {
        let v = ramp([9, 7, 5], [1.5, 1.5, 1.5]);
        let same = resample_image(&v, [1.5, 1.5, 1.5]);
        assert_eq!(same, v);
        let labels = v.map(|x| (x.abs() as u8) % 4);
        let l2 = resample_labels(&labels, [0.75, 3.0, 1.5]);
        assert_eq!(l2.shape, [17, 4, 5]);
        // Output voxel (2, 1, 3) sits on input voxel (1, 2, 3).
        assert_eq!(l2.get(2, 1, 3), labels.get(1, 2, 3));
        assert!(l2.data.iter().all(|&x| x < 4));
    }
}
