//! Classification metrics.

/// Fraction of correct predictions.
pub fn accuracy(pred: &[usize], truth: &[usize]) -> f64 {
    if truth.is_empty() {
        return f64::NAN;
    }
    pred.iter().zip(truth).filter(|(a, b)| a == b).count() as f64 / truth.len() as f64
}

/// Area under the ROC curve of `scores` for the positives in `positive` (Mann-Whitney U,
/// ties averaged). NaN when a class is absent.
pub fn auc(scores: &[f64], positive: &[bool]) -> f64 {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| {
        scores[a]
            .partial_cmp(&scores[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let sum_pos: f64 = ranks
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(r, _)| r)
        .sum();
    (sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos * n_neg) as f64
}

/// Mean one-vs-rest AUC over the classes present among `truth` (scikit-learn's
/// `roc_auc_score(multi_class="ovr", average="macro")`). `probs[i][c]`.
pub fn macro_auc(probs: &[Vec<f64>], truth: &[usize], classes: usize) -> f64 {
    let aucs: Vec<f64> = (0..classes)
        .map(|c| {
            auc(
                &probs.iter().map(|p| p[c]).collect::<Vec<_>>(),
                &truth.iter().map(|&t| t == c).collect::<Vec<_>>(),
            )
        })
        .filter(|a| a.is_finite())
        .collect();
    if aucs.is_empty() {
        f64::NAN
    } else {
        aucs.iter().sum::<f64>() / aucs.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_known_cases() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), 1.0);
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), 0.0);
        assert_eq!(auc(&[0.5, 0.5, 0.5, 0.5], &[false, true, false, true]), 0.5);
        // sklearn.metrics.roc_auc_score([0,0,1,1], [0.1,0.4,0.35,0.8]) = 0.75
        assert!((auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]) - 0.75).abs() < 1e-12);
        assert!(auc(&[0.1], &[true]).is_nan());
    }

    #[test]
    fn macro_auc_and_accuracy() {
        let probs = vec![
            vec![0.8, 0.1, 0.1],
            vec![0.1, 0.8, 0.1],
            vec![0.1, 0.1, 0.8],
            vec![0.6, 0.3, 0.1],
        ];
        assert_eq!(macro_auc(&probs, &[0, 1, 2, 0], 3), 1.0);
        assert_eq!(accuracy(&[0, 1, 2, 1], &[0, 1, 2, 0]), 0.75);
    }
}
