//! The `meduet` command line.

mod cli;
mod commands;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    let multi = meduet_engine::cli_logging::init(args.verbose, args.quiet);
    let code = match commands::dispatch(args, multi) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<meduet_engine::EngineError>() {
                Some(meduet_engine::EngineError::Pipeline(_)) => 2,
                Some(meduet_engine::EngineError::Cancelled) => 130,
                Some(meduet_engine::EngineError::MissingFiles(_)) => commands::EXIT_MISSING_FILES,
                _ if e.downcast_ref::<meduet_engine::PipelineError>().is_some() => 2,
                _ => 1,
            }
        }
    };
    std::process::exit(code);
}
