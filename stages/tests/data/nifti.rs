//! NIfTI reading against nibabel, and bad files.

use std::path::Path;

use meduet_stages::data::nifti_io::{read_nifti, write_nifti, NiftiDtype};
use meduet_stages::data::volume::{Volume, IDENTITY};
use meduet_stages::testing::run_python;

use crate::common::{affine_diff, read_f32, read_json};

/// Writes NIfTI variants with nibabel and, for each, what nibabel reads from it.
const NIBABEL_VARIANTS: &str = r#"
import sys, json, struct, numpy as np, nibabel as nib
out = sys.argv[1]
rng = np.random.default_rng(0)
shape = (9, 7, 5)
ijk = np.indices(shape).astype(np.float64)
base = 37.0 * ijk[0] - 11.0 * ijk[1] + 5.5 * ijk[2] - 300.0
def rot(deg):
    t = np.deg2rad(deg); c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
def aff(m, d, o):
    a = np.eye(4); a[:3, :3] = m @ np.diag(d); a[:3, 3] = o; return a
variants = {}
def save(name, img):
    p = f"{out}/{name}"; nib.save(img, p); variants[name] = p
# a: float data stored as int16: nibabel picks a non-trivial scl_slope/inter
img = nib.Nifti1Image(base + rng.uniform(-0.4, 0.4, shape), aff(np.eye(3), [0.7, 0.7, 2.5], [-10, 20, 30]))
img.set_data_dtype(np.int16)
save("a_scaled_int16.nii.gz", img)
# b: big-endian float32, LPS
hdr = nib.Nifti1Header(endianness=">")
save("b_big_endian_lps.nii", nib.Nifti1Image(base.astype(np.float32), aff(np.eye(3), [-0.8, -0.8, 3.0], [100, 90, -40]), hdr))
# c: sform only, oblique (20 degrees about z)
img = nib.Nifti1Image(base.astype(np.float32), aff(rot(20), [1.0, 1.2, 2.0], [5, 6, 7]))
img.set_qform(None, code=0); img.set_sform(img.affine, code=2)
save("c_sform_only_oblique.nii.gz", img)
# d: qform only, left-handed (LAS: qfac = -1)
a = aff(rot(-15), [-0.9, 0.9, 1.5], [-3, 4, -5])
img = nib.Nifti1Image(base.astype(np.int16), a)
img.set_sform(None, code=0); img.set_qform(a, code=1)
save("d_qform_only_las.nii", img)
# e: sform and qform differ: the sform wins
img = nib.Nifti1Image(base.astype(np.float64), aff(np.eye(3), [1, 1, 1], [0, 0, 0]))
img.set_qform(aff(np.eye(3), [2, 2, 2], [9, 9, 9]), code=1)
img.set_sform(aff(np.eye(3), [1.5, 1.25, 1.0], [-1, -2, -3]), code=1)
save("e_sform_wins_f64.nii", img)
# f: uint8, RAS, 4D with t = 1
save("f_uint8_t1.nii.gz", nib.Nifti1Image((np.abs(base) % 200).astype(np.uint8)[..., None], aff(np.eye(3), [1, 1, 1], [0, 0, 0])))
# g: exact slope/inter patched into an int16 file (CT-style: stored + 2 * x - 1024)
img = nib.Nifti1Image(np.round(base).astype(np.int16), aff(np.eye(3), [0.7, 0.7, 2.5], [0, 0, 0]))
save("g_patched_slope.nii", img)
with open(variants["g_patched_slope.nii"], "r+b") as f:
    f.seek(112); f.write(struct.pack("<ff", 2.0, -1024.0))
# nibabel's own test data
import os
d = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
for name in ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"]:
    variants[name] = os.path.join(d, name)
