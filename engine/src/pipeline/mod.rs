//! Validated pipelines: the stage graph.
//!
//! [`Pipeline::load`] turns a raw pipeline file ([`raw`]) into a DAG of [`StageDef`]s and
//! reports every problem with its file, line and column before anything runs: TOML
//! syntax, unknown stage kinds (listing the known ones), unknown or mistyped parameters
//! (with the expected type), references to missing stages or outputs, outputs of the
//! wrong type wired to an input, and cycles (naming their stages). A source file that does
//! not exist is not an error of the file: it is recorded in [`Pipeline::missing_files`]
//! (with the command that makes it, from the file's `[made_by]` table), so that `graph`
//! and `plan` still work and `run` refuses with the whole list before running anything.
//! Loading never touches the cache.

pub mod raw;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::error::{Location, PipelineError};
use crate::params::{find_absolute_paths, source_missing, source_path, visit_sources};
use crate::registry::{DynStage, Registry};
use crate::resources::Resources;
use crate::stage::{Arity, ArtifactType};

/// Keys of a stage table that are not parameters.
pub const RESERVED_KEYS: &[&str] = &["kind", "inputs", "resources", "description", "executor"];

/// A reference to another stage's output, `"stage.output"`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutputRef {
    pub stage: String,
    pub output: String,
}

impl std::fmt::Display for OutputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.stage, self.output)
    }
}

/// A source path parameter, resolved for existence (hashed later, by the planner).
#[derive(Debug, Clone)]
pub struct SourceParam {
    /// JSON path of the parameter (`datasets[0].images`).
    pub param: String,
    /// As written.
    pub raw: String,
    /// Folder of the file that wrote it.
    pub base: PathBuf,
}

/// A source file that a stage reads and that does not exist.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MissingFile {
    pub stage: String,
    /// JSON path of the parameter (`weights`, `datasets[0].images`).
    pub param: String,
    /// Where the parameter was written.
    pub at: Location,
    /// The path as written.
    pub raw: String,
    /// The path it resolves to.
    pub resolved: PathBuf,
    /// The command that makes it, from the pipeline's `[made_by]` table.
    pub made_by: Option<String>,
}

/// The missing files as a clearly marked list: one entry per file, with the command
/// that makes it where the pipeline names one, then where each stage that reads it wrote
/// the parameter.
pub fn missing_files_report(files: &[MissingFile]) -> String {
    let mut by_file: Vec<(&Path, Vec<&MissingFile>)> = Vec::new();
    for m in files {
        match by_file.iter_mut().find(|(p, _)| *p == m.resolved.as_path()) {
            Some((_, v)) => v.push(m),
            None => by_file.push((&m.resolved, vec![m])),
        }
    }
    let mut s = format!(
        "MISSING FILES: {} input file(s) do not exist; the {} stage(s) that read them cannot run:",
        by_file.len(),
        files.len()
    );
    for (path, readers) in &by_file {
        let first = readers[0];
        let make = match &first.made_by {
            Some(c) => format!("make it with: {c}"),
            None => "no command of this pipeline makes it (is the path right?)".to_string(),
        };
        s.push_str(&format!(
            "\n  '{}' (resolved to '{}'): {make}",
            first.raw,
            path.display()
        ));
        for m in readers {
            s.push_str(&format!(
                "\n    read by {}: stage '{}': parameter '{}'",
                m.at, m.stage, m.param
            ));
        }
    }
    s
}

/// One validated stage.
#[derive(Clone)]
pub struct StageDef {
    pub name: String,
    pub kind: Arc<dyn DynStage>,
    pub at: Location,
    /// Canonical parameters (sources still as written).
    pub params: serde_json::Value,
    pub sources: Vec<SourceParam>,
    pub inputs: BTreeMap<String, Vec<OutputRef>>,
    pub resources: Resources,
    pub description: Option<String>,
    /// Where the stage runs and its per-stage Slurm settings (the stage's `executor`).
    pub executor: crate::executor::config::StageExecutor,
}

