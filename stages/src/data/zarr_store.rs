//! The Zarr v3 volume store (`zarrs`): one array per volume.
//!
//! # Format
//!
//! - A Zarr v3 array at the root of its folder (`image.zarr/zarr.json` plus chunks
//!   `c/<i>/<j>/<k>`), shape `[nx, ny, nz]` in C order: element `[i, j, k]` is voxel
//!   `(i, j, k)` of [`crate::data::volume`], so `zarr.open_array(p)[:]` in zarr-python
//!   gives the same array as `nibabel.load(...).get_fdata()` of the exported NIfTI.
//! - Images are `float32`, labels `uint8`; fill value 0; regular chunks of
//!   `min(64, n)` per axis; codecs `bytes` (little endian) then `zstd` (level 3, no
//!   checksum). Dimension names `["i", "j", "k"]`.
//! - Attributes: `affine` (4x4, row-major, voxel centre to RAS+ mm), `spacing` (mm, column
//!   norms of the affine), `orientation` (e.g. `"RAS"`), plus whatever the caller adds
//!   (`original_spacing`, `domain`, `domain_id`, `source_digest`, ...).
//! - Metadata is deterministic: zarrs' own `_zarrs` attribute is switched off, so the same
//!   volume always gives the same bytes (and the same content digest in the cache).
//! - Writing encodes the chunks in parallel into an in-memory store, then writes the files
//!   (zarrs' filesystem store would `fsync` every chunk; the cache makes the whole object
//!   durable once when it commits). Reading uses zarrs' filesystem store.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use zarrs::array::{Array, ArrayBuilder};
use zarrs::filesystem::FilesystemStore;
use zarrs::storage::store::MemoryStore;
use zarrs::storage::{ListableStorageTraits, ReadableStorageTraits};

use crate::data::error::DataError;
use crate::data::orientation::axcodes;
use crate::data::volume::{affine_from_json, affine_to_json, spacing_of, VolumeOf};

/// Chunk edge length (voxels).
pub const CHUNK: usize = 64;
/// zstd compression level.
pub const ZSTD_LEVEL: i32 = 3;

/// Attributes of a stored volume.
pub type Attrs = serde_json::Map<String, serde_json::Value>;

fn configure() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        zarrs::config::global_config_mut().set_include_zarrs_metadata(false);
    });
}

/// A voxel type the store writes: `f32` (images) or `u8` (labels).
pub trait StoreElement:
    zarrs::array::Element + zarrs::array::ElementOwned + Copy + Default + Send + Sync
{
    fn data_type() -> zarrs::array::DataType;
    fn fill() -> zarrs::metadata::FillValueMetadata;
    const NAME: &'static str;
}

impl StoreElement for f32 {
    fn data_type() -> zarrs::array::DataType {
        zarrs::array::data_type::float32()
    }
    fn fill() -> zarrs::metadata::FillValueMetadata {
        0.0f32.into()
    }
    const NAME: &'static str = "float32";
}

impl StoreElement for u8 {
    fn data_type() -> zarrs::array::DataType {
        zarrs::array::data_type::uint8()
    }
    fn fill() -> zarrs::metadata::FillValueMetadata {
        0u8.into()
    }
    const NAME: &'static str = "uint8";
}

/// Writes a volume as a Zarr v3 array at `path` (replacing what is there) with the
/// geometry attributes plus `extra`.
pub fn write_zarr<T: StoreElement>(
    path: &Path,
    v: &VolumeOf<T>,
    extra: &Attrs,
) -> Result<(), DataError> {
    configure();
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|e| DataError::io(path, e))?;
    }
    let zerr = |e: &dyn std::fmt::Display| DataError::zarr(path, e);
    // Encode into memory, then write the files: zarrs' filesystem store syncs every file
    // it writes, which the cache does once for the whole object when it commits.
    let store = Arc::new(MemoryStore::new());
    let mut attrs = Attrs::new();
    attrs.insert("affine".into(), affine_to_json(&v.affine));
    attrs.insert("spacing".into(), serde_json::json!(spacing_of(&v.affine)));
    attrs.insert("orientation".into(), serde_json::json!(axcodes(&v.affine)));
    for (k, x) in extra {
        attrs.insert(k.clone(), x.clone());
    }
    let shape: Vec<u64> = v.shape.iter().map(|&n| n as u64).collect();
    let chunk_shape: Vec<u64> = v.shape.iter().map(|&n| chunk_of(n) as u64).collect();
    let array = ArrayBuilder::new(shape, chunk_shape, T::data_type(), T::fill())
        .bytes_to_bytes_codecs(vec![Arc::new(zarrs::array::codec::ZstdCodec::new(
            ZSTD_LEVEL, false,
        ))])
        .dimension_names(Some(["i", "j", "k"]))
        .attributes(attrs)
        .build(store.clone(), "/")
        .map_err(|e| zerr(&e))?;
    array.store_metadata().map_err(|e| zerr(&e))?;
    // Chunk by chunk, in parallel: each chunk is encoded once (no read-modify-write);
    // edge chunks are stored full-size, padded with the fill value, as the spec says.
    let [nx, ny, nz] = v.shape;
    let n = [
        nx.div_ceil(chunk_of(nx)),
        ny.div_ceil(chunk_of(ny)),
        nz.div_ceil(chunk_of(nz)),
    ];
    let c = [chunk_of(nx), chunk_of(ny), chunk_of(nz)];
    let chunks: Vec<[usize; 3]> = (0..n[0])
        .flat_map(|a| (0..n[1]).flat_map(move |b| (0..n[2]).map(move |d| [a, b, d])))
        .collect();
    chunks.par_iter().try_for_each(|&ci| {
        let mut buf = vec![T::default(); c[0] * c[1] * c[2]];
        let start = [ci[0] * c[0], ci[1] * c[1], ci[2] * c[2]];
        let len = [
            c[0].min(nx - start[0]),
            c[1].min(ny - start[1]),
            c[2].min(nz - start[2]),
        ];
        for i in 0..len[0] {
            for j in 0..len[1] {
                let src = ((start[0] + i) * ny + start[1] + j) * nz + start[2];
                let dst = (i * c[1] + j) * c[2];
                buf[dst..dst + len[2]].copy_from_slice(&v.data[src..src + len[2]]);
            }
        }
        let idx: Vec<u64> = ci.iter().map(|&x| x as u64).collect();
        array.store_chunk(&idx, buf).map_err(|e| zerr(&e))
    })?;
    let keys = store.list().map_err(|e| zerr(&e))?;
    keys.par_iter().try_for_each(|key| {
        let bytes = store
            .get(key)
            .map_err(|e| zerr(&e))?
            .ok_or_else(|| zerr(&format!("key '{}' vanished", key.as_str())))?;
        let file = path.join(key.as_str());
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        std::fs::write(&file, &bytes[..]).map_err(|e| DataError::io(&file, e))
    })
}

