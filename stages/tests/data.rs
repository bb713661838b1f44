//! The data stages end to end: NIfTI variants against nibabel (files it writes and its own
//! test data), bad inputs, resampling against an analytic reference, phantoms (determinism,
//! style vs content statistics), the phantom -> ingest -> resample pipeline, zarr-python
//! interop and export back to NIfTI.
//!
//! Python checks use the project venv (numpy, nibabel, zarr) through
//! `meduet_stages::testing::run_python`.

#[path = "data/common.rs"]
mod common;
#[path = "data/nifti.rs"]
mod nifti;
#[path = "data/phantoms.rs"]
mod phantoms;
#[path = "data/pipeline.rs"]
mod pipeline;
#[path = "data/resampling.rs"]
mod resampling;
