//! The training loop every training stage runs on.
//!
//! A training stage supplies its networks and one step ([`TrainingTask`]); [`run`] owns
//! everything around the step, identically for every kind:
//!
//! - **resume**: the latest checkpoint of the stage's scratch folder is loaded into every
//!   store, optimiser and loss scaler the task lists, and the run continues from its step;
//! - **seeding**: libtorch's generator is seeded from `(seed, step)` before each step and
//!   the task gets the same per-step seed for its own generators, so a resumed run
//!   continues with exactly the losses of an uninterrupted one;
//! - **the losses log** (`losses.jsonl`, one line per step; a resumed run drops the lines
//!   of steps it recomputes) and its PNG plot ([`finish`]);
//! - **NaN and infinity checks**: [`Learner::minimize`] refuses a non-finite loss before
//!   any parameter moves (nothing is committed);
//! - **cancellation** (Ctrl-C, a cluster's signal) between steps, **progress**, and
//!   **EMA** updates after every step that moved the parameters;
//! - **checkpoints** every `checkpoint_every` steps ([`Checkpoints`]).
//!
//! Its version, [`meduet_stages::training::TRAINER_VERSION`], enters the key of every
//! training stage.

use std::path::{Path, PathBuf};

use meduet_engine::{StageContext, StageError};
use meduet_stages::training::{Amp, OptimKind, ResolvedOptim, Training};
use tch::nn::VarStore;
use tch::Tensor;

use crate::runners::common::{fail, step_seed};
use crate::train::amp::GradScaler;
use crate::train::checkpoint::Checkpoints;
use crate::train::ema::ema_update;
use crate::train::log::{plot_jsonl, JsonlLog};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::sgd::{Sgd, SgdConfig};

/// An optimiser whose whole state can be saved and restored (for an exact resume).
pub trait Optimizer {
    fn zero_grad(&mut self);
    /// Multiplies every gradient by `factor` (loss-scale removal).
    fn scale_grads(&mut self, factor: f64);
    /// Clips the global gradient norm to `max_norm`; returns the norm before clipping.
    fn clip_grad_norm(&mut self, max_norm: f64) -> f64;
    /// One update with learning rate `lr`.
    fn step(&mut self, lr: f64);
    fn save(&self, path: &Path) -> Result<(), String>;
    fn load(&mut self, path: &Path) -> Result<(), String>;
}

macro_rules! impl_optimizer {
    ($t:ty) => {
        impl Optimizer for $t {
            fn zero_grad(&mut self) {
                <$t>::zero_grad(self)
            }
            fn scale_grads(&mut self, factor: f64) {
                <$t>::scale_grads(self, factor)
            }
            fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
                <$t>::clip_grad_norm(self, max_norm)
            }
            fn step(&mut self, lr: f64) {
                <$t>::step(self, lr)
            }
            fn save(&self, path: &Path) -> Result<(), String> {
                <$t>::save(self, path).map_err(|e| e.to_string())
            }
            fn load(&mut self, path: &Path) -> Result<(), String> {
                <$t>::load(self, path)
            }
        }
    };
}
impl_optimizer!(AdamW);
impl_optimizer!(Sgd);

/// The optimiser the configuration names, over the trainable variables of `vs`.
pub fn optimizer(vs: &VarStore, o: &ResolvedOptim) -> Box<dyn Optimizer> {
    match o.kind {
        OptimKind::Adamw => Box::new(AdamW::new(
            vs,
            AdamWConfig {
                beta1: o.betas[0],
                beta2: o.betas[1],
                eps: o.eps,
                weight_decay: o.weight_decay,
            },
        )),
        OptimKind::Sgd => Box::new(Sgd::new(
            vs,
            SgdConfig {
                momentum: o.momentum,
                nesterov: o.nesterov,
                weight_decay: o.weight_decay,
            },
        )),
    }
}

/// One optimiser with its loss scaler and gradient clip: what [`Learner::minimize`] needs.
pub struct Learner {
    opt: Box<dyn Optimizer>,
    scaler: GradScaler,
    grad_clip: f64,
}

