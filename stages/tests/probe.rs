//! The probe's logistic regression against scikit-learn's `LogisticRegression` (in the
//! project venv) on the same features and the same stratified folds, over 20 fold seeds.
//!
//! Run: `cargo test --release -p meduet-stages --test probe -- --nocapture` (prints the
//! measured differences).

use meduet_stages::analysis::logistic::{cross_validate_folds, stratified_folds};
use meduet_stages::analysis::stats::Spread;
use meduet_stages::analysis::Matrix;
use meduet_stages::testing::run_python;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// The probe's objective is mean cross entropy + l2 ||W||^2 on standardised features;
/// scikit-learn minimises C * sum cross entropy + ||W||^2 / 2, the same optimum at
/// C = 1 / (2 n l2) with n the training rows of the fold.
const PY_SKLEARN: &str = r#"
import sys, json
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
d = json.load(open(sys.argv[1]))
x, y, l2, classes = np.array(d["x"]), np.array(d["y"]), d["l2"], d["classes"]
out = []
for folds in d["assignments"]:
    folds = np.array(folds)
    probs = np.zeros((len(y), classes))
    for f in range(folds.max() + 1):
        tr, te = folds != f, folds == f
        mean, std = x[tr].mean(0), np.maximum(x[tr].std(0), 1e-12)
        m = LogisticRegression(C=1.0 / (2 * tr.sum() * l2), tol=1e-10, max_iter=10000)
        m.fit((x[tr] - mean) / std, y[tr])
        probs[te] = m.predict_proba((x[te] - mean) / std)
    out.append({
        "accuracy": float((probs.argmax(1) == y).mean()),
        "auc": float(roc_auc_score(y, probs, multi_class="ovr", average="macro")),
    })
print(json.dumps(out))
"#;

#[test]
fn probe_equals_scikit_learn_logistic_regression_over_repeated_folds() {
    // 4 classes x 12 samples in 16 dimensions, class means N(0, 0.5^2) apart, unit noise:
    // overlapping classes, so the accuracy is neither chance nor perfect.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (classes, per, dim) = (4usize, 12usize, 16usize);
    let means: Vec<f64> = (0..classes * dim)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            0.5 * z
        })
        .collect();
    let mut data = Vec::new();
    let mut y = Vec::new();
    for c in 0..classes {
        for _ in 0..per {
            for j in 0..dim {
                let noise: f64 = StandardNormal.sample(&mut rng);
                data.push(means[c * dim + j] + noise);
            }
            y.push(c);
        }
    }
    let x = Matrix::new(y.len(), dim, data);
    let (folds, l2, iterations) = (5, 1e-2, 300);
    let assignments: Vec<Vec<usize>> = (0..20).map(|s| stratified_folds(&y, folds, s)).collect();
    let ours: Vec<_> = assignments
        .iter()
        .map(|a| cross_validate_folds(&x, &y, classes, a, folds, l2, iterations))
        .collect();

    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("probe.json");
    let rows: Vec<Vec<f64>> = (0..x.rows).map(|r| x.row(r).to_vec()).collect();
    std::fs::write(
        &input,
        serde_json::json!({ "x": rows, "y": y, "l2": l2, "classes": classes,
                            "assignments": assignments })
        .to_string(),
    )
    .unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(run_python(PY_SKLEARN, &[input.to_str().unwrap()]).trim()).unwrap();

    let acc_ours: Vec<f64> = ours.iter().map(|r| r.accuracy).collect();
    let acc_sk: Vec<f64> = (0..20)
        .map(|i| theirs[i]["accuracy"].as_f64().unwrap())
        .collect();
    let auc_ours: Vec<f64> = ours.iter().map(|r| r.macro_auc).collect();
    let auc_sk: Vec<f64> = (0..20)
        .map(|i| theirs[i]["auc"].as_f64().unwrap())
        .collect();
    let max_acc_diff = acc_ours
        .iter()
        .zip(&acc_sk)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let (so, ss) = (Spread::of(&acc_ours), Spread::of(&acc_sk));
    let (ao, as_) = (Spread::of(&auc_ours), Spread::of(&auc_sk));
    println!(
        "accuracy over 20 fold seeds: meduet {} vs scikit-learn {} (max per-seed |diff| {max_acc_diff:.4}); AUC {} vs {}",
        so.text(4),
        ss.text(4),
        ao.text(4),
        as_.text(4)
    );
    let mean_diff = (so.mean.unwrap() - ss.mean.unwrap()).abs();
    let auc_diff = (ao.mean.unwrap() - as_.mean.unwrap()).abs();
    assert!(
        mean_diff <= 0.01,
        "repeated-CV accuracy differs by {mean_diff}"
    );
    assert!(auc_diff <= 0.005, "repeated-CV AUC differs by {auc_diff}");
    assert!(
        max_acc_diff <= 2.0 / y.len() as f64 + 1e-12,
        "a split differs by more than two predictions: {max_acc_diff}"
    );
    let acc = so.mean.unwrap();
    assert!(
        acc > 0.4 && acc < 0.95,
        "an informative test needs overlap: {acc}"
    );
}
