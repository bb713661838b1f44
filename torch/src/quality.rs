//! Image quality: PSNR and 3-D SSIM (Gaussian window, as MONAI's `SSIMMetric`: kernel 11,
//! sigma 1.5, k1 0.01, k2 0.03), computed with tensors on any device.

use tch::{Kind, Tensor};

/// Peak signal-to-noise ratio in dB for intensities with range `data_range`.
pub fn psnr(x: &Tensor, y: &Tensor, data_range: f64) -> f64 {
    let mse = (x - y)
        .pow_tensor_scalar(2)
        .mean(Kind::Float)
        .double_value(&[]);
    if mse <= 0.0 {
        return f64::INFINITY;
    }
    10.0 * (data_range * data_range / mse).log10()
}

/// A normalised 1-D Gaussian kernel.
fn gaussian_1d(size: i64, sigma: f64, dev: tch::Device) -> Tensor {
    let c = (size - 1) as f64 / 2.0;
    let v: Vec<f32> = (0..size)
        .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let s: f32 = v.iter().sum();
    Tensor::from_slice(&v.iter().map(|x| x / s).collect::<Vec<_>>()).to_device(dev)
}

/// Separable Gaussian filtering of `[b, c, d, h, w]` (valid convolution, per channel).
fn blur(x: &Tensor, k: &Tensor) -> Tensor {
    let c = x.size()[1];
    let n = k.size()[0];
    let kd = k.view([1, 1, n, 1, 1]).repeat([c, 1, 1, 1, 1]);
    let kh = k.view([1, 1, 1, n, 1]).repeat([c, 1, 1, 1, 1]);
    let kw = k.view([1, 1, 1, 1, n]).repeat([c, 1, 1, 1, 1]);
    let y = x.conv3d(&kd, None::<Tensor>, [1, 1, 1], [0, 0, 0], [1, 1, 1], c);
    let y = y.conv3d(&kh, None::<Tensor>, [1, 1, 1], [0, 0, 0], [1, 1, 1], c);
    y.conv3d(&kw, None::<Tensor>, [1, 1, 1], [0, 0, 0], [1, 1, 1], c)
}

/// Mean SSIM of two `[b, c, d, h, w]` volumes (window `kernel`, Gaussian `sigma`). Every
/// spatial size must be at least `kernel`.
pub fn ssim_3d(x: &Tensor, y: &Tensor, data_range: f64, kernel: i64, sigma: f64) -> f64 {
    let (x, y) = (x.to_kind(Kind::Float), y.to_kind(Kind::Float));
    let k = gaussian_1d(kernel, sigma, x.device());
    let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
    let mx = blur(&x, &k);
    let my = blur(&y, &k);
    let sxx = blur(&(&x * &x), &k) - &mx * &mx;
    let syy = blur(&(&y * &y), &k) - &my * &my;
    let sxy = blur(&(&x * &y), &k) - &mx * &my;
    let num = (&mx * &my * 2.0 + c1) * (&sxy * 2.0 + c2);
    let den = (&mx * &mx + &my * &my + c1) * (sxx + syy + c2);
    (num / den).mean(Kind::Float).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_volumes_score_perfectly_and_noise_lowers_both() {
        tch::manual_seed(0);
        let x = Tensor::rand([1, 1, 16, 16, 16], (Kind::Float, tch::Device::Cpu));
        assert!((ssim_3d(&x, &x, 1.0, 7, 1.5) - 1.0).abs() < 1e-5);
        assert!(psnr(&x, &x, 1.0).is_infinite());
        let noisy = &x + Tensor::randn([1, 1, 16, 16, 16], (Kind::Float, tch::Device::Cpu)) * 0.1;
        let p = psnr(&x, &noisy, 1.0);
        assert!(
            (p - 20.0).abs() < 0.5,
            "psnr of sigma 0.1 noise is about 20 dB, got {p}"
        );
        assert!(ssim_3d(&x, &noisy, 1.0, 7, 1.5) < 0.95);
    }
}
