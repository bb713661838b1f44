//! Hashing source files by content, fast.
//!
//! Raw datasets can be terabytes, and hashing them is the top complaint against DVC and
//! Snakemake. meduet hashes with blake3 over memory maps on all cores
//! ([`blake3::Hasher::update_mmap_rayon`]) and remembers each file's digest in a
//! [`DigestMemo`] keyed by `(device, inode, size, mtime_ns)`. The content digest is the
//! truth; the stat tuple only finds the remembered digest. Files modified within the
//! last two seconds are never memoised (the "racy git" problem: a write in the same
//! mtime tick would otherwise be missed).
//!
//! A tree of files (a dataset folder, an object's output) is digested as a Merkle root
//! over its sorted `(relative path, size, digest)` entries ([`merkle_root`]); absolute
//! paths never enter it, so moving a folder does not change its digest.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::ContentDigest;

/// Version tag of the tree digest format. Changing [`merkle_root`] requires a new tag.
const TREE_TAG: &[u8] = b"meduet-tree-v1\0";

/// Digest of one file's bytes (memory-mapped, multithreaded for large files).
pub fn hash_file(path: &Path) -> io::Result<ContentDigest> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize().into())
}

/// One file of a tree: its path relative to the tree root (with `/` separators), size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub path: String,
    pub size: u64,
    pub digest: ContentDigest,
}

/// Merkle root over tree entries. Entries are sorted by path first, so the order given
/// does not matter.
pub fn merkle_root(entries: &[TreeEntry]) -> ContentDigest {
    let mut sorted: Vec<&TreeEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    h.update(TREE_TAG);
    for e in sorted {
        h.update(e.path.as_bytes());
        h.update(&[0]);
        h.update(&e.size.to_le_bytes());
        h.update(e.digest.as_bytes());
    }
    h.finalize().into()
}

/// Lists the regular files under `root` (recursively, following no symlinks to folders),
/// as sorted relative paths with `/` separators. A single file lists as itself with an
/// empty relative path replaced by its file name.
pub fn list_files(root: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let meta = fs::metadata(root)?;
    if meta.is_file() {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(vec![(name, root.to_path_buf())]);
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_file() {
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("walkdir yields paths under its root");
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, entry.path().to_path_buf()));
        }
    }
    Ok(out)
}

/// Hashes every file under `root` in parallel (through the memo when given) and returns
/// the entries and their Merkle root.
pub fn hash_tree(
    root: &Path,
    memo: Option<&DigestMemo>,
) -> io::Result<(Vec<TreeEntry>, ContentDigest)> {
    let files = list_files(root)?;
    let entries = files
        .par_iter()
        .map(|(rel, abs)| {
            let size = fs::metadata(abs)?.len();
            let digest = match memo {
                Some(m) => m.digest(abs)?.0,
                None => hash_file(abs)?,
            };
            Ok(TreeEntry {
                path: rel.clone(),
                size,
                digest,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let root_digest = merkle_root(&entries);
    Ok((entries, root_digest))
}

/// Remembers file digests by `(device, inode, size, mtime_ns)`, one small file per entry
/// under the memo folder, so that concurrent processes never contend on one memo file.
#[derive(Debug, Clone)]
pub struct DigestMemo {
    dir: PathBuf,
}

/// Files changed more recently than this are hashed but not memoised.
const RACY_WINDOW: Duration = Duration::from_secs(2);

impl DigestMemo {
    /// A memo stored under `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn entry_path(&self, meta: &fs::Metadata) -> PathBuf {
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        self.dir
            .join(format!("{:02x}", meta.ino() % 256))
            .join(format!(
                "{}-{}-{}-{}",
                meta.dev(),
                meta.ino(),
                meta.size(),
                mtime_ns
            ))
    }

    /// The digest of `path`, and whether it came from the memo.
    pub fn digest(&self, path: &Path) -> io::Result<(ContentDigest, bool)> {
        let meta = fs::metadata(path)?;
        let entry = self.entry_path(&meta);
        if let Ok(text) = fs::read_to_string(&entry) {
            if let Ok(d) = ContentDigest::parse_hex(text.trim()) {
                return Ok((d, true));
            }
        }
        let digest = hash_file(path)?;
        // Re-stat: if the file changed while we hashed it, do not remember anything.
        let after = fs::metadata(path)?;
        let racy = after
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < RACY_WINDOW);
        if !racy && self.entry_path(&after) == entry {
            // Best effort: a memo that cannot be written only costs a rehash later.
            let _ = write_atomic(&entry, digest.to_hex().as_bytes(), false);
        }
        Ok((digest, false))
    }
}

/// Writes `bytes` to `path` atomically: a unique temporary file beside it, optional
/// fsync, then `rename()`. Creates parent folders.
pub fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        unique_suffix()
    ));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    // A failed write (a full disk) leaves no temporary file behind.
    written.inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    if sync {
        sync_dir(parent)?;
    }
    Ok(())
}

/// fsyncs a folder so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// A process-unique, time-salted suffix for temporary names.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}{:x}", std::process::id(), nanos, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_digest_matches_blake3_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &data).unwrap();
        assert_eq!(hash_file(&p).unwrap(), ContentDigest::of_bytes(&data));
    }

    #[test]
    fn memo_hits_only_when_stat_tuple_matches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        fs::write(&p, b"hello").unwrap();
        // Age the file beyond the racy window.
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let memo = DigestMemo::new(dir.path().join("memo"));
        let (d1, hit1) = memo.digest(&p).unwrap();
        let (d2, hit2) = memo.digest(&p).unwrap();
        assert!(!hit1 && hit2);
        assert_eq!(d1, d2);
        // Same size, different content and mtime: must rehash.
        fs::write(&p, b"world").unwrap();
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old + Duration::from_secs(1))
            .unwrap();
        let (d3, hit3) = memo.digest(&p).unwrap();
        assert!(!hit3);
        assert_eq!(d3, ContentDigest::of_bytes(b"world"));
    }

    #[test]
    fn fresh_files_are_not_memoised() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        fs::write(&p, b"hello").unwrap();
        let memo = DigestMemo::new(dir.path().join("memo"));
        assert!(!memo.digest(&p).unwrap().1);
        assert!(!memo.digest(&p).unwrap().1);
    }

    #[test]
    fn tree_digest_ignores_location_and_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            fs::create_dir_all(root.join("sub")).unwrap();
            fs::write(root.join("sub/x.txt"), b"x").unwrap();
            fs::write(root.join("y.txt"), b"y").unwrap();
        }
        let (ea, da) = hash_tree(a.path(), None).unwrap();
        let (_, db) = hash_tree(b.path(), None).unwrap();
        assert_eq!(da, db);
        assert_eq!(
            ea.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["sub/x.txt", "y.txt"]
        );
        let mut rev = ea.clone();
        rev.reverse();
        assert_eq!(merkle_root(&rev), da);
        fs::write(b.path().join("y.txt"), b"z").unwrap();
        assert_ne!(hash_tree(b.path(), None).unwrap().1, da);
    }
}
