//! The object store.
//!
//! ```text
//! <cache>/
//!   objects/<key>/manifest.json      written last; the object exists iff this exists
//!   objects/<key>/out/<output>/...   the stage's outputs (digested)
//!   objects/<key>/log.txt ...        meta files (verified, not digested)
//!   tmp/<key>.<unique>/              objects being written
//!   leases/<key>.lease               one lease per key (see `lease`)
//!   scratch/<key>/                   resumable checkpoints of long stages
//!   runs/<time>-<stage>-<key>.json   a run record per execution (see `records`)
//!   roots/<name>.<identity>.json     gc roots: keys of the last run of each pipeline file
//!   pins/<name>                      gc roots: pinned keys, one per line
//!   live/<host>-<pid>-<n>.json       gc roots: keys a running process uses (see `live`)
//!   gc.lock                          held by gc while it sweeps (see `live`)
//!   memo/                            file-digest memo (see `hashing`)
//!   quarantine/<key>.<time>.<n>/     objects that failed verification
//! ```
//!
//! Commit protocol: a stage writes into `tmp/<key>.<unique>/`, every file is hashed and
//! fsynced, `manifest.json` is written and fsynced last, and the folder is renamed to
//! `objects/<key>`. A crash at any point leaves at worst a `tmp/` folder, which no run
//! ever trusts. A failed or cancelled stage never commits (the [`Staging`] guard removes
//! its folder when dropped).
//!
//! Committed files are made read-only, and an object whose manifest lists a file that is
//! gone is not an object ([`Store::load`] says `None`, so plan and run recompute it, and
//! the recomputed object replaces it). [`Store::check_files`] compares an object's files
//! with its manifest (sizes, and digests through the memo, so an unchanged file is not
//! re-read): executors call it on a stage's inputs before the stage reads them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use crate::digest::StageKey;
use crate::error::{CacheError, IoContext, Result};
use crate::hashing::{hash_file, list_files, sync_dir, unique_suffix, write_atomic, DigestMemo};
use crate::manifest::{FileEntry, Manifest, OutputEntry, Provenance, MANIFEST_FORMAT};

/// Name of the manifest file inside an object folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Folder of the outputs inside an object folder.
pub const OUT_DIR: &str = "out";

/// A cache folder.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A committed object.
#[derive(Debug, Clone)]
pub struct Object {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Object {
    /// Every file the manifest lists, relative to the object folder.
    pub fn listed_files(&self) -> impl Iterator<Item = String> + '_ {
        let outputs = self.manifest.outputs.iter().flat_map(|(name, out)| {
            out.files
                .keys()
                .map(move |rel| format!("{OUT_DIR}/{name}/{rel}"))
        });
        outputs.chain(self.manifest.meta_files.keys().cloned())
    }

    pub fn key(&self) -> StageKey {
        self.manifest.key
    }

    /// The folder of output `name` (which may not exist if the output is empty).
    pub fn output_dir(&self, name: &str) -> PathBuf {
        self.dir.join(OUT_DIR).join(name)
    }

