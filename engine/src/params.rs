//! Parameters: typed parsing, canonical form, and source paths.
//!
//! Stage parameters are parsed from the TOML table into the kind's typed `Params`
//! struct (unknown keys rejected, every mistyped value reported with its path and the
//! expected type), then serialised back to JSON. That JSON, with defaults filled in and
//! keys sorted, is the *canonical* form that enters the cache key: `lr = 1e-4` and
//! `lr = 0.0001` are the same key, and so is leaving a default unwritten.
//!
//! Source paths (raw datasets, imported weights) are [`SourcePath`] fields. They are
//! serialised as `{"$source": "<path>"}` so the engine can find them; at plan time each
//! is resolved (relative to the pipeline file that wrote it), its files hashed by
//! content, and in the key it is replaced by `{"$source_digest": <Merkle root>}`. No
//! absolute path ever enters a key: moving the data reruns nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meduet_cache::{ContentDigest, DigestMemo, TreeEntry};
use serde::{Deserialize, Serialize};

/// A path to source data given by the user: a file, a folder, or a glob pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePath(String);

const SOURCE_TAG: &str = "$source";
const SOURCE_DIGEST_TAG: &str = "$source_digest";

impl SourcePath {
    pub fn new(p: impl Into<String>) -> Self {
        Self(p.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl Serialize for SourcePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = BTreeMap::new();
        m.insert(SOURCE_TAG, &self.0);
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SourcePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Plain(String),
            Tagged(BTreeMap<String, String>),
        }
        match Repr::deserialize(d)
            .map_err(|_| serde::de::Error::custom("invalid type, expected a path string"))?
        {
            Repr::Plain(s) => Ok(SourcePath(s)),
            Repr::Tagged(m) => m
                .get(SOURCE_TAG)
                .cloned()
                .map(SourcePath)
                .ok_or_else(|| serde::de::Error::custom("expected a path string")),
        }
    }
}

/// The resolved content of a source path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTree {
    /// The absolute path (file, folder, or the folder a glob was taken from).
    pub root: PathBuf,
    /// Files relative to `root`, sorted, with sizes and digests.
    pub files: Vec<TreeEntry>,
    /// Merkle root over `files`.
    pub digest: ContentDigest,
}

