//! Multinomial logistic regression (softmax, L2 penalty), fitted by full-batch gradient
//! descent with Nesterov momentum on standardised features; stratified k-fold
//! cross-validation of it, repeated over fold seeds, and a permutation test against chance.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::metrics::{accuracy, macro_auc};
use super::stats::{quantile, Spread};
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
    cross_validate_folds(x, y, classes, &assignment, folds, l2, iterations)
}

/// [`cross_validate`] on given fold indices (`assignment[i]` in `0..folds`).
pub fn cross_validate_folds(
    x: &Matrix,
    y: &[usize],
    classes: usize,
    assignment: &[usize],
    folds: usize,
    l2: f64,
    iterations: usize,
) -> ProbeResult {
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
    let counts = class_counts(y, classes);
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

fn class_counts(y: &[usize], classes: usize) -> Vec<usize> {
    let mut counts = vec![0usize; classes];
    for &c in y {
        counts[c] += 1;
    }
    counts
}

/// Refuses `folds` above the sample count of the rarest class (`names[c]` names class c):
/// a stratified split would leave that class out of some test folds.
pub fn check_folds(y: &[usize], names: &[String], folds: usize) -> Result<(), String> {
    let counts = class_counts(y, names.len());
    if let Some((c, &n)) = counts
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .min_by_key(|(_, &n)| n)
    {
        if n < folds {
            return Err(format!(
                "folds: {folds} folds need at least {folds} samples of each class, but '{}' has {n}",
                names[c]
            ));
        }
    }
    Ok(())
}

/// How a probe is repeated and tested.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    pub folds: usize,
    pub l2: f64,
    pub iterations: usize,
    /// Stratified k-fold splits, fold seeds `seed..seed + repeats`.
    pub repeats: usize,
    /// Label permutations of the permutation test (0: no test).
    pub permutations: usize,
    pub seed: u64,
}

/// Probe figures over repeated stratified k-fold splits, with a permutation test.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RepeatedProbe {
    /// Out-of-fold accuracy, one value per fold seed.
    pub accuracy: Spread,
    /// Macro one-vs-rest AUC, one value per fold seed.
    pub macro_auc: Spread,
    /// Share of the most frequent class.
    pub chance_accuracy: f64,
    pub folds: usize,
    pub repeats: usize,
    pub samples: usize,
    pub classes: usize,
    pub permutation: Option<PermutationTest>,
}

/// The probe against chance: the split of the first fold seed, refitted with the labels
/// shuffled (the folds re-stratified on them), as scikit-learn's `permutation_test_score`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PermutationTest {
    pub permutations: usize,
    /// Accuracy and AUC of that split with the true labels.
    pub observed_accuracy: f64,
    pub observed_auc: f64,
    /// `(1 + #{null >= observed}) / (1 + permutations)`.
    pub accuracy_p: f64,
    pub auc_p: f64,
    /// 2.5th and 97.5th percentiles of the shuffled-label figures: the 95 % chance band.
    pub accuracy_chance_band: [f64; 2],
    pub auc_chance_band: [f64; 2],
}

