//! Training crops for segmentation: an input crop (image voxels, or VAE latents) and the
//! label crop on the image grid, drawn with foreground oversampling and augmented alike.
//!
//! - **Grids.** The input may be coarser than the label by an integer `scale` (latents: 4);
//!   a crop of `crop` input voxels at input origin `o` pairs with the label crop of
//!   `crop * scale` voxels at `o * scale`, which covers exactly the same world region
//!   (latent voxel `u` summarises image voxels `4u .. 4u+3`).
//! - **Foreground oversampling.** With probability `fg_fraction` the crop is centred on a
//!   random foreground voxel (label > 0), clamped to stay inside the volume, as MONAI's
//!   `RandCropByPosNegLabeld` (pos 9 : neg 1 = 0.9, the authors' UNETR setting) and nnU-Net's
//!   oversampling (1/3); otherwise the origin is uniform. Volumes smaller than the crop are
//!   centred and padded with zeros (label: background).
//! - **Augmentation.** The same flips (per axis, `flip_p`) and rotation by k·90° in the
//!   plane of axes 0 and 1 (`rot90_p`) on input and label
//!   ([`crate::sampling::augment_in_place`]); then on the input only, MONAI's
//!   `RandScaleIntensity` (`x * (1 + U(-scale, scale))` with probability `scale_p`) and
//!   `RandShiftIntensity` (`x + U(-shift, shift)` with probability `shift_p`).
//! - **Determinism.** A batch is a pure function of `(seed, step)`, so a resumed training
//!   run sees exactly the batches of an uninterrupted one.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sampling::{augment_in_place, CropSource};

/// Augmentation probabilities and ranges.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegAugment {
    pub flip_p: f64,
    pub rot90_p: f64,
    pub scale_p: f64,
    pub scale: f64,
    pub shift_p: f64,
    pub shift: f64,
}

impl Default for SegAugment {
    /// The authors' BTCV/WORD transforms (method.md 5).
    fn default() -> Self {
        Self {
            flip_p: 0.2,
            rot90_p: 0.2,
            scale_p: 0.1,
            scale: 0.1,
            shift_p: 0.5,
            shift: 0.1,
        }
    }
}

impl SegAugment {
    pub const NONE: SegAugment = SegAugment {
        flip_p: 0.0,
        rot90_p: 0.0,
        scale_p: 0.0,
        scale: 0.0,
        shift_p: 0.0,
        shift: 0.0,
    };

    pub fn validate(&self) -> Result<(), String> {
        for (n, p) in [
            ("flip_p", self.flip_p),
            ("rot90_p", self.rot90_p),
            ("scale_p", self.scale_p),
            ("shift_p", self.shift_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("augment.{n}: {p} is not a probability"));
            }
        }
        if !(self.scale >= 0.0 && self.shift >= 0.0) {
            return Err("augment.scale / augment.shift must be >= 0".into());
        }
        Ok(())
    }
}

/// One training subject: its input array and its label map (classes `0..=K`).
#[derive(Debug, Clone)]
pub struct SegSource {
    pub input: CropSource,
    pub label: Arc<Vec<u8>>,
    pub label_shape: [usize; 3],
    /// Label voxels per input voxel along each axis (1: image, 4: latents).
    pub scale: usize,
    /// Flat indices of foreground voxels (label > 0).
    pub foreground: Arc<Vec<u32>>,
}

impl SegSource {
    /// Checks that the grids pair up and indexes the foreground.
    pub fn new(
        input: CropSource,
        label: Vec<u8>,
        label_shape: [usize; 3],
        scale: usize,
    ) -> Result<Self, String> {
        let want: [usize; 3] = std::array::from_fn(|a| input.shape[a + 1] * scale);
        if want != label_shape || label.len() != label_shape.iter().product::<usize>() {
            return Err(format!(
                "'{}': input grid {:?} x {scale} = {want:?} does not match the label grid {label_shape:?}",
                input.id,
                &input.shape[1..]
            ));
        }
        let foreground = label
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0)
            .map(|(i, _)| i as u32)
            .collect();
        Ok(Self {
            input,
            label: Arc::new(label),
            label_shape,
            scale,
            foreground: Arc::new(foreground),
        })
    }

    /// Copies the label region at `origin` (label voxels; zeros outside).
    pub fn read_label(&self, origin: [i64; 3], size: [usize; 3], out: &mut [f32]) {
        let [nx, ny, nz] = self.label_shape.map(|n| n as i64);
        let mut o = 0;
        for i in 0..size[0] as i64 {
            for j in 0..size[1] as i64 {
                for k in 0..size[2] as i64 {
                    let (x, y, z) = (origin[0] + i, origin[1] + j, origin[2] + k);
                    out[o] = if x < 0 || y < 0 || z < 0 || x >= nx || y >= ny || z >= nz {
                        0.0
                    } else {
                        self.label[((x * ny + y) * nz + z) as usize] as f32
                    };
                    o += 1;
                }
            }
        }
    }
}