impl SourceTree {
    /// Absolute path of a file of the tree.
    pub fn path_of(&self, rel: &str) -> PathBuf {
        if self.files.len() == 1 && self.files[0].path == rel && self.root.is_file() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Resolves and hashes one source path. `base` is the folder of the pipeline file
/// that wrote it.
pub fn resolve_source(raw: &str, base: &Path, memo: &DigestMemo) -> Result<SourceTree, String> {
    let abs = source_path(raw, base);
    let abs_str = abs.to_string_lossy().into_owned();
    if has_glob(&abs_str) {
        let prefix: PathBuf = abs
            .components()
            .take_while(|c| !has_glob(&c.as_os_str().to_string_lossy()))
            .collect();
        let mut files = Vec::new();
        let paths =
            glob::glob(&abs_str).map_err(|e| format!("invalid glob pattern '{raw}': {e}"))?;
        for p in paths {
            let p = p.map_err(|e| format!("cannot read '{}': {e}", e.path().display()))?;
            if p.is_file() {
                files.push(p);
            }
        }
        if files.is_empty() {
            return Err(format!(
                "glob '{raw}' matches no file (resolved to '{abs_str}')"
            ));
        }
        files.sort();
        let entries = hash_listed(&prefix, &files, memo)?;
        let digest = meduet_cache::hashing::merkle_root(&entries);
        return Ok(SourceTree {
            root: prefix,
            files: entries,
            digest,
        });
    }
    if !abs.exists() {
        return Err(format!(
            "path '{raw}' does not exist (resolved to '{}')",
            abs.display()
        ));
    }
    let abs = abs.canonicalize().unwrap_or(abs);
    let (files, digest) = meduet_cache::hash_tree(&abs, Some(memo))
        .map_err(|e| format!("cannot hash '{}': {e}", abs.display()))?;
    Ok(SourceTree {
        root: abs,
        files,
        digest,
    })
}

fn hash_listed(
    prefix: &Path,
    files: &[PathBuf],
    memo: &DigestMemo,
) -> Result<Vec<TreeEntry>, String> {
    use rayon::prelude::*;
    files
        .par_iter()
        .map(|p| {
            let (digest, _) = memo
                .digest(p)
                .map_err(|e| format!("cannot hash '{}': {e}", p.display()))?;
            let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let rel = p
                .strip_prefix(prefix)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned();
            Ok(TreeEntry {
                path: rel,
                size,
                digest,
            })
        })
        .collect()
}

fn expand_home(s: &str) -> String {
    match (s.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => format!("{home}/{rest}"),
        _ => s.to_string(),
    }
}

/// Where a source path written in a pipeline file points: `~/` expanded, a relative path
/// joined to `base` (the folder of the file that wrote it). Not canonicalised, so a path
/// that does not exist yet resolves too.
pub fn source_path(raw: &str, base: &Path) -> PathBuf {
    let expanded = expand_home(raw);
    if Path::new(&expanded).is_absolute() {
        PathBuf::from(expanded)
    } else {
        base.join(expanded)
    }
}

/// Whether a source path is missing (the file may still be made, e.g. by an optional
/// setup script): `Ok(true)` when it does not exist or a glob matches no file, `Err` when
/// it can never be valid (a malformed glob pattern).
pub fn source_missing(raw: &str, base: &Path) -> Result<bool, String> {
    let abs = source_path(raw, base);
    let s = abs.to_string_lossy();
    if has_glob(&s) {
        let any = glob::glob(&s)
            .map_err(|e| format!("invalid glob pattern '{raw}': {e}"))?
            .filter_map(|p| p.ok())
            .any(|p| p.is_file());
        return Ok(!any);
    }
    Ok(!abs.exists())
}

/// Finds every `{"$source": ...}` in `params`, calling `f(json_path, raw_path)`.
pub fn visit_sources(params: &serde_json::Value, mut f: impl FnMut(&str, &str)) {
    fn walk(v: &serde_json::Value, path: &str, f: &mut dyn FnMut(&str, &str)) {
        match v {
            serde_json::Value::Object(m) => {
                if let (Some(serde_json::Value::String(s)), 1) = (m.get(SOURCE_TAG), m.len()) {
                    f(path, s);
                    return;
                }
                for (k, x) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x, &p, f);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), f);
                }
            }
            _ => {}
        }
    }
    walk(params, "", &mut f);
}

/// Rewrites every source marker: `f(raw)` gives the replacement value.
pub fn map_sources(
    params: &serde_json::Value,
    f: &dyn Fn(&str) -> serde_json::Value,
) -> serde_json::Value {
    match params {
        serde_json::Value::Object(m) => {
            if let (Some(serde_json::Value::String(s)), 1) = (m.get(SOURCE_TAG), m.len()) {
                return f(s);
            }
            serde_json::Value::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), map_sources(v, f)))
                    .collect(),
            )
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.iter().map(|v| map_sources(v, f)).collect())
        }
        other => other.clone(),
    }
}

/// The key form of a resolved source.
pub fn source_key_value(tree: &SourceTree) -> serde_json::Value {
    serde_json::json!({ SOURCE_DIGEST_TAG: tree.digest.to_hex(), "files": tree.files.len() })
}

/// The runtime form of a resolved source (the absolute path).
pub fn source_runtime_value(tree_root_or_pattern: &Path) -> serde_json::Value {
    serde_json::json!({ SOURCE_TAG: tree_root_or_pattern.to_string_lossy() })
}

