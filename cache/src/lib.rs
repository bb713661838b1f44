//! # meduet-cache
//!
//! The content-addressed object store under every meduet run. It knows nothing about
//! pipelines or tensors: it stores *objects* (folders of files) under *keys*, proves
//! their existence with manifests, and coordinates processes with per-key leases.
//!
//! - [`digest`]: typed digests ([`ContentDigest`] vs [`StageKey`]).
//! - [`hashing`]: parallel memory-mapped blake3 of files and trees, with a stat-keyed memo.
//! - [`manifest`]: what an object contains; output digests (Merkle roots).
//! - [`store`]: the folder layout and the atomic commit protocol.
//! - [`lease`]: one O_EXCL lease per key, heartbeats, automatic breaking of stale leases.
//! - [`live`]: the keys running processes use, kept by `gc` while they live.
//! - [`records`]: run records.
//! - [`maintenance`]: `gc` and `verify`.

pub mod digest;
pub mod error;
pub mod hashing;
pub mod lease;
pub mod live;
pub mod maintenance;
pub mod manifest;
pub mod records;
pub mod store;

pub use digest::{ContentDigest, StageKey};
pub use error::{CacheError, Result};
pub use hashing::{hash_file, hash_tree, DigestMemo, TreeEntry};
pub use lease::{Acquired, LeaseGuard, LeaseInfo, LeaseOptions};
pub use live::{LiveRoot, LiveRootInfo};
pub use manifest::{FileEntry, Manifest, OutputEntry, Provenance};
pub use records::{RunRecord, RunStatus, Versions};
pub use store::{Object, Staging, Store};