/// A batch: input `[B, C, cx, cy, cz]` and labels `[B, cx*s, cy*s, cz*s]`, C order.
#[derive(Debug, Clone, PartialEq)]
pub struct SegBatch {
    pub input: Vec<f32>,
    pub input_shape: [usize; 5],
    pub label: Vec<u8>,
    pub label_shape: [usize; 4],
    pub ids: Vec<String>,
    /// Whether each crop was centred on foreground.
    pub foreground: Vec<bool>,
}

/// Draws segmentation batches.
#[derive(Debug, Clone)]
pub struct SegSampler {
    sources: Vec<SegSource>,
    pub crop: [usize; 3],
    pub fg_fraction: f64,
    pub augment: SegAugment,
    pub seed: u64,
}

impl SegSampler {
    pub fn new(
        sources: Vec<SegSource>,
        crop: [usize; 3],
        fg_fraction: f64,
        augment: SegAugment,
        seed: u64,
    ) -> Result<Self, String> {
        if sources.is_empty() {
            return Err("no labelled subjects to sample crops from".into());
        }
        let (c, s) = (sources[0].input.shape[0], sources[0].scale);
        if let Some(x) = sources
            .iter()
            .find(|x| x.input.shape[0] != c || x.scale != s)
        {
            return Err(format!(
                "'{}' has {} channels at scale {}, others {c} at {s}",
                x.input.id, x.input.shape[0], x.scale
            ));
        }
        if !(0.0..=1.0).contains(&fg_fraction) {
            return Err(format!("fg_fraction {fg_fraction} is not a probability"));
        }
        augment.validate()?;
        Ok(Self {
            sources,
            crop,
            fg_fraction,
            augment,
            seed,
        })
    }

    pub fn sources(&self) -> &[SegSource] {
        &self.sources
    }

