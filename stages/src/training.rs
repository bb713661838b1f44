//! The training configuration every training kind shares (`vae_train`, `pretrain`,
//! `diffusion_train`, `segment_train`, `classify_train`).
//!
//! In a pipeline file the run-level numbers sit beside the kind's own parameters, and the
//! optimiser and the learning-rate schedule are two tables:
//!
//! ```toml
//! [stages.pretrain]
//! kind = "pretrain"
//! steps = 1000                 # also seed, amp, checkpoint_every, grad_clip
//! optim = { lr = 1e-3, min_lr = 1e-5 }          # kind, lr, min_lr, betas, eps,
//!                                               # weight_decay, momentum, nesterov
//! schedule = { warmup_steps = 50 }              # kind, warmup_steps, warmup_lr_init, power
//! ```
//!
//! Every field left out takes the kind's default, filled in *before* the key is computed
//! ([`TrainingDefaults::fill`], called from each kind's
//! `Stage::resolve`), so the key holds every number that shapes the output and `meduet plan`
//! names the one that changed (`optim.eps: 1e-8 -> 1e-6`). Fields that do not apply to the
//! chosen optimiser or schedule are refused, not ignored.
//!
//! [`TRAINER_VERSION`] is the version of the shared training loop (the `Trainer` of the
//! `meduet-torch` crate); it enters the key of every training stage.

use serde::{Deserialize, Serialize};

/// Version of the shared training loop. Bump it when a change to the loop (resume,
/// loss scaling, clipping, EMA, seeding) changes what training stages produce: every
/// training stage's key changes with it.
pub const TRAINER_VERSION: u32 = 1;

/// Mixed precision on CUDA (ignored on the CPU, where training runs in float32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Amp {
    /// float32 everywhere.
    Off,
    /// fp16 autocast with dynamic loss scaling (the authors' setting).
    #[default]
    Fp16,
}

/// The optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    /// PyTorch's AdamW with timm's no-decay groups (biases and 1-D parameters).
    Adamw,
    /// PyTorch's SGD with (Nesterov) momentum (nnU-Net).
    Sgd,
}

/// The learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Linear warmup from `warmup_lr_init`, then cosine from `lr` to `min_lr` over the run
    /// (timm's `CosineLRScheduler`, per step, `warmup_prefix = False`).
    Cosine,
    /// `lr (1 - step / steps)^power` (nnU-Net: power 0.9), after an optional linear warmup.
    Poly,
    /// `lr` throughout, after an optional linear warmup.
    Constant,
}

/// `optim = { .. }`: the optimiser and its numbers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<OptimKind>,
    /// Peak learning rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Floor of the cosine schedule (cosine only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// AdamW's (beta1, beta2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub betas: Option<[f64; 2]>,
    /// AdamW's epsilon (added after the square root, as PyTorch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Decoupled (AdamW) or L2 (SGD) weight decay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// SGD momentum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// SGD Nesterov momentum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
}

/// `schedule = { .. }`: the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ScheduleKind>,
    /// Steps of linear warmup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Learning rate at step 0 of the warmup (default `min(1e-6, lr)`, timm's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_lr_init: Option<f64>,
    /// Exponent of the poly schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
}

/// A kind's defaults: complete values for one optimiser and one schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingDefaults {
    pub optim: ResolvedOptim,
    pub schedule: ResolvedSchedule,
}

/// The optimiser with every number set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResolvedOptim {
    pub kind: OptimKind,
    pub lr: f64,
    /// Used by the cosine schedule only (0 otherwise).
    pub min_lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
}

impl ResolvedOptim {
    /// AdamW with PyTorch's betas and eps.
    pub const fn adamw(lr: f64, min_lr: f64, weight_decay: f64) -> Self {
        Self {
            kind: OptimKind::Adamw,
            lr,
            min_lr,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay,
            momentum: 0.0,
            nesterov: false,
        }
    }
    /// SGD with the given momentum.
    pub const fn sgd(lr: f64, momentum: f64, nesterov: bool, weight_decay: f64) -> Self {
        Self {
            kind: OptimKind::Sgd,
            lr,
            min_lr: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay,
            momentum,
            nesterov,
        }
    }
}

