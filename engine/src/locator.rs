//! Finding files by content digest: items refer to source files and upstream outputs by
//! content, so they keep working after the data moves.

use std::path::PathBuf;

use meduet_cache::{ContentDigest, Object};

use crate::params::SourceTree;

/// Finds files by content digest (so that items can refer to source files by content,
/// and keep working after the data moves).
pub type Locator = std::collections::HashMap<ContentDigest, PathBuf>;

/// Builds the locator of a stage from its ancestors' sources and objects.
pub fn build_locator<'a>(
    sources: impl IntoIterator<Item = &'a SourceTree>,
    objects: impl IntoIterator<Item = &'a Object>,
) -> Locator {
    let mut l = Locator::new();
    for t in sources {
        for f in &t.files {
            l.entry(f.digest).or_insert_with(|| t.path_of(&f.path));
        }
    }
    for o in objects {
        for (name, out) in &o.manifest.outputs {
            for (rel, f) in &out.files {
                l.entry(f.digest)
                    .or_insert_with(|| o.output_dir(name).join(rel));
            }
        }
    }
    l
}
