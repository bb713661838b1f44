//! Separable Gaussian filtering of C-order 3D arrays (three 1D passes, never a 3D
//! convolution), parallel over slabs on the current rayon pool.
//!
//! The kernel is a sampled Gaussian truncated at `ceil(3 sigma)` voxels and normalised to
//! sum 1; borders replicate the edge voxel (scipy's `mode="nearest"`). A sigma of 0 on an
//! axis leaves that axis untouched.

use rayon::prelude::*;

/// The normalised 1D kernel for `sigma` voxels (`[1.0]` for sigma 0).
pub fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    if sigma <= 0.0 {
        return vec![1.0];
    }
    let r = (3.0 * sigma).ceil() as i64;
    let w: Vec<f64> = (-r..=r)
        .map(|t| (-(t as f64).powi(2) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|x| (x / s) as f32).collect()
}

/// Filters along the last axis (contiguous rows of length `nz`).
fn pass_k(src: &[f32], nz: usize, kern: &[f32]) -> Vec<f32> {
    let r = (kern.len() / 2) as isize;
    let mut out = vec![0.0f32; src.len()];
    out.par_chunks_mut(nz)
        .zip(src.par_chunks(nz))
        .for_each(|(o, row)| {
            for (k, y) in o.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for (t, &w) in kern.iter().enumerate() {
                    let idx = (k as isize + t as isize - r).clamp(0, nz as isize - 1) as usize;
                    acc += w * row[idx];
                }
                *y = acc;
            }
        });
    out
}

/// Filters along an outer axis: `n` blocks of `block` contiguous values, grouped in
/// `outer` independent groups (axis j: groups = slabs; axis i: one group).
fn pass_outer(src: &[f32], outer: usize, n: usize, block: usize, kern: &[f32]) -> Vec<f32> {
    let r = (kern.len() / 2) as isize;
    let mut out = vec![0.0f32; src.len()];
    out.par_chunks_mut(block).enumerate().for_each(|(ob, dst)| {
        let (g, m) = (ob / n, ob % n);
        let base = g * n * block;
        for (t, &w) in kern.iter().enumerate() {
            let idx = (m as isize + t as isize - r).clamp(0, n as isize - 1) as usize;
            let s = &src[base + idx * block..][..block];
            for (y, &x) in dst.iter_mut().zip(s) {
                *y += w * x;
            }
        }
    });
    debug_assert_eq!(outer * n * block, src.len());
    out
}

/// Gaussian filter with per-axis sigmas (in voxels) of a C-order array of `shape`.
pub fn gaussian_blur(src: &[f32], shape: [usize; 3], sigma: [f64; 3]) -> Vec<f32> {
    let [nx, ny, nz] = shape;
    assert_eq!(
        src.len(),
        nx * ny * nz,
        "data length does not match the shape"
    );
    let mut cur: Option<Vec<f32>> = None;
    if sigma[2] > 0.0 {
        cur = Some(pass_k(src, nz, &gaussian_kernel(sigma[2])));
    }
    if sigma[1] > 0.0 {
        let input = cur.as_deref().unwrap_or(src);
        cur = Some(pass_outer(input, nx, ny, nz, &gaussian_kernel(sigma[1])));
    }
    if sigma[0] > 0.0 {
        let input = cur.as_deref().unwrap_or(src);
        cur = Some(pass_outer(
            input,
            1,
            nx,
            ny * nz,
            &gaussian_kernel(sigma[0]),
        ));
    }
    cur.unwrap_or_else(|| src.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_normalised_and_blur_preserves_mass() {
        let k = gaussian_kernel(1.5);
        assert_eq!(k.len(), 11);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let shape = [21, 19, 23];
        let mut v = vec![0.0f32; 21 * 19 * 23];
        v[(10 * 19 + 9) * 23 + 11] = 1000.0;
        let b = gaussian_blur(&v, shape, [1.0, 2.0, 0.5]);
        let total: f32 = b.iter().sum();
        assert!((total - 1000.0).abs() < 0.05, "{total}");
        // Variance along each axis matches sigma^2 (discrete Gaussian, close to it).
        let mut var = [0.0f64; 3];
        for i in 0..21 {
            for j in 0..19 {
                for k in 0..23 {
                    let w = b[(i * 19 + j) * 23 + k] as f64 / 1000.0;
                    var[0] += w * (i as f64 - 10.0).powi(2);
                    var[1] += w * (j as f64 - 9.0).powi(2);
                    var[2] += w * (k as f64 - 11.0).powi(2);
                }
            }
        }
        // Exactly the variance of each sampled kernel (close to sigma^2 for sigma >= 1).
        for (a, s) in [1.0, 2.0, 0.5].into_iter().enumerate() {
            let k = gaussian_kernel(s);
            let r = (k.len() / 2) as f64;
            let want: f64 = k
                .iter()
                .enumerate()
                .map(|(t, &w)| w as f64 * (t as f64 - r).powi(2))
                .sum();
            assert!((var[a] - want).abs() < 1e-4, "{var:?} {want}");
        }
        // Truncation at 3 sigma loses about 1% of the variance.
        assert!(
            (var[0] - 1.0).abs() < 0.02 && (var[1] - 4.0).abs() < 0.08,
            "{var:?}"
        );
        // A constant stays constant (replicated borders).
        let c = gaussian_blur(&vec![3.0; 21 * 19 * 23], shape, [2.0, 2.0, 2.0]);
        assert!(c.iter().all(|&x| (x - 3.0).abs() < 1e-5));
    }
}
