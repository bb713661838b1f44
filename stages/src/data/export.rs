//! Export of volume items back to NIfTI (`meduet export`).
//!
//! Every Zarr array `<name>.zarr` of an item folder (`image.zarr`, `label.zarr`, or any other
//! 3D `float32` / `uint8` array with an `affine` attribute, as [`crate::data::zarr_store`]
//! writes them) becomes `<name>.nii.gz` in the output folder: same voxels, same data type,
//! and the stored affine written to both the sform and the qform, so that
//! `nibabel.load(out).affine` equals the Zarr `affine` attribute (to `f32` precision).

use std::path::{Path, PathBuf};

use crate::data::error::DataError;
use crate::data::nifti_io::{write_nifti, write_nifti_labels, NiftiDtype};
use crate::data::zarr_store::read_zarr;

/// The data type named in an array's `zarr.json`.
fn zarr_data_type(array: &Path) -> Result<String, DataError> {
    let meta = array.join("zarr.json");
    let text = std::fs::read(&meta).map_err(|e| DataError::io(&meta, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| DataError::zarr(array, e))?;
    v.get("data_type")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| DataError::zarr(array, "zarr.json has no string 'data_type'"))
}

/// Writes every Zarr array of `item_dir` as `<name>.nii.gz` into `out_dir` (created if
/// needed). Returns the written files, sorted.
pub fn export_volume_item(item_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(item_dir).map_err(|e| DataError::io(item_dir, e))?;
    let mut arrays: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "zarr") && p.join("zarr.json").is_file())
        .collect();
    arrays.sort();
    if arrays.is_empty() {
        return Err(DataError::Invalid(format!(
            "'{}': no Zarr array (<name>.zarr with a zarr.json) to export",
            item_dir.display()
        )));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    let mut written = Vec::new();
    for a in arrays {
        let stem = a
            .file_stem()
            .expect("has a name")
            .to_string_lossy()
            .into_owned();
        let out = out_dir.join(format!("{stem}.nii.gz"));
        match zarr_data_type(&a)?.as_str() {
            "float32" => write_nifti(&out, &read_zarr::<f32>(&a)?.0, NiftiDtype::Float32)?,
            "uint8" => write_nifti_labels(&out, &read_zarr::<u8>(&a)?.0)?,
            other => {
                return Err(DataError::zarr(
                    &a,
                    format!("data type {other} cannot be exported (float32 and uint8 can)"),
                ))
            }
        }
        written.push(out);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::nifti_io::{read_nifti, read_nifti_labels};
    use crate::data::volume::{LabelVolume, Volume, IDENTITY};
    use crate::data::zarr_store::{write_zarr, Attrs};

    #[test]
    fn zarr_item_round_trips_through_nifti() {
        let dir = tempfile::tempdir().unwrap();
        let item = dir.path().join("item");
        let mut affine = IDENTITY;
        affine[0][0] = 1.5;
        affine[1][1] = 1.5;
        affine[2][2] = 1.5;
        affine[0][3] = -33.25;
        let img = Volume {
            data: (0..4 * 5 * 6).map(|x| x as f32 / 7.0).collect(),
            shape: [4, 5, 6],
            affine,
        };
        let lab: LabelVolume = img.map(|x| (x * 3.0) as u8);
        write_zarr(&item.join("image.zarr"), &img, &Attrs::new()).unwrap();
        write_zarr(&item.join("label.zarr"), &lab, &Attrs::new()).unwrap();
        let out = dir.path().join("out");
        let files = export_volume_item(&item, &out).unwrap();
        assert_eq!(
            files,
            vec![out.join("image.nii.gz"), out.join("label.nii.gz")]
        );
        let (back, info) = read_nifti(&files[0]).unwrap();
        assert_eq!(back.data, img.data);
        assert_eq!(back.affine, img.affine);
        assert_eq!(info.datatype, "float32");
        let (lback, linfo) = read_nifti_labels(&files[1]).unwrap();
        assert_eq!(lback.data, lab.data);
        assert_eq!(linfo.datatype, "uint8");
        let e = export_volume_item(&out, &out).unwrap_err().to_string();
        assert!(e.contains("no Zarr array"), "{e}");
    }
}
