//! `meduet plan`: what is cached, what will run, and why.
//!
//! Planning walks the stages in topological order. A stage whose upstream objects all
//! exist has a known key: it is *cached* if its object exists, else it *will run*, and
//! the difference between its fingerprint and the one recorded at the pipeline's last run
//! says why (a parameter with its old and new value, an input digest, the
//! implementation version). A stage downstream of one that will run has an unknown key
//! until that stage runs (early cut-off may still make it a cache hit); the plan says so,
//! together with any parameter changes it can already see.

use std::collections::{BTreeMap, HashMap};

use meduet_cache::{Object, StageKey, Store};
use serde::Serialize;

use crate::error::EngineError;
use crate::exec::{input_artifact, prepare, Prepared};
use crate::fingerprint::{explain, DirtyReason, Fingerprint, History, KEY_SCHEMA_VERSION};
use crate::pipeline::{Pipeline, StageDef};
use crate::stage::InputArtifact;

/// The plan for one stage.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedStage {
    pub name: String,
    pub kind: String,
    #[serde(flatten)]
    pub status: StageStatus,
}

/// Cached or not, and why.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StageStatus {
    Cached {
        key: StageKey,
    },
    WillRun {
        key: Option<StageKey>,
        reasons: Vec<DirtyReason>,
        /// For fan-out stages with known inputs: (items, items already cached).
        items: Option<(usize, usize)>,
    },
}

impl StageStatus {
    pub fn is_cached(&self) -> bool {
        matches!(self, StageStatus::Cached { .. })
    }
}

/// Loads the last-run history of a pipeline file.
pub fn load_history(store: &Store, pipeline: &Pipeline) -> History {
    store
        .read_json::<History>(&history_path(store, pipeline))
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The history file of `pipeline` in `store` (`roots/<name>.<identity>.json`). A history
/// kept under the name alone (`roots/<name>.json`, before identities) is moved into place
/// when it is this file's.
pub fn history_path(store: &Store, pipeline: &Pipeline) -> String {
    let identity = History::identity(&pipeline.file, store.root());
    let path = History::path_for(&pipeline.name, &identity);
    let legacy = History::legacy_path_for(&pipeline.name);
    if !store.root().join(&path).exists() {
        if let Ok(Some(old)) = store.read_json::<History>(&legacy) {
            if same_file(std::path::Path::new(&old.file), &pipeline.file) {
                let _ = std::fs::rename(store.root().join(&legacy), store.root().join(&path));
            }
        }
    }
    path
}

/// Refuses a pipeline file whose name another existing pipeline file already uses in this
/// cache: their histories are kept apart, but runs, ledgers and `meduet status` name
/// pipelines by name, so one name must mean one file.
pub fn check_name(store: &Store, pipeline: &Pipeline) -> Result<(), EngineError> {
    let own = History::path_for(
        &pipeline.name,
        &History::identity(&pipeline.file, store.root()),
    );
    let prefix = format!("{}.", meduet_cache::store::sanitize(&pipeline.name));
    let Ok(rd) = std::fs::read_dir(store.root().join("roots")) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let identity_file = rest
            .strip_suffix(".json")
            .is_some_and(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()));
        if !(identity_file || rest == "json") || format!("roots/{name}") == own {
            continue;
        }
        let Ok(Some(other)) = store.read_json::<History>(&format!("roots/{name}")) else {
            continue;
        };
        let other_file = std::path::Path::new(&other.file);
        if other.pipeline == pipeline.name
            && other_file.exists()
            && !same_file(other_file, &pipeline.file)
        {
            return Err(EngineError::Other(format!(
                "cache '{}' already holds pipeline '{}' from '{}', another file than '{}': one name must mean one file (runs, Slurm ledgers and `meduet status` go by name); give this file its own `name = \"...\"`, or its own cache",
                store.root().display(),
                pipeline.name,
                other.file,
                pipeline.file.display()
            )));
        }
    }
    Ok(())
}

