//! Reading and writing NIfTI-1 files (`.nii`, `.nii.gz`) with the `nifti` crate.
//!
//! # Reading
//!
//! - The whole file is read and, when it starts with the gzip magic bytes, decompressed
//!   (multi-member streams accepted), so a truncated or corrupt `.nii.gz` is reported as
//!   such (the CRC and length of the gzip trailer are checked). Decompression stops at
//!   what the header needs (`vox_offset` + the voxels, plus [`TRAILING_SLACK`]): a small
//!   file that inflates to far more (a gzip bomb) is refused without inflating it.
//! - `vox_offset` must be finite and at least 352 (the end of a single-file NIfTI-1
//!   header, as nibabel requires), and the voxel data must fit the file; sizes are
//!   computed with checked arithmetic, so no header makes the reader panic.
//! - Byte order comes from the header (big-endian files are swapped by the crate).
//! - Values are converted to `f32` with `scl_slope`/`scl_inter` applied (a slope of 0 or
//!   NaN means "no scaling", a NaN intercept 0, as in nibabel).
//! - The affine is chosen as nibabel's `get_best_affine` does for the codes: the sform when
//!   `sform_code > 0`, else the qform (quaternion, `qfac` from `pixdim[0]`) when
//!   `qform_code > 0`, else NIfTI "method 1": `diag(pixdim)` with a zero origin.
//! - Checked, with an error naming the file and the problem: gzip integrity, magic, a 2D
//!   image, a 4D image with more than one volume (a trailing `t = 1` is fine), NaN or Inf
//!   voxels, zero or negative spacing, spacing above [`MAX_SPACING_MM`] (no medical
//!   volume has voxels that large; such a header would make resampling allocate without
//!   bound), a singular affine, unsupported data types.
//!
//! # Writing
//!
//! [`write_nifti`] writes the affine to *both* the sform and the qform (code 1, scanner),
//! with `pixdim` = the column norms and units = mm, so nibabel, ITK and MONAI read the same
//! affine back (to `f32` precision). `.nii.gz` output is deterministic (gzip mtime 0).

use std::io::{Cursor, Read};
use std::path::Path;

use nifti::{InMemNiftiVolume, IntoNdArray, NiftiHeader, NiftiType, XForm};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::error::DataError;
use crate::data::orientation::axcodes;
use crate::data::volume::{format_affine, invert_affine, spacing_of, Affine, LabelVolume, Volume};

/// Header facts of a NIfTI file, recorded by `ingest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NiftiInfo {
    /// Data type on disk, e.g. `"int16"`.
    pub datatype: String,
    /// The first three dimensions.
    pub shape: [usize; 3],
    /// `dim[1..=dim[0]]` as stored.
    pub dim: Vec<usize>,
    /// `pixdim[1..=3]`.
    pub pixdim: [f64; 3],
    /// Spacing from the chosen affine (column norms).
    pub spacing: [f64; 3],
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub sform_code: i16,
    pub qform_code: i16,
    /// Where the affine came from: `"sform"`, `"qform"` or `"pixdim"`.
    pub affine_source: String,
    /// The affine (voxel centre to RAS+ mm).
    pub affine: Affine,
    /// Orientation code of the affine, e.g. `"LPS"`.
    pub orientation: String,
    pub big_endian: bool,
    pub gzip: bool,
}

/// The data types [`write_nifti`] can store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NiftiDtype {
    Uint8,
    Int16,
    Float32,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Size of a NIfTI-1 header; the header of a single `.nii` file ends with 4 bytes of
/// extension flags, so voxel data start at 352 at the earliest.
const HEADER_BYTES: usize = 348;
const MIN_VOX_OFFSET: f64 = 352.0;

/// Bytes a decompressed file may hold past its voxel data before it is refused.
pub const TRAILING_SLACK: u64 = 1 << 20;

/// The largest voxel spacing read (mm, per axis, from the chosen affine).
pub const MAX_SPACING_MM: f64 = 50.0;

