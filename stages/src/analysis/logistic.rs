//! Multinomial logistic regression (softmax, L2 penalty), fitted by full-batch gradient
//! descent with Nesterov momentum on standardised features; stratified k-fold
//! cross-validation of it.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::metrics::{accuracy, macro_auc};
use super::Matrix;

/// A fitted model: `weights[c * d + j]`, `bias[c]`.
#[derive(Debug, Clone)]
pub struct Logistic {
    pub classes: usize,
    pub dim: usize,
    pub weights: Vec<f64>,
    pub bias: Vec<f64>,
}

impl Logistic {
    /// Class probabilities of each row.
    pub fn predict_proba(&self, x: &Matrix) -> Vec<Vec<f64>> {
        (0..x.rows)
            .map(|r| {
                let row = x.row(r);
                let logits: Vec<f64> = (0..self.classes)
                    .map(|c| {
                        self.bias[c]
                            + self.weights[c * self.dim..(c + 1) * self.dim]
                                .iter()
                                .zip(row)
                                .map(|(w, v)| w * v)
                                .sum::<f64>()
                    })
                    .collect();
                softmax(&logits)
            })
            .collect()
    }
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Fits on `x` (standardise first) with labels `y` in `0..classes`, minimising mean cross
/// entropy + `l2 * ||W||^2`.
pub fn fit(x: &Matrix, y: &[usize], classes: usize, l2: f64, iterations: usize) -> Logistic {
    let (n, d) = (x.rows, x.cols);
    let mut w = vec![0.0; classes * d];
    let mut b = vec![0.0; classes];
    let (mut vw, mut vb) = (vec![0.0; classes * d], vec![0.0; classes]);
    // Step size from a bound on the Hessian of the mean softmax loss: 0.5 * max row norm^2 + 2 l2.
    let max_sq = (0..n)
        .map(|r| x.row(r).iter().map(|v| v * v).sum::<f64>() + 1.0)
        .fold(0.0, f64::max);
    let lr = 1.0 / (0.5 * max_sq + 2.0 * l2).max(1e-12);
    let mu = 0.9;
    for _ in 0..iterations {
        // Nesterov: gradient at the look-ahead point.
        let wl: Vec<f64> = w.iter().zip(&vw).map(|(a, v)| a + mu * v).collect();
        let bl: Vec<f64> = b.iter().zip(&vb).map(|(a, v)| a + mu * v).collect();
        let m = Logistic {
            classes,
            dim: d,
            weights: wl.clone(),
            bias: bl.clone(),
        };
        let p = m.predict_proba(x);
        let mut gw = vec![0.0; classes * d];
        let mut gb = vec![0.0; classes];
        for r in 0..n {
            let row = x.row(r);
            for c in 0..classes {
                let g = (p[r][c] - if y[r] == c { 1.0 } else { 0.0 }) / n as f64;
                gb[c] += g;
                for (gj, v) in gw[c * d..(c + 1) * d].iter_mut().zip(row) {
                    *gj += g * v;
                }
            }
        }
        for (g, wv) in gw.iter_mut().zip(&wl) {
            *g += 2.0 * l2 * wv;
        }
        for i in 0..w.len() {
            vw[i] = mu * vw[i] - lr * gw[i];
            w[i] += vw[i];
        }
        for c in 0..classes {
            vb[c] = mu * vb[c] - lr * gb[c];
            b[c] += vb[c];
        }
    }
    Logistic {
        classes,
        dim: d,
        weights: w,
        bias: b,
    }
}

/// Fold index of each sample: each class is shuffled (seeded) and dealt round-robin.
pub fn stratified_folds(y: &[usize], folds: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut fold = vec![0; y.len()];
    let classes = y.iter().copied().max().map(|m| m + 1).unwrap_or(0);
    let mut offset = 0;
    for c in 0..classes {
        let mut idx: Vec<usize> = (0..y.len()).filter(|&i| y[i] == c).collect();
        idx.shuffle(&mut rng);
        for (k, i) in idx.into_iter().enumerate() {
            fold[i] = (k + offset) % folds;
        }
        offset += 1;
    }
    fold
}

/// Cross-validated probe results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    pub accuracy: f64,
    pub macro_auc: f64,
    /// Accuracy of always predicting the most frequent class (its share of the samples).
    /// (The majority of each fold's training part would be biased low under stratified
    /// folds: it is the class the held-out fold has least of.)
    pub chance_accuracy: f64,
    pub fold_accuracy: Vec<f64>,
    pub folds: usize,
    pub samples: usize,
    pub classes: usize,
}

