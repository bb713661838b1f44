//! Cache keys, and why a stage reruns.
//!
//! A stage's key is blake3 over the canonical JSON of its [`Fingerprint`]:
//!
//! | field          | what                                                             |
//! |----------------|------------------------------------------------------------------|
//! | `schema`       | [`KEY_SCHEMA_VERSION`]                                           |
//! | `kind`         | the stage kind                                                   |
//! | `kind_version` | the kind's implementation version (bumped by hand)               |
//! | `params`       | resolved parameters, canonical; source paths as content digests  |
//! | `resolved`     | what named presets in `params` stand for (the full model sizes); |
//! |                | absent for kinds without presets ([`crate::Stage::resolved`])    |
//! | `code`         | versions of shared code the kind runs on (the training loop);    |
//! |                | absent for kinds without ([`crate::Stage::code_versions`])       |
//! | `device_class` | `"cpu"` or `"cuda"`, only for stages whose bytes depend on it    |
//! |                | (fp16 autocast: [`crate::Stage::device_dependent`])              |
//! | `inputs`       | input name -> output digests of the wired upstream outputs       |
//!
//! Inputs enter by the upstream *output digest*, not the upstream key: a change upstream
//! that yields identical bytes stops the rerun there (early cut-off). Resources (threads,
//! device) do not enter the key. A fan-out item's key is the same fingerprint with the
//! mapped collection replaced by the one item (id, attributes, digest).
//!
//! A preset enters by what it resolves to, not only by its name, so a change to a preset's
//! definition reruns what used it without a hand-bumped kind version (Bazel keys an action on
//! its command line, not on the name of the macro that wrote it).
//!
//! **If you change what enters a key, or how, bump [`KEY_SCHEMA_VERSION`].**
//!
//! The fingerprint of each stage's last run is stored per pipeline; comparing it with the
//! current one yields [`DirtyReason`]s, which `meduet plan` prints (as cargo's
//! `DirtyReason` and Bazel's `--explain` do).

use std::collections::BTreeMap;

use meduet_cache::{ContentDigest, StageKey};
use serde::{Deserialize, Serialize};

use crate::params::{canonical_bytes, diff_params};

/// Version of the key schema.
pub const KEY_SCHEMA_VERSION: u32 = 1;

/// Everything that determines a stage's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    pub params: serde_json::Value,
    /// What named presets in `params` resolve to; `None` for kinds without presets (their
    /// keys are as before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<serde_json::Value>,
    /// Versions of shared code ([`crate::Stage::code_versions`]); empty for kinds without
    /// (their keys are as before this field existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub code: BTreeMap<String, u32>,
    /// The device class, for stages whose output bytes depend on it; `None` otherwise
    /// (their keys are as before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<crate::resources::DeviceClass>,
    pub inputs: BTreeMap<String, Vec<ContentDigest>>,
    /// For per-item keys of fan-out stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<ItemFingerprint>,
}

/// The item part of a per-item key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemFingerprint {
    pub input: String,
    pub id: String,
    pub attrs: BTreeMap<String, serde_json::Value>,
    pub digest: ContentDigest,
}

impl Fingerprint {
    /// The cache key.
    pub fn key(&self) -> StageKey {
        let v = serde_json::to_value(self).expect("fingerprint serializes");
        let mut h = blake3::Hasher::new();
        h.update(b"meduet-stage-key\0");
        h.update(&canonical_bytes(&v));
        h.finalize().into()
    }

    /// The fingerprint of one item of a fan-out stage over input `input`.
    pub fn for_item(
        &self,
        input: &str,
        id: &str,
        attrs: &BTreeMap<String, serde_json::Value>,
        digest: ContentDigest,
    ) -> Fingerprint {
        let mut f = self.clone();
        f.inputs.remove(input);
        f.item = Some(ItemFingerprint {
            input: input.to_string(),
            id: id.to_string(),
            attrs: attrs.clone(),
            digest,
        });
        f
    }
}

