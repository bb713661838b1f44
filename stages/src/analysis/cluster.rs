//! Silhouette score (Euclidean), as `sklearn.metrics.silhouette_score`.

use super::Matrix;

/// Mean silhouette coefficient of `labels` on the rows of `x`. Samples alone in their
/// cluster score 0. NaN with fewer than 2 clusters.
pub fn silhouette(x: &Matrix, labels: &[usize]) -> f64 {
    let n = x.rows;
    let k = labels.iter().copied().max().map(|m| m + 1).unwrap_or(0);
    let sizes: Vec<usize> = (0..k)
        .map(|c| labels.iter().filter(|&&l| l == c).count())
        .collect();
    if sizes.iter().filter(|&&s| s > 0).count() < 2 {
        return f64::NAN;
    }
    let d2 = x.pairwise_sq_dist();
    let mut total = 0.0;
    for i in 0..n {
        let li = labels[i];
        if sizes[li] <= 1 {
            continue;
        }
        let mut sums = vec![0.0; k];
        for j in 0..n {
            if j != i {
                sums[labels[j]] += d2[i * n + j].sqrt();
            }
        }
        let a = sums[li] / (sizes[li] - 1) as f64;
        let b = (0..k)
            .filter(|&c| c != li && sizes[c] > 0)
            .map(|c| sums[c] / sizes[c] as f64)
            .fold(f64::INFINITY, f64::min);
        let m = a.max(b);
        total += if m > 0.0 { (b - a) / m } else { 0.0 };
    }
    total / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computed_case() {
        // Points 0, 1 (cluster 0) and 4, 6 (cluster 1) on a line.
        // s(0) = (5 - 1)/5 = 0.8; s(1) = (4 - 1)/4 = 0.75; s(4) = (3.5-2)/3.5; s(6) = (5.5-2)/5.5
        let x = Matrix::new(4, 1, vec![0.0, 1.0, 4.0, 6.0]);
        let want = (0.8 + 0.75 + 1.5 / 3.5 + 3.5 / 5.5) / 4.0;
        assert!((silhouette(&x, &[0, 0, 1, 1]) - want).abs() < 1e-12);
        assert!(silhouette(&x, &[0, 0, 0, 0]).is_nan());
    }
}