/// Collects the inputs of stage `i` from the objects of its upstream stages; `None` if
/// some upstream object is missing.
pub fn gather_inputs(
    pipeline: &Pipeline,
    store: &Store,
    i: usize,
    objects: &HashMap<usize, Object>,
) -> Result<Option<BTreeMap<String, Vec<InputArtifact>>>, EngineError> {
    let def = &pipeline.stages[i];
    let mut inputs = BTreeMap::new();
    for (name, refs) in &def.inputs {
        let mut arts = Vec::new();
        for r in refs {
            let up = pipeline.index_of(&r.stage).expect("validated reference");
            let Some(obj) = objects.get(&up) else {
                return Ok(None);
            };
            let ty = pipeline.output_type(r).expect("validated output");
            arts.push(input_artifact(store, &r.stage, &r.output, ty, obj)?);
        }
        inputs.insert(name.clone(), arts);
    }
    Ok(Some(inputs))
}

/// Names of the outputs wired to each input, for explanations.
pub fn input_sources(pipeline: &Pipeline, i: usize) -> BTreeMap<String, Vec<String>> {
    pipeline.stages[i]
        .inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|r| r.to_string()).collect()))
        .collect()
}

/// Counts the cached items of a fan-out stage.
pub fn item_counts(store: &Store, p: &Prepared) -> Option<(usize, usize)> {
    let input = p.kind.map_over()?;
    let items: Vec<_> = p
        .inputs
        .get(input)?
        .iter()
        .flat_map(|a| a.items.iter())
        .collect();
    let cached = items
        .iter()
        .filter(|it| {
            store.contains(
                &p.fingerprint
                    .for_item(input, &it.id, &it.attrs, it.digest)
                    .key(),
            )
        })
        .count();
    Some((items.len(), cached))
}

/// For callers that know no CUDA device can be visible (tests, CPU-only tools).
pub fn no_cuda(_: &StageDef) -> bool {
    false
}

/// Plans `selected` stages (all when empty), with `force`d stage names.
/// `cuda_visible` says whether a stage with `device = "auto"` would get a CUDA device (asked
/// only for stages whose key holds the device class; [`no_cuda`] where none can be).
pub fn plan(
    pipeline: &Pipeline,
    store: &Store,
    selected: &[usize],
    force: &[String],
    cuda_visible: &dyn Fn(&StageDef) -> bool,
) -> Result<Vec<PlannedStage>, EngineError> {
    plan_with(
        pipeline,
        store,
        selected,
        force,
        cuda_visible,
        &mut |_, _| Ok(()),
    )
}

/// Writes an execution spec for every stage that will run and whose inputs all exist
/// (what a cluster executor submits first). Returns `(stage, spec path)`.
pub fn write_ready_specs(
    pipeline: &Pipeline,
    store: &Store,
    selected: &[usize],
    force: &[String],
    cuda_visible: &dyn Fn(&StageDef) -> bool,
) -> Result<Vec<(String, std::path::PathBuf)>, EngineError> {
    let mut out = Vec::new();
    plan_with(
        pipeline,
        store,
        selected,
        force,
        cuda_visible,
        &mut |i, p| {
            let def = &pipeline.stages[i];
            let spec = crate::spec::ExecSpec::from_prepared(
                &pipeline.name,
                p,
                &def.resources,
                force.contains(&def.name),
                p.locator_source_paths(),
                p.locator_object_keys(),
            );
            out.push((def.name.clone(), spec.write(store)?));
            Ok(())
        },
    )?;
    Ok(out)
}

type ReadyHook<'a> = dyn FnMut(usize, &Prepared) -> Result<(), EngineError> + 'a;