    /// Path of a meta file.
    pub fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Store {
    /// Opens (creating if needed) the cache folder `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in [
            "objects", "tmp", "leases", "scratch", "runs", "roots", "pins", "memo",
        ] {
            let p = root.join(sub);
            fs::create_dir_all(&p).at(&p)?;
        }
        Ok(Self { root })
    }

    /// Opens an existing cache folder without creating anything.
    pub fn open_existing(root: impl Into<PathBuf>) -> Option<Self> {
        let root = root.into();
        root.join("objects").is_dir().then_some(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_dir(&self, key: &StageKey) -> PathBuf {
        self.root.join("objects").join(key.to_hex())
    }

    pub fn lease_path(&self, key: &StageKey) -> PathBuf {
        self.root
            .join("leases")
            .join(format!("{}.lease", key.to_hex()))
    }

    /// The file-digest memo of this cache.
    pub fn memo(&self) -> DigestMemo {
        DigestMemo::new(self.root.join("memo"))
    }

    /// Whether a whole committed object exists for `key`: its manifest, and every file
    /// the manifest lists (see [`Store::load`]).
    pub fn contains(&self, key: &StageKey) -> bool {
        self.load(key).is_ok_and(|o| o.is_some())
    }

    /// Loads the object for `key`, if committed and whole: an object whose manifest
    /// lists a file that is gone is treated as absent (with a warning), so that it is
    /// recomputed rather than failing every stage that reads it.
    pub fn load(&self, key: &StageKey) -> Result<Option<Object>> {
        let Some(obj) = self.load_manifest(key)? else {
            return Ok(None);
        };
        if let Some(rel) = obj.listed_files().find(|rel| !obj.dir.join(rel).exists()) {
            tracing::warn!(
                key = %key.short(),
                "object {} lacks its file '{rel}': treated as gone (the next run recomputes it)",
                obj.dir.display()
            );
            return Ok(None);
        }
        Ok(Some(obj))
    }

    /// Compares the files of `output` of `obj` (every output when `None`) with its
    /// manifest: presence, size, and the blake3 digest through the memo (a file whose
    /// inode, size and mtime are unchanged since it was last hashed is not re-read).
    /// Returns the first difference, naming the file.
    pub fn check_files(
        &self,
        obj: &Object,
        output: Option<&str>,
    ) -> std::result::Result<(), String> {
        let memo = self.memo();
        let files: Vec<(String, &FileEntry)> = obj
            .manifest
            .outputs
            .iter()
            .filter(|(name, _)| output.is_none_or(|o| o == name.as_str()))
            .flat_map(|(name, out)| {
                out.files
                    .iter()
                    .map(move |(rel, f)| (format!("{OUT_DIR}/{name}/{rel}"), f))
            })
            .collect();
        files.par_iter().try_for_each(|(rel, f)| {
            let path = obj.dir.join(rel);
            let size = fs::metadata(&path)
                .map_err(|e| format!("file '{}': {e}", path.display()))?
                .len();
            if size != f.size {
                return Err(format!(
                    "file '{}' has {size} bytes, its manifest says {}",
                    path.display(),
                    f.size
                ));
            }
            let (digest, _) = memo
                .digest(&path)
                .map_err(|e| format!("file '{}': {e}", path.display()))?;
            if digest != f.digest {
                return Err(format!(
                    "file '{}' has digest {}, its manifest says {}",
                    path.display(),
                    digest.short(),
                    f.digest.short()
                ));
            }
            Ok(())
        })
    }

    /// Reads and checks the manifest of `key`, without looking at the files.
    fn load_manifest(&self, key: &StageKey) -> Result<Option<Object>> {
        let dir = self.object_dir(key);
        let path = dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(&path),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| CacheError::CorruptManifest {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if manifest.key != *key {
            return Err(CacheError::CorruptManifest {
                path,
                message: format!(
                    "manifest names key {} but lives under {}",
                    manifest.key, key
                ),
            });
        }
        Ok(Some(Object { dir, manifest }))
    }

    /// Starts writing the object for `key` in a fresh temporary folder.
    pub fn stage(&self, key: StageKey) -> Result<Staging> {
        let dir = self
            .root
            .join("tmp")
            .join(format!("{}.{}", key.to_hex(), unique_suffix()));
        fs::create_dir_all(dir.join(OUT_DIR)).at(&dir)?;
        Ok(Staging {
            store: self.clone(),
            key,
            dir,
            done: false,
        })
    }

    /// The resumable scratch folder of `key` (created). Long stages keep checkpoints here;
    /// it is removed when the object commits.
    pub fn scratch_dir(&self, key: &StageKey) -> Result<PathBuf> {
        let p = self.root.join("scratch").join(key.to_hex());
        fs::create_dir_all(&p).at(&p)?;
        Ok(p)
    }

    /// Keys of every committed object.
    pub fn object_keys(&self) -> Result<Vec<StageKey>> {
        let dir = self.root.join("objects");
        let mut keys = Vec::new();
        for e in fs::read_dir(&dir).at(&dir)? {
            let e = e.at(&dir)?;
            if let Ok(k) = StageKey::parse_hex(&e.file_name().to_string_lossy()) {
                if e.path().join(MANIFEST_FILE).is_file() {
                    keys.push(k);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Moves an object out of `objects/` into `quarantine/` so that the next run
    /// recomputes it. Returns the quarantine path.
    pub fn quarantine(&self, key: &StageKey) -> Result<PathBuf> {
        let qdir = self.root.join("quarantine");
        fs::create_dir_all(&qdir).at(&qdir)?;
        let dest = qdir.join(format!(
            "{}.{}.{}",
            key.to_hex(),
            now_unix(),
            unique_suffix()
        ));
        let src = self.object_dir(key);
        fs::rename(&src, &dest).at(&src)?;
        Ok(dest)
    }

    /// Writes the gc roots of a pipeline: every key its last run used.
    pub fn write_roots(&self, name: &str, keys: &[StageKey]) -> Result<()> {
        let path = self
            .root
            .join("roots")
            .join(format!("{}.json", sanitize(name)));
        let json = serde_json::json!({ "pipeline": name, "keys": keys });
        write_atomic(
            &path,
            serde_json::to_string_pretty(&json).unwrap().as_bytes(),
            false,
        )
        .at(&path)
    }

    /// Pins keys under a name (gc never removes them).
    pub fn pin(&self, name: &str, keys: &[StageKey]) -> Result<()> {
        let path = self.root.join("pins").join(sanitize(name));
        let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
        write_atomic(&path, text.as_bytes(), false).at(&path)
    }

    /// Reads a JSON file under the cache root (for engine bookkeeping files).
    pub fn read_json<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Result<Option<T>> {
        let path = self.root.join(rel);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CacheError::CorruptJson {
                    path,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).at(&path),
        }
    }

    /// Writes a JSON file under the cache root atomically.
    pub fn write_json<T: serde::Serialize>(&self, rel: &str, value: &T) -> Result<()> {
        let path = self.root.join(rel);
        let text = serde_json::to_vec_pretty(value).expect("serializable");
        write_atomic(&path, &text, false).at(&path)
    }
}

/// Replaces characters that do not belong in a file name.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An object being written. Dropping it without [`Staging::commit`] deletes its folder.
#[derive(Debug)]
pub struct Staging {
    store: Store,
    key: StageKey,
    dir: PathBuf,
    done: bool,
}

impl Staging {
    pub fn key(&self) -> StageKey {
        self.key
    }

    /// The object folder being written (meta files go directly here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of output `name`, created.
    pub fn output_dir(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name.contains('\\') {
            return Err(CacheError::BadOutputName(name.to_string()));
        }
        let p = self.dir.join(OUT_DIR).join(name);
        fs::create_dir_all(&p).at(&p)?;
        Ok(p)
    }

    /// Hashes and fsyncs every file, writes the manifest last and renames the folder into
    /// `objects/`. If another process committed the same key meanwhile, its object is
    /// kept and this one discarded (both are valid results of the same key).
    pub fn commit(mut self, provenance: Provenance) -> Result<Object> {
        let files = list_files(&self.dir).at(&self.dir)?;
        let hashed: Vec<(String, FileEntry)> = files
            .par_iter()
            .filter(|(rel, _)| rel != MANIFEST_FILE)
            .map(|(rel, abs)| {
                let f = fs::File::open(abs).at(abs)?;
                f.sync_all().at(abs)?;
                let meta = f.metadata().at(abs)?;
                let size = meta.len();
                let digest = hash_file(abs).at(abs)?;
                // Committed files are immutable: read-only for everyone.
                let mut perms = meta.permissions();
                perms.set_readonly(true);
                fs::set_permissions(abs, perms).at(abs)?;
                Ok((rel.clone(), FileEntry { size, digest }))
            })
            .collect::<Result<_>>()?;
        let mut outputs: BTreeMap<String, BTreeMap<String, FileEntry>> = BTreeMap::new();
        let mut meta_files = BTreeMap::new();
        // Every created output folder is an output, even when empty.
        let out_root = self.dir.join(OUT_DIR);
        for e in fs::read_dir(&out_root).at(&out_root)? {
            let e = e.at(&out_root)?;
            if e.path().is_dir() {
                outputs.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    BTreeMap::new(),
                );
            }
        }
        for (rel, entry) in hashed {
            match rel.strip_prefix("out/") {
                Some(rest) => {
                    let (name, inner) = rest.split_once('/').ok_or_else(|| {
                        CacheError::BadOutputName(format!("{rest} (a file directly under out/)"))
                    })?;
                    outputs
                        .entry(name.to_string())
                        .or_default()
                        .insert(inner.to_string(), entry);
                }
                None => {
                    meta_files.insert(rel, entry);
                }
            }
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: self.key,
            provenance,
            outputs: outputs
                .into_iter()
                .map(|(n, f)| (n, OutputEntry::from_files(f)))
                .collect(),
            meta_files,
            created_unix: now_unix(),
        };
        let mpath = self.dir.join(MANIFEST_FILE);
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        write_atomic(&mpath, &text, true).at(&mpath)?;
        let mut perms = fs::metadata(&mpath).at(&mpath)?.permissions();
        perms.set_readonly(true);
        fs::set_permissions(&mpath, perms).at(&mpath)?;
        for d in walk_dirs(&self.dir) {
            sync_dir(&d).at(&d)?;
        }
        let dest = self.store.object_dir(&self.key);
        if dest.exists() && !dest.join(MANIFEST_FILE).is_file() {
            // A folder without a manifest is never an object (left by a quarantine
            // interrupted half-way, for instance): replace it.
            fs::remove_dir_all(&dest).at(&dest)?;
        } else if dest.exists() && self.store.load(&self.key)?.is_none() {
            // An object that lost a file: move it aside and commit the new one.
            let q = self.store.quarantine(&self.key)?;
            tracing::warn!(key = %self.key.short(), "replacing an object that lost files (moved to {})", q.display());
        }
        match fs::rename(&self.dir, &dest) {
            Ok(()) => {
                self.done = true;
                let objects = self.store.root.join("objects");
                sync_dir(&objects).at(&objects)?;
                let scratch = self.store.root.join("scratch").join(self.key.to_hex());
                let _ = fs::remove_dir_all(scratch);
                Ok(Object {
                    dir: dest,
                    manifest,
                })
            }
            Err(_) if dest.join(MANIFEST_FILE).is_file() => {
                tracing::info!(key = %self.key.short(), "object committed concurrently by another process; keeping it");
                self.store
                    .load(&self.key)?
                    .ok_or_else(|| CacheError::CorruptManifest {
                        path: dest.join(MANIFEST_FILE),
                        message: "an object committed concurrently lacks files".into(),
                    })
            }
            Err(e) => Err(e).at(&dest),
        }
    }
}

fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_dir())
        .map(|e| e.into_path())
        .collect()
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::ContentDigest;

    fn key(n: u8) -> StageKey {
        StageKey::from_bytes([n; 32])
    }

    #[test]
    fn commit_writes_manifest_with_output_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let st = store.stage(key(1)).unwrap();
        let out = st.output_dir("volumes").unwrap();
        fs::write(out.join("a.txt"), b"alpha").unwrap();
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("sub/b.txt"), b"beta").unwrap();
        st.output_dir("empty").unwrap();
        fs::write(st.dir().join("log.txt"), b"some log").unwrap();
        assert!(!store.contains(&key(1)));
        let obj = st
            .commit(Provenance {
                stage: "s".into(),
                kind: "k".into(),
                item: None,
            })
            .unwrap();
        assert!(store.contains(&key(1)));
        let m = &obj.manifest;
        assert_eq!(m.outputs["volumes"].files.len(), 2);
        assert_eq!(
            m.outputs["volumes"].files["a.txt"].digest,
            ContentDigest::of_bytes(b"alpha")
        );
        assert!(m.outputs["empty"].files.is_empty());
        assert!(m.meta_files.contains_key("log.txt"));
        assert_eq!(
            m.outputs["volumes"].digest,
            m.outputs["volumes"].recomputed_digest()
        );
        let loaded = store.load(&key(1)).unwrap().unwrap();
        assert_eq!(loaded.manifest, *m);
        assert_eq!(store.object_keys().unwrap(), vec![key(1)]);
        assert!(fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        {
            let st = store.stage(key(2)).unwrap();
            fs::write(st.output_dir("x").unwrap().join("f"), b"partial").unwrap();
        }
        assert!(!store.contains(&key(2)));
        assert!(fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn output_digest_does_not_depend_on_meta_or_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut digests = Vec::new();
        for (k, log) in [(3u8, "log one"), (4u8, "another log")] {
            let st = store.stage(key(k)).unwrap();
            fs::write(st.output_dir("o").unwrap().join("f"), b"same").unwrap();
            fs::write(st.dir().join("log.txt"), log).unwrap();
            digests.push(st.commit(Provenance::default()).unwrap().manifest.outputs["o"].digest);
        }
        assert_eq!(digests[0], digests[1]);
    }

    #[test]
    fn concurrent_commit_keeps_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.stage(key(5)).unwrap();
        let b = store.stage(key(5)).unwrap();
        fs::write(a.output_dir("o").unwrap().join("f"), b"1").unwrap();
        fs::write(b.output_dir("o").unwrap().join("f"), b"1").unwrap();
        a.commit(Provenance::default()).unwrap();
        let obj = b.commit(Provenance::default()).unwrap();
        assert_eq!(obj.key(), key(5));
        assert!(fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn quarantine_removes_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let st = store.stage(key(6)).unwrap();
        fs::write(st.output_dir("o").unwrap().join("f"), b"1").unwrap();
        st.commit(Provenance::default()).unwrap();
        let q = store.quarantine(&key(6)).unwrap();
        assert!(q.join(MANIFEST_FILE).is_file());
        assert!(!store.contains(&key(6)));
    }
}
