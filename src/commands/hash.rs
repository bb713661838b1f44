//! `meduet hash`: the blake3 content digests of files and folders, as sources enter keys.

use std::path::Path;

use anyhow::{Context, Result};
use meduet_cache::{ContentDigest, DigestMemo};

use super::common::open_store;
use crate::cli::HashArgs;

/// `meduet hash PATH... [--cache DIR]`: with a cache, through its digest memo.
pub(super) fn hash(args: HashArgs) -> Result<i32> {
    let memo = match &args.cache.cache {
        Some(c) => Some(open_store(c)?.memo()),
        None => None,
    };
    for path in args.paths {
        let t0 = std::time::Instant::now();
        let digest = digest_of(&path, memo.as_ref())
            .with_context(|| format!("cannot hash '{}'", path.display()))?;
        tracing::debug!(
            "hashed '{}' in {:.3} ms",
            path.display(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        println!("{digest}  {}", path.display());
    }
    Ok(0)
}

/// The digest of a file, or the Merkle root of a folder's files.
fn digest_of(path: &Path, memo: Option<&DigestMemo>) -> std::io::Result<ContentDigest> {
    if path.is_dir() {
        return Ok(meduet_cache::hash_tree(path, memo)?.1);
    }
    match memo {
        Some(m) => Ok(m.digest(path)?.0),
        None => meduet_cache::hash_file(path),
    }
}
