//! N-dimensional float32 Zarr v3 arrays (latents, factor tables), stored like volumes.
//!
//! The same conventions as [`crate::data::zarr_store`] (C order, `bytes` then `zstd`,
//! deterministic metadata, fill value 0) for arrays of any rank, for example latents
//! `[C, X, Y, Z]` with `dimension_names = ["c", "i", "j", "k"]`. Chunks are whole along
//! the first axis when it is short (channels) and `min(64, n)` elsewhere.

use std::path::Path;
use std::sync::Arc;

use zarrs::array::{Array, ArrayBuilder, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::data::error::DataError;
use crate::data::zarr_store::{Attrs, CHUNK, ZSTD_LEVEL};

/// Writes `data` (C order, `shape`) at `path`, replacing what is there.
pub fn write_array_f32(
    path: &Path,
    shape: &[usize],
    data: &[f32],
    dim_names: &[&str],
    attrs: &Attrs,
) -> Result<(), DataError> {
    zarrs::config::global_config_mut().set_include_zarrs_metadata(false);
    let n: usize = shape.iter().product();
    if n != data.len() || dim_names.len() != shape.len() {
        return Err(DataError::zarr(path, &format!("shape {shape:?} holds {n} values and {} dimension names, got {} values and {} names", shape.len(), data.len(), dim_names.len())));
    }
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|e| DataError::io(path, e))?;
    }
    std::fs::create_dir_all(path).map_err(|e| DataError::io(path, e))?;
    let zerr = |e: &dyn std::fmt::Display| DataError::zarr(path, e);
    let store = Arc::new(FilesystemStore::new(path).map_err(|e| zerr(&e))?);
    let chunks: Vec<u64> = shape
        .iter()
        .enumerate()
        .map(|(a, &s)| {
            if a == 0 && s <= 16 {
                s.max(1) as u64
            } else {
                s.clamp(1, CHUNK) as u64
            }
        })
        .collect();
    let array = ArrayBuilder::new(
        shape.iter().map(|&s| s as u64).collect::<Vec<_>>(),
        chunks,
        zarrs::array::data_type::float32(),
        0.0f32,
    )
    .bytes_to_bytes_codecs(vec![Arc::new(zarrs::array::codec::ZstdCodec::new(
        ZSTD_LEVEL, false,
    ))])
    .dimension_names(Some(
        dim_names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    ))
    .attributes(attrs.clone())
    .build(store, "/")
    .map_err(|e| zerr(&e))?;
    array.store_metadata().map_err(|e| zerr(&e))?;
    array
        .store_array_subset(&ArraySubset::new_with_shape(array.shape().to_vec()), data)
        .map_err(|e| zerr(&e))?;
    Ok(())
}

/// Reads a float32 array: `(data, shape, attributes)`.
pub fn read_array_f32(path: &Path) -> Result<(Vec<f32>, Vec<usize>, Attrs), DataError> {
    if !path.join("zarr.json").is_file() {
        return Err(DataError::Zarr {
            path: path.to_path_buf(),
            message: "no zarr.json: not a Zarr v3 array".into(),
        });
    }
    let zerr = |e: &dyn std::fmt::Display| DataError::zarr(path, e);
    let store = Arc::new(FilesystemStore::new(path).map_err(|e| zerr(&e))?);
    let array = Array::open(store, "/").map_err(|e| zerr(&e))?;
    if array.data_type() != &zarrs::array::data_type::float32() {
        return Err(zerr(&format!(
            "data type is {:?}, expected float32",
            array.data_type()
        )));
    }
    let shape: Vec<usize> = array.shape().iter().map(|&s| s as usize).collect();
    let data: Vec<f32> = array
        .retrieve_array_subset(&array.subset_all())
        .map_err(|e| zerr(&e))?;
    Ok((data, shape, array.attributes().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_d_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("latent.zarr");
        let shape = [4, 5, 70, 3];
        let data: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| i as f32 * 0.5)
            .collect();
        let mut attrs = Attrs::new();
        attrs.insert("mode".into(), "sample".into());
        write_array_f32(&p, &shape, &data, &["c", "i", "j", "k"], &attrs).unwrap();
        let (back, s, a) = read_array_f32(&p).unwrap();
        assert_eq!(back, data);
        assert_eq!(s, shape);
        assert_eq!(a["mode"], "sample");
        assert!(write_array_f32(&p, &[2, 2], &data, &["a", "b"], &attrs).is_err());
    }
}