fn datatype_name(t: NiftiType) -> String {
    match t {
        NiftiType::Uint8 => "uint8".into(),
        NiftiType::Int8 => "int8".into(),
        NiftiType::Uint16 => "uint16".into(),
        NiftiType::Int16 => "int16".into(),
        NiftiType::Uint32 => "uint32".into(),
        NiftiType::Int32 => "int32".into(),
        NiftiType::Uint64 => "uint64".into(),
        NiftiType::Int64 => "int64".into(),
        NiftiType::Float32 => "float32".into(),
        NiftiType::Float64 => "float64".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A NIfTI file's bytes: the whole of an uncompressed file, or a gzip stream
/// decompressed on demand and never past a limit.
enum Source {
    Plain(Vec<u8>),
    Gzip {
        decoder: flate2::read::MultiGzDecoder<std::fs::File>,
        out: Vec<u8>,
    },
}

impl Source {
    fn open(path: &Path) -> Result<Self, DataError> {
        let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut magic = [0u8; 2];
        let n = f.read(&mut magic).map_err(|e| DataError::io(path, e))?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| DataError::io(path, e))?;
        if n == 2 && magic == GZIP_MAGIC {
            return Ok(Source::Gzip {
                decoder: flate2::read::MultiGzDecoder::new(f),
                out: Vec::new(),
            });
        }
        if path.to_string_lossy().ends_with(".gz") {
            return Err(DataError::Gzip {
                path: path.to_path_buf(),
                message: "the file does not start with the gzip magic bytes".into(),
            });
        }
        let mut raw = Vec::new();
        f.read_to_end(&mut raw)
            .map_err(|e| DataError::io(path, e))?;
        Ok(Source::Plain(raw))
    }

    fn is_gzip(&self) -> bool {
        matches!(self, Source::Gzip { .. })
    }

    /// Decompresses until `len` bytes are there (or the stream ends); `to_end` reads on
    /// to the end of the stream (checking the gzip trailer) but never past `len` bytes.
    fn fill(&mut self, path: &Path, len: u64, to_end: bool) -> Result<&[u8], DataError> {
        match self {
            Source::Plain(raw) => Ok(raw),
            Source::Gzip { decoder, out } => {
                let want = if to_end { len.saturating_add(1) } else { len };
                let have = out.len() as u64;
                if want > have {
                    decoder
                        .by_ref()
                        .take(want - have)
                        .read_to_end(out)
                        .map_err(|e| DataError::Gzip {
                            path: path.to_path_buf(),
                            message: e.to_string(),
                        })?;
                }
                if to_end && out.len() as u64 > len {
                    return Err(DataError::Format {
                        path: path.to_path_buf(),
                        message: format!(
                            "decompresses to more than the {len} bytes its header describes (vox_offset + voxel data + {TRAILING_SLACK} bytes of slack); refusing to inflate it further"
                        ),
                    });
                }
                Ok(out)
            }
        }
    }

    /// For a header that does not parse: the gzip stream's own error when it is corrupt
    /// (read on, at most 64 MiB, to find out), else `e`.
    fn explain(&mut self, path: &Path, e: DataError) -> DataError {
        match self.fill(path, 64 << 20, true) {
            Err(g @ DataError::Gzip { .. }) => g,
            _ => e,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        match self {
            Source::Plain(raw) => raw,
            Source::Gzip { out, .. } => out,
        }
    }
}

fn quaternion_matrix(b: f64, c: f64, d: f64) -> [[f64; 3]; 3] {
    let (mut a, mut b, mut c, mut d) = (1.0 - (b * b + c * c + d * d), b, c, d);
    if a < 1e-7 {
        let n = 1.0 / (b * b + c * c + d * d).sqrt();
        b *= n;
        c *= n;
        d *= n;
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ]
}

/// The affine a header describes, and where it came from.
pub fn header_affine(h: &NiftiHeader) -> (Affine, &'static str) {
    let mut a = crate::data::volume::IDENTITY;
    if h.sform_code > 0 {
        for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for c in 0..4 {
                a[r][c] = row[c] as f64;
            }
        }
        (a, "sform")
    } else if h.qform_code > 0 {
        let rot = quaternion_matrix(h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let s = [
            h.pixdim[1] as f64,
            h.pixdim[2] as f64,
            h.pixdim[3] as f64 * qfac,
        ];
        for r in 0..3 {
            for c in 0..3 {
                a[r][c] = rot[r][c] * s[c];
            }
        }
        a[0][3] = h.quatern_x as f64;
        a[1][3] = h.quatern_y as f64;
        a[2][3] = h.quatern_z as f64;
        (a, "qform")
    } else {
        for (c, row) in a.iter_mut().take(3).enumerate() {
            row[c] = h.pixdim[c + 1] as f64;
        }
        (a, "pixdim")
    }
}

/// Parses and checks the header; returns it with the voxel bytes and the facts.
fn parse(path: &Path) -> Result<(NiftiHeader, Vec<u8>, NiftiInfo), DataError> {
    let mut source = Source::open(path)?;
    let gzip = source.is_gzip();
    let fmt = |message: String| DataError::Format {
        path: path.to_path_buf(),
        message,
    };
    let bytes = source.fill(path, HEADER_BYTES as u64, false)?;
    if bytes.len() < HEADER_BYTES {
        let e = fmt(format!(
            "file is too short for a header ({} bytes, need 348)",
            bytes.len()
        ));
        return Err(source.explain(path, e));
    }
    let sizeof_hdr = i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if sizeof_hdr == 540 || sizeof_hdr.swap_bytes() == 540 {
        return Err(fmt("NIfTI-2 files are not supported".into()));
    }
    let mut header = match NiftiHeader::from_reader(Cursor::new(&bytes[..HEADER_BYTES])) {
        Ok(h) => h,
        Err(e) => {
            let e = fmt(format!("cannot parse the header: {e}"));
            return Err(source.explain(path, e));
        }
    };
    // As nibabel: a zero or non-finite slope means "no scaling"; a non-finite intercept 0.
    if header.scl_slope == 0.0 || !header.scl_slope.is_finite() {
        header.scl_slope = 1.0;
        header.scl_inter = 0.0;
    } else if !header.scl_inter.is_finite() {
        header.scl_inter = 0.0;
    }
    let ndim = header.dim[0] as usize;
    let dim: Vec<usize> = header.dim[1..=ndim.min(7)]
        .iter()
        .map(|&d| d as usize)
        .collect();
    if ndim < 3 || dim[..3].iter().any(|&d| d < 2) {
        return Err(DataError::NotVolume {
            path: path.to_path_buf(),
            dim,
        });
    }
    let volumes: usize = dim[3..].iter().product();
    if volumes != 1 {
        return Err(DataError::MultiVolume {
            path: path.to_path_buf(),
            volumes,
            dim,
        });
    }
    let pixdim = [
        header.pixdim[1] as f64,
        header.pixdim[2] as f64,
        header.pixdim[3] as f64,
    ];
    if pixdim
        .iter()
        .any(|&p| p.is_nan() || p <= 0.0 || p.is_infinite())
    {
        return Err(DataError::BadSpacing {
            path: path.to_path_buf(),
            pixdim: [header.pixdim[1], header.pixdim[2], header.pixdim[3]],
        });
    }
    let (affine, affine_source) = header_affine(&header);
    if invert_affine(&affine).is_none() || affine.iter().flatten().any(|x| !x.is_finite()) {
        return Err(DataError::BadAffine {
            path: path.to_path_buf(),
            affine: format_affine(&affine),
        });
    }
    let spacing = spacing_of(&affine);
    if let Some(axis) = (0..3).find(|&a| spacing[a] > MAX_SPACING_MM) {
        return Err(fmt(format!(
            "spacing {:.6} mm along axis {axis} (from the {affine_source}{}) is above {MAX_SPACING_MM} mm: no medical volume has voxels that large (a wrong header?)",
            spacing[axis],
            if affine_source == "pixdim" { format!(", pixdim[{}]", axis + 1) } else { String::new() }
        )));
    }
    let datatype = header.data_type().map_err(|e| DataError::Unsupported {
        path: path.to_path_buf(),
        datatype: format!("code {} ({e})", header.datatype),
    })?;
    let vox_offset = header.vox_offset as f64;
    if !vox_offset.is_finite() || vox_offset < MIN_VOX_OFFSET {
        return Err(fmt(format!(
            "vox_offset {vox_offset} is not a valid offset: a single-file NIfTI-1 image keeps its voxels at byte {MIN_VOX_OFFSET} or later"
        )));
    }
    let too_large = || {
        fmt(format!(
            "vox_offset {vox_offset} and dim {dim:?} describe more bytes than any file holds"
        ))
    };
    let offset = u64::try_from(vox_offset as u128).map_err(|_| too_large())?;
    let need = dim[..3]
        .iter()
        .try_fold(datatype.size_of() as u64, |acc, &d| {
            acc.checked_mul(d as u64)
        })
        .ok_or_else(too_large)?;
    let end = offset.checked_add(need).ok_or_else(too_large)?;
    let bytes = source.fill(path, end.saturating_add(TRAILING_SLACK), true)?;
    if (bytes.len() as u64) < end {
        return Err(fmt(format!(
            "file is truncated: {need} bytes of voxel data expected after vox_offset {offset}, found {}",
            (bytes.len() as u64).saturating_sub(offset)
        )));
    }
    let (offset, need) = (offset as usize, need as usize);
    let info = NiftiInfo {
        datatype: datatype_name(datatype),
        shape: [dim[0], dim[1], dim[2]],
        dim,
        pixdim,
        spacing,
        scl_slope: header.scl_slope as f64,
        scl_inter: header.scl_inter as f64,
        sform_code: header.sform_code,
        qform_code: header.qform_code,
        affine_source: affine_source.into(),
        affine,
        orientation: axcodes(&affine),
        big_endian: header.endianness == nifti::Endianness::Big,
        gzip,
    };
    let mut voxels = source.into_bytes();
    voxels.truncate(offset + need);
    voxels.drain(..offset);
    Ok((header, voxels, info))
}

/// Transposes Fortran-order data (first index fastest) to C order (last index fastest).
///
/// For each `j` this is a 2D transpose between the `i` and `k` axes; it runs in 32 x 32
/// tiles so that both reads and writes are contiguous runs, in parallel over blocks of `i`.
pub fn fortran_to_c<T: Copy + Send + Sync + Default>(src: &[T], shape: [usize; 3]) -> Vec<T> {
    let [nx, ny, nz] = shape;
    let mut out = vec![T::default(); src.len()];
    const B: usize = 32;
    out.par_chunks_mut(B * ny * nz)
        .enumerate()
        .for_each(|(bi, dst)| {
            let i0 = bi * B;
            let nb = dst.len() / (ny * nz);
            let mut tile = [[T::default(); B]; B];
            for j in 0..ny {
                for k0 in (0..nz).step_by(B) {
                    let kb = B.min(nz - k0);
                    for (kk, row) in tile.iter_mut().enumerate().take(kb) {
                        let s = ((k0 + kk) * ny + j) * nx + i0;
                        row[..nb].copy_from_slice(&src[s..s + nb]);
                    }
                    for di in 0..nb {
                        let d = (di * ny + j) * nz + k0;
                        for (x, row) in dst[d..d + kb].iter_mut().zip(tile.iter()) {
                            *x = row[di];
                        }
                    }
                }
            }
        });
    out
}

/// Reads an image as `f32` (scaling applied) with its header facts. See the module docs
/// for what is checked.
pub fn read_nifti(path: &Path) -> Result<(Volume, NiftiInfo), DataError> {
    let (mut header, voxels, info) = parse(path)?;
    // The volume is 3D from here on (a trailing t = 1 dimension is dropped).
    header.dim[0] = 3;
    for d in &mut header.dim[4..] {
        *d = 1;
    }
    let unsupported = |e: nifti::NiftiError| DataError::Unsupported {
        path: path.to_path_buf(),
        datatype: format!("{} ({e})", info.datatype),
    };
    if !matches!(
        header.data_type(),
        Ok(NiftiType::Uint8
            | NiftiType::Int8
            | NiftiType::Uint16
            | NiftiType::Int16
            | NiftiType::Uint32
            | NiftiType::Int32
            | NiftiType::Uint64
            | NiftiType::Int64
            | NiftiType::Float32
            | NiftiType::Float64)
    ) {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            datatype: info.datatype.clone(),
        });
    }
    let vol = InMemNiftiVolume::from_raw_data(&header, voxels).map_err(unsupported)?;
    let arr = vol.into_ndarray::<f32>().map_err(unsupported)?;
    let (fdata, _) = arr.into_raw_vec_and_offset();
    let data = fortran_to_c(&fdata, info.shape);
    drop(fdata);
    let shape = info.shape;
    let bad = data
        .par_iter()
        .enumerate()
        .filter(|(_, x)| !x.is_finite())
        .map(|(i, _)| i);
    let count = bad.clone().count();
    if count > 0 {
        let i = bad.min().expect("count > 0");
        return Err(DataError::NonFinite {
            path: path.to_path_buf(),
            count,
            first: [
                i / (shape[1] * shape[2]),
                (i / shape[2]) % shape[1],
                i % shape[2],
            ],
        });
    }
    Ok((
        Volume {
            data,
            shape,
            affine: info.affine,
        },
        info,
    ))
}