/// The schedule with every number set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResolvedSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// `None`: `min(1e-6, lr)`.
    pub warmup_lr_init: Option<f64>,
    pub power: f64,
}

impl ResolvedSchedule {
    pub const fn cosine(warmup_steps: u64) -> Self {
        Self {
            kind: ScheduleKind::Cosine,
            warmup_steps,
            warmup_lr_init: None,
            power: 0.9,
        }
    }
    pub const fn poly(power: f64) -> Self {
        Self {
            kind: ScheduleKind::Poly,
            warmup_steps: 0,
            warmup_lr_init: None,
            power,
        }
    }
}

fn refuse<T>(field: &str, value: &Option<T>, applies_to: &str) -> Result<(), String> {
    match value {
        Some(_) => Err(format!(
            "{field}: applies to {applies_to} only; remove it or change the kind"
        )),
        None => Ok(()),
    }
}

impl TrainingDefaults {
    /// Fills every unset field of `optim` and `schedule` that applies to the chosen
    /// optimiser and schedule (the kind's defaults; for an optimiser or schedule other than
    /// the default's, PyTorch's and timm's defaults with the kind's lr), and leaves the
    /// others unset. The result is what enters the key.
    pub fn fill(&self, optim: &mut OptimConfig, schedule: &mut ScheduleConfig) {
        let d = &self.optim;
        let kind = optim.kind.unwrap_or(d.kind);
        let base = if kind == d.kind {
            *d
        } else {
            match kind {
                OptimKind::Adamw => ResolvedOptim::adamw(d.lr, d.min_lr, 0.01),
                OptimKind::Sgd => ResolvedOptim::sgd(d.lr, 0.9, false, 0.0),
            }
        };
        optim.kind = Some(kind);
        let lr = *optim.lr.get_or_insert(base.lr);
        optim.weight_decay.get_or_insert(base.weight_decay);
        match kind {
            OptimKind::Adamw => {
                optim.betas.get_or_insert(base.betas);
                optim.eps.get_or_insert(base.eps);
            }
            OptimKind::Sgd => {
                optim.momentum.get_or_insert(base.momentum);
                optim.nesterov.get_or_insert(base.nesterov);
            }
        }
        let d = &self.schedule;
        let skind = schedule.kind.unwrap_or(d.kind);
        let base = if skind == d.kind {
            *d
        } else {
            ResolvedSchedule {
                kind: skind,
                warmup_steps: 0,
                warmup_lr_init: None,
                power: 0.9,
            }
        };
        schedule.kind = Some(skind);
        let warmup = *schedule.warmup_steps.get_or_insert(base.warmup_steps);
        if warmup > 0 {
            schedule
                .warmup_lr_init
                .get_or_insert(base.warmup_lr_init.unwrap_or(1e-6f64.min(lr)));
        }
        match skind {
            ScheduleKind::Poly => {
                schedule.power.get_or_insert(base.power);
            }
            ScheduleKind::Cosine => {
                optim.min_lr.get_or_insert(self.optim.min_lr.min(lr));
            }
            ScheduleKind::Constant => {}
        }
    }
}