/// Why a stage will run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DirtyReason {
    /// No earlier run of this stage in this pipeline is recorded.
    NeverRun,
    KindChanged {
        old: String,
        new: String,
    },
    ImplVersionChanged {
        old: u32,
        new: u32,
    },
    KeySchemaChanged {
        old: u32,
        new: u32,
    },
    ParamChanged {
        param: String,
        old: Option<serde_json::Value>,
        new: Option<serde_json::Value>,
    },
    /// A field of what a preset resolves to changed (the preset's definition changed in
    /// the code, or the run before recorded none).
    PresetChanged {
        field: String,
        old: Option<serde_json::Value>,
        new: Option<serde_json::Value>,
    },
    /// The class of device changed for a stage whose bytes depend on it.
    DeviceClassChanged {
        old: Option<crate::resources::DeviceClass>,
        new: Option<crate::resources::DeviceClass>,
    },
    /// The version of shared code the kind runs on changed (the training loop).
    CodeVersionChanged {
        component: String,
        old: Option<u32>,
        new: Option<u32>,
    },
    InputChanged {
        input: String,
        from: Vec<String>,
    },
    /// The key is the same as last time but its object is gone (gc, quarantine).
    ObjectMissing,
    /// An upstream stage has not run yet; the key is unknown until it does.
    UpstreamPending {
        stages: Vec<String>,
    },
    /// A source file of the stage does not exist: it cannot run until it does.
    MissingFile {
        param: String,
        path: String,
    },
    Forced,
}

impl std::fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |v: &Option<serde_json::Value>| match v {
            None => "(unset)".to_string(),
            Some(v) => {
                let s = v.to_string();
                if s.len() > 60 {
                    format!("{}...", &s[..57])
                } else {
                    s
                }
            }
        };
        match self {
            DirtyReason::NeverRun => f.write_str("never run in this pipeline"),
            DirtyReason::KindChanged { old, new } => write!(f, "kind changed: {old} -> {new}"),
            DirtyReason::ImplVersionChanged { old, new } => {
                write!(f, "implementation version changed: {old} -> {new}")
            }
            DirtyReason::KeySchemaChanged { old, new } => {
                write!(f, "key schema changed: {old} -> {new}")
            }
            DirtyReason::ParamChanged { param, old, new } => write!(
                f,
                "parameter '{param}' changed: {} -> {}",
                short(old),
                short(new)
            ),
            DirtyReason::PresetChanged { field, old, new } if field.is_empty() => write!(
                f,
                "resolved preset sizes changed: {} -> {}",
                short(old),
                short(new)
            ),
            DirtyReason::PresetChanged { field, old, new } => write!(
                f,
                "resolved preset field '{field}' changed: {} -> {}",
                short(old),
                short(new)
            ),
            DirtyReason::CodeVersionChanged {
                component,
                old,
                new,
            } => {
                let v = |v: &Option<u32>| v.map_or("(unset)".to_string(), |v| v.to_string());
                write!(f, "{component} version changed: {} -> {}", v(old), v(new))
            }
            DirtyReason::DeviceClassChanged { old, new } => {
                let v = |v: &Option<crate::resources::DeviceClass>| {
                    v.map_or("(unset)".to_string(), |v| v.to_string())
                };
                write!(
                    f,
                    "device class changed: {} -> {} (fp16 autocast runs only on CUDA)",
                    v(old),
                    v(new)
                )
            }
            DirtyReason::InputChanged { input, from } => {
                write!(f, "input '{input}' changed (from {})", from.join(", "))
            }
            DirtyReason::ObjectMissing => {
                f.write_str("same key as the last run, but its object is gone (gc or quarantine)")
            }
            DirtyReason::UpstreamPending { stages } => write!(
                f,
                "waits for {} (its key is known once they have run)",
                stages.join(", ")
            ),
            DirtyReason::MissingFile { param, path } => write!(
                f,
                "cannot run yet: parameter '{param}' names '{path}', which does not exist (see the missing files below)"
            ),
            DirtyReason::Forced => f.write_str("forced (--force)"),
        }
    }
}

