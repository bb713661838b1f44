//! Volumes: NIfTI and Zarr I/O, orientation, resampling, intensity, phantoms.
//!
//! Pure library code (no engine types) used by the data stage kinds in [`crate::kinds`]:
//!
//! | module          | concern                                                         |
//! |-----------------|-----------------------------------------------------------------|
//! | [`volume`]      | `Volume` / `LabelVolume`: C-order voxels + affine, affine maths |
//! | [`nifti_io`]    | NIfTI-1 read (checked) and write (sform + qform)                |
//! | [`orientation`] | orientation codes, reorientation to RAS                         |
//! | [`resample`]    | resampling to a target spacing (trilinear / nearest)            |
//! | [`intensity`]   | CT window, MRI percentile normalisation                         |
//! | [`croppad`]     | crop to foreground, centre crop, symmetric and divisible pad    |
//! | [`preprocess`]  | the method's per-volume chain (method.md 1.1 steps 1-5)        |
//! | [`zarr_store`]  | Zarr v3 volume store (zstd, chunked, attributes)                |
//! | [`filters`]     | separable Gaussian filtering                                    |
//! | [`phantom`]     | seeded phantom anatomy (content)                                |
//! | [`phantom_style`] | domain styles (site, scanner, protocol)                       |
//! | [`phantom_render`] | anatomy x style -> CT image, labels, truth                   |
//! | [`export`]      | Zarr volume items back to NIfTI                                 |

pub mod array_store;
pub mod croppad;
pub mod error;
pub mod export;
pub mod filters;
pub mod intensity;
pub mod nifti_io;
pub mod orientation;
pub mod phantom;
pub mod phantom_render;
pub mod phantom_style;
pub mod preprocess;
pub mod resample;
pub mod volume;
pub mod zarr_store;

pub use error::DataError;
pub use volume::{Affine, LabelVolume, Volume, VolumeOf};
