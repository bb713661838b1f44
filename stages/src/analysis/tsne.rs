//! Exact t-SNE (van der Maaten and Hinton, 2008) for a few thousand points: perplexity-
//! calibrated Gaussian affinities, Student-t similarities in 2-D, early exaggeration 12
//! for the first 250 iterations, momentum 0.5 then 0.8, and per-coordinate adaptive gains,
//! as in the reference implementation.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::Matrix;

/// Symmetrised joint probabilities `P` for a target perplexity.
fn joint_probabilities(d2: &[f64], n: usize, perplexity: f64) -> Vec<f64> {
    let target = perplexity.min((n - 1) as f64 * 0.999).max(1.0).ln();
    let mut p = vec![0.0; n * n];
    for i in 0..n {
        let (mut lo, mut hi, mut beta) = (f64::NEG_INFINITY, f64::INFINITY, 1.0);
        let row: Vec<f64> = (0..n).map(|j| d2[i * n + j]).collect();
        let dmin = row
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, &v)| v)
            .fold(f64::INFINITY, f64::min);
        for _ in 0..100 {
            let mut sum = 0.0;
            let mut dsum = 0.0;
            for j in 0..n {
                if j != i {
                    let e = (-(row[j] - dmin) * beta).exp();
                    p[i * n + j] = e;
                    sum += e;
                    dsum += e * (row[j] - dmin);
                }
            }
            let sum = sum.max(1e-300);
            let h = sum.ln() + beta * dsum / sum;
            for j in 0..n {
                p[i * n + j] /= sum;
            }
            let diff = h - target;
            if diff.abs() < 1e-5 {
                break;
            }
            if diff > 0.0 {
                lo = beta;
                beta = if hi.is_finite() {
                    (beta + hi) / 2.0
                } else {
                    beta * 2.0
                };
            } else {
                hi = beta;
                beta = if lo.is_finite() {
                    (beta + lo) / 2.0
                } else {
                    beta / 2.0
                };
            }
        }
    }
    let mut joint = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            joint[i * n + j] = ((p[i * n + j] + p[j * n + i]) / (2.0 * n as f64)).max(1e-12);
        }
    }
    joint
}

/// A 2-D embedding of the rows of `x` (standardise first).
pub fn tsne(x: &Matrix, perplexity: f64, iterations: usize, seed: u64) -> Vec<(f64, f64)> {
    let n = x.rows;
    if n < 3 {
        return (0..n).map(|i| (i as f64, 0.0)).collect();
    }
    let p = joint_probabilities(&x.pairwise_sq_dist(), n, perplexity);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0, 1e-4).expect("valid normal");
    let mut y: Vec<f64> = (0..2 * n).map(|_| normal.sample(&mut rng)).collect();
    let mut update = vec![0.0; 2 * n];
    let mut gains = vec![1.0f64; 2 * n];
    let lr = (n as f64 / 12.0).max(50.0);
    let mut num = vec![0.0; n * n];
    for it in 0..iterations {
        let exaggeration = if it < 250 { 12.0 } else { 1.0 };
        let momentum = if it < 250 { 0.5 } else { 0.8 };
        let mut qsum = 0.0;
        for i in 0..n {
            for j in (i + 1)..n {
                let dx = y[2 * i] - y[2 * j];
                let dy = y[2 * i + 1] - y[2 * j + 1];
                let v = 1.0 / (1.0 + dx * dx + dy * dy);
                num[i * n + j] = v;
                num[j * n + i] = v;
                qsum += 2.0 * v;
            }
        }
        for i in 0..n {
            let (mut gx, mut gy) = (0.0, 0.0);
            for j in 0..n {
                if i == j {
                    continue;
                }
                let q = (num[i * n + j] / qsum).max(1e-12);
                let m = (exaggeration * p[i * n + j] - q) * num[i * n + j];
                gx += m * (y[2 * i] - y[2 * j]);
                gy += m * (y[2 * i + 1] - y[2 * j + 1]);
            }
            for (k, g) in [(2 * i, 4.0 * gx), (2 * i + 1, 4.0 * gy)] {
                gains[k] = if (g > 0.0) != (update[k] > 0.0) {
                    gains[k] + 0.2
                } else {
                    (gains[k] * 0.8).max(0.01)
                };
                update[k] = momentum * update[k] - lr * gains[k] * g;
            }
        }
        for k in 0..2 * n {
            y[k] += update[k];
        }
        // Re-centre.
        let (mx, my) = (
            (0..n).map(|i| y[2 * i]).sum::<f64>() / n as f64,
            (0..n).map(|i| y[2 * i + 1]).sum::<f64>() / n as f64,
        );
        for i in 0..n {
            y[2 * i] -= mx;
            y[2 * i + 1] -= my;
        }
    }
    (0..n).map(|i| (y[2 * i], y[2 * i + 1])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::cluster::silhouette;
    use rand::Rng;

    #[test]
    fn separated_clusters_stay_separated() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for c in 0..3 {
            for _ in 0..15 {
                for d in 0..10 {
                    data.push(if d == c { 10.0 } else { 0.0 } + rng.random::<f64>());
                }
                labels.push(c);
            }
        }
        let x = Matrix::new(45, 10, data);
        let emb = tsne(&x, 10.0, 500, 0);
        let e = Matrix::new(45, 2, emb.iter().flat_map(|p| [p.0, p.1]).collect());
        let s = silhouette(&e, &labels);
        assert!(s > 0.5, "silhouette of the embedding {s}");
        assert_eq!(tsne(&x, 10.0, 500, 0), emb, "deterministic given the seed");
    }
}
