//! `meduet kinds`: the stage kinds, or one kind's inputs, outputs and defaults.

use anyhow::{Context, Result};
use meduet_engine::Registry;

use crate::cli::KindsArgs;

/// `meduet kinds [KIND]`.
pub(super) fn kinds(args: KindsArgs, registry: &Registry) -> Result<i32> {
    match args.kind.as_deref() {
        None => list(registry),
        Some(name) => describe(registry, name)?,
    }
    Ok(0)
}

/// A line per kind: name, version, what it does, whether it runs per item.
fn list(registry: &Registry) {
    for k in registry.iter() {
        let fanout = if k.map_over().is_some() {
            " [per item]"
        } else {
            ""
        };
        println!("{:<18} v{:<3} {}{fanout}", k.kind(), k.version(), k.about());
    }
}

/// One kind: its inputs, outputs, default resources and default parameters.
fn describe(registry: &Registry, name: &str) -> Result<()> {
    let k = registry.get(name).with_context(|| {
        format!(
            "unknown stage kind '{name}' (known kinds: {})",
            registry.names().join(", ")
        )
    })?;
    println!("{} (version {}): {}", k.kind(), k.version(), k.about());
    println!("inputs:");
    for i in k.inputs() {
        println!("  {:<16} {} ({:?}) {}", i.name, i.ty, i.arity, i.doc);
    }
    println!("outputs:");
    for o in k.outputs() {
        println!("  {:<16} {} {}", o.name, o.ty, o.doc);
    }
    let r = k.default_resources();
    println!(
        "default resources: threads = {}, device = \"{}\"",
        r.threads, r.device
    );
    match k.resolve_params(toml::Table::new()) {
        Ok(v) => println!("default parameters:\n{}", serde_json::to_string_pretty(&v)?),
        Err((p, m)) => {
            println!("parameters: required parameter(s) without default ({p}: {m})")
        }
    }
    Ok(())
}
