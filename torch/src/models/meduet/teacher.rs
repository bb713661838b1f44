//! The EMA teacher: a frozen copy of the student in its own var store, moved towards the
//! student after every optimizer step with `theta_T <- m theta_T + (1 - m) theta_S`
//! (momentum from [`meduet_stages::schedule::EmaSchedule`]).
//!
//! As in the authors' `update_ema`, every named variable is averaged, the fixed position
//! tables included (they are equal in both networks, so they stay put).

use tch::nn;

use super::{Config, MeDuet, MeduetError};
use crate::train::ema::{ema_update, EmaError};

/// A frozen MeDUET network that follows a student by exponential moving average.
#[derive(Debug)]
pub struct Teacher {
    vs: nn::VarStore,
    model: MeDuet,
}

impl Teacher {
    /// Builds a teacher on the student's device and copies every student variable into it
    /// (the authors' `deepcopy(student)`). Building the network draws its (discarded) init from
    /// libtorch's global generator.
    pub fn from_student(student_vs: &nn::VarStore, cfg: &Config) -> Result<Self, MeduetError> {
        let mut vs = nn::VarStore::new(student_vs.device());
        let model = MeDuet::new(&vs.root(), cfg)?;
        vs.copy(student_vs)?;
        vs.freeze();
        Ok(Self { vs, model })
    }

    /// The teacher network.
    pub fn model(&self) -> &MeDuet {
        &self.model
    }

    /// The teacher's variables (save them with `var_store().save("teacher.safetensors")`).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access, for loading a checkpoint into the teacher.
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// One EMA step towards `student_vs` with momentum `m`.
    pub fn update(&self, student_vs: &nn::VarStore, momentum: f64) -> Result<(), EmaError> {
        ema_update(&self.vs, student_vs, momentum)
    }
}
