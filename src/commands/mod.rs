//! What each subcommand does: [`dispatch`] hands each one to its module.
//!
//! Subcommand modules (`run`, `plan`, `graph`, `status`, `show`, `export`,
//! `maintenance`, `doctor`, `hash`, `kinds`, `exec_stage`, `slurm`) use the helper
//! modules (`common`, `devices`, `output`), which use no subcommand module. The `run`,
//! `status` and `exec_stage` modules also call `slurm`, the Slurm side of those commands,
//! which calls only helpers: no two modules use each other.

mod common;
mod devices;
mod output;

mod doctor;
mod exec_stage;
mod export;
mod graph;
mod hash;
mod kinds;
mod maintenance;
mod plan;
mod run;
mod show;
mod slurm;
mod status;

use anyhow::Result;
use indicatif::MultiProgress;

use crate::cli::{Cli, Command};

pub use plan::EXIT_MISSING_FILES;

/// Runs the subcommand of `args`; returns the process's exit status.
pub fn dispatch(args: Cli, multi: MultiProgress) -> Result<i32> {
    let registry = meduet_stages::registry();
    match args.command {
        Command::Run(a) => run::run(a, &registry, &multi),
        Command::Cancel(a) => slurm::cancel(a, &registry),
        Command::Plan(a) => plan::plan(a, &registry),
        Command::Graph(a) => graph::graph(a, &registry),
        Command::Status(a) => status::status(a, &registry),
        Command::Show(a) => show::show(a, &registry),
        Command::Export(a) => export::export(a, &registry),
        Command::Gc(a) => maintenance::gc(a, &registry),
        Command::Verify(a) => maintenance::verify(a, &registry),
        Command::Pin(a) => maintenance::pin(a, &registry),
        Command::Doctor(a) => doctor::doctor(a, &registry),
        Command::Hash(a) => hash::hash(a),
        Command::Kinds(a) => kinds::kinds(a, &registry),
        Command::ExecStage(a) => exec_stage::exec_stage(a, &registry, &multi),
    }
}
