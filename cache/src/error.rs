//! Errors of the store.

use std::io;
use std::path::PathBuf;

use crate::digest::StageKey;

/// Everything that can go wrong in the store. Messages are lowercase and name the path.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("i/o error on '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt manifest '{path}': {message}")]
    CorruptManifest { path: PathBuf, message: String },
    #[error("invalid output name '{0}' (expected a non-empty name without '/')")]
    BadOutputName(String),
    #[error("cancelled while waiting for the lease on {0}")]
    Cancelled(StageKey),
    #[error("corrupt json file '{path}': {message}")]
    CorruptJson { path: PathBuf, message: String },
}

/// Short alias.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| CacheError::Io {
            path: path.into(),
            source,
        })
    }
}