/// Repeated stratified k-fold probe and permutation test; fits run in parallel (rayon)
/// and the result does not depend on the thread count.
pub fn repeated_probe(x: &Matrix, y: &[usize], classes: usize, s: &ProbeSettings) -> RepeatedProbe {
    let folds = s.folds.min(y.len()).max(2);
    let runs: Vec<ProbeResult> = (0..s.repeats.max(1) as u64)
        .into_par_iter()
        .map(|r| cross_validate(x, y, classes, folds, s.l2, s.iterations, s.seed + r))
        .collect();
    let permutation = (s.permutations > 0).then(|| {
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x9e37_79b9_7f4a_7c15);
        let shuffled: Vec<Vec<usize>> = (0..s.permutations)
            .map(|_| {
                let mut yp = y.to_vec();
                yp.shuffle(&mut rng);
                yp
            })
            .collect();
        let null: Vec<(f64, f64)> = shuffled
            .par_iter()
            .map(|yp| {
                let r = cross_validate(x, yp, classes, folds, s.l2, s.iterations, s.seed);
                (r.accuracy, r.macro_auc)
            })
            .collect();
        let observed = &runs[0];
        let p = |obs: f64, pick: fn(&(f64, f64)) -> f64| {
            (1 + null.iter().filter(|v| pick(v) >= obs - 1e-12).count()) as f64
                / (1 + null.len()) as f64
        };
        let band = |pick: fn(&(f64, f64)) -> f64| {
            let v: Vec<f64> = null.iter().map(pick).collect();
            [
                quantile(&v, 0.025).unwrap_or(f64::NAN),
                quantile(&v, 0.975).unwrap_or(f64::NAN),
            ]
        };
        PermutationTest {
            permutations: null.len(),
            observed_accuracy: observed.accuracy,
            observed_auc: observed.macro_auc,
            accuracy_p: p(observed.accuracy, |v| v.0),
            auc_p: p(observed.macro_auc, |v| v.1),
            accuracy_chance_band: band(|v| v.0),
            auc_chance_band: band(|v| v.1),
        }
    });
    RepeatedProbe {
        accuracy: Spread::of(&runs.iter().map(|r| r.accuracy).collect::<Vec<_>>()),
        macro_auc: Spread::of(&runs.iter().map(|r| r.macro_auc).collect::<Vec<_>>()),
        chance_accuracy: runs[0].chance_accuracy,
        folds,
        repeats: runs.len(),
        samples: y.len(),
        classes,
        permutation,
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
    fn repeated_probe_has_error_bars_and_a_permutation_test() {
        let settings = ProbeSettings {
            folds: 5,
            l2: 1e-2,
            iterations: 100,
            repeats: 8,
            permutations: 49,
            seed: 3,
        };
        // Separable: every split perfect; no shuffled labelling does as well: p = 1 / 50.
        let (x, y) = blobs(10, &[[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], 1.0, 1);
        let r = repeated_probe(&x, &y, 3, &settings);
        assert_eq!((r.accuracy.n, r.repeats, r.folds), (8, 8, 5));
        assert_eq!((r.accuracy.mean, r.accuracy.sd), (Some(1.0), Some(0.0)));
        let t = r.permutation.as_ref().unwrap();
        assert_eq!(t.permutations, 49);
        assert!(
            (t.accuracy_p - 1.0 / 50.0).abs() < 1e-12,
            "{}",
            t.accuracy_p
        );
        assert!(t.accuracy_chance_band[1] < 1.0 && t.accuracy_chance_band[0] < 0.5);
        // Noise: the split's accuracy sits inside the chance band, p far from 0; splits
        // differ, so the spread is not zero.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let noise = Matrix::new(60, 4, (0..240).map(|_| rng.random::<f64>()).collect());
        let labels: Vec<usize> = (0..60).map(|i| i % 3).collect();
        let r = repeated_probe(&noise, &labels, 3, &settings);
        let t = r.permutation.as_ref().unwrap();
        assert!(t.accuracy_p > 0.05, "{t:?}");
        assert!(r.accuracy.sd.unwrap() > 0.0);
        let m = r.accuracy.mean.unwrap();
        assert!(r.accuracy.min.unwrap() <= m && m <= r.accuracy.max.unwrap());
        // The same seed gives the same figures, whatever the thread count.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let r1 = one.install(|| repeated_probe(&noise, &labels, 3, &settings));
        assert_eq!(r1.accuracy, r.accuracy);
        assert_eq!(r1.permutation.unwrap().accuracy_p, t.accuracy_p);
    }

    #[test]
    fn more_folds_than_the_rarest_class_are_refused() {
        let names: Vec<String> = ["venous", "native"].iter().map(|s| s.to_string()).collect();
        let y = [0, 0, 0, 0, 0, 1, 1, 1];
        assert!(check_folds(&y, &names, 3).is_ok());
        let e = check_folds(&y, &names, 4).unwrap_err();
        assert!(
            e.starts_with("folds: 4") && e.contains("'native' has 3"),
            "{e}"
        );
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
