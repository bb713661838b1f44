//! Style augmentation settings (the paper's appendix C.4, Eqs. 25-30; method.md 6) and
//! the per-step draws, in plain Rust; the tensor work is in `meduet-torch`'s
//! `train::style_augment`.
//!
//! A target style prototype `E_s` (token-level, `[L, d_s]`) is the mean MeDUET style of the
//! crops of `prototype_volumes` target volumes, refreshed every `prototype_every` steps
//! with an EMA (`prototype_ema`, 0.9). With probability `probability` a batch is augmented:
//! its content is kept and its style mixed toward the prototype,
//! `z_aug = Dec(Ent(z_c, (1 - a) z_s + a E_s))` with one `a ~ U(alpha)`, and the task loss
//! of the augmented view is added with weight `weight`, plus `kl_weight` times the KL
//! divergence between the clean and the augmented predictions (Eq. 29; absent from the
//! authors' trainers, so 0 by default).
//!
//! Defaults per label fraction (Table 12 as recovered in method.md 6; 1-shot | 10% | 50% |
//! 100%): `probability` 0.9 | 0.8 | 0.6 | 0.3, `alpha` (0.4, 0.8) | (0.4, 0.8) | (0.3, 0.6) |
//! (0.2, 0.5); the 100% column equals the authors' code. `weight` is the code's 0.1 for
//! segmentation and 0.3 for classification (the Table 12 row read as this weight, 0.4, has
//! lost its label in the paper's text, so the code's values are the default).
//!
//! Target volumes: `train` (the labelled training volumes, as the authors' code does),
//! `unlabelled` (the training domains' volumes without labels in this split) or `heldout`
//! (the unseen domains' volumes, images only: the paper's cross-domain adaptation, which
//! sees the test domain's images but never its labels).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::splits::{LabelFraction, Splits};

/// Which subjects define the target style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StyleTarget {
    /// The labelled training subjects (the authors' code).
    #[default]
    Train,
    /// The training domains' subjects left unlabelled by the label fraction.
    Unlabelled,
    /// Every subject of the held-out (unseen) domains, images only (the paper).
    Heldout,
}

/// `style_augment` of `segment_train` / `classify_train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StyleAugmentParams {
    /// Off by default; on, the stage needs a `meduet` input (a pretrained MeDUET).
    pub enabled: bool,
    pub target: StyleTarget,
    /// K: target volumes per prototype update (the authors: 4 BTCV, 32 AMOS/WORD, 16 CC-CCII).
    pub prototype_volumes: usize,
    /// Steps between prototype updates (the authors: once an epoch).
    pub prototype_every: u64,
    /// EMA decay of the prototype (0.9).
    pub prototype_ema: f64,
    /// Probability that a batch is augmented (unset: by label fraction).
    pub probability: Option<f64>,
    /// Range of the mixing strength `a` (unset: by label fraction).
    pub alpha: Option<[f64; 2]>,
    /// Weight of the augmented view's task loss (unset: 0.1 segmentation, 0.3 classification).
    pub weight: Option<f64>,
    /// Weight of the clean/augmented KL consistency term (the paper's Eq. 29; 0: the code).
    pub kl_weight: f64,
}

impl Default for StyleAugmentParams {
    fn default() -> Self {
        Self {
            enabled: false,
            target: StyleTarget::Train,
            prototype_volumes: 4,
            prototype_every: 50,
            prototype_ema: 0.9,
            probability: None,
            alpha: None,
            weight: None,
            kl_weight: 0.0,
        }
    }
}

/// The task whose loss the augmented view adds to (it sets the default `weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AugmentedTask {
    Segmentation,
    Classification,
}

/// Style augmentation with every default resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StyleAugment {
    pub target: StyleTarget,
    pub prototype_volumes: usize,
    pub prototype_every: u64,
    pub prototype_ema: f64,
    pub probability: f64,
    pub alpha: [f64; 2],
    pub weight: f64,
    pub kl_weight: f64,
}

/// Table 12's column for a label fraction: 1-shot (any k-shot), 10%, 50%, 100%.
fn table12_column(fraction: &LabelFraction) -> usize {
    match *fraction {
        LabelFraction::Shots(_) => 0,
        LabelFraction::Fraction(f) if f <= 0.1 + 1e-9 => 1,
        LabelFraction::Fraction(f) if f <= 0.5 + 1e-9 => 2,
        LabelFraction::Fraction(_) => 3,
    }
}

