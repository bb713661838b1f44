//! `meduet-torch`: the worker that runs the stage kinds needing libtorch.
//!
//! The `meduet` binary starts it as `meduet-torch exec-stage --spec SPEC` for each such
//! stage; cluster jobs can run the same command. `devices` lists the CUDA devices (the
//! scheduler asks once per run, only when a GPU-capable stage has to run) and `doctor`
//! reports the libtorch build.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use meduet_engine::exec_stage::{delegate, exec_stage, spec_cache, ExecStage};

#[derive(Parser)]
#[command(name = "meduet-torch", version, about = "meduet's libtorch worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Execute one stage from a spec.
    ExecStage {
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Print the CUDA device indices libtorch sees, one per line.
    Devices,
    /// Print the libtorch build: version, threads, CUDA, cuDNN.
    Doctor,
}

fn main() {
    let cli = Cli::parse();
    let multi = meduet_engine::cli_logging::init(cli.verbose, cli.quiet);
    let code = match cli.command {
        Command::Devices => {
            for d in meduet_torch::device::cuda_devices() {
                println!("{d}");
            }
            0
        }
        Command::Doctor => {
            println!(
                "torch         {} (libtorch via tch 0.26)",
                meduet_torch::device::torch_version()
            );
            println!("threads       {} torch intra-op", tch::get_num_threads());
            let devs = meduet_torch::device::cuda_devices();
            println!(
                "cuda          {}",
                if devs.is_empty() {
                    "no CUDA device seen".to_string()
                } else {
                    format!("{} device(s): {devs:?}", devs.len())
                }
            );
            println!(
                "cudnn         {}",
                if tch::Cuda::cudnn_is_available() {
                    "available"
                } else {
                    "not available"
                }
            );
            0
        }
        Command::ExecStage { spec, cache } => match run_spec(spec, cache, multi) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                if matches!(
                    e.downcast_ref::<meduet_engine::EngineError>(),
                    Some(meduet_engine::EngineError::Cancelled)
                ) {
                    130
                } else {
                    1
                }
            }
        },
    };
    std::process::exit(code);
}

fn run_spec(
    spec: PathBuf,
    cache: Option<PathBuf>,
    multi: indicatif::MultiProgress,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let spec_path = spec
        .canonicalize()
        .with_context(|| format!("spec '{}' not found", spec.display()))?;
    let dir = spec_cache(&spec_path, cache);
    let store = meduet_cache::Store::open_existing(&dir)
        .with_context(|| format!("'{}' is not a meduet cache", dir.display()))?;
    let registry = meduet_torch::registry();
    let mut env = meduet_engine::ExecEnv::new(store.clone());
    env.progress = meduet_engine::progress::Reporter::new(multi);
    env.versions = meduet_cache::Versions {
        meduet: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: option_env!("MEDUET_GIT_COMMIT")
            .filter(|c| !c.is_empty())
            .map(str::to_string),
        torch: Some(meduet_torch::device::torch_version()),
    };
    env.thread_hook = Some(std::sync::Arc::new(meduet_torch::device::set_threads));
    let cancel = env.cancel.clone();
    let _ = ctrlc::set_handler(move || cancel.cancel());
    match exec_stage(
        &spec_path,
        store,
        &registry,
        &env,
        &meduet_torch::device::cuda_devices,
    )? {
        ExecStage::Delegate(w) => Err(delegate(w, &spec_path, &dir).into()),
        ExecStage::Done(ex) => {
            println!(
                "{} {}",
                if ex.computed { "computed" } else { "cached" },
                ex.object.dir.display()
            );
            Ok(())
        }
    }
}
