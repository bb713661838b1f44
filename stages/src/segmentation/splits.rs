//! Subject splits for downstream training: test / validation / training pool per domain,
//! the labelled subset of the pool (the label fraction), and the held-out domains.
//!
//! ```text
//! subjects of a training domain d, sorted by id, shuffled with seed (split_seed, d)
//!   -> first round(test_fraction * n)           test        (>= 1 when n >= 3)
//!   -> next  round(val_fraction * n)            validation  (>= 1 when n >= 4 and val_fraction > 0)
//!   -> the rest                                 pool
//! pool of all training domains, sorted, shuffled with `seed`
//!   -> first k                                  labelled training subjects
//!      k = 1 ("1-shot"), or max(1, round(f * |pool|)) for "f%"
//! every subject of a domain not trained on      held out (unseen-domain evaluation)
//! ```
//!
//! The test and validation subjects depend only on `split_seed` and the data, never on the
//! label fraction or the training seed, so every fraction and initialisation of an
//! experiment is scored on the same test subjects, and the test subjects never enter the
//! pool. Splits are written into the trained model's artifact (`splits.json`) and the
//! evaluation stages read them from there.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How many labelled subjects train the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LabelFraction {
    /// `k` subjects ("1-shot", "5-shot").
    Shots(usize),
    /// A fraction of the pool ("10%" -> 0.1), at least one subject.
    Fraction(f64),
}

impl LabelFraction {
    /// Parses `"1-shot"`, `"k-shot"`, `"10%"`, `"100%"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(k) = t.strip_suffix("-shot") {
            let k: usize = k.parse().map_err(|_| {
                format!("label_fraction '{s}': expected 'k-shot' with k a positive integer")
            })?;
            if k == 0 {
                return Err(format!("label_fraction '{s}': k must be at least 1"));
            }
            return Ok(Self::Shots(k));
        }
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| {
                format!("label_fraction '{s}': expected a percentage such as '10%'")
            })?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!(
                    "label_fraction '{s}': the percentage must lie in (0, 100]"
                ));
            }
            return Ok(Self::Fraction(p / 100.0));
        }
        Err(format!(
            "label_fraction '{s}': expected '1-shot', 'k-shot' or a percentage such as '10%', '50%', '100%'"
        ))
    }

    /// The number of labelled subjects drawn from a pool of `n`.
    pub fn count(&self, n: usize) -> usize {
        match *self {
            Self::Shots(k) => k.min(n),
            Self::Fraction(f) => ((f * n as f64).round() as usize).clamp(1, n.max(1)).min(n),
        }
    }
}

/// Parameters of [`make_splits`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// Domains the model trains on (empty: every domain).
    pub train_domains: Vec<String>,
    pub test_fraction: f64,
    pub val_fraction: f64,
    /// Seed of the test / validation / pool split.
    pub split_seed: u64,
    /// `"1-shot"`, `"10%"`, ...
    pub label_fraction: String,
    /// Seed of the labelled subset.
    pub seed: u64,
}

/// The recorded splits (subject ids, sorted within each list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splits {
    pub label_fraction: String,
    pub train_domains: Vec<String>,
    pub heldout_domains: Vec<String>,
    /// Labelled training subjects.
    pub train: Vec<String>,
    /// Pool subjects not used for training (their labels are not read).
    pub unlabelled: Vec<String>,
    pub val: Vec<String>,
    /// In-domain test subjects.
    pub test: Vec<String>,
    /// Every subject of the held-out domains.
    pub heldout: Vec<String>,
}

