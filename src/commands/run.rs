//! `meduet run`: compute what is not cached, here or (see [`super::slurm`]) under Slurm.

use std::sync::Arc;

use anyhow::Result;
use indicatif::MultiProgress;
use meduet_engine::scheduler::DeviceProbe;
use meduet_engine::{CancelFlag, Registry, RunOptions};

use super::common::{cache_dir, env_for, load, open_store};
use super::devices::cuda_devices;
use super::output::print_summary;
use super::slurm;
use crate::cli::RunArgs;

/// `meduet run PIPELINE`.
pub(super) fn run(args: RunArgs, registry: &Registry, multi: &MultiProgress) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    let on_slurm = slurm::wants_slurm(&p, args.executor, args.detach)?;
    let store = open_store(&cache_dir(&p, &args.cache))?;
    let env = env_for(store.clone(), multi);
    cancel_on_interrupt(env.cancel.clone());
    let opts = RunOptions {
        only: args.only,
        force: args.force,
        keep_going: args.keep_going,
        threads: args.threads,
        cuda_devices: None,
        device_probe: Some(DeviceProbe(Arc::new(cuda_devices))),
    };
    tracing::info!(
        "pipeline '{}' ({} stages), cache {}",
        p.name,
        p.stages.len(),
        store.root().display()
    );
    if on_slurm {
        return slurm::run(&p, &store, &env, &opts, args.detach);
    }
    let result = meduet_engine::run(&p, &env, &opts);
    if let Ok(summary) = &result {
        print_summary(&p, &store, summary);
    }
    result?;
    Ok(0)
}

/// Ctrl-C cancels the running stages (nothing partial is committed); a second Ctrl-C
/// exits at once.
fn cancel_on_interrupt(cancel: CancelFlag) {
    let _ = ctrlc::set_handler(move || {
        if cancel.is_cancelled() {
            eprintln!("interrupted twice: exiting now (leases of this process will be broken by the next run)");
            std::process::exit(130);
        }
        eprintln!("interrupt: cancelling running stages (nothing partial is committed); press Ctrl-C again to exit at once");
        cancel.cancel();
    });
}