const TABLE12_PROBABILITY: [f64; 4] = [0.9, 0.8, 0.6, 0.3];
const TABLE12_ALPHA: [[f64; 2]; 4] = [[0.4, 0.8], [0.4, 0.8], [0.3, 0.6], [0.2, 0.5]];

impl StyleAugmentParams {
    /// Checks the fields (names in messages are relative to `style_augment`).
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.prototype_volumes == 0 || self.prototype_every == 0 {
            return Err(
                "style_augment.prototype_volumes / prototype_every must be positive".into(),
            );
        }
        if !(0.0..1.0).contains(&self.prototype_ema) {
            return Err(format!(
                "style_augment.prototype_ema: {} must lie in [0, 1)",
                self.prototype_ema
            ));
        }
        if let Some(p) = self.probability {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "style_augment.probability: {p} is not a probability"
                ));
            }
        }
        if let Some([a, b]) = self.alpha {
            if !(0.0 <= a && a <= b && b <= 1.0) {
                return Err(format!(
                    "style_augment.alpha: [{a}, {b}] must satisfy 0 <= a <= b <= 1"
                ));
            }
        }
        if let Some(w) = self.weight {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(format!("style_augment.weight: {w} must be >= 0"));
            }
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            return Err(format!(
                "style_augment.kl_weight: {} must be >= 0",
                self.kl_weight
            ));
        }
        Ok(())
    }

    /// The resolved settings, or `None` when off. `label_fraction` picks Table 12's column.
    pub fn resolve(
        &self,
        label_fraction: &str,
        task: AugmentedTask,
    ) -> Result<Option<StyleAugment>, String> {
        if !self.enabled {
            return Ok(None);
        }
        self.validate()?;
        let col = table12_column(&LabelFraction::parse(label_fraction)?);
        Ok(Some(StyleAugment {
            target: self.target,
            prototype_volumes: self.prototype_volumes,
            prototype_every: self.prototype_every,
            prototype_ema: self.prototype_ema,
            probability: self.probability.unwrap_or(TABLE12_PROBABILITY[col]),
            alpha: self.alpha.unwrap_or(TABLE12_ALPHA[col]),
            weight: self.weight.unwrap_or(match task {
                AugmentedTask::Segmentation => 0.1,
                AugmentedTask::Classification => 0.3,
            }),
            kl_weight: self.kl_weight,
        }))
    }
}