impl std::fmt::Debug for StageDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageDef")
            .field("name", &self.name)
            .field("kind", &self.kind.kind())
            .finish()
    }
}

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The top-level file (absolute).
    pub file: PathBuf,
    /// The cache folder the file asks for, else `.meduet/` beside the file.
    pub cache_dir: PathBuf,
    /// Stages in a topological order (ties broken by name).
    pub stages: Vec<StageDef>,
    index: HashMap<String, usize>,
    /// Edge u -> v when v consumes an output of u.
    pub graph: DiGraph<usize, ()>,
    pub executor: toml::Table,
    pub executor_at: Option<Location>,
    /// The `[executor]` table, validated.
    pub executor_config: crate::executor::config::ExecutorConfig,
    /// Source files the stages read that do not exist, in stage order.
    pub missing_files: Vec<MissingFile>,
}

impl Pipeline {
    /// Reads and validates a pipeline file.
    pub fn load(file: &Path, registry: &Registry) -> Result<Self, PipelineError> {
        let raw = raw::load(file)?;
        Self::from_raw(raw, registry)
    }

    pub fn stage(&self, name: &str) -> Option<&StageDef> {
        self.index.get(name).map(|&i| &self.stages[i])
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Stage names, comma-separated (for error messages).
    pub fn stage_names(&self) -> String {
        self.stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The missing source files of the stages in `selected` (all stages when empty).
    pub fn missing_files_of(&self, selected: &[usize]) -> Vec<&MissingFile> {
        self.missing_files
            .iter()
            .filter(|m| {
                selected.is_empty()
                    || self
                        .index_of(&m.stage)
                        .is_some_and(|i| selected.contains(&i))
            })
            .collect()
    }

    /// Indices of the stages `name` depends on, transitively, plus itself.
    pub fn ancestors_of(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.stages.len()];
        let mut stack = vec![i];
        while let Some(s) = stack.pop() {
            if std::mem::replace(&mut seen[s], true) {
                continue;
            }
            for refs in self.stages[s].inputs.values() {
                for r in refs {
                    stack.push(self.index[&r.stage]);
                }
            }
        }
        (0..self.stages.len()).filter(|&j| seen[j]).collect()
    }

    /// Indices of the stages that depend on `i`, transitively (excluding `i`).
    pub fn descendants_of(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.stages.len()];
        let mut stack: Vec<usize> = self
            .graph
            .neighbors(NodeIndex::new(i))
            .map(|n| n.index())
            .collect();
        while let Some(s) = stack.pop() {
            if std::mem::replace(&mut seen[s], true) {
                continue;
            }
            stack.extend(self.graph.neighbors(NodeIndex::new(s)).map(|n| n.index()));
        }
        (0..self.stages.len()).filter(|&j| seen[j]).collect()
    }

