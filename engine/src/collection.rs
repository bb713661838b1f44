//! Collections: per-subject items.
//!
//! One subject = one object. A collection output holds, in `out/<name>/items.json`, the
//! list of its items as `{id, attrs, digest}` (the digest of the item's own files). The
//! collection's output digest therefore depends only on item ids, attributes and
//! content, never on where the items are stored, so early cut-off works per cohort.
//! Where each item lives (which object, which folder) is bookkeeping kept in the meta
//! file `refs.json` of the object; its `keys` are also what `gc` follows from a rooted
//! cohort to its item objects.
//!
//! Items are produced either by a fan-out stage (each item computed as its own object,
//! keyed by the stage's key inputs plus that one input item, so adding a subject
//! computes one new object) or emitted by a whole-stage `run` (for example `ingest`),
//! in which case they live inside that stage's own object under `out/<name>/items/<id>/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meduet_cache::{ContentDigest, StageKey, Store};
use serde::{Deserialize, Serialize};

/// The file listing a collection's items.
pub const ITEMS_FILE: &str = "items.json";
/// The folder holding emitted items inside a collection output.
pub const ITEMS_DIR: &str = "items";
/// The meta file with item locations and referenced keys.
pub const REFS_FILE: &str = meduet_cache::maintenance::REFS_FILE;

/// One item as listed in `items.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemEntry {
    pub id: String,
    #[serde(default)]
    pub attrs: BTreeMap<String, serde_json::Value>,
    pub digest: ContentDigest,
}

/// Where an item's files are: `objects/<key>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemLocation {
    pub key: StageKey,
    pub path: String,
}

/// `refs.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refs {
    /// Keys this object refers to (gc keeps them while this object is rooted).
    pub keys: Vec<StageKey>,
    /// Output name -> item id -> location.
    pub locations: BTreeMap<String, BTreeMap<String, ItemLocation>>,
}

/// An item as a stage sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub attrs: BTreeMap<String, serde_json::Value>,
    pub digest: ContentDigest,
    /// The item's folder.
    pub dir: PathBuf,
}

impl Item {
    /// A string attribute.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).and_then(|v| v.as_str())
    }
    /// An integer attribute.
    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        self.attrs.get(key).and_then(|v| v.as_i64())
    }
}

/// Item ids become folder names: letters, digits, `-`, `_` and `.` only.
pub fn check_item_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 200
        || id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "invalid item id '{id}' (letters, digits, '-', '_' and '.' only)"
        ));
    }
    Ok(())
}

/// Reads the items of collection output `output` of the object in `object_dir`.
pub fn read_items(store: &Store, object_dir: &Path, output: &str) -> Result<Vec<Item>, String> {
    let items_path = object_dir
        .join(meduet_cache::store::OUT_DIR)
        .join(output)
        .join(ITEMS_FILE);
    let text = std::fs::read_to_string(&items_path)
        .map_err(|e| format!("cannot read '{}': {e}", items_path.display()))?;
    let entries: Vec<ItemEntry> = serde_json::from_str(&text)
        .map_err(|e| format!("corrupt '{}': {e}", items_path.display()))?;
    let refs_path = object_dir.join(REFS_FILE);
    let refs: Refs = match std::fs::read_to_string(&refs_path) {
        Ok(t) => serde_json::from_str(&t)
            .map_err(|e| format!("corrupt '{}': {e}", refs_path.display()))?,
        Err(_) => Refs::default(),
    };
    let locs = refs.locations.get(output);
    entries
        .into_iter()
        .map(|e| {
            let dir = match locs.and_then(|l| l.get(&e.id)) {
                Some(loc) => store.object_dir(&loc.key).join(&loc.path),
                None => object_dir
                    .join(meduet_cache::store::OUT_DIR)
                    .join(output)
                    .join(ITEMS_DIR)
                    .join(&e.id),
            };
            if !dir.is_dir() {
                return Err(format!(
                    "item '{}' of '{}' is missing at '{}' (hint: run 'meduet verify' and rerun)",
                    e.id,
                    output,
                    dir.display()
                ));
            }
            Ok(Item {
                id: e.id,
                attrs: e.attrs,
                digest: e.digest,
                dir,
            })
        })
        .collect()
}

/// Writes `items.json` into an output folder.
pub fn write_items(out_dir: &Path, entries: &[ItemEntry]) -> std::io::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let text = serde_json::to_vec_pretty(entries).expect("items serialize");
    std::fs::write(out_dir.join(ITEMS_FILE), text)
}
