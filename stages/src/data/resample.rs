//! Resampling to a target voxel spacing: trilinear for images, nearest for labels.
//!
//! # Grid convention (MONAI `Orientationd("RAS")` then `Spacingd`, defaults
//! `align_corners=False`, `scale_extent=False`)
//!
//! - [`ras_grid`]: the output is the RAS-reoriented grid (see
//!   [`crate::data::orientation`]) with each affine column rescaled from its spacing `s_in`
//!   to the target `s_out` and the translation unchanged, so the centre of output voxel
//!   `(0, 0, 0)` is the centre of the first voxel of the reoriented input.
//!   ([`target_grid`] is the same without reorientation.)
//! - Output size per axis: `N = round_half_even((n - 1) * s_in / s_out + 1)` (numpy's
//!   `np.round` in MONAI's `compute_shape_offset`): the output grid spans the same physical
//!   extent, centre of the first voxel to centre of the last, within half an output voxel.
//! - Output voxel `o` samples the reoriented input at voxel coordinate `x = o * s_out / s_in`;
//!   coordinates past the last input voxel centre are clamped to it (MONAI's default
//!   `padding_mode="border"`).
//!
//! So every world point keeps its world position: `out.affine * o == in.affine * x`.
//!
//! # Implementation
//!
//! The reorientation is not done on the voxels: a [`Grid`] records, per output axis, the
//! input axis it runs along and the input voxel coordinate `x = origin + step * o` (a
//! negative step for a flipped axis), so resampling reads the input in place. Trilinear
//! interpolation is then separable: per output `(i, j)` column we blend the four input rows
//! `(i0|i1, j0|j1, :)` (contiguous in memory, so the loop vectorises) over the range of `k`
//! the column needs, then interpolate that row along `k`. Output slabs along `i` run in
//! parallel on the current rayon pool. When the input's contiguous axis is not the output's
//! last axis (an axis permutation, e.g. a sagittal `PIR` volume), the axes are permuted
//! first (one copy).

use rayon::prelude::*;

use crate::data::orientation::{axis_mapping, permute_flip};
use crate::data::volume::{mat_mul, spacing_of, Affine, LabelVolume, Volume, VolumeOf};

/// The output grid of a resampling, and where each output axis reads the input.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub shape: [usize; 3],
    pub affine: Affine,
    /// Output axis `a` runs along input axis `axis[a]`.
    pub axis: [usize; 3],
    /// Input voxel coordinate of output index 0, per output axis.
    pub origin: [f64; 3],
    /// Input voxel coordinate per output voxel step, per output axis (negative: flipped).
    pub step: [f64; 3],
}

/// The grid for resampling `shape`/`affine` to `spacing` keeping the input's orientation.
pub fn target_grid(shape: [usize; 3], affine: &Affine, spacing: [f64; 3]) -> Grid {
    scaled(shape, affine, spacing, [0, 1, 2], [1, 1, 1])
}

/// The grid for reorienting `shape`/`affine` to RAS and resampling to `spacing`
/// (method.md 1.1 steps 1 and 3, without moving voxels in between).
pub fn ras_grid(shape: [usize; 3], affine: &Affine, spacing: [f64; 3]) -> Grid {
    let (perm, sign) = axis_mapping(affine);
    scaled(shape, affine, spacing, perm, sign)
}

fn scaled(
    shape: [usize; 3],
    affine: &Affine,
    spacing: [f64; 3],
    perm: [usize; 3],
    sign: [i8; 3],
) -> Grid {
    // The reoriented grid: output axis w = input axis perm[w], flipped when sign[w] < 0.
    let mut t = [[0.0; 4]; 4];
    t[3][3] = 1.0;
    for w in 0..3 {
        t[perm[w]][w] = sign[w] as f64;
        if sign[w] < 0 {
            t[perm[w]][3] = shape[perm[w]] as f64 - 1.0;
        }
    }
    let ras = mat_mul(affine, &t);
    let s_in = spacing_of(&ras);
    let mut out = ras;
    let mut out_shape = [1usize; 3];
    let mut origin = [0.0; 3];
    let mut step = [1.0; 3];
    for w in 0..3 {
        let r = spacing[w] / s_in[w];
        for row in out.iter_mut().take(3) {
            row[w] = row[w] / s_in[w] * spacing[w];
        }
        let n = shape[perm[w]];
        out_shape[w] = (((n as f64 - 1.0) / r + 1.0).round_ties_even() as usize).max(1);
        if sign[w] < 0 {
            origin[w] = n as f64 - 1.0;
            step[w] = -r;
        } else {
            step[w] = r;
        }
    }
    Grid {
        shape: out_shape,
        affine: out,
        axis: perm,
        origin,
        step,
    }
}

