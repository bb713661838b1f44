//! Rendering a phantom anatomy ([`crate::data::phantom`]) in a domain's style
//! ([`crate::data::phantom_style`]) as a CT-like image with its label map.
//!
//! Per case, in this order, on the domain's RAS grid:
//! 1. rasterise tissues and labels at voxel centres; base HU = the phase's tissue mean
//!    plus a tissue-specific amount of the anatomy's texture;
//! 2. blur: reconstruction kernel (`blur_mm` in-plane) and slice profile
//!    (`sqrt(blur^2 + (thickness / 2.355)^2)` along z), separable Gaussian;
//! 3. calibration `hu_scale * HU + hu_offset`;
//! 4. a smooth additive bias field of amplitude `bias_hu` (products of sines with
//!    wavelengths of 250-450 mm, seeded by the style seed);
//! 5. correlated noise: white Gaussian noise smoothed with `noise_corr_mm` and rescaled to a
//!    standard deviation of exactly `noise_hu` (divided by the kernel's L2 norm);
//! 6. clamp to the CT range `[-1024, 3071]`, then reorient image and labels to the
//!    domain's header orientation (voxels move, world positions do not).
//!
//! The noise of slab `i` comes from its own ChaCha8 stream, so rendering is parallel and
//! bit-for-bit deterministic for any thread count.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::filters::{gaussian_blur, gaussian_kernel};
use crate::data::orientation::reorient_to;
use crate::data::phantom::{grid_affine, rasterize, Anatomy, LABELS};
use crate::data::phantom_style::{tissue_hu, DomainStyle, TISSUES};
use crate::data::volume::{LabelVolume, Volume};

/// Texture amplitude (HU per unit texture) of each tissue.
const TEXTURE_HU: [f32; TISSUES] = [0.0, 8.0, 5.0, 25.0, 6.0, 6.0, 8.0, 60.0, 3.0, 30.0, 5.0];

/// What a case is known to contain: the classification target and organ volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseTruth {
    pub has_lesion: bool,
    /// Lesion volume in ml on this grid (0 without lesion).
    pub lesion_ml: f64,
    /// Volume of each labelled structure in ml on this grid (by label name).
    pub organ_ml: BTreeMap<String, f64>,
    /// The seed the anatomy was drawn from (equal seeds: the same subject).
    pub content_seed: u64,
}

