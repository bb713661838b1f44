//! `meduet graph`: the stage DAG as Graphviz DOT or Mermaid.

use crate::pipeline::Pipeline;

fn label(p: &Pipeline, i: usize) -> String {
    let s = &p.stages[i];
    let fanout = if s.kind.map_over().is_some() {
        " (per item)"
    } else {
        ""
    };
    format!("{}\\n{}{}", s.name, s.kind.kind(), fanout)
}

/// Graphviz DOT; edges are labelled with the output and the input they connect.
pub fn to_dot(p: &Pipeline) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n",
        p.name
    );
    for (i, s) in p.stages.iter().enumerate() {
        out.push_str(&format!("  \"{}\" [label=\"{}\"];\n", s.name, label(p, i)));
    }
    for s in &p.stages {
        for (input, refs) in &s.inputs {
            for r in refs {
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\" [label=\"{} -> {}\"];\n",
                    r.stage, s.name, r.output, input
                ));
            }
        }
    }
    out.push_str("}\n");
    out
}

/// Mermaid flowchart.
pub fn to_mermaid(p: &Pipeline) -> String {
    let id = |name: &str| name.replace(['-', '.'], "_");
    let mut out = String::from("flowchart LR\n");
    for (i, s) in p.stages.iter().enumerate() {
        out.push_str(&format!(
            "  {}[\"{}\"]\n",
            id(&s.name),
            label(p, i).replace("\\n", "<br/>")
        ));
    }
    for s in &p.stages {
        for (input, refs) in &s.inputs {
            for r in refs {
                out.push_str(&format!(
                    "  {} -->|{} to {}| {}\n",
                    id(&r.stage),
                    r.output,
                    input,
                    id(&s.name)
                ));
            }
        }
    }
    out
}