impl OptimConfig {
    /// Checks a filled configuration; messages start with the field (`optim.lr: ..`).
    pub fn check(&self) -> Result<ResolvedOptim, String> {
        let kind = self.kind.ok_or("optim.kind: unset")?;
        let lr = self.lr.ok_or("optim.lr: unset")?;
        let min_lr = self.min_lr.unwrap_or(0.0);
        if !(lr > 0.0) || !lr.is_finite() {
            return Err(format!("optim.lr: {lr} must be positive"));
        }
        if !(0.0..=lr).contains(&min_lr) {
            return Err(format!("optim.min_lr: {min_lr} must lie in [0, lr = {lr}]"));
        }
        let weight_decay = self.weight_decay.unwrap_or(0.0);
        if !(weight_decay >= 0.0) {
            return Err(format!(
                "optim.weight_decay: {weight_decay} must be non-negative"
            ));
        }
        let mut r = ResolvedOptim {
            kind,
            lr,
            min_lr,
            weight_decay,
            ..ResolvedOptim::adamw(lr, min_lr, weight_decay)
        };
        match kind {
            OptimKind::Adamw => {
                refuse("optim.momentum", &self.momentum, "kind = \"sgd\"")?;
                refuse("optim.nesterov", &self.nesterov, "kind = \"sgd\"")?;
                r.betas = self.betas.ok_or("optim.betas: unset")?;
                r.eps = self.eps.ok_or("optim.eps: unset")?;
                if r.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
                    return Err(format!(
                        "optim.betas: {:?} must each lie in [0, 1)",
                        r.betas
                    ));
                }
                if !(r.eps > 0.0) {
                    return Err(format!("optim.eps: {} must be positive", r.eps));
                }
            }
            OptimKind::Sgd => {
                refuse("optim.betas", &self.betas, "kind = \"adamw\"")?;
                refuse("optim.eps", &self.eps, "kind = \"adamw\"")?;
                r.momentum = self.momentum.ok_or("optim.momentum: unset")?;
                r.nesterov = self.nesterov.ok_or("optim.nesterov: unset")?;
                if !(0.0..1.0).contains(&r.momentum) {
                    return Err(format!("optim.momentum: {} must lie in [0, 1)", r.momentum));
                }
                if r.nesterov && r.momentum == 0.0 {
                    return Err("optim.nesterov: needs a positive momentum".into());
                }
            }
        }
        Ok(r)
    }
}

impl ScheduleConfig {
    /// Checks a filled configuration against the filled optimiser.
    pub fn check(
        &self,
        optim: &ResolvedOptim,
        o: &OptimConfig,
    ) -> Result<ResolvedSchedule, String> {
        let kind = self.kind.ok_or("schedule.kind: unset")?;
        let warmup_steps = self.warmup_steps.unwrap_or(0);
        if kind != ScheduleKind::Cosine {
            refuse("optim.min_lr", &o.min_lr, "schedule.kind = \"cosine\"")?;
        }
        if kind != ScheduleKind::Poly {
            refuse("schedule.power", &self.power, "kind = \"poly\"")?;
        }
        if warmup_steps == 0 {
            refuse(
                "schedule.warmup_lr_init",
                &self.warmup_lr_init,
                "a positive warmup_steps",
            )?;
        }
        if let Some(w) = self.warmup_lr_init {
            if !(0.0..=optim.lr).contains(&w) {
                return Err(format!(
                    "schedule.warmup_lr_init: {w} must lie in [0, optim.lr = {}]",
                    optim.lr
                ));
            }
        }
        let power = self.power.unwrap_or(0.9);
        if !(power > 0.0) {
            return Err(format!("schedule.power: {power} must be positive"));
        }
        Ok(ResolvedSchedule {
            kind,
            warmup_steps,
            warmup_lr_init: self.warmup_lr_init,
            power,
        })
    }
}

/// Everything the shared training loop needs, every number set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Training {
    pub steps: u64,
    pub seed: u64,
    pub amp: Amp,
    /// Steps between resumable checkpoints (0: none).
    pub checkpoint_every: u64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    pub optim: ResolvedOptim,
    pub schedule: ResolvedSchedule,
}

