//! Printing shared by several subcommands: the summary after a run, byte sizes.

use std::collections::{HashMap, HashSet};

use meduet_cache::Store;
use meduet_engine::{Outcome, Pipeline, RunSummary};

/// After a run: what was computed and cached, the time the cache saved (on stderr), and
/// where the final results are (on stdout).
pub fn print_summary(p: &Pipeline, store: &Store, summary: &RunSummary) {
    let computed = summary.computed().len();
    let cached = summary.cached().len();
    // Time saved: what the cached objects took when they were computed.
    let mut saved = 0.0;
    let mut by_stage: HashMap<&str, &Outcome> = HashMap::new();
    for (n, o) in &summary.stages {
        by_stage.insert(n.as_str(), o);
        if let Outcome::Cached { key } | Outcome::Reused { key } = o {
            if let Ok(text) = std::fs::read_to_string(store.object_dir(key).join("record.json")) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                saved += v["wall_seconds"].as_f64().unwrap_or(0.0);
            }
        }
    }
    eprintln!(
        "done in {:.1}s: {computed} stage(s) computed, {cached} cached (saving about {:.1}s)",
        summary.wall_seconds, saved
    );
    // Where the final results are: outputs of stages nothing else consumes.
    let consumed: HashSet<&str> = p
        .stages
        .iter()
        .flat_map(|s| s.inputs.values().flatten().map(|r| r.stage.as_str()))
        .collect();
    for s in &p.stages {
        if consumed.contains(s.name.as_str()) {
            continue;
        }
        if let Some(
            Outcome::Cached { key } | Outcome::Computed { key, .. } | Outcome::Reused { key },
        ) = by_stage.get(s.name.as_str())
        {
            for out in s.kind.outputs() {
                println!(
                    "{}.{}: {}",
                    s.name,
                    out.name,
                    store.object_dir(key).join("out").join(out.name).display()
                );
            }
        }
    }
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