/// Differences between the last recorded fingerprint and the current one.
pub fn explain(
    old: Option<&Fingerprint>,
    new: &Fingerprint,
    input_sources: &BTreeMap<String, Vec<String>>,
) -> Vec<DirtyReason> {
    let Some(old) = old else {
        return vec![DirtyReason::NeverRun];
    };
    let mut reasons = Vec::new();
    if old.schema != new.schema {
        reasons.push(DirtyReason::KeySchemaChanged {
            old: old.schema,
            new: new.schema,
        });
    }
    if old.kind != new.kind {
        reasons.push(DirtyReason::KindChanged {
            old: old.kind.clone(),
            new: new.kind.clone(),
        });
    } else if old.kind_version != new.kind_version {
        reasons.push(DirtyReason::ImplVersionChanged {
            old: old.kind_version,
            new: new.kind_version,
        });
    }
    for (param, o, n) in diff_params(&old.params, &new.params) {
        reasons.push(DirtyReason::ParamChanged {
            param,
            old: o,
            new: n,
        });
    }
    match (&old.resolved, &new.resolved) {
        (Some(o), Some(n)) => {
            for (field, o, n) in diff_params(o, n) {
                reasons.push(DirtyReason::PresetChanged {
                    field,
                    old: o,
                    new: n,
                });
            }
        }
        (None, None) => {}
        (o, n) => reasons.push(DirtyReason::PresetChanged {
            field: String::new(),
            old: o.clone(),
            new: n.clone(),
        }),
    }
    if old.device_class != new.device_class {
        reasons.push(DirtyReason::DeviceClassChanged {
            old: old.device_class,
            new: new.device_class,
        });
    }
    let components: std::collections::BTreeSet<&String> =
        old.code.keys().chain(new.code.keys()).collect();
    for c in components {
        if old.code.get(c) != new.code.get(c) {
            reasons.push(DirtyReason::CodeVersionChanged {
                component: c.clone(),
                old: old.code.get(c).copied(),
                new: new.code.get(c).copied(),
            });
        }
    }
    let names: std::collections::BTreeSet<&String> =
        old.inputs.keys().chain(new.inputs.keys()).collect();
    for name in names {
        if old.inputs.get(name) != new.inputs.get(name) {
            reasons.push(DirtyReason::InputChanged {
                input: name.clone(),
                from: input_sources.get(name).cloned().unwrap_or_default(),
            });
        }
    }
    if reasons.is_empty() {
        reasons.push(DirtyReason::ObjectMissing);
    }
    reasons
}

/// What the engine remembers about the last run of one stage in one pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageHistory {
    pub key: StageKey,
    pub fingerprint: Fingerprint,
    #[serde(default)]
    pub outputs: BTreeMap<String, ContentDigest>,
}

/// `roots/<pipeline>.<identity>.json`: the last run of a pipeline file (also the gc roots).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub pipeline: String,
    pub file: String,
    /// Every key the last run used, item objects included (gc roots).
    pub keys: Vec<StageKey>,
    pub stages: BTreeMap<String, StageHistory>,
}

impl History {
    /// Where the history of pipeline `name` with identity `identity` lives.
    pub fn path_for(name: &str, identity: &str) -> String {
        format!(
            "roots/{}.{identity}.json",
            meduet_cache::store::sanitize(name)
        )
    }

    /// Where histories were kept before they were keyed by identity (`roots/<name>.json`).
    pub fn legacy_path_for(name: &str) -> String {
        format!("roots/{}.json", meduet_cache::store::sanitize(name))
    }

