//! Cropping and padding with exact affine updates (MONAI semantics).
//!
//! - [`foreground_box`]: MONAI `CropForeground` with its default `select_fn` (value `> 0`),
//!   margin 0: the smallest box holding every foreground voxel.
//! - [`center_crop_box`]: MONAI `CenterSpatialCrop(roi)`: axes longer than the roi are cut
//!   to it around the centre (`start = n / 2 - roi / 2`); shorter axes are kept.
//! - [`symmetric_pad`]: MONAI `SpatialPad` / `DivisiblePad` with `method="symmetric"`: the
//!   padding is split as `before = total / 2`, `after = total - before`, constant value.
//!
//! A crop starting at voxel `s` moves the affine's origin to the world position of `s`; a
//! pad of `p` voxels before moves it to voxel `-p` ([`shift_affine`]), so every voxel
//! keeps its world position.

use rayon::prelude::*;

use crate::data::volume::{shift_affine, VolumeOf};

/// A box of voxels: `start` inclusive, `end` exclusive, per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoxelBox {
    pub start: [usize; 3],
    pub end: [usize; 3],
}

impl VoxelBox {
    /// The whole grid.
    pub fn all(shape: [usize; 3]) -> Self {
        Self {
            start: [0; 3],
            end: shape,
        }
    }
    /// The box's shape.
    pub fn shape(&self) -> [usize; 3] {
        [
            self.end[0] - self.start[0],
            self.end[1] - self.start[1],
            self.end[2] - self.start[2],
        ]
    }
}

/// The bounding box of voxels with value `> 0`; `None` when there is none.
pub fn foreground_box(v: &VolumeOf<f32>) -> Option<VoxelBox> {
    let [_, ny, nz] = v.shape;
    let plane = ny * nz;
    let per_slab: Vec<Option<([usize; 2], [usize; 2])>> = v
        .data
        .par_chunks(plane.max(1))
        .map(|slab| {
            let mut lo = [usize::MAX; 2];
            let mut hi = [0usize; 2];
            let mut any = false;
            for j in 0..ny {
                let row = &slab[j * nz..][..nz];
                let first = row.iter().position(|&x| x > 0.0);
                if let Some(f) = first {
                    let last = row.iter().rposition(|&x| x > 0.0).expect("has one");
                    any = true;
                    lo = [lo[0].min(j), lo[1].min(f)];
                    hi = [hi[0].max(j + 1), hi[1].max(last + 1)];
                }
            }
            any.then_some((lo, hi))
        })
        .collect();
    let mut out: Option<VoxelBox> = None;
    for (i, s) in per_slab.iter().enumerate() {
        if let Some((lo, hi)) = s {
            let b = out.get_or_insert(VoxelBox {
                start: [i, lo[0], lo[1]],
                end: [i + 1, hi[0], hi[1]],
            });
            b.start = [
                b.start[0].min(i),
                b.start[1].min(lo[0]),
                b.start[2].min(lo[1]),
            ];
            b.end = [
                b.end[0].max(i + 1),
                b.end[1].max(hi[0]),
                b.end[2].max(hi[1]),
            ];
        }
    }
    out
}

/// The MONAI `CenterSpatialCrop(roi)` box of a grid.
pub fn center_crop_box(shape: [usize; 3], roi: [usize; 3]) -> VoxelBox {
    let mut b = VoxelBox::all(shape);
    for a in 0..3 {
        if roi[a] > 0 && shape[a] > roi[a] {
            b.start[a] = shape[a] / 2 - roi[a] / 2;
            b.end[a] = b.start[a] + roi[a];
        }
    }
    b
}

/// Crops to a box (which must lie inside the grid).
pub fn crop<T: Copy + Send + Sync>(v: &VolumeOf<T>, b: &VoxelBox) -> VolumeOf<T> {
    let [_, ny, nz] = v.shape;
    let s = b.shape();
    if b.start == [0; 3] && s == v.shape {
        return v.clone();
    }
    let slabs: Vec<Vec<T>> = (b.start[0]..b.end[0])
        .into_par_iter()
        .map(|i| {
            let mut out = Vec::with_capacity(s[1] * s[2]);
            for j in b.start[1]..b.end[1] {
                let r = (i * ny + j) * nz;
                out.extend_from_slice(&v.data[r + b.start[2]..r + b.end[2]]);
            }
            out
        })
        .collect();
    VolumeOf {
        data: slabs.concat(),
        shape: s,
        affine: shift_affine(
            &v.affine,
            [b.start[0] as f64, b.start[1] as f64, b.start[2] as f64],
        ),
    }
}

