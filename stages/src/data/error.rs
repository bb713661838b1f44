//! Errors of the data code. Every message names the file (or item) and the problem, in
//! lowercase, so a stage can pass it to the user unchanged.

use std::path::{Path, PathBuf};

/// An error reading, checking, transforming or writing volumes.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("'{}': {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{}': truncated or corrupt gzip data ({message})", path.display())]
    Gzip { path: PathBuf, message: String },
    #[error("'{}': not a valid NIfTI-1 file: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("'{}': is a 2D image (dim = {dim:?}); a 3D volume is needed", path.display())]
    NotVolume { path: PathBuf, dim: Vec<usize> },
    #[error("'{}': is a 4D image with {volumes} volumes (dim = {dim:?}); only single-volume images are supported", path.display())]
    MultiVolume {
        path: PathBuf,
        volumes: usize,
        dim: Vec<usize>,
    },
    #[error("'{}': {count} voxel(s) are NaN or Inf (first at voxel {first:?})", path.display())]
    NonFinite {
        path: PathBuf,
        count: usize,
        first: [usize; 3],
    },
    #[error("'{}': zero or negative spacing (pixdim = {pixdim:?})", path.display())]
    BadSpacing { path: PathBuf, pixdim: [f32; 3] },
    #[error("'{}': degenerate affine (its 3x3 part is singular or not finite): {affine}", path.display())]
    BadAffine { path: PathBuf, affine: String },
    #[error("'{}': unsupported data type {datatype}", path.display())]
    Unsupported { path: PathBuf, datatype: String },
    #[error("'{}': label values must be integers in 0..=255, found {value} at voxel {at:?}", path.display())]
    BadLabel {
        path: PathBuf,
        value: f32,
        at: [usize; 3],
    },
    #[error("label '{}' does not match image '{}': {message}", label.display(), image.display())]
    GeometryMismatch {
        image: PathBuf,
        label: PathBuf,
        message: String,
    },
    #[error("'{}': zarr error: {message}", path.display())]
    Zarr { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    /// An i/o error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A zarr error on `path`.
    pub fn zarr(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Zarr {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

impl From<DataError> for meduet_engine::StageError {
    fn from(e: DataError) -> Self {
        match e {
            DataError::Io { .. } | DataError::Zarr { .. } => Self::failed(e),
            other => Self::input(other),
        }
    }
}
