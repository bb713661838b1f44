//! Execution specs: one stage execution as a self-contained, content-addressed file.
//!
//! `meduet exec-stage --spec SPEC.json` runs exactly what the planner wrote: the kind,
//! its parameters, the keys and digests of its input objects, and its resources. It is
//! idempotent (exits at once when the object exists), takes the key's lease, commits
//! atomically and releases: any cluster scheduler can run it on a shared cache. Specs are
//! stored under `specs/<blake3 of the spec>.json` and never change.
//!
//! A spec is a pure function of its fingerprint, and is trusted only as such: a spec
//! file whose name is a digest must hash to it, and its kind, parameters (their key form)
//! and input digests must be the fingerprint's; any difference is refused, naming the
//! field, before anything runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meduet_cache::{ContentDigest, StageKey, Store};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::exec::{input_artifact, Prepared};
use crate::fingerprint::Fingerprint;
use crate::params::{diff_params, map_sources, resolve_source, source_key_value};
use crate::registry::Registry;
use crate::resources::{Assignment, Resources};

/// Format version of spec files.
pub const SPEC_FORMAT: u32 = 1;

/// One wired input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecInput {
    pub stage: String,
    pub output: String,
    /// Key of the object holding it.
    pub key: StageKey,
    pub digest: ContentDigest,
}

/// A stage execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub format: u32,
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    pub key: StageKey,
    pub fingerprint: Fingerprint,
    /// Parameters as the stage sees them (absolute source paths).
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, Vec<SpecInput>>,
    /// What the stage asked for.
    pub resources: Resources,
    /// What the scheduler gave it (device and threads), when it runs under one: the
    /// process that runs the spec takes it as is. Absent for a spec run on its own (a
    /// cluster job assigns on its node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned: Option<Assignment>,
    pub force: bool,
    /// Ancestors' source paths and object keys, to rebuild the locator.
    #[serde(default)]
    pub locator_sources: Vec<PathBuf>,
    #[serde(default)]
    pub locator_objects: Vec<StageKey>,
    /// For a fan-out stage run as a cluster job array: the ids of the items the array
    /// computes, task `i` computing `items[i]` (`exec-stage --item-index i`). Absent
    /// from every other spec, so their bytes (and paths) do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<String>>,
}

