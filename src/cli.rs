//! Command-line arguments (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    Run(RunArgs),
    /// Cancel the Slurm jobs of a pipeline's runs (attached runs stop, detached chains are
    /// scancelled).
    Cancel(CancelArgs),
    /// Show what is cached, what will run, and why (runs nothing).
    Plan(PlanArgs),
    /// Print the stage graph.
    Graph(GraphArgs),
    /// Status of each stage: cached, missing, or being computed (by whom).
    Status(StatusArgs),
    /// Show a stage's object: path, outputs, metrics, log.
    Show(ShowArgs),
    /// Write a stage's volume and label outputs back to NIfTI (one folder per subject).
    Export(ExportArgs),
    /// Remove objects not reachable from the last run of any pipeline or a pin.
    Gc(GcArgs),
    /// Re-hash every object; quarantine corrupt ones so the next run recomputes them.
    Verify(VerifyArgs),
    /// Pin the current objects of a pipeline so gc keeps them.
    Pin(PinArgs),
    /// Print the environment: torch, threads, CUDA devices, cache, free disk.
    Doctor(DoctorArgs),
    /// Print the blake3 content digest of files or folders (as sources enter keys), using
    /// the cache's digest memo when a cache is given.
    Hash(HashArgs),
    /// List stage kinds, or describe one (inputs, outputs, default parameters).
    Kinds(KindsArgs),
    /// Execute one stage from a spec written by the planner (what cluster jobs run).
    ExecStage(ExecStageArgs),
}

/// Arguments of `meduet run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    pub pipeline: PathBuf,
    /// Run only this stage (and what it needs); repeatable.
    #[arg(long)]
    pub only: Vec<String>,
    /// Recompute this stage even if cached; repeatable.
    #[arg(long)]
    pub force: Vec<String>,
    /// After a failure, let independent stages finish.
    #[arg(long)]
    pub keep_going: bool,
    /// CPU thread budget (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where stages run (default: the pipeline's [executor] default, else local).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorArg>,
    /// With --executor slurm: submit the whole remaining graph as dependent jobs, print
    /// their ids and exit.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet cancel`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    pub pipeline: PathBuf,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    pub pipeline: PathBuf,
    #[arg(long)]
    pub only: Vec<String>,
    #[arg(long)]
    pub force: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write an execution spec (for `meduet exec-stage`) for every stage that will run
    /// and whose inputs exist, and print their paths.
    #[arg(long)]
    pub specs: bool,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet graph`.
#[derive(Args, Debug)]
pub struct GraphArgs {
    pub pipeline: PathBuf,
    #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
    pub format: GraphFormat,
}

/// Arguments of `meduet status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    pub pipeline: PathBuf,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet show`.
#[derive(Args, Debug)]
pub struct ShowArgs {
    pub pipeline: PathBuf,
    pub stage: String,
    /// Also print the stage's log.
    #[arg(long)]
    pub log: bool,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    pub pipeline: PathBuf,
    pub stage: String,
    /// Destination folder.
    #[arg(long)]
    pub to: PathBuf,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet gc`.
#[derive(Args, Debug)]
pub struct GcArgs {
    /// A pipeline file whose cache to collect (or use --cache).
    pub pipeline: Option<PathBuf>,
    /// Only report what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    pub pipeline: Option<PathBuf>,
    /// Only report.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet pin`.
#[derive(Args, Debug)]
pub struct PinArgs {
    pub pipeline: PathBuf,
    /// Pin name (default: the pipeline name).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    pub pipeline: Option<PathBuf>,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet hash`.
#[derive(Args, Debug)]
pub struct HashArgs {
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub cache: CacheArg,
}

/// Arguments of `meduet kinds`.
#[derive(Args, Debug)]
pub struct KindsArgs {
    pub kind: Option<String>,
}

/// Arguments of `meduet exec-stage`.
#[derive(Args, Debug)]
pub struct ExecStageArgs {
    #[arg(
        long,
        required_unless_present = "pipeline",
        conflicts_with = "pipeline"
    )]
    pub spec: Option<PathBuf>,
    /// Cache folder (default: the folder holding specs/).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Compute only this item of a fan-out stage (a job array's task index).
    #[arg(long, env = "MEDUET_ITEM_INDEX")]
    pub item_index: Option<usize>,
    /// Instead of a spec: plan stage --stage of this pipeline file now (its inputs
    /// must exist) and execute it.
    #[arg(long, requires = "stage")]
    pub pipeline: Option<PathBuf>,
    #[arg(long, requires = "pipeline")]
    pub stage: Option<String>,
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