/// Reads a label map: every value (after scaling) must be an integer in `0..=255`.
pub fn read_nifti_labels(path: &Path) -> Result<(LabelVolume, NiftiInfo), DataError> {
    let (v, info) = read_nifti(path)?;
    if let Some((i, &x)) = v
        .data
        .par_iter()
        .enumerate()
        .find_first(|(_, &x)| !(0.0..=255.0).contains(&x) || x.fract() != 0.0)
    {
        let s = v.shape;
        return Err(DataError::BadLabel {
            path: path.to_path_buf(),
            value: x,
            at: [i / (s[1] * s[2]), (i / s[2]) % s[1], i % s[2]],
        });
    }
    Ok((v.map(|x| x as u8), info))
}

/// The header used for writing: sform and qform from the affine, pixdim, units mm.
fn write_header(affine: &Affine) -> NiftiHeader {
    let mut m = nalgebra::Matrix4::<f64>::identity();
    for r in 0..4 {
        for c in 0..4 {
            m[(r, c)] = affine[r][c];
        }
    }
    let mut h = NiftiHeader::default();
    h.set_sform(&m, XForm::ScannerAnat);
    h.set_qform(&m, XForm::ScannerAnat);
    h.xyzt_units = 2; // NIFTI_UNITS_MM
    h.descrip = b"meduet".to_vec();
    h
}