facts = {}
for name, p in variants.items():
    im = nib.load(p)
    data = np.asarray(im.get_fdata(), dtype=np.float32)
    if data.ndim == 4: data = data[..., 0]
    np.ascontiguousarray(data).tofile(f"{out}/{name}.expect.bin")
    h = im.header
    facts[name] = {"path": p, "affine": im.affine.tolist(), "shape": list(data.shape),
                   "axcodes": "".join(nib.aff2axcodes(im.affine)), "endianness": h.endianness,
                   "dtype": str(h.get_data_dtype().newbyteorder("=")),
                   "slope": float(np.nan_to_num(h["scl_slope"], nan=1.0)),
                   "sform_code": int(h["sform_code"]), "qform_code": int(h["qform_code"])}
json.dump(facts, open(f"{out}/facts.json", "w"))
print(len(facts))
"#;

#[test]
fn nifti_variants_read_like_nibabel() {
    let dir = tempfile::tempdir().unwrap();
    let n: usize = run_python(NIBABEL_VARIANTS, &[dir.path().to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, 10);
    let facts = read_json(&dir.path().join("facts.json"));
    let mut checked = Vec::new();
    for (name, f) in facts.as_object().unwrap() {
        let (v, info) = read_nifti(Path::new(f["path"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = read_f32(&dir.path().join(format!("{name}.expect.bin")));
        let shape: Vec<usize> = f["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(v.shape.to_vec(), shape, "{name}");
        let mut worst: f32 = 0.0;
        for (a, b) in v.data.iter().zip(&want) {
            worst = worst.max((a - b).abs() / b.abs().max(1.0));
        }
        // nibabel scales in float64, we in float32: a few ulp.
        assert!(worst < 1e-5, "{name}: relative difference {worst}");
        let d = affine_diff(&v.affine, &f["affine"]);
        assert!(
            d < 1e-5,
            "{name}: affine differs by {d}: {:?} vs {}",
            v.affine,
            f["affine"]
        );
        assert_eq!(info.orientation, f["axcodes"].as_str().unwrap(), "{name}");
        assert_eq!(info.big_endian, f["endianness"] == ">", "{name}");
        assert_eq!(info.datatype, f["dtype"].as_str().unwrap(), "{name}");
        checked.push((name.clone(), info));
    }
    let get = |n: &str| &checked.iter().find(|(x, _)| x == n).unwrap().1;
    // What each variant exercises.
    assert!(get("a_scaled_int16.nii.gz").gzip && get("a_scaled_int16.nii.gz").scl_slope != 1.0);
    assert!(get("b_big_endian_lps.nii").big_endian);
    assert_eq!(get("b_big_endian_lps.nii").orientation, "LPS");
    assert_eq!(get("c_sform_only_oblique.nii.gz").affine_source, "sform");
    assert_eq!(get("d_qform_only_las.nii").affine_source, "qform");
    assert_eq!(get("d_qform_only_las.nii").orientation, "LAS");
    assert_eq!(get("e_sform_wins_f64.nii").affine_source, "sform");
    assert_eq!(get("e_sform_wins_f64.nii").spacing, [1.5, 1.25, 1.0]);
    assert_eq!(get("f_uint8_t1.nii.gz").dim, vec![9, 7, 5, 1]);
    assert_eq!(
        (
            get("g_patched_slope.nii").scl_slope,
            get("g_patched_slope.nii").scl_inter
        ),
        (2.0, -1024.0)
    );
    assert!(get("anatomical.nii").big_endian);
    assert_eq!(get("anatomical.nii").orientation, "LAS");
    assert_eq!(get("standard.nii.gz").datatype, "uint8");
}

/// nibabel test files this reader must reject, with the reason.
#[test]
fn nibabel_multi_volume_nan_and_nifti2_files_are_rejected_by_name() {
    let code = "import nibabel, os; print(os.path.join(os.path.dirname(nibabel.__file__), 'tests', 'data'))";
    let d = std::path::PathBuf::from(run_python(code, &[]).trim());
    let e = read_nifti(&d.join("example4d.nii.gz"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("example4d.nii.gz': is a 4D image with 2 volumes (dim = [128, 96, 24, 2])"),
        "{e}"
    );
    let e = read_nifti(&d.join("functional.nii"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("functional.nii': is a 4D image with 20 volumes"),
        "{e}"
    );
    let e = read_nifti(&d.join("example_nifti2.nii.gz"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "example_nifti2.nii.gz': not a valid NIfTI-1 file: NIfTI-2 files are not supported"
        ),
        "{e}"
    );
}

fn sample() -> Volume {
    let mut affine = IDENTITY;
    affine[0][0] = -0.7;
    affine[1][1] = -0.8;
    affine[2][2] = 2.5;
    Volume {
        data: (0..60).map(|x| x as f32 * 3.0 - 50.0).collect(),
        shape: [5, 4, 3],
        affine,
    }
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

#[test]
fn bad_files_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let v = sample();
    let good = dir.path().join("good.nii");
    write_nifti(&good, &v, NiftiDtype::Int16).unwrap();
    let err = |p: &Path| read_nifti(p).unwrap_err().to_string();

    let gz = dir.path().join("trunc.nii.gz");
    write_nifti(&gz, &v, NiftiDtype::Int16).unwrap();
    let b = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &b[..b.len() / 2]).unwrap();
    let e = err(&gz);
    assert!(
        e.contains("trunc.nii.gz': truncated or corrupt gzip data"),
        "{e}"
    );

    let bad = dir.path().join("corrupt.nii.gz");
    write_nifti(&bad, &v, NiftiDtype::Float32).unwrap();
    let mut b = std::fs::read(&bad).unwrap();
    let n = b.len();
    for x in &mut b[n / 3..n - 12] {
        *x ^= 0x5a;
    }
    std::fs::write(&bad, &b).unwrap();
    let e = err(&bad);
    assert!(
        e.contains("corrupt.nii.gz': truncated or corrupt gzip data ("),
        "{e}"
    );

    let fake = dir.path().join("fake.nii.gz");
    std::fs::copy(&good, &fake).unwrap();
    let e = err(&fake);
    assert!(e.contains("fake.nii.gz': truncated or corrupt gzip data (the file does not start with the gzip magic bytes)"), "{e}");

    let two = dir.path().join("twod.nii");
    std::fs::copy(&good, &two).unwrap();
    patch(&two, 40, &2u16.to_le_bytes());
    let e = err(&two);
    assert!(
        e.contains("twod.nii': is a 2D image (dim = [5, 4]); a 3D volume is needed"),
        "{e}"
    );

    let four = dir.path().join("four.nii");
    std::fs::copy(&good, &four).unwrap();
    patch(&four, 40, &4u16.to_le_bytes());
    patch(&four, 48, &3u16.to_le_bytes());
    let e = err(&four);
    assert!(
        e.contains("four.nii': is a 4D image with 3 volumes (dim = [5, 4, 3, 3])"),
        "{e}"
    );
    patch(&four, 48, &1u16.to_le_bytes());
    assert_eq!(
        read_nifti(&four).unwrap().0.data,
        read_nifti(&good).unwrap().0.data
    );

    let sp = dir.path().join("spacing.nii");
    std::fs::copy(&good, &sp).unwrap();
    patch(&sp, 84, &0f32.to_le_bytes()); // pixdim[2]
    let e = err(&sp);
    assert!(
        e.contains("spacing.nii': zero or negative spacing (pixdim = [0.7, 0.0, 2.5])"),
        "{e}"
    );
    patch(&sp, 84, &(-0.8f32).to_le_bytes());
    assert!(err(&sp).contains("zero or negative spacing (pixdim = [0.7, -0.8, 2.5])"));

    let nan = dir.path().join("nan.nii.gz");
    let mut w = v.clone();
    w.data[13] = f32::NAN;
    w.data[40] = f32::INFINITY;
    write_nifti(&nan, &w, NiftiDtype::Float32).unwrap();
    let e = err(&nan);
    assert!(
        e.contains("nan.nii.gz': 2 voxel(s) are NaN or Inf (first at voxel [1, 0, 1])"),
        "{e}"
    );

    let short = dir.path().join("short.nii");
    let b = std::fs::read(&good).unwrap();
    std::fs::write(&short, &b[..b.len() - 10]).unwrap();
    let e = err(&short);
    assert!(e.contains("short.nii': not a valid NIfTI-1 file: file is truncated: 120 bytes of voxel data expected after vox_offset 352, found 110"), "{e}");

    let junk = dir.path().join("junk.nii");
    std::fs::write(&junk, vec![7u8; 400]).unwrap();
    assert!(err(&junk).contains("junk.nii': not a valid NIfTI-1 file"));
    let e = err(&dir.path().join("missing.nii"));
    assert!(e.contains("missing.nii': No such file"), "{e}");
}

/// Hostile headers (issue 19, item 5): each is an error naming the file and the field,
/// found before any large allocation, never a panic.
#[test]
fn hostile_headers_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let v = sample();
    let good = dir.path().join("good.nii");
    write_nifti(&good, &v, NiftiDtype::Float32).unwrap();
    let err = |p: &Path| read_nifti(p).unwrap_err().to_string();
    let variant = |name: &str, at: usize, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::copy(&good, &p).unwrap();
        patch(&p, at, bytes);
        p
    };
    // vox_offset (byte 108, float32) far past the end: was a slice-index panic.
    let e = err(&variant("far.nii", 108, &1e30f32.to_le_bytes()));
    assert!(
        e.contains("far.nii': not a valid NIfTI-1 file: vox_offset 1000000015047466200000000000000 and dim [5, 4, 3] describe more bytes than any file holds"),
        "{e}"
    );
    let e = err(&variant("nan_offset.nii", 108, &f32::NAN.to_le_bytes()));
    assert!(
        e.contains("nan_offset.nii'") && e.contains("vox_offset NaN is not a valid offset"),
        "{e}"
    );
    // vox_offset inside the header: was read silently from the header's bytes.
    let e = err(&variant("inside.nii", 108, &0f32.to_le_bytes()));
    assert!(
        e.contains("inside.nii': not a valid NIfTI-1 file: vox_offset 0 is not a valid offset: a single-file NIfTI-1 image keeps its voxels at byte 352 or later"),
        "{e}"
    );
    let e = err(&variant("beyond.nii", 108, &4096f32.to_le_bytes()));
    assert!(
        e.contains("beyond.nii'")
            && e.contains(
                "file is truncated: 240 bytes of voxel data expected after vox_offset 4096"
            ),
        "{e}"
    );
    // Spacing of 1e6 mm and 60 mm in the sform (srow_x[0], byte 280): resampling
    // would have allocated without bound (a capacity overflow, or 434 MB).
    for (name, sx) in [("huge.nii", 1e6f32), ("sixty.nii", 60.0)] {
        let e = err(&variant(name, 280, &sx.to_le_bytes()));
        assert!(
            e.contains(&format!("{name}': not a valid NIfTI-1 file: spacing {:.6} mm along axis 0 (from the sform) is above 50 mm", sx)),
            "{e}"
        );
    }
    // 50 mm is still read.
    assert!(read_nifti(&variant("fifty.nii", 280, &50f32.to_le_bytes())).is_ok());

    // A gzip bomb: a 60-voxel header followed by 1 GiB of zeros, about 1 MB compressed.
    // Decompression stops 1 MiB past what the header needs.
    let bomb = dir.path().join("bomb.nii.gz");
    {
        use std::io::Write;
        let head = std::fs::read(&good).unwrap();
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&bomb).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(&head).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            gz.write_all(&zeros).unwrap();
        }
        gz.finish().unwrap();
    }
    let size = std::fs::metadata(&bomb).unwrap().len();
    assert!(size < 8 << 20, "the bomb is small on disk ({size} bytes)");
    let e = err(&bomb);
    assert!(
        e.contains("bomb.nii.gz': not a valid NIfTI-1 file: decompresses to more than the 1049168 bytes its header describes"),
        "{e}"
    );
    // A good file with a few trailing bytes (within the slack) still reads.
    let tail = dir.path().join("tail.nii");
    let mut b = std::fs::read(&good).unwrap();
    b.extend_from_slice(&[0u8; 16]);
    std::fs::write(&tail, b).unwrap();
    assert_eq!(
        read_nifti(&tail).unwrap().0.data,
        read_nifti(&good).unwrap().0.data
    );
}