/// Mixes two 64-bit values into a well-spread seed (splitmix64 finaliser).
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Renders one case: the image (HU, in the style's header orientation), its labels (same
/// grid) and the truth. `content_seed` is recorded in the truth.
pub fn render_case(
    anatomy: &Anatomy,
    content_seed: u64,
    style: &DomainStyle,
    style_seed: u64,
) -> Result<(Volume, LabelVolume, CaseTruth), String> {
    style.validate()?;
    let shape = style.shape;
    let sp = style.spacing;
    let (tissue, labels, texture) = rasterize(anatomy, shape, sp);
    let hu = tissue_hu(style.phase);
    let base: Vec<f32> = tissue
        .par_iter()
        .zip(texture.par_iter())
        .map(|(&t, &x)| hu[t as usize] + TEXTURE_HU[t as usize] * x)
        .collect();
    // 2. kernel and slice profile
    let z_mm = (style.blur_mm.powi(2) + (style.slice_thickness_mm / 2.355).powi(2)).sqrt();
    let sigma = [style.blur_mm / sp[0], style.blur_mm / sp[1], z_mm / sp[2]];
    let mut img = gaussian_blur(&base, shape, sigma);
    drop(base);
    // 3-4. calibration and bias
    let affine = grid_affine(shape, sp);
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(style_seed, 0xB1A5));
    use rand::Rng;
    let tau = std::f64::consts::TAU;
    let bias: [(f64, f64); 3] = [0; 3].map(|_| {
        (
            tau / rng.random_range(250.0..450.0),
            rng.random_range(0.0..tau),
        )
    });
    let [_, ny, nz] = shape;
    let (scale, offset, amp) = (style.hu_scale as f32, style.hu_offset as f32, style.bias_hu);
    img.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, slab)| {
            let x = affine[0][0] * i as f64 + affine[0][3];
            let bx = (bias[0].0 * x + bias[0].1).sin();
            for j in 0..ny {
                let y = affine[1][1] * j as f64 + affine[1][3];
                let bxy = 0.6 * bx * (bias[1].0 * y + bias[1].1).cos();
                for k in 0..nz {
                    let z = affine[2][2] * k as f64 + affine[2][3];
                    let b = amp * (bxy + 0.4 * (bias[2].0 * z + bias[2].1).sin());
                    let v = &mut slab[j * nz + k];
                    *v = *v * scale + offset + b as f32;
                }
            }
        });
    // 5. correlated noise
    if style.noise_hu > 0.0 {
        let white: Vec<f32> = (0..shape[0])
            .into_par_iter()
            .flat_map_iter(|i| {
                let mut r = ChaCha8Rng::seed_from_u64(mix_seed(style_seed, i as u64 + 1));
                (0..ny * nz)
                    .map(move |_| rand::Rng::sample::<f32, _>(&mut r, StandardNormal))
                    .collect::<Vec<_>>()
            })
            .collect();
        let nsig = [0, 1, 2].map(|a| style.noise_corr_mm / sp[a]);
        let l2: f64 = nsig
            .iter()
            .map(|&s| {
                gaussian_kernel(s)
                    .iter()
                    .map(|&w| (w as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .product();
        let gain = (style.noise_hu / l2) as f32;
        let noise = gaussian_blur(&white, shape, nsig);
        img.par_iter_mut()
            .zip(noise.par_iter())
            .for_each(|(v, n)| *v += gain * n);
    }
    // 6. range and orientation
    img.par_iter_mut()
        .for_each(|v| *v = v.clamp(-1024.0, 3071.0));
    let voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0;
    let mut counts = [0usize; LABELS.len()];
    for &l in &labels {
        counts[l as usize] += 1;
    }
    let organ_ml: BTreeMap<String, f64> = LABELS
        .iter()
        .enumerate()
        .skip(1)
        .map(|(v, name)| (name.to_string(), counts[v] as f64 * voxel_ml))
        .collect();
    let truth = CaseTruth {
        has_lesion: anatomy.lesion.is_some() && counts[8] > 0,
        lesion_ml: counts[8] as f64 * voxel_ml,
        organ_ml,
        content_seed,
    };
    let image = reorient_to(
        &Volume {
            data: img,
            shape,
            affine,
        },
        &style.orientation,
    )?;
    let labels = reorient_to(
        &LabelVolume {
            data: labels,
            shape,
            affine,
        },
        &style.orientation,
    )?;
    Ok((image, labels, truth))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::orientation::axcodes;
    use crate::data::phantom::sample_anatomy;
    use crate::data::phantom_style::presets;

    #[test]
    fn render_is_deterministic_and_noise_has_the_requested_level() {
        let a = sample_anatomy(5, 1.0, 1.0);
        let mut style = presets()[1].clone(); // LPS, arterial
        style.bias_hu = 0.0;
        let (img, lab, truth) = render_case(&a, 5, &style, 77).unwrap();
        let (img2, lab2, _) = render_case(&a, 5, &style, 77).unwrap();
        assert_eq!(img, img2);
        assert_eq!(lab, lab2);
        assert_eq!(axcodes(&img.affine), "LPS");
        assert!(truth.has_lesion && truth.lesion_ml > 0.1);
        // Noise: compare with a noise-free rendering on the same grid.
        let mut quiet = style.clone();
        quiet.noise_hu = 0.0;
        let (img0, _, _) = render_case(&a, 5, &quiet, 77).unwrap();
        let d: Vec<f64> = img
            .data
            .iter()
            .zip(&img0.data)
            .filter(|(_, y)| **y > -900.0 && **y < 2900.0)
            .map(|(x, y)| (x - y) as f64)
            .collect();
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        assert!(
            (sd - style.noise_hu).abs() < 0.05 * style.noise_hu,
            "noise sd {sd}"
        );
        assert!(mean.abs() < 1.0, "noise mean {mean}");
        // A different style seed gives different noise, same labels.
        let (img3, lab3, _) = render_case(&a, 5, &style, 78).unwrap();
        assert_ne!(img3, img);
        assert_eq!(lab3, lab);
    }
}
