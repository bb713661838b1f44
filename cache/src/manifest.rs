//! The manifest of an object: the only proof that an object exists.
//!
//! `objects/<key>/manifest.json` lists every file of the object with its size and blake3
//! digest. Files under `out/<name>/` make up the named output `<name>`; each output's
//! digest is the Merkle root of its files (relative to `out/<name>/`), which is what
//! downstream keys depend on (early cut-off). Every other file of the object (the stage
//! log, metrics, the run record, engine bookkeeping) is a *meta* file: verified, but
//! never part of an output digest, because logs and timings differ between runs that
//! produce identical outputs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::{ContentDigest, StageKey};
use crate::hashing::{merkle_root, TreeEntry};

/// Format version of `manifest.json`.
pub const MANIFEST_FORMAT: u32 = 1;

/// Size and digest of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub digest: ContentDigest,
}

/// One named output of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEntry {
    /// Merkle root over `files`.
    pub digest: ContentDigest,
    /// Paths relative to `out/<name>/`.
    pub files: BTreeMap<String, FileEntry>,
}

impl OutputEntry {
    /// Builds the entry (and its Merkle digest) from its files.
    pub fn from_files(files: BTreeMap<String, FileEntry>) -> Self {
        let digest = merkle_root(&tree_entries(&files));
        Self { digest, files }
    }

    /// Recomputes the Merkle digest from the listed files.
    pub fn recomputed_digest(&self) -> ContentDigest {
        merkle_root(&tree_entries(&self.files))
    }
}

fn tree_entries(files: &BTreeMap<String, FileEntry>) -> Vec<TreeEntry> {
    files
        .iter()
        .map(|(p, f)| TreeEntry {
            path: p.clone(),
            size: f.size,
            digest: f.digest,
        })
        .collect()
}

/// Who made an object (informational: used by `gc` and `show` reports).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The stage name in the pipeline that first produced it.
    pub stage: String,
    /// The stage kind.
    pub kind: String,
    /// For per-item objects of a fan-out stage: the item id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: StageKey,
    pub provenance: Provenance,
    pub outputs: BTreeMap<String, OutputEntry>,
    /// Files outside `out/` (relative to the object folder), excluding the manifest itself.
    pub meta_files: BTreeMap<String, FileEntry>,
    /// Seconds since the Unix epoch at commit time.
    pub created_unix: u64,
}

impl Manifest {
    /// Total bytes of every listed file.
    pub fn total_bytes(&self) -> u64 {
        let out: u64 = self
            .outputs
            .values()
            .flat_map(|o| o.files.values())
            .map(|f| f.size)
            .sum();
        out + self.meta_files.values().map(|f| f.size).sum::<u64>()
    }
}