/// Finds absolute-path-looking strings outside source markers (they would put a
/// machine-specific path into a key).
pub fn find_absolute_paths(params: &serde_json::Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    fn walk(v: &serde_json::Value, path: &str, found: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::String(s)
                if s.starts_with('/') && s.len() > 1 && !s.contains(' ') =>
            {
                found.push((path.to_string(), s.clone()))
            }
            serde_json::Value::Object(m) => {
                if m.contains_key(SOURCE_TAG) || m.contains_key(SOURCE_DIGEST_TAG) {
                    return;
                }
                for (k, x) in m {
                    walk(
                        x,
                        &if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        },
                        found,
                    );
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), found);
                }
            }
            _ => {}
        }
    }
    walk(params, "", &mut found);
    found
}

/// Canonical bytes of a JSON value: compact, object keys sorted at every level (sorted
/// explicitly: another crate in the build may switch on serde_json's `preserve_order`),
/// numbers in serde_json's shortest round-trip form.
pub fn canonical_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&sorted(v)).expect("json serializes")
}

fn sorted(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            serde_json::Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Lists the differences between two parameter sets as `(path, old, new)`.
pub fn diff_params(
    old: &serde_json::Value,
    new: &serde_json::Value,
) -> Vec<(String, Option<serde_json::Value>, Option<serde_json::Value>)> {
    let mut out = Vec::new();
    fn walk(
        a: Option<&serde_json::Value>,
        b: Option<&serde_json::Value>,
        path: String,
        out: &mut Vec<(String, Option<serde_json::Value>, Option<serde_json::Value>)>,
    ) {
        match (a, b) {
            (Some(serde_json::Value::Object(x)), Some(serde_json::Value::Object(y)))
                if !x.contains_key(SOURCE_DIGEST_TAG) =>
            {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x.get(k), y.get(k), p, out);
                }
            }
            (a, b) if a != b => out.push((path, a.cloned(), b.cloned())),
            _ => {}
        }
    }
    walk(Some(old), Some(new), String::new(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_path_round_trip() {
        let s = SourcePath::new("data/x");
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v, serde_json::json!({"$source": "data/x"}));
        let back: SourcePath = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        let plain: SourcePath = serde_json::from_value(serde_json::json!("a/b")).unwrap();
        assert_eq!(plain.as_str(), "a/b");
    }

    #[test]
    fn diff_lists_changed_leaves() {
        let a = serde_json::json!({"lr": 0.1, "opt": {"b1": 0.9, "b2": 0.95}});
        let b = serde_json::json!({"lr": 0.2, "opt": {"b1": 0.9, "b2": 0.99}, "new": 1});
        let d = diff_params(&a, &b);
        let paths: Vec<&str> = d.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(paths, ["lr", "new", "opt.b2"]);
    }

    #[test]
    fn resolve_source_by_content_not_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let memo = DigestMemo::new(a.path().join("memo"));
        for d in [a.path(), b.path()] {
            std::fs::create_dir_all(d.join("data")).unwrap();
            std::fs::write(d.join("data/x.nii"), b"1").unwrap();
            std::fs::write(d.join("data/y.nii"), b"2").unwrap();
            std::fs::write(d.join("data/z.txt"), b"3").unwrap();
        }
        let ta = resolve_source("data", a.path(), &memo).unwrap();
        let tb = resolve_source(
            &b.path().join("data").to_string_lossy(),
            Path::new("/"),
            &memo,
        )
        .unwrap();
        assert_eq!(ta.digest, tb.digest);
        let g = resolve_source("data/*.nii", a.path(), &memo).unwrap();
        assert_eq!(g.files.len(), 2);
        assert_eq!(g.files[0].path, "x.nii");
        let e = resolve_source("nope/*.nii", a.path(), &memo).unwrap_err();
        assert!(e.contains("matches no file"), "{e}");
        let e = resolve_source("missing", a.path(), &memo).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }
}