impl Training {
    /// Assembles and checks the shared part of a kind's parameters (after its
    /// `Stage::resolve` filled `optim` and `schedule`).
    pub fn new(
        steps: u64,
        seed: u64,
        amp: Amp,
        checkpoint_every: u64,
        grad_clip: f64,
        optim: &OptimConfig,
        schedule: &ScheduleConfig,
    ) -> Result<Self, String> {
        if steps == 0 {
            return Err("steps: must be positive".into());
        }
        if !(grad_clip >= 0.0) {
            return Err(format!(
                "grad_clip: {grad_clip} must be non-negative (0: off)"
            ));
        }
        let o = optim.check()?;
        let s = schedule.check(&o, optim)?;
        Ok(Self {
            steps,
            seed,
            amp,
            checkpoint_every,
            grad_clip,
            optim: o,
            schedule: s,
        })
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let (lr, s) = (self.optim.lr, &self.schedule);
        if step < s.warmup_steps {
            let init = s.warmup_lr_init.unwrap_or(1e-6f64.min(lr));
            return init + step as f64 * (lr - init) / s.warmup_steps as f64;
        }
        match s.kind {
            ScheduleKind::Cosine => crate::schedule::CosineLrScheduler {
                base_lr: lr,
                warmup_t: 0,
                warmup_lr_init: lr,
                t_initial: self.steps,
                lr_min: self.optim.min_lr,
                warmup_prefix: false,
            }
            .lr(step),
            ScheduleKind::Poly => {
                lr * (1.0 - step as f64 / self.steps as f64)
                    .max(0.0)
                    .powf(s.power)
            }
            ScheduleKind::Constant => lr,
        }
    }
}

/// Implements `training()` on a training kind's parameters, which hold `steps, seed, amp,
/// checkpoint_every, grad_clip, optim, schedule`.
macro_rules! training_params {
    ($params:ty) => {
        impl $params {
            /// The shared training configuration (after `Stage::resolve`).
            pub fn training(&self) -> Result<$crate::training::Training, String> {
                $crate::training::Training::new(
                    self.steps,
                    self.seed,
                    self.amp,
                    self.checkpoint_every,
                    self.grad_clip,
                    &self.optim,
                    &self.schedule,
                )
            }
        }
    };
}
pub(crate) use training_params;

/// The `Stage` methods every training kind shares, inside its `impl Stage`: the device
/// class in the key for fp16, the kind's defaults (`$defaults`: parameters ->
/// [`TrainingDefaults`]) filled before hashing, then `$after` (more defaults), the moved
/// spellings `$moved`, and the trainer version.
macro_rules! training_stage {
    ($params:ty, $defaults:expr, $moved:expr $(, $after:expr)?) => {
        fn device_dependent(&self, p: &$params) -> bool {
            p.amp == $crate::training::Amp::Fp16
        }
        fn resolve(&self, p: &mut $params) {
            let defaults: $crate::training::TrainingDefaults = ($defaults)(&*p);
            defaults.fill(&mut p.optim, &mut p.schedule);
            $( ($after)(p); )?
        }
        fn moved_params(&self) -> &'static [(&'static str, &'static str)] {
            $moved
        }
        fn code_versions(&self) -> &'static [(&'static str, u32)] {
            $crate::training::TRAINER_CODE
        }
    };
}
pub(crate) use training_stage;

/// What every training kind returns from `Stage::code_versions`.
pub const TRAINER_CODE: &[(&str, u32)] = &[("trainer", TRAINER_VERSION)];

