//! Cache upkeep: `meduet gc` (remove what nothing uses), `meduet verify` (re-hash and
//! quarantine), `meduet pin` (keep a pipeline's current objects).

use anyhow::{bail, Result};
use meduet_engine::plan::load_history;
use meduet_engine::Registry;

use super::common::{existing_store, load, pipeline_store};
use super::output::human_bytes;
use crate::cli::{GcArgs, PinArgs, VerifyArgs};

/// `meduet gc [PIPELINE] [--dry-run]`.
pub(super) fn gc(args: GcArgs, registry: &Registry) -> Result<i32> {
    let store = existing_store(&args.pipeline, &args.cache, registry)?;
    let dry_run = args.dry_run;
    let r = store.gc(dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    println!("{} rooted objects kept; {verb} {} object(s), {} scratch, {} temporary and {} job log folder(s): {}", r.kept_objects, r.removed_objects.len(), r.removed_scratch.len(), r.removed_tmp.len(), r.removed_logs.len(), human_bytes(r.bytes));
    for (stage, (n, bytes)) in &r.removed_by_stage {
        println!("  {stage:<24} {n:>6} object(s) {:>12}", human_bytes(*bytes));
    }
    if r.live_roots > 0 {
        println!(
            "kept what {} running process(es) use (their live roots; `meduet status` lists them)",
            r.live_roots
        );
    }
    Ok(0)
}

/// `meduet verify [PIPELINE] [--dry-run]`: exits 1 when an object is corrupt.
pub(super) fn verify(args: VerifyArgs, registry: &Registry) -> Result<i32> {
    let store = existing_store(&args.pipeline, &args.cache, registry)?;
    let r = store.verify(args.dry_run)?;
    println!(
        "verified {} object(s), {} file(s), {}",
        r.objects,
        r.files,
        human_bytes(r.bytes)
    );
    for c in &r.corrupt {
        println!("CORRUPT {} (stage '{}'):", c.key.short(), c.stage);
        for p in &c.problems {
            println!("  {p}");
        }
        if let Some(q) = &c.quarantined_to {
            println!(
                "  quarantined to {} (the next run recomputes it)",
                q.display()
            );
        }
    }
    Ok(if r.corrupt.is_empty() { 0 } else { 1 })
}

/// `meduet pin PIPELINE [--name NAME]`.
pub(super) fn pin(args: PinArgs, registry: &Registry) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    let store = pipeline_store(&p, &args.cache)?;
    let h = load_history(&store, &p);
    let name = args.name.unwrap_or_else(|| p.name.clone());
    if name.trim().is_empty() {
        bail!(
            "--name must not be empty: it names the pin (a file under '{}')",
            store.root().join("pins").display()
        );
    }
    store.pin(&name, &h.keys)?;
    println!("pinned {} object(s) as '{name}'", h.keys.len());
    Ok(0)
}
