//! `meduet show`: a stage's object (key, folder, outputs, metrics, run record, log).

use anyhow::Result;
use meduet_cache::Object;
use meduet_engine::Registry;

use super::common::{load, pipeline_store, stage_object};
use super::output::human_bytes;
use crate::cli::ShowArgs;

/// `meduet show PIPELINE STAGE [--log]`.
pub(super) fn show(args: ShowArgs, registry: &Registry) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    let store = pipeline_store(&p, &args.cache)?;
    let stage = &args.stage;
    let obj = stage_object(&p, &store, stage)?;
    println!("stage    {stage} ({})", obj.manifest.provenance.kind);
    println!("key      {}", obj.key());
    println!("object   {}", obj.dir.display());
    println!("size     {}", human_bytes(obj.manifest.total_bytes()));
    println!("outputs");
    for (name, out) in &obj.manifest.outputs {
        let bytes: u64 = out.files.values().map(|f| f.size).sum();
        println!(
            "  {name:<16} {} files, {}, digest {}  {}",
            out.files.len(),
            human_bytes(bytes),
            out.digest.short(),
            obj.output_dir(name).display()
        );
    }
    print_metrics_and_record(&obj);
    let log_path = obj.meta_path("log.txt");
    println!("log      {}", log_path.display());
    if args.log {
        print!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
    }
    Ok(0)
}

/// The object's metrics (when it has any) and its run record: when, where, how long.
fn print_metrics_and_record(obj: &Object) {
    if let Ok(m) = std::fs::read_to_string(obj.meta_path("metrics.json")) {
        let v: serde_json::Value = serde_json::from_str(&m).unwrap_or_default();
        if v.as_object().is_some_and(|o| !o.is_empty()) {
            println!("metrics");
            for (k, v) in v.as_object().unwrap() {
                println!("  {k:<24} {v}");
            }
        }
    }
    if let Ok(r) = std::fs::read_to_string(obj.meta_path("record.json")) {
        let v: serde_json::Value = serde_json::from_str(&r).unwrap_or_default();
        println!(
            "run      {} on {} ({}), {:.2}s, peak RSS {}",
            v["started"].as_str().unwrap_or("?"),
            v["host"].as_str().unwrap_or("?"),
            v["device"].as_str().unwrap_or("?"),
            v["wall_seconds"].as_f64().unwrap_or(0.0),
            human_bytes(v["peak_rss_bytes"].as_u64().unwrap_or(0))
        );
    }
}