    /// The batch of step `step`.
    pub fn batch(&self, step: u64, batch_size: usize) -> SegBatch {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407));
        let c = self.sources[0].input.shape[0];
        let s = self.sources[0].scale;
        let crop = self.crop;
        let lcrop = crop.map(|n| n * s);
        let per_in = c * crop.iter().product::<usize>();
        let per_lab: usize = lcrop.iter().product();
        let mut input = vec![0.0f32; batch_size * per_in];
        let mut label = vec![0u8; batch_size * per_lab];
        let mut lab_f = vec![0.0f32; per_lab];
        let (mut ids, mut fgs) = (
            Vec::with_capacity(batch_size),
            Vec::with_capacity(batch_size),
        );
        for b in 0..batch_size {
            let src = &self.sources[rng.random_range(0..self.sources.len())];
            let want_fg = rng.random_bool(self.fg_fraction) && !src.foreground.is_empty();
            let mut origin = [0i64; 3];
            let centre: Option<[usize; 3]> = want_fg.then(|| {
                let v = src.foreground[rng.random_range(0..src.foreground.len())] as usize;
                let [_, ly, lz] = src.label_shape;
                [v / (ly * lz), (v / lz) % ly, v % lz]
            });
            for a in 0..3 {
                let n = src.input.shape[a + 1] as i64;
                let k = crop[a] as i64;
                origin[a] = if n <= k {
                    -((k - n) / 2)
                } else if let Some(cv) = centre {
                    ((cv[a] / s) as i64 - k / 2).clamp(0, n - k)
                } else {
                    rng.random_range(0..=(n - k))
                };
            }
            let out = &mut input[b * per_in..(b + 1) * per_in];
            src.input.read_crop(origin, crop, out);
            src.read_label(origin.map(|o| o * s as i64), lcrop, &mut lab_f);
            let flips = [
                rng.random_bool(self.augment.flip_p),
                rng.random_bool(self.augment.flip_p),
                rng.random_bool(self.augment.flip_p),
            ];
            let k = if rng.random_bool(self.augment.rot90_p) {
                rng.random_range(1..=3)
            } else {
                0
            };
            augment_in_place(out, c, crop, flips, k);
            augment_in_place(&mut lab_f, 1, lcrop, flips, k);
            if rng.random_bool(self.augment.scale_p) {
                let f = 1.0 + rng.random_range(-self.augment.scale..=self.augment.scale) as f32;
                out.iter_mut().for_each(|x| *x *= f);
            }
            if rng.random_bool(self.augment.shift_p) {
                let o = rng.random_range(-self.augment.shift..=self.augment.shift) as f32;
                out.iter_mut().for_each(|x| *x += o);
            }
            for (d, &v) in label[b * per_lab..(b + 1) * per_lab].iter_mut().zip(&lab_f) {
                *d = v as u8;
            }
            ids.push(src.input.id.clone());
            fgs.push(want_fg);
        }
        SegBatch {
            input,
            input_shape: [batch_size, c, crop[0], crop[1], crop[2]],
            label,
            label_shape: [batch_size, lcrop[0], lcrop[1], lcrop[2]],
            ids,
            foreground: fgs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latent-like source (2 channels at scale 2) whose label marks one input voxel's block.
    fn source() -> SegSource {
        let shape = [2, 6, 5, 4];
        let n: usize = shape.iter().product();
        let input = CropSource {
            id: "a".into(),
            domain_id: 0,
            shape,
            data: Arc::new((0..n).map(|v| v as f32).collect()),
        };
        let ls = [12, 10, 8];
        let mut label = vec![0u8; ls.iter().product()];
        // Foreground: the 2x2x2 label block of input voxel (4, 3, 1).
        for i in 8..10 {
            for j in 6..8 {
                for k in 2..4 {
                    label[(i * 10 + j) * 8 + k] = 1;
                }
            }
        }
        SegSource::new(input, label, ls, 2).unwrap()
    }

    #[test]
    fn crops_pair_input_and_label_grids() {
        let s = SegSampler::new(vec![source()], [2, 2, 2], 1.0, SegAugment::NONE, 5).unwrap();
        let b = s.batch(0, 3);
        assert_eq!(b.input_shape, [3, 2, 2, 2, 2]);
        assert_eq!(b.label_shape, [3, 4, 4, 4]);
        assert!(b.foreground.iter().all(|&f| f));
        for i in 0..3 {
            // Centred on input voxel (4, 3, 1): origin (3, 2, 0) -> label origin (6, 4, 0);
            // the foreground block is then at label offsets 2..4, 2..4, 2..4.
            let lab = &b.label[i * 64..(i + 1) * 64];
            assert_eq!(lab.iter().filter(|&&v| v == 1).count(), 8);
            assert_eq!(lab[(2 * 4 + 2) * 4 + 2], 1);
            let first = b.input[i * 16];
            assert_eq!(first, ((3 * 5 + 2) * 4) as f32, "input origin (3, 2, 0)");
        }
        assert_eq!(s.batch(7, 2), s.batch(7, 2));
    }

    #[test]
    fn flips_move_input_and_label_together() {
        let aug = SegAugment {
            flip_p: 1.0,
            ..SegAugment::NONE
        };
        let s = SegSampler::new(vec![source()], [2, 2, 2], 1.0, aug, 5).unwrap();
        let b = s.batch(0, 1);
        // Flipped on every axis: the foreground block moves to label offsets 0..2.
        assert_eq!(b.label[0], 1);
        assert_eq!(b.label[(2 * 4 + 2) * 4 + 2], 0);
        // And the input's last voxel of channel 0 is now first.
        assert_eq!(b.input[0], (((3 + 1) * 5 + 2 + 1) * 4 + 1) as f32);
    }

    #[test]
    fn mismatched_grids_are_rejected() {
        let s = source();
        let e = SegSource::new(s.input.clone(), vec![0; 10], [2, 5, 1], 2).unwrap_err();
        assert!(e.contains("does not match the label grid"), "{e}");
    }
}
