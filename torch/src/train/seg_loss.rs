//! MONAI's `DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0,
//! smooth_dr=1e-6)` (the authors' setting, method.md 5) and nnU-Net's deep-supervision
//! weighting.
//!
//! ```text
//! p = softmax(logits, classes);  y = one_hot(target)
//! dice = mean over batch and classes of 1 - 2 sum(p y) / (sum(p^2) + sum(y^2) + 1e-6)
//! ce   = cross entropy (mean over voxels)
//! loss = dice + ce
//! ```
//!
//! The background class is included (MONAI's default).

use tch::{Kind, Reduction, Tensor};

/// DiceCE terms.
pub struct DiceCe {
    pub total: Tensor,
    pub dice: Tensor,
    pub ce: Tensor,
}

/// # Shapes
/// `logits`: `[b, K, X, Y, Z]` (any float kind), `target`: `[b, X, Y, Z]` int64 in `0..K`
pub fn dice_ce(logits: &Tensor, target: &Tensor) -> DiceCe {
    let logits = logits.to_kind(Kind::Float);
    let k = logits.size()[1];
    let p = logits.softmax(1, Kind::Float);
    let y = target
        .one_hot(k)
        .permute([0, 4, 1, 2, 3])
        .to_kind(Kind::Float);
    let dims = [2i64, 3, 4];
    let inter = (&p * &y).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
    let den = p
        .pow_tensor_scalar(2)
        .sum_dim_intlist(dims.as_slice(), false, Kind::Float)
        + y.pow_tensor_scalar(2)
            .sum_dim_intlist(dims.as_slice(), false, Kind::Float);
    let ratio: Tensor = inter * 2.0 / (den + 1e-6);
    let dice = (ratio.neg() + 1.0).mean(Kind::Float);
    let ce = logits.cross_entropy_loss::<Tensor>(target, None, Reduction::Mean, -100, 0.0);
    DiceCe {
        total: &dice + &ce,
        dice,
        ce,
    }
}

/// nnU-Net's deep-supervision weights for `n` outputs (full resolution first):
/// `1 / 2^i`, normalised to sum 1. (nnU-Net also zeroes the lowest resolution when it has
/// many; these heads stop above it already.)
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    let w: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32)).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|x| x / s).collect()
}

/// The label map resampled (nearest) to a lower-resolution output's grid.
pub fn downsample_labels(target: &Tensor, size: [i64; 3]) -> Tensor {
    let t = target.size();
    if t[1..] == size {
        return target.shallow_clone();
    }
    target
        .unsqueeze(1)
        .to_kind(Kind::Float)
        .upsample_nearest3d(size, None, None, None)
        .squeeze_dim(1)
        .to_kind(Kind::Int64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn perfect_logits_give_small_loss_and_values_match_the_formula() {
        let target = Tensor::from_slice(&[0i64, 1, 1, 0, 2, 2, 0, 1]).view([1, 2, 2, 2]);
        let onehot = target
            .one_hot(3)
            .permute([0, 4, 1, 2, 3])
            .to_kind(Kind::Float);
        let good = dice_ce(&(&onehot * 50.0), &target);
        assert!(
            good.total.double_value(&[]) < 1e-6,
            "{}",
            good.total.double_value(&[])
        );
        // Uniform logits: p = 1/3 everywhere; class counts 3, 3, 2 of 8 voxels.
        let flat = Tensor::zeros([1, 3, 2, 2, 2], (Kind::Float, Device::Cpu));
        let l = dice_ce(&flat, &target);
        let d = |n: f64| 1.0 - 2.0 * (n / 3.0) / (8.0 / 9.0 + n + 1e-6);
        let want_dice = (d(3.0) + d(3.0) + d(2.0)) / 3.0;
        assert!((l.dice.double_value(&[]) - want_dice).abs() < 1e-6);
        assert!((l.ce.double_value(&[]) - 3f64.ln()).abs() < 1e-6);
        let w = deep_supervision_weights(3);
        assert!((w[0] - 4.0 / 7.0).abs() < 1e-12 && (w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let lo = downsample_labels(&target, [1, 1, 1]);
        assert_eq!(lo.size(), [1, 1, 1, 1]);
    }
}
