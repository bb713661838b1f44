//! Command-line arguments (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// meduet: content-addressed pipelines for 3D medical-imaging ML (MeDUET).
#[derive(Parser, Debug)]
#[command(name = "meduet", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More logging (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// Where the cache is: `--cache`, else `MEDUET_CACHE`, else the pipeline's `cache`,
/// else `.meduet/` beside the pipeline file.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArg {
    /// Cache folder (overrides MEDUET_CACHE and the pipeline file).
    #[arg(long, env = "MEDUET_CACHE")]
    pub cache: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline: compute what is not cached.
    Run {
        pipeline: PathBuf,
        /// Run only this stage (and what it needs); repeatable.
        #[arg(long)]
        only: Vec<String>,
        /// Recompute this stage even if cached; repeatable.
        #[arg(long)]
        force: Vec<String>,
        /// After a failure, let independent stages finish.
        #[arg(long)]
        keep_going: bool,
        /// CPU thread budget (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Where stages run (default: the pipeline's [executor] default, else local).
        #[arg(long, value_enum)]
        executor: Option<ExecutorArg>,
        /// With --executor slurm: submit the whole remaining graph as dependent jobs, print
        /// their ids and exit.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Cancel the Slurm jobs of a pipeline's runs (attached runs stop, detached chains are
    /// scancelled).
    Cancel {
        pipeline: PathBuf,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Show what is cached, what will run, and why (runs nothing).
    Plan {
        pipeline: PathBuf,
        #[arg(long)]
        only: Vec<String>,
        #[arg(long)]
        force: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Write an execution spec (for `meduet exec-stage`) for every stage that will run
        /// and whose inputs exist, and print their paths.
        #[arg(long)]
        specs: bool,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Print the stage graph.
    Graph {
        pipeline: PathBuf,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Status of each stage: cached, missing, or being computed (by whom).
    Status {
        pipeline: PathBuf,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Show a stage's object: path, outputs, metrics, log.
    Show {
        pipeline: PathBuf,
        stage: String,
        /// Also print the stage's log.
        #[arg(long)]
        log: bool,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Write a stage's volume and label outputs back to NIfTI (one folder per subject).
    Export {
        pipeline: PathBuf,
        stage: String,
        /// Destination folder.
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Remove objects not reachable from the last run of any pipeline or a pin.
    Gc {
        /// A pipeline file whose cache to collect (or use --cache).
        pipeline: Option<PathBuf>,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Re-hash every object; quarantine corrupt ones so the next run recomputes them.
    Verify {
        pipeline: Option<PathBuf>,
        /// Only report.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Pin the current objects of a pipeline so gc keeps them.
    Pin {
        pipeline: PathBuf,
        /// Pin name (default: the pipeline name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Print the environment: torch, threads, CUDA devices, cache, free disk.
    Doctor {
        pipeline: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Print the blake3 content digest of files or folders (as sources enter keys), using
    /// the cache's digest memo when a cache is given.
    Hash {
        paths: Vec<PathBuf>,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// List stage kinds, or describe one (inputs, outputs, default parameters).
    Kinds { kind: Option<String> },
    /// Execute one stage from a spec written by the planner (what cluster jobs run).
    ExecStage {
        #[arg(
            long,
            required_unless_present = "pipeline",
            conflicts_with = "pipeline"
        )]
        spec: Option<PathBuf>,
        /// Cache folder (default: the folder holding specs/).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Compute only this item of a fan-out stage (a job array's task index).
        #[arg(long, env = "MEDUET_ITEM_INDEX")]
        item_index: Option<usize>,
        /// Instead of a spec: plan stage --stage of this pipeline file now (its inputs
        /// must exist) and execute it.
        #[arg(long, requires = "stage")]
        pipeline: Option<PathBuf>,
        #[arg(long, requires = "pipeline")]
        stage: Option<String>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}