/// Stratified k-fold probe: standardise with the training folds' statistics, fit, predict
/// the held-out fold; accuracy and macro AUC over the pooled out-of-fold predictions.
pub fn cross_validate(
    x: &Matrix,
    y: &[usize],
    classes: usize,
    folds: usize,
    l2: f64,
    iterations: usize,
    seed: u64,
) -> ProbeResult {
    let folds = folds.min(y.len()).max(2);
    let assignment = stratified_folds(y, folds, seed);
    let mut probs = vec![vec![0.0; classes]; y.len()];
    let mut fold_accuracy = Vec::new();
    for f in 0..folds {
        let train: Vec<usize> = (0..y.len()).filter(|&i| assignment[i] != f).collect();
        let test: Vec<usize> = (0..y.len()).filter(|&i| assignment[i] == f).collect();
        if test.is_empty() || train.is_empty() {
            continue;
        }
        let xt = x.select(&train);
        let (mean, std) = xt.column_stats();
        let ytr: Vec<usize> = train.iter().map(|&i| y[i]).collect();
        let model = fit(&xt.standardized(&mean, &std), &ytr, classes, l2, iterations);
        let p = model.predict_proba(&x.select(&test).standardized(&mean, &std));
        let mut pred = Vec::new();
        let mut truth = Vec::new();
        for (k, &i) in test.iter().enumerate() {
            probs[i] = p[k].clone();
            pred.push(argmax(&p[k]));
            truth.push(y[i]);
        }
        fold_accuracy.push(accuracy(&pred, &truth));
    }
    let pred: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
    let mut counts = vec![0usize; classes];
    for &c in y {
        counts[c] += 1;
    }
    let majority = counts.iter().copied().max().unwrap_or(0);
    ProbeResult {
        accuracy: accuracy(&pred, y),
        macro_auc: macro_auc(&probs, y, classes),
        chance_accuracy: majority as f64 / y.len().max(1) as f64,
        fold_accuracy,
        folds,
        samples: y.len(),
        classes,
    }
}

fn argmax(p: &[f64]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.partial_cmp(b.1).unwrap_or(std::cmp::Ordering::Equal))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn blobs(n_per: usize, centers: &[[f64; 2]], noise: f64, seed: u64) -> (Matrix, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut data = Vec::new();
        let mut y = Vec::new();
        for (c, ctr) in centers.iter().enumerate() {
            for _ in 0..n_per {
                data.push(ctr[0] + noise * (rng.random::<f64>() - 0.5));
                data.push(ctr[1] + noise * (rng.random::<f64>() - 0.5));
                y.push(c);
            }
        }
        (Matrix::new(y.len(), 2, data), y)
    }

    #[test]
    fn separable_blobs_are_probed_perfectly_and_noise_at_chance() {
        let (x, y) = blobs(20, &[[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], 1.0, 1);
        let r = cross_validate(&x, &y, 3, 5, 1e-3, 200, 0);
        assert_eq!(r.accuracy, 1.0);
        assert!(r.macro_auc > 0.99);
        // Labels independent of the features: accuracy near chance (1/3).
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let noise = Matrix::new(90, 4, (0..360).map(|_| rng.random::<f64>()).collect());
        let labels: Vec<usize> = (0..90).map(|i| i % 3).collect();
        let r = cross_validate(&noise, &labels, 3, 5, 1e-2, 200, 0);
        assert!(r.accuracy < 0.55, "{}", r.accuracy);
        assert!((r.macro_auc - 0.5).abs() < 0.2, "{}", r.macro_auc);
        // Balanced classes: chance is 1/3 exactly; 2:1 imbalance: 2/3.
        assert!((r.chance_accuracy - 1.0 / 3.0).abs() < 1e-12);
        let skewed: Vec<usize> = (0..90).map(|i| usize::from(i % 3 == 0)).collect();
        let r = cross_validate(&noise, &skewed, 2, 5, 1e-2, 200, 0);
        assert!((r.chance_accuracy - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn folds_are_stratified() {
        let y: Vec<usize> = (0..30).map(|i| i % 3).collect();
        let f = stratified_folds(&y, 5, 3);
        for fold in 0..5 {
            for c in 0..3 {
                assert_eq!((0..30).filter(|&i| f[i] == fold && y[i] == c).count(), 2);
            }
        }
    }
}
