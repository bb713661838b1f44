//! `meduet graph`: the stage graph as Graphviz dot or Mermaid.

use anyhow::Result;
use meduet_engine::Registry;

use super::common::load;
use crate::cli::{GraphArgs, GraphFormat};

/// `meduet graph PIPELINE [--format dot|mermaid]`.
pub(super) fn graph(args: GraphArgs, registry: &Registry) -> Result<i32> {
    let p = load(&args.pipeline, registry)?;
    match args.format {
        GraphFormat::Dot => print!("{}", meduet_engine::graph::to_dot(&p)),
        GraphFormat::Mermaid => print!("{}", meduet_engine::graph::to_mermaid(&p)),
    }
    Ok(0)
}