fn plan_with(
    pipeline: &Pipeline,
    store: &Store,
    selected: &[usize],
    force: &[String],
    cuda_visible: &dyn Fn(&StageDef) -> bool,
    on_ready: &mut ReadyHook<'_>,
) -> Result<Vec<PlannedStage>, EngineError> {
    check_name(store, pipeline)?;
    let mut prepared_all: HashMap<usize, Prepared> = HashMap::new();
    let history = load_history(store, pipeline);
    let mut objects: HashMap<usize, Object> = HashMap::new();
    let mut out = Vec::new();
    for (i, def) in pipeline.stages.iter().enumerate() {
        if !selected.is_empty() && !selected.contains(&i) {
            continue;
        }
        let old = history.stages.get(&def.name).map(|h| &h.fingerprint);
        let forced = force.contains(&def.name);
        let missing: Vec<DirtyReason> = pipeline
            .missing_files_of(&[i])
            .into_iter()
            .map(|m| DirtyReason::MissingFile {
                param: m.param.clone(),
                path: m.raw.clone(),
            })
            .collect();
        if !missing.is_empty() {
            out.push(PlannedStage {
                name: def.name.clone(),
                kind: def.kind.kind().to_string(),
                status: StageStatus::WillRun {
                    key: None,
                    reasons: missing,
                    items: None,
                },
            });
            continue;
        }
        let status = match gather_inputs(pipeline, store, i, &objects)? {
            Some(inputs) => {
                let mut p = prepare(def, store, inputs, cuda_visible)?;
                let status = match store.load(&p.key)? {
                    Some(obj) if !forced => {
                        objects.insert(i, obj);
                        StageStatus::Cached { key: p.key }
                    }
                    _ => {
                        let reasons = if forced {
                            vec![DirtyReason::Forced]
                        } else {
                            explain(old, &p.fingerprint, &input_sources(pipeline, i))
                        };
                        p.locator = std::sync::Arc::new(crate::scheduler::locator_for(
                            pipeline,
                            i,
                            &prepared_all,
                            &objects,
                        ));
                        p.locator_roots =
                            crate::scheduler::locator_roots(pipeline, i, &prepared_all, &objects);
                        on_ready(i, &p)?;
                        StageStatus::WillRun {
                            key: Some(p.key),
                            reasons,
                            items: item_counts(store, &p),
                        }
                    }
                };
                prepared_all.insert(i, p);
                status
            }
            None => {
                let pending: Vec<String> = pipeline
                    .upstream_of(i)
                    .into_iter()
                    .filter(|u| !objects.contains_key(u))
                    .map(|u| pipeline.stages[u].name.clone())
                    .collect();
                let mut reasons = vec![DirtyReason::UpstreamPending { stages: pending }];
                // What can already be seen: parameter and version changes.
                if let Ok((_, key_params, _)) = crate::exec::resolve_stage_sources(def, store) {
                    let partial = Fingerprint {
                        schema: KEY_SCHEMA_VERSION,
                        kind: def.kind.kind().to_string(),
                        kind_version: def.kind.version(),
                        params: key_params,
                        resolved: def.kind.resolved(&def.params),
                        code: def
                            .kind
                            .code_versions()
                            .iter()
                            .map(|(k, v)| (k.to_string(), *v))
                            .collect(),
                        device_class: def
                            .kind
                            .device_dependent(&def.params)
                            .then(|| def.resources.device.class(&|| cuda_visible(def))),
                        inputs: old.map(|o| o.inputs.clone()).unwrap_or_default(),
                        item: None,
                    };
                    if old.is_some() {
                        reasons.extend(
                            explain(old, &partial, &BTreeMap::new())
                                .into_iter()
                                .filter(|r| !matches!(r, DirtyReason::ObjectMissing)),
                        );
                    }
                }
                if forced {
                    reasons.push(DirtyReason::Forced);
                }
                StageStatus::WillRun {
                    key: None,
                    reasons,
                    items: None,
                }
            }
        };
        out.push(PlannedStage {
            name: def.name.clone(),
            kind: def.kind.kind().to_string(),
            status,
        });
    }
    Ok(out)
}

/// The stages a run considers (the `--only` names with their ancestors; every stage when
/// there are none). Refuses, before anything runs, when any of them reads a source file
/// that does not exist, listing every such file.
pub fn select_for_run(pipeline: &Pipeline, only: &[String]) -> Result<Vec<usize>, EngineError> {
    let selected: Vec<usize> = if only.is_empty() {
        (0..pipeline.stages.len()).collect()
    } else {
        select(pipeline, only)?
    };
    let missing = pipeline.missing_files_of(&selected);
    if !missing.is_empty() {
        return Err(EngineError::MissingFiles(
            missing.into_iter().cloned().collect(),
        ));
    }
    Ok(selected)
}

/// Resolves `--only` names to the stages to consider (each with its ancestors).
pub fn select(pipeline: &Pipeline, only: &[String]) -> Result<Vec<usize>, EngineError> {
    let mut sel = Vec::new();
    for name in only {
        let i =
            pipeline
                .index_of(name)
                .ok_or_else(|| crate::error::PipelineError::NoSuchStage {
                    file: pipeline.file.clone(),
                    stage: name.clone(),
                    known: pipeline.stage_names(),
                })?;
        sel.extend(pipeline.ancestors_of(i));
    }
    sel.sort();
    sel.dedup();
    Ok(sel)
}
