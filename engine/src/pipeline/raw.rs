//! Raw pipeline files: TOML as written, with the file and line of every value, and
//! `include` / `extends` resolved.
//!
//! A pipeline file:
//!
//! ```toml
//! name = "quickstart"          # defaults to the file name
//! cache = "../.meduet"         # optional; default: .meduet/ beside the top-level file
//! include = ["base.toml"]      # optional: stages of other files, reused verbatim
//!
//! [made_by]                    # optional: the command that makes a file a stage reads
//! "~/.cache/meduet/weights/i3resnet152.safetensors" = "scripts/fetch_i3resnet"
//!
//! [stages.resample]
//! kind = "resample"
//! inputs = { subjects = "ingest.subjects" }
//! resources = { threads = 2, device = "cpu" }
//! spacing = [1.5, 1.5, 1.5]    # every other key is a parameter of the kind
//!
//! [stages.resample_fine]
//! extends = "resample"         # copy another stage's table, then override
//! spacing = [1.0, 1.0, 1.0]
//! ```
//!
//! Included stages come first; a stage of the same name in the including file is merged
//! into the included one key by key (`inputs`, `resources`, `optim` and `schedule` entry by
//! entry), so an ablation file can change one parameter and reuse everything else, cache
//! included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Location, PipelineError};

/// A TOML value with where it was written.
#[derive(Debug, Clone)]
pub struct Located {
    pub value: toml::Value,
    pub at: Location,
    /// Folder of the file that wrote it (relative paths resolve against it).
    pub base: PathBuf,
}

/// One stage table, merged.
#[derive(Debug, Clone)]
pub struct RawStage {
    pub name: String,
    pub at: Location,
    pub entries: BTreeMap<String, Located>,
}

/// A pipeline file with its includes resolved.
#[derive(Debug, Clone)]
pub struct RawPipeline {
    pub file: PathBuf,
    pub name: String,
    /// The cache folder the file asks for (absolute), if any.
    pub cache: Option<PathBuf>,
    pub stages: BTreeMap<String, RawStage>,
    /// The `[executor]` table, if any (merged from includes).
    pub executor: toml::Table,
    pub executor_at: Option<Location>,
    /// Where each key under `executor` and under `stages.<name>.executor` was written,
    /// by dotted path (`executor.slurm.time`, `stages.train.executor.slurm.time`), so
    /// executor settings are reported with their own line.
    pub executor_spans: BTreeMap<String, Location>,
    /// The `[made_by]` table: for a source file (resolved like a source parameter), the
    /// command that makes it, named when the file is missing. Merged from includes.
    pub made_by: BTreeMap<PathBuf, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    name: Option<String>,
    cache: Option<Spanned<String>>,
    #[serde(default)]
    include: Vec<Spanned<String>>,
    #[serde(default)]
    stages: BTreeMap<String, Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    executor: Option<Spanned<toml::Table>>,
    #[serde(default)]
    made_by: BTreeMap<String, String>,
}

/// Line and column (1-based) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

fn loc(file: &Path, text: &str, offset: usize) -> Location {
    let (line, column) = line_col(text, offset);
    Location {
        file: file.to_path_buf(),
        line,
        column,
    }
}

/// Reads a pipeline file and everything it includes.
pub fn load(file: &Path) -> Result<RawPipeline, PipelineError> {
    let abs = absolute(file);
    let mut chain = Vec::new();
    load_rec(&abs, &mut chain)
}

fn absolute(p: &Path) -> PathBuf {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    p.canonicalize().unwrap_or(p)
}

fn load_rec(file: &Path, chain: &mut Vec<PathBuf>) -> Result<RawPipeline, PipelineError> {
    if chain.iter().any(|c| c == file) {
        let mut c = chain.clone();
        c.push(file.to_path_buf());
        return Err(PipelineError::IncludeCycle {
            file: chain[0].clone(),
            chain: c,
        });
    }
    let text = std::fs::read_to_string(file).map_err(|source| PipelineError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    let repr: FileRepr = toml::from_str(&text).map_err(|e| PipelineError::Syntax {
        at: loc(file, &text, e.span().map(|s| s.start).unwrap_or(0)),
        message: e.message().trim().to_string(),
    })?;
    let base = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    chain.push(file.to_path_buf());
    let mut merged = RawPipeline {
        file: file.to_path_buf(),
        name: String::new(),
        cache: None,
        stages: BTreeMap::new(),
        executor: toml::Table::new(),
        executor_at: None,
        executor_spans: BTreeMap::new(),
        made_by: BTreeMap::new(),
    };
    for inc in &repr.include {
        let inc_path = absolute(&base.join(inc.get_ref()));
        if !inc_path.is_file() {
            let what = if inc_path.is_dir() {
                "is a folder, not a pipeline file"
            } else {
                "does not exist"
            };
            return Err(PipelineError::Invalid {
                at: loc(file, &text, inc.span().start),
                message: format!(
                    "included file '{}' {what} (resolved to '{}')",
                    inc.get_ref(),
                    inc_path.display()
                ),
            });
        }
        let sub = load_rec(&inc_path, chain)?;
        for (name, st) in sub.stages {
            merge_stage(&mut merged.stages, name, st);
        }
        merge_table(&mut merged.executor, sub.executor);
        merged.executor_spans.extend(sub.executor_spans);
        merged.executor_at = merged.executor_at.or(sub.executor_at);
        merged.cache = merged.cache.or(sub.cache);
        merged.made_by.extend(sub.made_by);
    }
    chain.pop();
    for (name, table) in repr.stages {
        let at = loc(file, &text, table.span().start);
        let entries = table
            .into_inner()
            .into_iter()
            .map(|(k, v)| {
                let at = loc(file, &text, v.span().start);
                (
                    k,
                    Located {
                        value: v.into_inner(),
                        at,
                        base: base.clone(),
                    },
                )
            })
            .collect();
        merge_stage(
            &mut merged.stages,
            name.clone(),
            RawStage { name, at, entries },
        );
    }
    record_executor_spans(file, &text, &mut merged.executor_spans);
    if let Some(exec) = repr.executor {
        merged.executor_at = Some(loc(file, &text, exec.span().start));
        merge_table(&mut merged.executor, exec.into_inner());
    }
    for (path, command) in repr.made_by {
        merged
            .made_by
            .insert(crate::params::source_path(&path, &base), command);
    }
    if let Some(c) = repr.cache {
        merged.cache = Some(base.join(c.get_ref()));
    }
    merged.name = repr.name.unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into())
    });
    resolve_extends(&mut merged)?;
    Ok(merged)
}