    /// Direct upstream stage indices of `i`.
    pub fn upstream_of(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.stages[i]
            .inputs
            .values()
            .flatten()
            .map(|r| self.index[&r.stage])
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn from_raw(raw: raw::RawPipeline, registry: &Registry) -> Result<Self, PipelineError> {
        let known = registry.names().join(", ");
        let mut defs = Vec::new();
        let mut missing_files = Vec::new();
        for (name, st) in &raw.stages {
            // A '.' would make "stage.output" references ambiguous.
            if crate::collection::check_item_id(name).is_err() || name.contains('.') {
                return Err(PipelineError::Invalid {
                    at: st.at.clone(),
                    message: format!(
                        "invalid stage name '{name}' (letters, digits, '-', '_' only)"
                    ),
                });
            }
            let kind_val = st
                .entries
                .get("kind")
                .ok_or_else(|| PipelineError::Invalid {
                    at: st.at.clone(),
                    message: format!("stage '{name}' has no 'kind' (known kinds: {known})"),
                })?;
            let kind_name = kind_val
                .value
                .as_str()
                .ok_or_else(|| PipelineError::Invalid {
                    at: kind_val.at.clone(),
                    message: format!("stage '{name}': 'kind' must be a string"),
                })?;
            let kind = registry
                .get(kind_name)
                .ok_or_else(|| PipelineError::UnknownKind {
                    at: kind_val.at.clone(),
                    stage: name.clone(),
                    kind: kind_name.to_string(),
                    known: known.clone(),
                })?;
            // Parameters.
            let mut table = toml::Table::new();
            let mut bases: BTreeMap<String, (PathBuf, Location)> = BTreeMap::new();
            for (k, v) in &st.entries {
                if RESERVED_KEYS.contains(&k.as_str()) {
                    continue;
                }
                table.insert(k.clone(), v.value.clone());
                bases.insert(k.clone(), (v.base.clone(), v.at.clone()));
            }
            let params = kind.resolve_params(table).map_err(|(path, message)| {
                let top = top_key(&path);
                let at = bases
                    .get(&top)
                    .map(|b| b.1.clone())
                    .unwrap_or_else(|| st.at.clone());
                let param = if path.is_empty() {
                    unknown_field(&message).unwrap_or_else(|| "(parameters)".into())
                } else {
                    path
                };
                let at = bases
                    .get(&top_key(&param))
                    .map(|b| b.1.clone())
                    .unwrap_or(at);
                PipelineError::Param {
                    at,
                    stage: name.clone(),
                    param,
                    message,
                }
            })?;
            let mut sources = Vec::new();
            let mut source_err = None;
            visit_sources(&params, |path, rawp| {
                let top = top_key(path);
                let (base, at) = bases
                    .get(&top)
                    .cloned()
                    .unwrap_or_else(|| (raw.file.parent().unwrap().to_path_buf(), st.at.clone()));
                match source_missing(rawp, &base) {
                    Ok(false) => {}
                    Ok(true) => {
                        let resolved = source_path(rawp, &base);
                        missing_files.push(MissingFile {
                            stage: name.clone(),
                            param: path.to_string(),
                            at,
                            raw: rawp.to_string(),
                            made_by: raw.made_by.get(&resolved).cloned(),
                            resolved,
                        });
                    }
                    Err(m) if source_err.is_none() => {
                        source_err = Some(PipelineError::Param {
                            at,
                            stage: name.clone(),
                            param: path.to_string(),
                            message: m,
                        });
                    }
                    Err(_) => {}
                }
                sources.push(SourceParam {
                    param: path.to_string(),
                    raw: rawp.to_string(),
                    base,
                });
            });
            if let Some(e) = source_err {
                return Err(e);
            }
            if let Some((path, value)) = find_absolute_paths(&params).into_iter().next() {
                let at = bases
                    .get(&top_key(&path))
                    .map(|b| b.1.clone())
                    .unwrap_or_else(|| st.at.clone());
                return Err(PipelineError::Param {
                    at,
                    stage: name.clone(),
                    param: path,
                    message: format!("absolute path '{value}' in a parameter would tie the cache key to this machine (hint: data and weights are source-path parameters, hashed by content)"),
                });
            }
            // Resources.
            let mut resources = kind.default_resources();
            if let Some(r) = st.entries.get("resources") {
                let toml::Value::Table(t) = &r.value else {
                    return Err(PipelineError::Invalid {
                        at: r.at.clone(),
                        message: format!("stage '{name}': 'resources' must be a table"),
                    });
                };
                let mut merged = toml::Table::try_from(&resources).expect("resources serialize");
                merged.remove("memory_gb");
                if let Some(m) = resources.memory_gb {
                    merged.insert("memory_gb".into(), toml::Value::Float(m));
                }
                for (k, v) in t {
                    merged.insert(k.clone(), v.clone());
                }
                resources =
                    serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
                        PipelineError::Param {
                            at: r.at.clone(),
                            stage: name.clone(),
                            param: format!("resources.{}", e.path()),
                            message: e.into_inner().message().to_string(),
                        }
                    })?;
            }
            let description = st
                .entries
                .get("description")
                .and_then(|d| d.value.as_str().map(str::to_string));
            let executor = match st.entries.get("executor") {
                Some(e) => crate::executor::config::StageExecutor::from_value(
                    name,
                    &e.value,
                    &raw.executor_spans,
                    e.at.clone(),
                )?,
                None => Default::default(),
            };
            defs.push((
                st,
                StageDef {
                    name: name.clone(),
                    kind,
                    at: st.at.clone(),
                    params,
                    sources,
                    inputs: BTreeMap::new(),
                    resources,
                    description,
                    executor,
                },
            ));
        }
        // Inputs and their types.
        let kinds_by_name: HashMap<String, Arc<dyn DynStage>> = defs
            .iter()
            .map(|(_, d)| (d.name.clone(), d.kind.clone()))
            .collect();
        let stage_list = raw.stages.keys().cloned().collect::<Vec<_>>().join(", ");
        for (st, def) in defs.iter_mut() {
            let specs = def.kind.inputs();
            let mut wired: BTreeMap<String, Vec<OutputRef>> = BTreeMap::new();
            if let Some(inp) = st.entries.get("inputs") {
                let toml::Value::Table(t) = &inp.value else {
                    return Err(PipelineError::Invalid { at: inp.at.clone(), message: format!("stage '{}': 'inputs' must be a table such as {{ volumes = \"resample.volumes\" }}", def.name) });
                };
                for (input_name, v) in t {
                    let err = |message: String| PipelineError::Input {
                        at: inp.at.clone(),
                        stage: def.name.clone(),
                        input: input_name.clone(),
                        message,
                    };
                    let Some(spec) = specs.iter().find(|s| s.name == input_name) else {
                        let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
                        return Err(err(format!(
                            "stage kind '{}' has no input '{input_name}' (inputs: {})",
                            def.kind.kind(),
                            if names.is_empty() {
                                "none".to_string()
                            } else {
                                names.join(", ")
                            }
                        )));
                    };
                    let refs: Vec<&str> = match v {
                        toml::Value::String(s) => vec![s.as_str()],
                        toml::Value::Array(a) => a
                            .iter()
                            .map(|x| {
                                x.as_str()
                                    .ok_or_else(|| err("expected \"stage.output\" strings".into()))
                            })
                            .collect::<Result<_, _>>()?,
                        _ => return Err(err("expected \"stage.output\" or a list of them".into())),
                    };
                    let mut parsed = Vec::new();
                    for r in refs {
                        let Some((s, o)) = r.split_once('.') else {
                            return Err(err(format!("reference '{r}' must be \"stage.output\"")));
                        };
                        let Some(up_kind) = kinds_by_name.get(s) else {
                            return Err(err(format!(
                                "reference '{r}': no stage named '{s}' (stages: {stage_list})"
                            )));
                        };
                        let outs = up_kind.outputs();
                        let Some(out) = outs.iter().find(|x| x.name == o) else {
                            return Err(err(format!(
                                "reference '{r}': stage '{s}' (kind '{}') has no output '{o}' (outputs: {})",
                                up_kind.kind(),
                                outs.iter().map(|x| x.name).collect::<Vec<_>>().join(", ")
                            )));
                        };
                        if out.ty != spec.ty {
                            return Err(err(format!("reference '{r}' is a {} but input '{input_name}' of kind '{}' expects a {}", out.ty, def.kind.kind(), spec.ty)));
                        }
                        if s == def.name {
                            return Err(PipelineError::Cycle {
                                file: raw.file.clone(),
                                cycle: vec![def.name.clone(), def.name.clone()],
                            });
                        }
                        parsed.push(OutputRef {
                            stage: s.to_string(),
                            output: o.to_string(),
                        });
                    }
                    if matches!(spec.arity, Arity::One | Arity::Optional) && parsed.len() > 1 {
                        return Err(err(format!("takes one reference, got {}", parsed.len())));
                    }
                    wired.insert(input_name.clone(), parsed);
                }
            }
            for spec in &specs {
                let n = wired.get(spec.name).map(|v| v.len()).unwrap_or(0);
                if n == 0 && matches!(spec.arity, Arity::One | Arity::Many) {
                    return Err(PipelineError::Input {
                        at: st
                            .entries
                            .get("inputs")
                            .map(|i| i.at.clone())
                            .unwrap_or_else(|| def.at.clone()),
                        stage: def.name.clone(),
                        input: spec.name.to_string(),
                        message: format!(
                            "required input is not wired (expected a {}: {})",
                            spec.ty, spec.doc
                        ),
                    });
                }
            }
            if let Some(m) = def.kind.map_over() {
                if !wired.contains_key(m) {
                    return Err(PipelineError::Input {
                        at: def.at.clone(),
                        stage: def.name.clone(),
                        input: m.to_string(),
                        message: "the fan-out input must be wired".into(),
                    });
                }
            }
            def.inputs = wired;
        }
        // Graph, cycle check, topological order.
        let defs: Vec<StageDef> = defs.into_iter().map(|(_, d)| d).collect();
        let by_name: HashMap<String, usize> = defs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        let mut g: DiGraph<usize, ()> = DiGraph::new();
        for i in 0..defs.len() {
            g.add_node(i);
        }
        for (i, d) in defs.iter().enumerate() {
            for r in d.inputs.values().flatten() {
                g.update_edge(NodeIndex::new(by_name[&r.stage]), NodeIndex::new(i), ());
            }
        }
        if petgraph::algo::toposort(&g, None).is_err() {
            let scc = petgraph::algo::tarjan_scc(&g);
            let cyc = scc.into_iter().find(|c| c.len() > 1).unwrap_or_default();
            let mut names: Vec<String> = cyc.iter().map(|n| defs[n.index()].name.clone()).collect();
            names.sort();
            if let Some(first) = names.first().cloned() {
                names.push(first);
            }
            return Err(PipelineError::Cycle {
                file: raw.file.clone(),
                cycle: names,
            });
        }
        // Deterministic topological order: Kahn's algorithm, smallest name first.
        let mut indeg: Vec<usize> = (0..defs.len())
            .map(|i| {
                g.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
                    .count()
            })
            .collect();
        let mut ready: std::collections::BTreeSet<(String, usize)> = (0..defs.len())
            .filter(|&i| indeg[i] == 0)
            .map(|i| (defs[i].name.clone(), i))
            .collect();
        let mut order = Vec::new();
        while let Some((_, i)) = ready.pop_first() {
            order.push(i);
            for n in g.neighbors(NodeIndex::new(i)) {
                indeg[n.index()] -= 1;
                if indeg[n.index()] == 0 {
                    ready.insert((defs[n.index()].name.clone(), n.index()));
                }
            }
        }
        let mut slots: Vec<Option<StageDef>> = defs.into_iter().map(Some).collect();
        let stages: Vec<StageDef> = order.iter().map(|&i| slots[i].take().unwrap()).collect();
        let index: HashMap<String, usize> = stages
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        let mut graph: DiGraph<usize, ()> = DiGraph::new();
        for i in 0..stages.len() {
            graph.add_node(i);
        }
        for (i, d) in stages.iter().enumerate() {
            for r in d.inputs.values().flatten() {
                graph.update_edge(NodeIndex::new(index[&r.stage]), NodeIndex::new(i), ());
            }
        }
        let cache_dir = raw
            .cache
            .clone()
            .unwrap_or_else(|| raw.file.parent().unwrap_or(Path::new(".")).join(".meduet"));
        let executor_config = crate::executor::config::ExecutorConfig::from_table(
            &raw.executor,
            &raw.executor_spans,
            raw.executor_at.clone().unwrap_or_else(|| Location {
                file: raw.file.clone(),
                line: 1,
                column: 1,
            }),
            &registry.names(),
        )?;
        if stages.is_empty() {
            return Err(PipelineError::Invalid {
                at: Location {
                    file: raw.file.clone(),
                    line: 1,
                    column: 1,
                },
                message: "the pipeline declares no stages: nothing to run (a stage is a [stages.NAME] table with a 'kind')".into(),
            });
        }
        missing_files.sort_by_key(|m: &MissingFile| index[&m.stage]);
        Ok(Pipeline {
            executor_config,
            name: raw.name,
            file: raw.file,
            cache_dir,
            stages,
            index,
            graph,
            executor: raw.executor,
            executor_at: raw.executor_at,
            missing_files,
        })
    }

    /// The type of output `r`.
    pub fn output_type(&self, r: &OutputRef) -> Option<ArtifactType> {
        self.stage(&r.stage)?
            .kind
            .outputs()
            .into_iter()
            .find(|o| o.name == r.output)
            .map(|o| o.ty)
    }
}

/// First segment of a JSON path (`a.b[0]` -> `a`).
fn top_key(path: &str) -> String {
    path.split(['.', '[']).next().unwrap_or("").to_string()
}

/// Extracts the field name from serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}