/// Writes voxel data of a concrete element type (the `nifti` writer's element bound is
/// `bytemuck::Pod`, so this is a macro over the three types we write).
macro_rules! write_array {
    ($path:expr, $data:expr, $shape:expr, $affine:expr, $t:expr) => {{
        let path: &Path = $path;
        let header = write_header($affine);
        let view = ndarray::ArrayView3::from_shape($shape, $data).map_err(|e| {
            DataError::Invalid(format!("'{}': bad volume shape: {e}", path.display()))
        })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        nifti::writer::WriterOptions::new(path)
            .reference_header(&header)
            .write_nifti_with_type(&view, $t)
            .map_err(|e| match e {
                nifti::NiftiError::Io(io) => DataError::io(path, io),
                other => DataError::Invalid(format!("'{}': cannot write: {other}", path.display())),
            })
    }};
}

/// Writes an image (`.nii` or `.nii.gz` by the file name) with the given data type;
/// `int16` and `uint8` values are rounded and clamped to the type's range.
pub fn write_nifti(path: &Path, v: &Volume, dtype: NiftiDtype) -> Result<(), DataError> {
    check_name(path)?;
    match dtype {
        NiftiDtype::Float32 => {
            write_array!(path, &v.data[..], v.shape, &v.affine, NiftiType::Float32)
        }
        NiftiDtype::Int16 => {
            let d: Vec<i16> = v
                .data
                .par_iter()
                .map(|&x| x.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16)
                .collect();
            write_array!(path, &d[..], v.shape, &v.affine, NiftiType::Int16)
        }
        NiftiDtype::Uint8 => {
            let d: Vec<u8> = v
                .data
                .par_iter()
                .map(|&x| x.round().clamp(0.0, 255.0) as u8)
                .collect();
            write_array!(path, &d[..], v.shape, &v.affine, NiftiType::Uint8)
        }
    }
}