    /// The identity of a pipeline file in a cache: 16 hex digits of blake3 over the file's
    /// canonical path relative to the cache folder (so a project moved together with its
    /// cache keeps it, and two files of the same name never share it).
    pub fn identity(file: &std::path::Path, cache_root: &std::path::Path) -> String {
        let file = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
        let root = cache_root
            .canonicalize()
            .unwrap_or_else(|_| cache_root.to_path_buf());
        let rel = pathdiff::diff_paths(&file, &root).unwrap_or(file);
        let h = blake3::hash(rel.to_string_lossy().as_bytes());
        h.to_hex()[..16].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(params: serde_json::Value) -> Fingerprint {
        Fingerprint {
            schema: KEY_SCHEMA_VERSION,
            kind: "k".into(),
            kind_version: 1,
            params,
            resolved: None,
            code: Default::default(),
            device_class: None,
            inputs: BTreeMap::new(),
            item: None,
        }
    }

    #[test]
    fn key_is_stable_and_param_sensitive() {
        let a = fp(serde_json::json!({"lr": 0.0001, "b": [1, 2]}));
        let b = fp(serde_json::json!({"b": [1, 2], "lr": 1e-4}));
        assert_eq!(a.key(), b.key());
        let c = fp(serde_json::json!({"b": [1, 2], "lr": 2e-4}));
        assert_ne!(a.key(), c.key());
        let mut d = a.clone();
        d.kind_version = 2;
        assert_ne!(a.key(), d.key());
    }

    #[test]
    fn explain_names_param_with_old_and_new() {
        let a = fp(serde_json::json!({"lr": 0.1}));
        let b = fp(serde_json::json!({"lr": 0.2}));
        let r = explain(Some(&a), &b, &BTreeMap::new());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].to_string(), "parameter 'lr' changed: 0.1 -> 0.2");
        assert_eq!(
            explain(None, &b, &BTreeMap::new()),
            vec![DirtyReason::NeverRun]
        );
        assert_eq!(
            explain(Some(&b), &b, &BTreeMap::new()),
            vec![DirtyReason::ObjectMissing]
        );
    }

    #[test]
    fn a_preset_enters_the_key_by_what_it_resolves_to() {
        let params = serde_json::json!({"preset": "small", "steps": 10});
        let mut a = fp(params.clone());
        // No presets: the key is that of a fingerprint without the field.
        let without = serde_json::to_value(&a).unwrap();
        assert!(without.get("resolved").is_none());
        a.resolved = Some(serde_json::json!({"depth": 2, "width": 288}));
        let mut b = fp(params);
        b.resolved = Some(serde_json::json!({"depth": 4, "width": 288}));
        assert_ne!(a.key(), b.key(), "same preset name, other sizes");
        let r = explain(Some(&a), &b, &BTreeMap::new());
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].to_string(),
            "resolved preset field 'depth' changed: 2 -> 4"
        );
        // A run recorded before presets entered keys: one reason, not one per field.
        let r = explain(Some(&fp(b.params.clone())), &b, &BTreeMap::new());
        assert_eq!(r.len(), 1);
        assert!(
            r[0].to_string()
                .starts_with("resolved preset sizes changed: (unset) -> {"),
            "{}",
            r[0]
        );
    }

    #[test]
    fn a_shared_code_version_enters_the_key_and_is_explained() {
        let a = fp(serde_json::json!({"steps": 10}));
        // Kinds without shared code: the key is that of a fingerprint without the field.
        assert!(serde_json::to_value(&a).unwrap().get("code").is_none());
        let mut b = a.clone();
        b.code.insert("trainer".into(), 1);
        let mut c = a.clone();
        c.code.insert("trainer".into(), 2);
        assert_ne!(a.key(), b.key());
        assert_ne!(b.key(), c.key());
        let r = explain(Some(&b), &c, &BTreeMap::new());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].to_string(), "trainer version changed: 1 -> 2");
    }
}
