//! `meduet plan`: what is cached, what will run and why; with `--specs`, the execution
//! specs of the stages ready to run. Also the missing-files report and its exit status.

use std::path::PathBuf;

use anyhow::Result;
use meduet_cache::Store;
use meduet_engine::plan::{select, PlannedStage, StageStatus};
use meduet_engine::{Pipeline, Registry};

use super::common::{cache_dir, load, open_store};
use super::devices::cuda_visible;
use crate::cli::PlanArgs;

/// Exit status of `plan` when the plan is complete but some input files are missing
/// (a validation error exits with 2).
pub const EXIT_MISSING_FILES: i32 = 3;

/// `meduet plan PIPELINE`.
pub(super) fn plan(args: PlanArgs, registry: &Registry) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    let dir = cache_dir(&p, &args.cache);
    let sel = select(&p, &args.only)?;
    if args.specs {
        let store = open_store(&dir)?;
        for (stage, path) in
            meduet_engine::plan::write_ready_specs(&p, &store, &sel, &args.force, &cuda_visible)?
        {
            println!("{stage}\t{}", path.display());
        }
        return Ok(report_missing_files(&p, &sel, true));
    }
    // Planning never creates a cache: an absent one means nothing is cached.
    let (store, _cleanup) = match Store::open_existing(&dir) {
        Some(s) => (s, None),
        None => {
            let tmp =
                std::env::temp_dir().join(format!("meduet-empty-plan-{}", std::process::id()));
            (Store::open(&tmp)?, Some(TempDirGuard(tmp)))
        }
    };
    let planned = meduet_engine::plan::plan(&p, &store, &sel, &args.force, &cuda_visible)?;
    print_plan(&planned, args.json);
    Ok(report_missing_files(&p, &sel, args.json))
}

/// Removes a folder when dropped.
struct TempDirGuard(PathBuf);
impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// After a plan: the list of missing input files of the selected stages (on stdout below
/// the plan, on stderr when stdout is machine-readable), and the exit status.
fn report_missing_files(p: &Pipeline, selected: &[usize], to_stderr: bool) -> i32 {
    let missing: Vec<_> = p.missing_files_of(selected).into_iter().cloned().collect();
    if missing.is_empty() {
        return 0;
    }
    let report = meduet_engine::pipeline::missing_files_report(&missing);
    if to_stderr {
        eprintln!("{report}");
    } else {
        println!("\n{report}");
    }
    EXIT_MISSING_FILES
}

/// The plan as a table (a line per stage, the reasons of each rerun) or as JSON.
fn print_plan(planned: &[PlannedStage], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(planned).expect("plan serializes")
        );
        return;
    }
    let cached = planned.iter().filter(|s| s.status.is_cached()).count();
    for s in planned {
        match &s.status {
            StageStatus::Cached { key } => {
                println!("  cached    {:<24} {:<16} {}", s.name, s.kind, key.short())
            }
            StageStatus::WillRun {
                key,
                reasons,
                items,
            } => {
                let k = key.map(|k| k.short()).unwrap_or_else(|| "?".repeat(12));
                let it = items
                    .map(|(t, c)| format!(" ({c} of {t} items cached)"))
                    .unwrap_or_default();
                println!("  will run  {:<24} {:<16} {k}{it}", s.name, s.kind);
                for r in reasons {
                    println!("              because {r}");
                }
            }
        }
    }
    println!("{cached} of {} stage(s) cached", planned.len());
}