fn domain_seed(seed: u64, domain: &str) -> u64 {
    let h = blake3::hash(domain.as_bytes());
    seed ^ u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Splits `(subject id, domain)` pairs (see the module documentation).
pub fn make_splits(subjects: &[(String, String)], cfg: &SplitConfig) -> Result<Splits, String> {
    let fraction = LabelFraction::parse(&cfg.label_fraction)?;
    if !(0.0..1.0).contains(&cfg.test_fraction) || !(0.0..1.0).contains(&cfg.val_fraction) {
        return Err(format!(
            "test_fraction {} and val_fraction {} must lie in [0, 1)",
            cfg.test_fraction, cfg.val_fraction
        ));
    }
    let mut by_domain: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (id, d) in subjects {
        by_domain.entry(d.as_str()).or_default().push(id.as_str());
    }
    for d in &cfg.train_domains {
        if !by_domain.contains_key(d.as_str()) {
            return Err(format!(
                "train_domains: no subject of domain '{d}' (domains: {})",
                by_domain.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let trained =
        |d: &str| cfg.train_domains.is_empty() || cfg.train_domains.iter().any(|t| t == d);
    let (mut test, mut val, mut pool, mut heldout) = (vec![], vec![], vec![], vec![]);
    let (mut train_domains, mut heldout_domains) = (vec![], vec![]);
    for (d, ids) in &mut by_domain {
        ids.sort_unstable();
        if !trained(d) {
            heldout.extend(ids.iter().map(|s| s.to_string()));
            heldout_domains.push(d.to_string());
            continue;
        }
        train_domains.push(d.to_string());
        let mut ids = ids.clone();
        ids.shuffle(&mut ChaCha8Rng::seed_from_u64(domain_seed(
            cfg.split_seed,
            d,
        )));
        let n = ids.len();
        let mut n_test = (cfg.test_fraction * n as f64).round() as usize;
        if cfg.test_fraction > 0.0 && n >= 3 {
            n_test = n_test.max(1);
        }
        let mut n_val = (cfg.val_fraction * n as f64).round() as usize;
        if cfg.val_fraction > 0.0 && n >= 4 {
            n_val = n_val.max(1);
        }
        if n_test + n_val >= n {
            return Err(format!(
                "domain '{d}' has {n} subjects: {n_test} test + {n_val} validation leave none to train on (lower test_fraction / val_fraction)"
            ));
        }
        test.extend(ids[..n_test].iter().map(|s| s.to_string()));
        val.extend(ids[n_test..n_test + n_val].iter().map(|s| s.to_string()));
        pool.extend(ids[n_test + n_val..].iter().map(|s| s.to_string()));
    }
    if pool.is_empty() {
        return Err("no subject left to train on".into());
    }
    pool.sort_unstable();
    pool.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
    let k = fraction.count(pool.len());
    let mut train = pool[..k].to_vec();
    let mut unlabelled = pool[k..].to_vec();
    for v in [
        &mut train,
        &mut unlabelled,
        &mut val,
        &mut test,
        &mut heldout,
    ] {
        v.sort_unstable();
    }
    Ok(Splits {
        label_fraction: cfg.label_fraction.clone(),
        train_domains,
        heldout_domains,
        train,
        unlabelled,
        val,
        test,
        heldout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects() -> Vec<(String, String)> {
        let mut v = vec![];
        for d in ["siteA", "siteB", "siteC"] {
            for s in 0..10 {
                v.push((format!("{d}_case_{s:03}"), d.to_string()));
            }
        }
        v
    }

    fn cfg(fraction: &str, seed: u64) -> SplitConfig {
        SplitConfig {
            train_domains: vec!["siteA".into(), "siteB".into()],
            test_fraction: 0.2,
            val_fraction: 0.1,
            split_seed: 3,
            label_fraction: fraction.into(),
            seed,
        }
    }

    #[test]
    fn parses_fractions() {
        assert_eq!(
            LabelFraction::parse("1-shot").unwrap(),
            LabelFraction::Shots(1)
        );
        assert_eq!(
            LabelFraction::parse("10%").unwrap(),
            LabelFraction::Fraction(0.1)
        );
        assert_eq!(LabelFraction::parse("100%").unwrap().count(14), 14);
        assert_eq!(LabelFraction::parse("10%").unwrap().count(14), 1);
        assert_eq!(LabelFraction::parse("50%").unwrap().count(14), 7);
        for bad in ["0-shot", "150%", "half", "0%"] {
            assert!(LabelFraction::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deterministic_disjoint_and_nested() {
        let s = subjects();
        let a = make_splits(&s, &cfg("50%", 7)).unwrap();
        // Deterministic given the seeds, whatever the input order.
        let mut rev = s.clone();
        rev.reverse();
        assert_eq!(a, make_splits(&rev, &cfg("50%", 7)).unwrap());
        // 2 test, 1 val, 7 pool per training domain; 50% of 14 = 7 labelled.
        assert_eq!(
            (a.test.len(), a.val.len(), a.train.len(), a.unlabelled.len()),
            (4, 2, 7, 7)
        );
        assert_eq!(a.heldout.len(), 10);
        assert_eq!(a.heldout_domains, ["siteC"]);
        assert!(a.heldout.iter().all(|h| h.starts_with("siteC")));
        // Disjoint.
        let mut all: Vec<&String> = a
            .train
            .iter()
            .chain(&a.unlabelled)
            .chain(&a.val)
            .chain(&a.test)
            .chain(&a.heldout)
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 30);
        // The test split does not depend on the fraction or the training seed.
        for (f, seed) in [("1-shot", 7), ("10%", 1), ("100%", 99)] {
            let b = make_splits(&s, &cfg(f, seed)).unwrap();
            assert_eq!(b.test, a.test, "{f}");
            assert_eq!(b.val, a.val, "{f}");
            assert!(b
                .train
                .iter()
                .all(|t| !a.test.contains(t) && !a.val.contains(t)));
        }
        assert_eq!(make_splits(&s, &cfg("1-shot", 7)).unwrap().train.len(), 1);
        assert_eq!(make_splits(&s, &cfg("100%", 7)).unwrap().train.len(), 14);
        // Another training seed draws another labelled subset.
        let other: Vec<_> = (0..20)
            .map(|seed| make_splits(&s, &cfg("10%", seed)).unwrap().train)
            .collect();
        assert!(other.iter().any(|t| *t != other[0]));
        // Another split seed draws another test set.
        let mut c = cfg("50%", 7);
        c.split_seed = 4;
        assert_ne!(make_splits(&s, &c).unwrap().test, a.test);
    }

    #[test]
    fn errors_name_the_problem() {
        let s = subjects();
        let mut c = cfg("10%", 0);
        c.train_domains = vec!["siteZ".into()];
        let e = make_splits(&s, &c).unwrap_err();
        assert!(
            e.contains("siteZ") && e.contains("siteA, siteB, siteC"),
            "{e}"
        );
        let mut c = cfg("10%", 0);
        c.test_fraction = 0.6;
        c.val_fraction = 0.4;
        assert!(make_splits(&s, &c)
            .unwrap_err()
            .contains("leave none to train on"));
    }
}