impl Learner {
    /// The configured optimiser over `vs`; fp16 loss scaling when `amp = "fp16"` on CUDA.
    pub fn new(vs: &VarStore, t: &Training) -> Self {
        Self {
            opt: optimizer(vs, &t.optim),
            scaler: GradScaler::new(vs.device().is_cuda() && t.amp == Amp::Fp16),
            grad_clip: t.grad_clip,
        }
    }

    /// Whether the forward pass should run under fp16 autocast.
    pub fn autocast(&self) -> bool {
        self.scaler.enabled
    }

    /// Zeroes the gradients, back-propagates `loss` (scaled), unscales, clips and steps
    /// (unless the fp16 gradients overflowed). Returns the gradient norm before clipping and
    /// whether the parameters moved. A non-finite loss is an error before anything moves.
    pub fn minimize(&mut self, loss: &Tensor, s: &Step) -> Result<(f64, bool), StageError> {
        let v = loss.double_value(&[]);
        if !v.is_finite() {
            return Err(fail(format!(
                "the loss is {v} at step {}; nothing is committed (lower optim.lr or check the inputs)",
                s.step
            )));
        }
        self.opt.zero_grad();
        self.scaler.backward(loss);
        Ok(self.scaler.step(self.opt.as_mut(), s.lr, self.grad_clip))
    }
}

/// What the loop hands to each step.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// 0-based step index.
    pub step: u64,
    /// The schedule's learning rate for this step.
    pub lr: f64,
    /// The per-step seed (libtorch's generator is already seeded with it); seed the task's
    /// own generators from it.
    pub seed: u64,
}

/// What one step reports.
pub struct StepOutput {
    /// Fields of the step's line in `losses.jsonl` (the loop adds `step` and `lr`).
    pub record: serde_json::Map<String, serde_json::Value>,
    /// Whether the parameters moved (false after an fp16 overflow): EMA follows only then.
    pub stepped: bool,
}

/// The EMA of a network: after every step that moved the parameters,
/// `averaged <- m averaged + (1 - m) source`.
pub struct Ema<'a> {
    pub averaged: &'a VarStore,
    pub source: &'a VarStore,
    pub momentum: f64,
}

