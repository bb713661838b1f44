//! Can the nodes of a cluster see the cache?
//!
//! A Slurm job runs `meduet exec-stage` on some node, which reads its inputs from the
//! cache and commits its object there: the cache must be on a filesystem every node
//! mounts at the same path. meduet cannot prove that a path is shared, but it can
//! refuse the places that certainly are not: the local temporary folders (`$TMPDIR`,
//! `/tmp`, `/var/tmp`, `/dev/shm`, `/run`) and memory filesystems (tmpfs, ramfs). The
//! Slurm executor accepts them all the same when every node of the cluster is this
//! machine (`slurm::nodes`).

use std::path::{Path, PathBuf};

/// Why `cache` cannot be the cache of a cluster run, if it cannot.
pub fn local_only_reason(cache: &Path) -> Option<String> {
    let abs = absolute(cache);
    let mut temp_roots: Vec<PathBuf> = vec![
        std::env::temp_dir(),
        "/tmp".into(),
        "/var/tmp".into(),
        "/dev/shm".into(),
        "/run".into(),
    ];
    temp_roots.sort();
    temp_roots.dedup();
    for root in &temp_roots {
        let root = absolute(root);
        if abs.starts_with(&root) {
            return Some(format!(
                "the cache '{}' is in the local temporary folder '{}', which the nodes of a cluster do not see",
                cache.display(),
                root.display()
            ));
        }
    }
    if let Some(fs) = memory_fs(&abs) {
        return Some(format!(
            "the cache '{}' is on a {fs} filesystem (in this machine's memory), which the nodes of a cluster do not see",
            cache.display()
        ));
    }
    None
}

/// The canonical form of `p`, or of its nearest existing ancestor joined with the rest.
fn absolute(p: &Path) -> PathBuf {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut existing = p.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return p,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for n in rest.iter().rev() {
        out.push(n);
    }
    out
}

/// `Some("tmpfs")` / `Some("ramfs")` when `p` (or its nearest existing ancestor) is on one.
fn memory_fs(p: &Path) -> Option<&'static str> {
    let mut q = p.to_path_buf();
    while !q.exists() {
        q = q.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(q.to_string_lossy().as_bytes()).ok()?;
    // SAFETY: statfs fills a plain struct for a valid C string.
    let kind = unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        s.f_type as i64
    };
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    match kind {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_folders_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = local_only_reason(&d.path().join("cache/.meduet")).unwrap();
        assert!(r.contains("temporary folder"), "{r}");
        assert!(local_only_reason(Path::new("/dev/shm/x")).is_some());
    }

    #[test]
    fn a_folder_in_the_build_tree_is_accepted() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("target-does-not-exist/cache");
        if local_only_reason(Path::new(env!("CARGO_MANIFEST_DIR"))).is_none() {
            assert_eq!(local_only_reason(&here), None);
        }
    }
}