/// Writes a label map as `uint8`.
pub fn write_nifti_labels(path: &Path, v: &LabelVolume) -> Result<(), DataError> {
    check_name(path)?;
    write_array!(path, &v.data[..], v.shape, &v.affine, NiftiType::Uint8)
}

fn check_name(path: &Path) -> Result<(), DataError> {
    if is_nifti_name(&path.to_string_lossy()) {
        Ok(())
    } else {
        Err(DataError::Invalid(format!(
            "'{}': a NIfTI file name must end in .nii or .nii.gz",
            path.display()
        )))
    }
}

/// Whether a file name is a single-file NIfTI (`.nii` / `.nii.gz`).
pub fn is_nifti_name(name: &str) -> bool {
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// The case name of a NIfTI file name: without folder and extension.
pub fn case_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.strip_suffix(".nii.gz")
        .or_else(|| base.strip_suffix(".nii"))
        .unwrap_or(base)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortran_to_c_transposes_every_voxel() {
        let shape = [37, 5, 70];
        let f: Vec<u32> = (0..37 * 5 * 70).collect();
        let c = fortran_to_c(&f, shape);
        for i in 0..37 {
            for j in 0..5 {
                for k in 0..70 {
                    assert_eq!(c[(i * 5 + j) * 70 + k], f[(k * 5 + j) * 37 + i] as u32);
                }
            }
        }
    }
    use crate::data::volume::IDENTITY;

    fn sample() -> Volume {
        let shape = [5, 4, 3];
        let mut affine = IDENTITY;
        affine[0][0] = -0.7;
        affine[1][1] = -0.8;
        affine[2][2] = 2.5;
        affine[0][3] = 10.0;
        affine[2][3] = -20.0;
        Volume {
            data: (0..60).map(|x| x as f32 * 3.0 - 50.0).collect(),
            shape,
            affine,
        }
    }

    fn patch(path: &Path, at: usize, bytes: &[u8]) {
        let mut b = std::fs::read(path).unwrap();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn round_trip_all_types_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let v = sample();
        for (name, t) in [
            ("a.nii", NiftiDtype::Int16),
            ("b.nii.gz", NiftiDtype::Float32),
            ("c.nii.gz", NiftiDtype::Uint8),
        ] {
            let p = dir.path().join(name);
            write_nifti(&p, &v, t).unwrap();
            let (back, info) = read_nifti(&p).unwrap();
            assert_eq!(back.shape, v.shape);
            for r in 0..4 {
                for c in 0..4 {
                    assert!(
                        (back.affine[r][c] - v.affine[r][c]).abs() < 1e-6,
                        "{back:?}"
                    );
                }
            }
            assert_eq!(info.orientation, "LPS");
            assert_eq!(info.affine_source, "sform");
            assert_eq!(info.gzip, name.ends_with(".gz"));
            for (x, y) in back.data.iter().zip(&v.data) {
                let want = if t == NiftiDtype::Uint8 {
                    y.clamp(0.0, 255.0)
                } else {
                    *y
                };
                assert_eq!(*x, want);
            }
        }
        // Same input, same bytes (gzip without a timestamp).
        let (p1, p2) = (dir.path().join("x.nii.gz"), dir.path().join("y.nii.gz"));
        write_nifti(&p1, &v, NiftiDtype::Int16).unwrap();
        write_nifti(&p2, &v, NiftiDtype::Int16).unwrap();
        assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        // The qform alone gives the same affine.
        let p = dir.path().join("q.nii");
        write_nifti(&p, &v, NiftiDtype::Int16).unwrap();
        patch(&p, 254, &0i16.to_le_bytes()); // sform_code = 0
        let (back, info) = read_nifti(&p).unwrap();
        assert_eq!(info.affine_source, "qform");
        for r in 0..3 {
            for c in 0..4 {
                assert!((back.affine[r][c] - v.affine[r][c]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn labels_must_be_small_integers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.nii.gz");
        let mut v = sample().map(|x| (x.abs() as u8 % 5) as f32);
        write_nifti(&p, &v, NiftiDtype::Uint8).unwrap();
        let (l, _) = read_nifti_labels(&p).unwrap();
        assert_eq!(l.data[7], v.data[7] as u8);
        v.data[7] = 2.5;
        write_nifti(&p, &v, NiftiDtype::Float32).unwrap();
        let e = read_nifti_labels(&p).unwrap_err().to_string();
        assert!(
            e.contains(
                "l.nii.gz': label values must be integers in 0..=255, found 2.5 at voxel [0, 2, 1]"
            ),
            "{e}"
        );
    }
}