/// A training stage as the loop sees it.
pub trait TrainingTask {
    /// The variable stores every checkpoint holds, by file name (the model, an EMA copy, a
    /// teacher, a discriminator).
    fn stores(&mut self) -> Vec<(&'static str, &mut VarStore)>;
    /// The learners every checkpoint holds, by name (`<name>.safetensors` holds the
    /// optimiser state; `state.json` the loss scale).
    fn learners(&mut self) -> Vec<(&'static str, &mut Learner)>;
    /// Called once before the first step with the step the run starts at (0, or the
    /// resumed checkpoint's): start data loaders there.
    fn start(&mut self, _first_step: u64) -> Result<(), StageError> {
        Ok(())
    }
    /// One step: the batch, the forward pass, the loss and [`Learner::minimize`].
    fn step(&mut self, s: &Step) -> Result<StepOutput, StageError>;
    /// The EMA to update after step `step`, if the task keeps one.
    fn ema(&self, _step: u64) -> Option<Ema<'_>> {
        None
    }
    /// Called after step `done - 1` is logged (validation, snapshots).
    fn after_step(&mut self, _done: u64) -> Result<(), StageError> {
        Ok(())
    }
    /// Writes extra state into a checkpoint folder; returns JSON kept in its `state.json`.
    fn save_extra(&self, _dir: &Path) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    /// Restores what [`TrainingTask::save_extra`] wrote.
    fn load_extra(&mut self, _dir: &Path, _state: &serde_json::Value) -> Result<(), StageError> {
        Ok(())
    }
}

/// What a finished run leaves for the stage's outputs.
pub struct Trained {
    /// `losses.jsonl` in the scratch folder.
    pub log: PathBuf,
    /// The step the run started at (0, or the resumed checkpoint's).
    pub resumed_at: u64,
    /// The last step's record.
    pub last: Option<serde_json::Value>,
}

/// Runs `t.steps` steps of `task` (resuming from the stage's latest checkpoint).
pub fn run(
    ctx: &mut StageContext,
    t: &Training,
    task: &mut dyn TrainingTask,
) -> Result<Trained, StageError> {
    let scratch = ctx.scratch_dir()?;
    let cps = Checkpoints::new(&scratch);
    let mut start = 0;
    if let Some((step, dir)) = cps.latest() {
        resume(&dir, task)?;
        start = step;
        tracing::info!("resuming from the checkpoint at step {step}");
    }
    task.start(start)?;
    let log_path = scratch.join("losses.jsonl");
    let mut log = JsonlLog::open(&log_path, start).map_err(|e| StageError::io(&log_path, e))?;
    let bar = ctx.progress(t.steps, "steps");
    bar.set_position(start);
    let mut last = None;
    for step in start..t.steps {
        ctx.check_cancelled()?;
        let seed = step_seed(t.seed, step);
        tch::manual_seed(seed as i64);
        let s = Step {
            step,
            lr: t.lr(step),
            seed,
        };
        let out = task.step(&s)?;
        if out.stepped {
            if let Some(e) = task.ema(step) {
                ema_update(e.averaged, e.source, e.momentum).map_err(fail)?;
            }
        }
        let mut record = serde_json::json!({ "step": step, "lr": s.lr });
        record.as_object_mut().expect("object").extend(out.record);
        log.write(&record)
            .map_err(|e| StageError::io(&log_path, e))?;
        last = Some(record);
        bar.inc(1);
        let done = step + 1;
        task.after_step(done)?;
        if t.checkpoint_every > 0 && done % t.checkpoint_every == 0 && done < t.steps {
            save(&cps, done, task)?;
        }
    }
    bar.finish_and_clear();
    Ok(Trained {
        log: log_path,
        resumed_at: start,
        last,
    })
}

fn resume(dir: &Path, task: &mut dyn TrainingTask) -> Result<(), StageError> {
    for (file, vs) in task.stores() {
        Checkpoints::load_into(dir, file, vs).map_err(fail)?;
    }
    let state = Checkpoints::state(dir).map_err(fail)?;
    for (name, l) in task.learners() {
        l.opt
            .load(&dir.join(format!("{name}.safetensors")))
            .map_err(fail)?;
        l.scaler = serde_json::from_value(state["scalers"][name].clone()).map_err(|e| {
            fail(format!(
                "checkpoint '{}': state.json: scalers.{name}: {e}",
                dir.display()
            ))
        })?;
    }
    task.load_extra(dir, &state["extra"])
}

fn save(cps: &Checkpoints, done: u64, task: &mut dyn TrainingTask) -> Result<(), StageError> {
    cps.save(done, &mut |dir: &Path| {
        for (file, vs) in task.stores() {
            vs.save(dir.join(file)).map_err(|e| e.to_string())?;
        }
        let mut scalers = serde_json::Map::new();
        for (name, l) in task.learners() {
            l.opt.save(&dir.join(format!("{name}.safetensors")))?;
            scalers.insert(name.into(), serde_json::to_value(&l.scaler).expect("json"));
        }
        let extra = task.save_extra(dir)?;
        Ok(serde_json::json!({ "scalers": scalers, "extra": extra }))
    })
    .map_err(fail)?;
    Ok(())
}

/// Copies the losses log into the output folder `out` and plots `fields` (log scale) to
/// `losses.png`.
pub fn finish(
    trained: &Trained,
    out: &Path,
    title: &str,
    fields: &[&str],
) -> Result<(), StageError> {
    let log = out.join("losses.jsonl");
    std::fs::copy(&trained.log, &log).map_err(|e| StageError::io(&trained.log, e))?;
    plot_jsonl(&log, &out.join("losses.png"), title, fields, true).map_err(fail)
}