impl ExecSpec {
    pub fn from_prepared(
        pipeline: &str,
        p: &Prepared,
        resources: &Resources,
        force: bool,
        locator_sources: Vec<PathBuf>,
        locator_objects: Vec<StageKey>,
    ) -> Self {
        let inputs = p
            .inputs
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter()
                        .map(|a| SpecInput {
                            stage: a.stage.clone(),
                            output: a.output.clone(),
                            key: a.key,
                            digest: a.digest,
                        })
                        .collect(),
                )
            })
            .collect();
        Self {
            format: SPEC_FORMAT,
            pipeline: pipeline.to_string(),
            stage: p.stage.clone(),
            kind: p.kind.kind().to_string(),
            key: p.key,
            fingerprint: p.fingerprint.clone(),
            params: p.runtime_params.clone(),
            inputs,
            resources: resources.clone(),
            assigned: None,
            force,
            locator_sources,
            locator_objects,
            items: None,
        }
    }

    /// Writes the spec into the store (content-addressed) and returns its path.
    pub fn write(&self, store: &Store) -> Result<PathBuf, EngineError> {
        let bytes = serde_json::to_vec_pretty(self).expect("spec serializes");
        let digest = ContentDigest::of_bytes(&bytes);
        let rel = format!("specs/{}.json", digest.to_hex());
        let path = store.root().join(&rel);
        if !path.exists() {
            meduet_cache::hashing::write_atomic(&path, &bytes, true).map_err(|e| {
                EngineError::Other(format!("cannot write spec '{}': {e}", path.display()))
            })?;
        }
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<Self, EngineError> {
        let text = std::fs::read(path).map_err(|e| {
            EngineError::Other(format!("cannot read spec '{}': {e}", path.display()))
        })?;
        let spec: ExecSpec = serde_json::from_slice(&text).map_err(|e| {
            EngineError::Other(format!(
                "spec '{}' is not a valid exec spec: {e}",
                path.display()
            ))
        })?;
        if let Some(name) = path.file_stem().and_then(|s| s.to_str()) {
            let is_digest = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            let actual = ContentDigest::of_bytes(&text);
            if is_digest && actual.to_hex() != name {
                return Err(EngineError::Other(format!(
                    "spec '{}' was changed after it was written: its name is the digest of its content, which is now {} (refusing it; replan with 'meduet plan --specs')",
                    path.display(),
                    actual.short()
                )));
            }
        }
        if spec.format != SPEC_FORMAT {
            return Err(EngineError::Other(format!(
                "spec '{}' has format {} (this meduet reads {SPEC_FORMAT})",
                path.display(),
                spec.format
            )));
        }
        Ok(spec)
    }

    /// Rebuilds the prepared stage from the store, checking that every input object
    /// exists with the recorded digest and that sources still hash to the key's digests.
    pub fn to_prepared(&self, store: &Store, registry: &Registry) -> Result<Prepared, EngineError> {
        let kind = registry.get(&self.kind).ok_or_else(|| {
            EngineError::Other(format!("spec names unknown stage kind '{}'", self.kind))
        })?;
        if self.kind != self.fingerprint.kind {
            return Err(self.tampered("kind", &self.fingerprint.kind, &self.kind));
        }
        self.check_inputs_match_fingerprint()?;
        if kind.version() != self.fingerprint.kind_version {
            return Err(EngineError::Other(format!(
                "spec was planned for '{}' version {} but this meduet has version {} (replan with the same meduet build)",
                self.kind,
                self.fingerprint.kind_version,
                kind.version()
            )));
        }
        for (component, version) in kind.code_versions() {
            if self.fingerprint.code.get(*component) != Some(version) {
                return Err(EngineError::Other(format!(
                    "spec was planned with {component} version {:?} but this meduet has version {version} (replan with the same meduet build)",
                    self.fingerprint.code.get(*component)
                )));
            }
        }
        let mut inputs = BTreeMap::new();
        for (name, refs) in &self.inputs {
            let spec_in = kind
                .inputs()
                .into_iter()
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    EngineError::Other(format!("kind '{}' has no input '{name}'", self.kind))
                })?;
            let mut arts = Vec::new();
            for r in refs {
                let obj = store.load(&r.key)?.ok_or_else(|| {
                    EngineError::Other(format!(
                        "input object {} ({}.{}) is not in the cache '{}'",
                        r.key.short(),
                        r.stage,
                        r.output,
                        store.root().display()
                    ))
                })?;
                let art = input_artifact(store, &r.stage, &r.output, spec_in.ty, &obj)?;
                if art.digest != r.digest {
                    return Err(EngineError::Other(format!(
                        "input {}.{} has digest {} but the spec expects {}",
                        r.stage,
                        r.output,
                        art.digest.short(),
                        r.digest.short()
                    )));
                }
                arts.push(art);
            }
            inputs.insert(name.clone(), arts);
        }
        let memo = store.memo();
        let mut sources = BTreeMap::new();
        let mut err = None;
        crate::params::visit_sources(&self.params, |_, raw| {
            match resolve_source(raw, Path::new("/"), &memo) {
                Ok(t) => {
                    sources.insert(PathBuf::from(raw), t);
                }
                Err(m) => err = err.take().or(Some(m)),
            }
        });
        if let Some(m) = err {
            return Err(EngineError::Other(m));
        }
        let mut trees = Vec::new();
        for s in &self.locator_sources {
            trees.push(
                resolve_source(&s.to_string_lossy(), Path::new("/"), &memo)
                    .map_err(EngineError::Other)?,
            );
        }
        let mut objs = Vec::new();
        for k in &self.locator_objects {
            objs.extend(store.load(k)?);
        }
        let locator = std::sync::Arc::new(crate::locator::build_locator(trees.iter(), objs.iter()));
        let p = Prepared {
            stage: self.stage.clone(),
            kind,
            fingerprint: self.fingerprint.clone(),
            key: self.key,
            runtime_params: self.params.clone(),
            sources,
            inputs,
            locator,
            locator_roots: (self.locator_sources.clone(), self.locator_objects.clone()),
        };
        if p.fingerprint.key() != self.key {
            return Err(EngineError::Other(
                "spec key does not match its fingerprint".into(),
            ));
        }
        let mut digests: Vec<String> = Vec::new();
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(d)) = m.get("$source_digest") {
                        out.push(d.clone());
                    }
                    m.values().for_each(|x| collect(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
                _ => {}
            }
        }
        collect(&p.fingerprint.params, &mut digests);
        for t in p.sources.values() {
            if !digests.contains(&t.digest.to_hex()) {
                return Err(EngineError::Other(format!(
                    "source '{}' changed since the spec was planned",
                    t.root.display()
                )));
            }
        }
        // The parameters, in their key form, must be the fingerprint's.
        let key_params = map_sources(&self.params, &|raw| {
            source_key_value(&p.sources[&PathBuf::from(raw)])
        });
        if let Some((field, want, got)) = diff_params(&self.fingerprint.params, &key_params)
            .into_iter()
            .next()
        {
            let show = |v: Option<serde_json::Value>| {
                v.map(|v| v.to_string()).unwrap_or("(absent)".into())
            };
            return Err(self.tampered(&format!("params.{field}"), &show(want), &show(got)));
        }
        Ok(p)
    }

    /// Every input reference's digest, input by input, must be the fingerprint's.
    fn check_inputs_match_fingerprint(&self) -> Result<(), EngineError> {
        let want = &self.fingerprint.inputs;
        for name in want.keys().chain(self.inputs.keys()) {
            let w: Vec<String> = want
                .get(name)
                .map(|v| v.iter().map(|d| d.to_hex()).collect())
                .unwrap_or_default();
            let g: Vec<String> = self
                .inputs
                .get(name)
                .map(|v| v.iter().map(|r| r.digest.to_hex()).collect())
                .unwrap_or_default();
            if w != g {
                let i = w
                    .iter()
                    .zip(&g)
                    .position(|(a, b)| a != b)
                    .unwrap_or(w.len().min(g.len()));
                let show = |v: &[String]| {
                    v.get(i)
                        .map(|d| d[..12].to_string())
                        .unwrap_or("(none)".into())
                };
                return Err(self.tampered(
                    &format!("inputs.{name}[{i}].digest"),
                    &show(&w),
                    &show(&g),
                ));
            }
        }
        Ok(())
    }

    fn tampered(
        &self,
        field: &str,
        want: &dyn std::fmt::Display,
        got: &dyn std::fmt::Display,
    ) -> EngineError {
        EngineError::Other(format!(
            "spec of stage '{}': field '{field}' is {got} but its fingerprint says {want}: the spec was changed after it was planned (refusing it; replan with 'meduet plan --specs')",
            self.stage
        ))
    }
}