/// Old spellings of the training parameters and what replaced them, for the error that
/// an old pipeline file gets (`Stage::moved_params`).
pub const MOVED_PARAMS: &[(&str, &str)] = &[
    ("lr", "optim.lr"),
    ("min_lr", "optim.min_lr"),
    ("weight_decay", "optim.weight_decay"),
    ("beta1", "optim.betas = [beta1, beta2]"),
    ("beta2", "optim.betas = [beta1, beta2]"),
    ("momentum", "optim.momentum"),
    ("optimizer", "optim.kind"),
    ("warmup_steps", "schedule.warmup_steps"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(o: OptimConfig, s: ScheduleConfig, d: &TrainingDefaults) -> Result<Training, String> {
        let (mut o, mut s) = (o, s);
        d.fill(&mut o, &mut s);
        Training::new(10, 0, Amp::Off, 0, 0.0, &o, &s)
    }

    fn adamw_cosine() -> TrainingDefaults {
        TrainingDefaults {
            optim: ResolvedOptim::adamw(1e-3, 1e-5, 0.01),
            schedule: ResolvedSchedule::cosine(2),
        }
    }

    #[test]
    fn defaults_fill_only_what_applies() {
        let d = adamw_cosine();
        let (mut o, mut s) = (OptimConfig::default(), ScheduleConfig::default());
        d.fill(&mut o, &mut s);
        let j = serde_json::to_value((&o, &s)).unwrap();
        assert_eq!(
            j,
            serde_json::json!([
                {"kind": "adamw", "lr": 1e-3, "min_lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
                {"kind": "cosine", "warmup_steps": 2, "warmup_lr_init": 1e-6}
            ])
        );
        // Switching the kind takes PyTorch's defaults for the new optimiser, not AdamW's.
        let t = filled(
            OptimConfig {
                kind: Some(OptimKind::Sgd),
                ..Default::default()
            },
            ScheduleConfig {
                kind: Some(ScheduleKind::Poly),
                ..Default::default()
            },
            &d,
        )
        .unwrap();
        assert_eq!(t.optim.momentum, 0.9);
        assert!(!t.optim.nesterov);
        assert_eq!(t.schedule.power, 0.9);
    }

    #[test]
    fn fields_that_do_not_apply_are_refused() {
        let d = adamw_cosine();
        let e = filled(
            OptimConfig {
                momentum: Some(0.9),
                ..Default::default()
            },
            ScheduleConfig::default(),
            &d,
        )
        .unwrap_err();
        assert!(
            e.starts_with("optim.momentum: applies to kind = \"sgd\""),
            "{e}"
        );
        let e = filled(
            OptimConfig::default(),
            ScheduleConfig {
                power: Some(1.0),
                ..Default::default()
            },
            &d,
        )
        .unwrap_err();
        assert!(e.starts_with("schedule.power"), "{e}");
        let e = filled(
            OptimConfig {
                lr: Some(-1.0),
                ..Default::default()
            },
            ScheduleConfig::default(),
            &d,
        )
        .unwrap_err();
        assert!(e.starts_with("optim.lr"), "{e}");
    }

    #[test]
    fn learning_rates_follow_the_schedules() {
        let d = adamw_cosine();
        let t = filled(OptimConfig::default(), ScheduleConfig::default(), &d).unwrap();
        // Warmup from 1e-6 over 2 steps, then timm's cosine on the absolute step.
        assert_eq!(t.lr(0), 1e-6);
        assert!((t.lr(1) - (1e-6 + (1e-3 - 1e-6) / 2.0)).abs() < 1e-15);
        let timm = crate::schedule::CosineLrScheduler {
            base_lr: 1e-3,
            warmup_t: 2,
            warmup_lr_init: 1e-6,
            t_initial: 10,
            lr_min: 1e-5,
            warmup_prefix: false,
        };
        for step in 0..12 {
            assert!((t.lr(step) - timm.lr(step)).abs() < 1e-15, "step {step}");
        }
        let poly = filled(
            OptimConfig {
                kind: Some(OptimKind::Sgd),
                lr: Some(1e-2),
                ..Default::default()
            },
            ScheduleConfig {
                kind: Some(ScheduleKind::Poly),
                ..Default::default()
            },
            &d,
        )
        .unwrap();
        assert_eq!(poly.lr(0), 1e-2);
        assert!((poly.lr(5) - 1e-2 * 0.5f64.powf(0.9)).abs() < 1e-15);
    }
}