/// The symmetric split of the padding needed to reach `target` (0 where already larger).
pub fn pad_amounts(shape: [usize; 3], target: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let mut before = [0; 3];
    let mut after = [0; 3];
    for a in 0..3 {
        let total = target[a].saturating_sub(shape[a]);
        before[a] = total / 2;
        after[a] = total - before[a];
    }
    (before, after)
}

/// The size MONAI `DivisiblePad(k)` pads to.
pub fn divisible_target(shape: [usize; 3], k: usize) -> [usize; 3] {
    let k = k.max(1);
    [
        shape[0].div_ceil(k) * k,
        shape[1].div_ceil(k) * k,
        shape[2].div_ceil(k) * k,
    ]
}

/// Pads with `value`: `before[a]` voxels before and `after[a]` after along each axis.
pub fn pad<T: Copy + Send + Sync>(
    v: &VolumeOf<T>,
    before: [usize; 3],
    after: [usize; 3],
    value: T,
) -> VolumeOf<T> {
    if before == [0; 3] && after == [0; 3] {
        return v.clone();
    }
    let s = [
        v.shape[0] + before[0] + after[0],
        v.shape[1] + before[1] + after[1],
        v.shape[2] + before[2] + after[2],
    ];
    let [_, ny, nz] = v.shape;
    let mut data = vec![value; s[0] * s[1] * s[2]];
    data.par_chunks_mut(s[1] * s[2])
        .enumerate()
        .for_each(|(oi, slab)| {
            if oi < before[0] || oi >= before[0] + v.shape[0] {
                return;
            }
            let i = oi - before[0];
            for j in 0..ny {
                let src = &v.data[(i * ny + j) * nz..][..nz];
                let o = ((j + before[1]) * s[2]) + before[2];
                slab[o..o + nz].copy_from_slice(src);
            }
        });
    VolumeOf {
        data,
        shape: s,
        affine: shift_affine(
            &v.affine,
            [
                -(before[0] as f64),
                -(before[1] as f64),
                -(before[2] as f64),
            ],
        ),
    }
}

/// Pads symmetrically to at least `target` per axis.
pub fn symmetric_pad<T: Copy + Send + Sync>(
    v: &VolumeOf<T>,
    target: [usize; 3],
    value: T,
) -> VolumeOf<T> {
    let (b, a) = pad_amounts(v.shape, target);
    pad(v, b, a, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::{apply_affine, Volume};

    fn blob() -> Volume {
        let shape = [10, 12, 14];
        let mut v = Volume::filled(shape, crate::data::volume::IDENTITY, 0.0);
        v.affine[0][0] = 2.0;
        v.affine[2][3] = -7.0;
        for (i, j, k) in [(2, 3, 4), (6, 9, 5), (4, 5, 11)] {
            let idx = v.index(i, j, k);
            v.data[idx] = 1.0 + i as f32;
        }
        v
    }

    #[test]
    fn foreground_box_is_tight_and_crop_keeps_world_positions() {
        let v = blob();
        let b = foreground_box(&v).unwrap();
        assert_eq!(b.start, [2, 3, 4]);
        assert_eq!(b.end, [7, 10, 12]);
        let c = crop(&v, &b);
        assert_eq!(c.shape, [5, 7, 8]);
        assert_eq!(c.get(4, 6, 1), 7.0);
        let p = apply_affine(&c.affine, [4.0, 6.0, 1.0]);
        let q = apply_affine(&v.affine, [6.0, 9.0, 5.0]);
        assert_eq!(p, q);
        assert!(foreground_box(&Volume::filled([2, 2, 2], v.affine, -1.0)).is_none());
    }

    #[test]
    fn pads_are_symmetric_like_monai() {
        let v = blob();
        assert_eq!(divisible_target([97, 96, 1], 4), [100, 96, 4]);
        assert_eq!(
            pad_amounts([10, 12, 14], [13, 12, 10]),
            ([1, 0, 0], [2, 0, 0])
        );
        let p = symmetric_pad(&v, [13, 16, 14], -5.0);
        assert_eq!(p.shape, [13, 16, 14]);
        assert_eq!(p.get(0, 0, 0), -5.0);
        assert_eq!(p.get(3, 5, 4), 3.0); // voxel (2, 3, 4) moved by (1, 2, 0)
        let w = apply_affine(&p.affine, [3.0, 5.0, 4.0]);
        assert_eq!(w, apply_affine(&v.affine, [2.0, 3.0, 4.0]));
        let b = center_crop_box([600, 100, 801], [512, 512, 768]);
        assert_eq!(b.start, [44, 0, 16]);
        assert_eq!(b.shape(), [512, 100, 768]);
    }
}