/// The chunk edge along an axis of `n` voxels.
fn chunk_of(n: usize) -> usize {
    n.clamp(1, CHUNK)
}

/// Reads a volume written by [`write_zarr`] (or any 3D Zarr array of the same data type
/// with an `affine` attribute). Returns it with all its attributes.
pub fn read_zarr<T: StoreElement>(path: &Path) -> Result<(VolumeOf<T>, Attrs), DataError> {
    configure();
    if !path.join("zarr.json").is_file() {
        return Err(DataError::Zarr {
            path: path.to_path_buf(),
            message: "no zarr.json: not a Zarr v3 array".into(),
        });
    }
    let zerr = |e: &dyn std::fmt::Display| DataError::zarr(path, e);
    let store = Arc::new(FilesystemStore::new(path).map_err(|e| zerr(&e))?);
    let array = Array::open(store, "/").map_err(|e| zerr(&e))?;
    if array.data_type() != &T::data_type() {
        return Err(zerr(&format!(
            "data type is {:?}, expected {}",
            array.data_type(),
            T::NAME
        )));
    }
    let shape = array.shape().to_vec();
    if shape.len() != 3 {
        return Err(zerr(&format!(
            "array has {} dimensions, expected 3",
            shape.len()
        )));
    }
    let attrs = array.attributes().clone();
    let affine = attrs
        .get("affine")
        .and_then(affine_from_json)
        .ok_or_else(|| zerr(&"missing or malformed 'affine' attribute (4 rows of 4 numbers)"))?;
    let data: Vec<T> = array
        .retrieve_array_subset(&array.subset_all())
        .map_err(|e| zerr(&e))?;
    let shape = [shape[0] as usize, shape[1] as usize, shape[2] as usize];
    let v = VolumeOf::from_parts(data, shape, affine).map_err(|e| zerr(&e))?;
    Ok((v, attrs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::{LabelVolume, Volume};

    fn volume() -> Volume {
        let shape = [70, 3, 5];
        let mut affine = crate::data::volume::IDENTITY;
        affine[0][0] = -1.5;
        affine[1][3] = 12.0;
        Volume {
            data: (0..70 * 15).map(|x| x as f32 * 0.25 - 3.0).collect(),
            shape,
            affine,
        }
    }

    #[test]
    fn round_trip_is_exact_and_bytes_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume();
        let mut extra = Attrs::new();
        extra.insert("domain".into(), "siteA".into());
        let p = dir.path().join("image.zarr");
        write_zarr(&p, &v, &extra).unwrap();
        let (back, attrs) = read_zarr::<f32>(&p).unwrap();
        assert_eq!(back, v);
        assert_eq!(attrs["domain"], "siteA");
        assert_eq!(attrs["orientation"], "LAS");
        assert_eq!(attrs["spacing"], serde_json::json!([1.5, 1.0, 1.0]));
        let meta = std::fs::read_to_string(p.join("zarr.json")).unwrap();
        assert!(!meta.contains("_zarrs"), "{meta}");
        assert!(meta.contains("\"zstd\""), "{meta}");
        // Chunks: 64 along the first axis gives two chunk rows.
        assert!(p.join("c/1/0/0").is_file());
        let (d1, _) = meduet_cache::hash_tree(&p, None).unwrap();
        write_zarr(&p, &v, &extra).unwrap();
        let (d2, _) = meduet_cache::hash_tree(&p, None).unwrap();
        assert_eq!(d1, d2);
        let labels: LabelVolume = v.map(|x| (x.abs() as u8) % 7);
        let lp = dir.path().join("label.zarr");
        write_zarr(&lp, &labels, &Attrs::new()).unwrap();
        assert_eq!(read_zarr::<u8>(&lp).unwrap().0, labels);
        let e = read_zarr::<f32>(&lp).unwrap_err().to_string();
        assert!(
            e.contains("label.zarr") && e.contains("expected float32"),
            "{e}"
        );
        let e = read_zarr::<f32>(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a Zarr v3 array"), "{e}");
    }
}