/// Puts the input's axes in the grid's order (a copy) when they are permuted, so the
/// contiguous input axis is the output's last axis. Flips stay in the grid.
fn aligned<'a, T: Copy + Send + Sync>(
    v: &'a VolumeOf<T>,
    grid: &Grid,
) -> (std::borrow::Cow<'a, VolumeOf<T>>, Grid) {
    if grid.axis == [0, 1, 2] {
        return (std::borrow::Cow::Borrowed(v), grid.clone());
    }
    let p = permute_flip(v, grid.axis, [false; 3]);
    let g = Grid {
        axis: [0, 1, 2],
        ..grid.clone()
    };
    (std::borrow::Cow::Owned(p), g)
}

/// Input coordinate of output index `o` along output axis `a`, clamped to the input.
#[inline]
fn coord(grid: &Grid, a: usize, o: usize, n_in: usize) -> f64 {
    (grid.origin[a] + grid.step[a] * o as f64).clamp(0.0, (n_in - 1) as f64)
}

/// Per output index: the lower input index and the weight of the upper one.
fn linear_taps(grid: &Grid, a: usize, n_in: usize) -> Vec<(usize, f32)> {
    (0..grid.shape[a])
        .map(|o| {
            let x = coord(grid, a, o, n_in);
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
fn nearest_taps(grid: &Grid, a: usize, n_in: usize) -> Vec<usize> {
    (0..grid.shape[a])
        .map(|o| {
            let x = coord(grid, a, o, n_in);
            // Ties round up in the reoriented (RAS) index, as if the voxels had been moved.
            let i = if grid.step[a] < 0.0 {
                (x - 0.5).ceil()
            } else {
                (x + 0.5).floor()
            };
            (i.max(0.0) as usize).min(n_in - 1)
        })
        .collect()
}

/// Trilinear resampling of an image onto `grid`.
pub fn resample_linear(v: &Volume, grid: &Grid) -> Volume {
    let (v, grid) = aligned(v, grid);
    let [nx, ny, nz] = v.shape;
    let [_, oy, oz] = grid.shape;
    let ti = linear_taps(&grid, 0, nx);
    let tj = linear_taps(&grid, 1, ny);
    let tk = linear_taps(&grid, 2, nz);
    let up = |i0: usize, n: usize| (i0 + 1).min(n - 1);
    // The k range the columns need.
    let k_lo = tk.iter().map(|t| t.0).min().unwrap_or(0);
    let k_hi = tk.iter().map(|t| up(t.0, nz)).max().unwrap_or(0) + 1;
    let src = &v.data;
    let mut data = vec![0.0f32; grid.shape.iter().product()];
    data.par_chunks_mut(oy * oz)
        .zip(ti.par_iter())
        .for_each(|(slab, &(a0, wa))| {
            let mut row = vec![0.0f32; nz];
            let (a1, wa0) = (up(a0, nx), 1.0 - wa);
            for (j, &(b0, wb)) in tj.iter().enumerate() {
                let (b1, wb0) = (up(b0, ny), 1.0 - wb);
                let r =
                    |a: usize, b: usize| &src[(a * ny + b) * nz + k_lo..(a * ny + b) * nz + k_hi];
                let (r00, r01, r10, r11) = (r(a0, b0), r(a0, b1), r(a1, b0), r(a1, b1));
                let (w00, w01, w10, w11) = (wa0 * wb0, wa0 * wb, wa * wb0, wa * wb);
                for (k, x) in row[k_lo..k_hi].iter_mut().enumerate() {
                    *x = w00 * r00[k] + w01 * r01[k] + w10 * r10[k] + w11 * r11[k];
                }
                let out = &mut slab[j * oz..][..oz];
                for (o, &(c0, wc)) in out.iter_mut().zip(tk.iter()) {
                    *o = row[c0] * (1.0 - wc) + row[up(c0, nz)] * wc;
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
    let (v, grid) = aligned(v, grid);
    let [nx, ny, nz] = v.shape;
    let [_, oy, oz] = grid.shape;
    let ti = nearest_taps(&grid, 0, nx);
    let tj = nearest_taps(&grid, 1, ny);
    let tk = nearest_taps(&grid, 2, nz);
    let src = &v.data;
    let mut data = vec![T::default(); grid.shape.iter().product()];
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

/// Resamples an image to `spacing` (trilinear), keeping its orientation.
pub fn resample_image(v: &Volume, spacing: [f64; 3]) -> Volume {
    resample_linear(v, &target_grid(v.shape, &v.affine, spacing))
}

/// Resamples a label map to `spacing` (nearest), keeping its orientation.
pub fn resample_labels(v: &LabelVolume, spacing: [f64; 3]) -> LabelVolume {
    resample_nearest(v, &target_grid(v.shape, &v.affine, spacing))
}

/// Nearest-neighbour mapping of a voxel map onto any grid (`shape`, `affine`) through world
/// coordinates; target voxels whose nearest source voxel lies outside the source get
/// `T::default()` (background). Used to bring predictions made on the resampled grid back
/// to the original scan's grid (any orientation, spacing or oblique affine).
pub fn map_onto_grid<T: Copy + Send + Sync + Default>(
    v: &VolumeOf<T>,
    shape: [usize; 3],
    affine: &Affine,
) -> Result<VolumeOf<T>, String> {
    let inv = crate::data::volume::invert_affine(&v.affine)
        .ok_or("the source grid's affine is singular")?;
    // Target voxel -> source voxel coordinates.
    let m = mat_mul(&inv, affine);
    let [sx, sy, sz] = v.shape;
    let [_, ny, nz] = shape;
    let mut data = vec![T::default(); shape.iter().product()];
    data.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, slab)| {
            for j in 0..ny {
                for k in 0..nz {
                    let (fi, fj, fk) = (i as f64, j as f64, k as f64);
                    let c: [f64; 3] = std::array::from_fn(|r| {
                        m[r][0] * fi + m[r][1] * fj + m[r][2] * fk + m[r][3]
                    });
                    let r = c.map(|x| x.round());
                    if r[0] < 0.0
                        || r[1] < 0.0
                        || r[2] < 0.0
                        || r[0] >= sx as f64
                        || r[1] >= sy as f64
                        || r[2] >= sz as f64
                    {
                        continue;
                    }
                    let (a, b, cc) = (r[0] as usize, r[1] as usize, r[2] as usize);
                    slab[j * nz + k] = v.data[(a * sy + b) * sz + cc];
                }
            }
        });
    Ok(VolumeOf {
        data,
        shape,
        affine: *affine,
    })
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
    fn mapping_onto_a_flipped_or_larger_grid_is_exact_with_background_outside() {
        let shape = [5, 4, 3];
        let data: Vec<u8> = (0..60).map(|i| (i % 7) as u8 + 1).collect();
        let v = LabelVolume {
            data: data.clone(),
            shape,
            affine: crate::data::volume::IDENTITY,
        };
        // Same voxels, axis 0 flipped: world x = 4 - i.
        let mut flip = crate::data::volume::IDENTITY;
        flip[0][0] = -1.0;
        flip[0][3] = 4.0;
        let f = map_onto_grid(&v, shape, &flip).unwrap();
        for i in 0..5 {
            for j in 0..4 {
                for k in 0..3 {
                    assert_eq!(f.get(i, j, k), v.get(4 - i, j, k));
                }
            }
        }
        // A grid one voxel larger on every side: the border is background.
        let big = crate::data::volume::shift_affine(&crate::data::volume::IDENTITY, [-1.0; 3]);
        let b = map_onto_grid(&v, [7, 6, 5], &big).unwrap();
        assert_eq!(b.get(0, 0, 0), 0);
        assert_eq!(b.get(6, 5, 4), 0);
        assert_eq!(b.get(1, 1, 1), v.get(0, 0, 0));
        assert_eq!(b.get(5, 4, 3), v.get(4, 3, 2));
        assert_eq!(b.data.iter().filter(|&&x| x > 0).count(), 60);
    }

    #[test]
    fn labels_resampled_to_ras_and_mapped_back_match_the_original() {
        // An LPS scan, 0.8 x 0.8 x 2.5 mm, with a box and a ball.
        let shape = [60, 50, 16];
        let mut affine = crate::data::volume::IDENTITY;
        affine[0][0] = -0.8;
        affine[1][1] = -0.8;
        affine[2][2] = 2.5;
        affine[0][3] = 30.0;
        affine[1][3] = 12.0;
        affine[2][3] = -20.0;
        let mut data = vec![0u8; shape.iter().product()];
        for i in 0..60 {
            for j in 0..50 {
                for k in 0..16 {
                    let w = apply_affine(&affine, [i as f64, j as f64, k as f64]);
                    let idx = (i * 50 + j) * 16 + k;
                    if (10..30).contains(&i) && (5..25).contains(&j) && (3..12).contains(&k) {
                        data[idx] = 1;
                    } else if ((w[0] + 5.0).powi(2) + (w[1] + 15.0).powi(2) + (w[2] - 5.0).powi(2))
                        .sqrt()
                        < 8.0
                    {
                        data[idx] = 2;
                    }
                }
            }
        }
        let orig = LabelVolume {
            data,
            shape,
            affine,
        };
        let ras = resample_nearest(&orig, &ras_grid(shape, &affine, [1.5, 1.5, 1.5]));
        assert!(ras.affine[0][0] > 0.0 && ras.affine[1][1] > 0.0, "RAS");
        let back = map_onto_grid(&ras, shape, &affine).unwrap();
        assert_eq!(back.affine, affine);
        for label in [1u8, 2] {
            let (a, b) = (&orig.data, &back.data);
            let inter = a
                .iter()
                .zip(b)
                .filter(|(x, y)| **x == label && **y == label)
                .count();
            let n = a.iter().filter(|x| **x == label).count()
                + b.iter().filter(|x| **x == label).count();
            let dice = 2.0 * inter as f64 / n as f64;
            // Two nearest-neighbour steps through a 1.5 mm grid lose at most a voxel layer.
            assert!(dice > 0.85, "label {label}: Dice {dice}");
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

    #[test]
    fn ras_grid_equals_reorienting_first() {
        use crate::data::orientation::reorient_to_ras;
        let mut v = ramp([20, 17, 8], [0.7, 0.8, 2.5]);
        for affine in [
            // LPS
            [
                [-0.7, 0.0, 0.0, 5.0],
                [0.0, -0.8, 0.0, 6.0],
                [0.0, 0.0, 2.5, 7.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            // PIR (a permutation)
            [
                [0.0, 0.0, 2.5, 5.0],
                [-0.7, 0.0, 0.0, 6.0],
                [0.0, -0.8, 0.0, 7.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ] {
            v.affine = affine;
            let direct = resample_linear(&v, &ras_grid(v.shape, &v.affine, [1.5, 1.5, 1.5]));
            let ras = reorient_to_ras(&v);
            let two_step = resample_image(&ras, [1.5, 1.5, 1.5]);
            assert_eq!(direct.shape, two_step.shape);
            assert_eq!(direct.affine, two_step.affine);
            // The same samples; the weights of flipped axes are computed from the other side,
            // so values agree to f32 rounding.
            for (a, b) in direct.data.iter().zip(&two_step.data) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
            }
            let labels = v.map(|x| (x.abs() as u8) % 5);
            let ln = resample_nearest(&labels, &ras_grid(v.shape, &v.affine, [1.5, 1.5, 1.5]));
            assert_eq!(
                ln,
                resample_labels(&reorient_to_ras(&labels), [1.5, 1.5, 1.5])
            );
        }
    }
}