impl StyleAugment {
    /// The step's draw: `Some(a)` when this step's batch is augmented with strength `a`.
    /// A pure function of `(seed, step)`, so a resumed run augments the same steps.
    pub fn draw(&self, seed: u64, step: u64) -> Option<f64> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ 0x5354_594c_4541_5547 ^ step.rotate_left(32));
        let on = rng.random::<f64>() < self.probability;
        let a = self.alpha[0] + (self.alpha[1] - self.alpha[0]) * rng.random::<f64>();
        on.then_some(a)
    }

    /// Whether the prototype is (re)computed before `step` (every `prototype_every` steps,
    /// starting at 0).
    pub fn refresh_at(&self, step: u64) -> bool {
        step.is_multiple_of(self.prototype_every)
    }

    /// The `prototype_volumes` target subjects of update number `update` (seeded; all of
    /// them when fewer exist), from the pool the target names.
    pub fn prototype_subjects(
        &self,
        splits: &Splits,
        seed: u64,
        update: u64,
    ) -> Result<Vec<String>, String> {
        let pool: &[String] = match self.target {
            StyleTarget::Train => &splits.train,
            StyleTarget::Unlabelled => &splits.unlabelled,
            StyleTarget::Heldout => &splits.heldout,
        };
        if pool.is_empty() {
            return Err(format!(
                "style_augment.target = \"{}\": this split has no such subjects",
                match self.target {
                    StyleTarget::Train => "train",
                    StyleTarget::Unlabelled => "unlabelled",
                    StyleTarget::Heldout => "heldout",
                }
            ));
        }
        let mut idx: Vec<usize> = (0..pool.len()).collect();
        // Partial Fisher-Yates with a seed per update (the authors: seed 2025 + epoch).
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(2025).wrapping_add(update));
        let k = self.prototype_volumes.min(pool.len());
        for i in 0..k {
            let j = rng.random_range(i..pool.len());
            idx.swap(i, j);
        }
        let mut out: Vec<String> = idx[..k].iter().map(|&i| pool[i].clone()).collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> StyleAugmentParams {
        StyleAugmentParams {
            enabled: true,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_table_12_by_label_fraction() {
        let seg = AugmentedTask::Segmentation;
        let r = |f: &str| on().resolve(f, seg).unwrap().unwrap();
        assert_eq!(
            (r("1-shot").probability, r("1-shot").alpha),
            (0.9, [0.4, 0.8])
        );
        assert_eq!(
            (r("5-shot").probability, r("5-shot").alpha),
            (0.9, [0.4, 0.8])
        );
        assert_eq!((r("10%").probability, r("10%").alpha), (0.8, [0.4, 0.8]));
        assert_eq!((r("50%").probability, r("50%").alpha), (0.6, [0.3, 0.6]));
        assert_eq!((r("100%").probability, r("100%").alpha), (0.3, [0.2, 0.5]));
        assert_eq!(r("100%").weight, 0.1);
        let c = on()
            .resolve("100%", AugmentedTask::Classification)
            .unwrap()
            .unwrap();
        assert_eq!(c.weight, 0.3);
        assert_eq!(c.kl_weight, 0.0);
        // Explicit values win; off resolves to None.
        let p = StyleAugmentParams {
            probability: Some(1.0),
            alpha: Some([0.5, 0.5]),
            ..on()
        };
        let s = p.resolve("1-shot", seg).unwrap().unwrap();
        assert_eq!((s.probability, s.alpha), (1.0, [0.5, 0.5]));
        assert!(StyleAugmentParams::default()
            .resolve("1-shot", seg)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        let e = StyleAugmentParams {
            alpha: Some([0.6, 0.2]),
            ..on()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("style_augment.alpha"), "{e}");
        let e = StyleAugmentParams {
            probability: Some(1.5),
            ..on()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("style_augment.probability"), "{e}");
        let e = StyleAugmentParams {
            prototype_ema: 1.0,
            ..on()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("prototype_ema"), "{e}");
    }

    #[test]
    fn draws_are_deterministic_at_the_stated_rate_and_in_range() {
        let s = on()
            .resolve("50%", AugmentedTask::Segmentation)
            .unwrap()
            .unwrap();
        let draws: Vec<Option<f64>> = (0..4000).map(|t| s.draw(7, t)).collect();
        assert_eq!(draws, (0..4000).map(|t| s.draw(7, t)).collect::<Vec<_>>());
        let hits: Vec<f64> = draws.iter().flatten().copied().collect();
        let rate = hits.len() as f64 / 4000.0;
        // Binomial(4000, 0.6): sd 0.0077; 5 sd.
        assert!((rate - 0.6).abs() < 0.04, "{rate}");
        assert!(hits.iter().all(|a| (0.3..=0.6).contains(a)));
        let mean = hits.iter().sum::<f64>() / hits.len() as f64;
        assert!((mean - 0.45).abs() < 0.01, "{mean}");
        assert!(s.refresh_at(0) && s.refresh_at(50) && !s.refresh_at(49));
    }

    #[test]
    fn prototype_subjects_come_from_the_target_pool() {
        let splits = Splits {
            label_fraction: "100%".into(),
            train_domains: vec!["a".into()],
            heldout_domains: vec!["b".into()],
            train: (0..10).map(|i| format!("t{i}")).collect(),
            unlabelled: vec![],
            val: vec![],
            test: vec!["x".into()],
            heldout: (0..3).map(|i| format!("h{i}")).collect(),
        };
        let s = on()
            .resolve("100%", AugmentedTask::Segmentation)
            .unwrap()
            .unwrap();
        let a = s.prototype_subjects(&splits, 0, 0).unwrap();
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|i| splits.train.contains(i)));
        assert_eq!(a, s.prototype_subjects(&splits, 0, 0).unwrap());
        let updates: std::collections::BTreeSet<Vec<String>> = (0..5)
            .map(|u| s.prototype_subjects(&splits, 0, u).unwrap())
            .collect();
        assert!(updates.len() > 1, "updates draw different volumes");
        let h = StyleAugment {
            target: StyleTarget::Heldout,
            ..s
        };
        assert_eq!(h.prototype_subjects(&splits, 0, 0).unwrap(), splits.heldout);
        let u = StyleAugment {
            target: StyleTarget::Unlabelled,
            ..s
        };
        let e = u.prototype_subjects(&splits, 0, 0).unwrap_err();
        assert!(e.contains("unlabelled"), "{e}");
    }
}