/// Records the location of every key under `executor` and `stages.*.executor`.
fn record_executor_spans(file: &Path, text: &str, out: &mut BTreeMap<String, Location>) {
    fn walk(
        file: &Path,
        text: &str,
        prefix: &str,
        v: &toml::de::DeValue<'_>,
        out: &mut BTreeMap<String, Location>,
    ) {
        if let toml::de::DeValue::Table(t) = v {
            for (k, v) in t.iter() {
                let path = format!("{prefix}.{}", k.get_ref());
                out.insert(path.clone(), loc(file, text, k.span().start));
                walk(file, text, &path, v.get_ref(), out);
            }
        }
    }
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return;
    };
    for (k, v) in doc.get_ref().iter() {
        match k.get_ref().as_ref() {
            "executor" => {
                out.insert("executor".into(), loc(file, text, k.span().start));
                walk(file, text, "executor", v.get_ref(), out);
            }
            "stages" => {
                let toml::de::DeValue::Table(stages) = v.get_ref() else {
                    continue;
                };
                for (name, st) in stages.iter() {
                    let toml::de::DeValue::Table(st) = st.get_ref() else {
                        continue;
                    };
                    for (k, v) in st.iter() {
                        if k.get_ref().as_ref() == "executor" {
                            let path = format!("stages.{}.executor", name.get_ref());
                            out.insert(path.clone(), loc(file, text, k.span().start));
                            walk(file, text, &path, v.get_ref(), out);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Tables merged entry by entry (for `inputs`, `resources`, a training kind's `optim` and
/// `schedule`, and `[executor]`): an override of `optim.lr` keeps the base's `optim.betas`.
/// An override that names another `kind` (`optim = { kind = "sgd" }`) replaces the table:
/// the base's AdamW numbers do not apply to SGD.
const MERGED_TABLES: &[&str] = &["inputs", "resources", "optim", "schedule"];

fn changes_kind(old: &toml::Value, new: &toml::Table) -> bool {
    match new.get("kind") {
        Some(k) => old.get("kind") != Some(k),
        None => false,
    }
}

fn merge_stage(stages: &mut BTreeMap<String, RawStage>, name: String, over: RawStage) {
    match stages.get_mut(&name) {
        None => {
            stages.insert(name, over);
        }
        Some(base) => {
            for (k, v) in over.entries {
                match (base.entries.get_mut(&k), &v.value) {
                    (Some(old), toml::Value::Table(new))
                        if MERGED_TABLES.contains(&k.as_str())
                            && !changes_kind(&old.value, new) =>
                    {
                        if let toml::Value::Table(t) = &mut old.value {
                            merge_table(t, new.clone());
                        } else {
                            *old = v;
                        }
                    }
                    _ => {
                        base.entries.insert(k, v);
                    }
                }
            }
            base.at = over.at;
        }
    }
}

fn merge_table(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_table(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn resolve_extends(p: &mut RawPipeline) -> Result<(), PipelineError> {
    let names: Vec<String> = p.stages.keys().cloned().collect();
    for name in names {
        let mut seen = vec![name.clone()];
        let mut current = p.stages[&name].clone();
        while let Some(ext) = current.entries.remove("extends") {
            let Some(parent_name) = ext.value.as_str().map(str::to_string) else {
                return Err(PipelineError::Invalid {
                    at: ext.at,
                    message: format!("stage '{name}': 'extends' must be a stage name (a string)"),
                });
            };
            if seen.contains(&parent_name) {
                seen.push(parent_name);
                return Err(PipelineError::Invalid {
                    at: ext.at,
                    message: format!(
                        "stage '{name}': 'extends' forms a cycle: {}",
                        seen.join(" -> ")
                    ),
                });
            }
            let Some(parent) = p.stages.get(&parent_name) else {
                return Err(PipelineError::Invalid {
                    at: ext.at,
                    message: format!(
                        "stage '{name}': extends unknown stage '{parent_name}' (stages: {})",
                        p.stages.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                });
            };
            seen.push(parent_name);
            let mut base = parent.clone();
            base.name = name.clone();
            let own = RawStage {
                name: name.clone(),
                at: current.at.clone(),
                entries: current.entries,
            };
            let mut map = BTreeMap::new();
            map.insert(name.clone(), base);
            merge_stage(&mut map, name.clone(), own);
            current = map.remove(&name).unwrap();
        }
        p.stages.insert(name, current);
    }
    Ok(())
}
