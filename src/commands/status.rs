//! `meduet status`: each stage cached, missing, pending, or being computed (by whom, with
//! the Slurm jobs of the stages that are not cached).

use anyhow::Result;
use meduet_cache::Store;
use meduet_engine::plan::{load_history, plan, StageStatus};
use meduet_engine::Registry;

use super::common::{cache_dir, load};
use super::devices::cuda_visible;
use super::slurm;
use crate::cli::StatusArgs;

/// `meduet status PIPELINE`.
pub(super) fn status(args: StatusArgs, registry: &Registry) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    let dir = cache_dir(&p, &args.cache);
    let Some(store) = Store::open_existing(&dir) else {
        println!("no cache at {} yet: nothing has run", dir.display());
        return Ok(0);
    };
    let planned = plan(&p, &store, &[], &[], &cuda_visible)?;
    let history = load_history(&store, &p);
    let jobs = slurm::status_jobs(&p, &store, &planned);
    println!("{:<24} {:<14} {:<14} details", "stage", "kind", "status");
    for s in planned {
        let (status, details) = cache_status(&store, &s.status);
        let (status, details) = match jobs.get(&s.name) {
            Some((st, d)) if status != "cached" => (st.clone(), format!("{d} {details}")),
            _ => (status, details),
        };
        let last = history
            .stages
            .get(&s.name)
            .map(|h| format!(" last key {}", h.key.short()))
            .unwrap_or_default();
        println!(
            "{:<24} {:<14} {:<14} {details}{}",
            s.name,
            s.kind,
            status,
            if status == "cached" {
                String::new()
            } else {
                last
            }
        );
    }
    let live = store.live_roots();
    if !live.is_empty() {
        println!("processes using this cache (their keys are kept by gc):");
        for (info, age) in live {
            println!(
                "  {:<32} pid {} on {}, {} key(s), heartbeat {:.0}s ago",
                info.holder,
                info.pid,
                info.host,
                info.keys.len(),
                age.as_secs_f64()
            );
        }
    }
    Ok(0)
}

/// What the cache says of a planned stage: (status, details). A stage that will run is
/// "running" while a live process holds its lease, "stale" when the lease's holder is
/// gone, else "missing" (or "pending" while its upstream is not computed).
fn cache_status(store: &Store, status: &StageStatus) -> (String, String) {
    match status {
        StageStatus::Cached { key } => ("cached".to_string(), key.short().to_string()),
        StageStatus::WillRun {
            key: Some(key),
            items,
            ..
        } => match store.lease_info(key) {
            Some((info, age)) => match store.lease_stale_reason(key) {
                Some(why) => (
                    "stale".to_string(),
                    format!(
                        "a lease of pid {} on {} that nothing holds: {why} (the next run breaks it)",
                        info.pid, info.host
                    ),
                ),
                None => (
                    "running".to_string(),
                    format!(
                        "by {} pid {} on {} (heartbeat {:.0}s ago)",
                        if info.holder.is_empty() {
                            "?"
                        } else {
                            &info.holder
                        },
                        info.pid,
                        info.host,
                        age.as_secs_f64()
                    ),
                ),
            },
            None => (
                "missing".to_string(),
                items
                    .map(|(t, c)| format!("{c}/{t} items cached"))
                    .unwrap_or_default(),
            ),
        },
        StageStatus::WillRun { key: None, .. } => {
            ("pending".to_string(), "upstream not computed".to_string())
        }
    }
}
