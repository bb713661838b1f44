//! Volumes: NIfTI and Zarr I/O, orientation, resampling, intensity, phantoms.
