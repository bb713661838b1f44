//! Resampling correctness against an analytic reference, through the ingest and resample
//! stages: an analytic pattern sampled by nibabel at 0.7 x 0.7 x 2.5 mm in two non-RAS
//! orientations (LPS, and the permuted PIR), resampled to 1.5 mm.

use meduet_stages::data::volume::apply_affine;
use meduet_stages::data::zarr_store::read_zarr;
use meduet_stages::testing::run_python;

use crate::common::Project;

/// The pattern, in world millimetres.
fn pattern(p: [f64; 3]) -> f64 {
    use std::f64::consts::TAU;
    100.0 * (TAU * p[0] / 40.0).sin() * (TAU * p[1] / 50.0).cos()
        + 80.0 * (TAU * p[2] / 60.0 + 0.3).sin()
        + 0.5 * p[0]
}

/// Landmarks: world centres of small label cubes (label = index + 1).
const LANDMARKS: [[f64; 3]; 6] = [
    [20.0, 10.0, 0.0],
    [-30.0, -20.0, 25.0],
    [40.0, -40.0, -30.0],
    [-50.0, 30.0, 40.0],
    [0.0, 0.0, -40.0],
    [10.0, -50.0, 10.0],
];

const WRITE: &str = r#"
import sys, json, numpy as np, nibabel as nib
out = sys.argv[1]
lm = np.array(json.loads(sys.argv[2]))
def pattern(x, y, z):
    t = 2 * np.pi
    return 100 * np.sin(t * x / 40) * np.cos(t * y / 50) + 80 * np.sin(t * z / 60 + 0.3) + 0.5 * x
cases = {
    # LPS: i towards L, j towards P, k towards S
    "lps": ((180, 160, 44), np.array([[-0.7, 0, 0, 60], [0, -0.7, 0, 50], [0, 0, 2.5, -50], [0, 0, 0, 1.0]])),
    # PIR: i towards P (0.7), j towards I (2.5), k towards R (0.7)
    "pir": ((160, 44, 180), np.array([[0, 0, 0.7, -65.3], [-0.7, 0, 0, 50], [0, -2.5, 0, 57.5], [0, 0, 0, 1.0]])),
}
facts = {}
for name, (shape, aff) in cases.items():
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(aff, ijk)
    img = pattern(*xyz.T).reshape(shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    cent = {}
    for n, c in enumerate(lm):
        d = np.abs(xyz - c)
        inside = ((d[:, 0] <= 2.1) & (d[:, 1] <= 2.1) & (d[:, 2] <= 3.8)).reshape(shape)
        lab[inside] = n + 1
        cent[n + 1] = xyz[inside.reshape(-1)].mean(axis=0).tolist()
    nib.save(nib.Nifti1Image(img, aff), f"{out}/data/imagesTr/{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), f"{out}/data/labelsTr/{name}.nii.gz")
    facts[name] = {"axcodes": "".join(nib.aff2axcodes(aff)), "centroids": cent}
print(json.dumps(facts))
"#;

const PIPELINE: &str = r#"
name = "analytic"
[stages.ingest]
kind = "ingest"
datasets = [{ name = "analytic", id = 0, path = "data" }]
[stages.resample]
kind = "resample"
inputs = { subjects = "ingest.subjects" }
mode = "none"
crop_foreground = false
min_size = [1, 1, 1]
divisible = 1
"#;

#[test]
fn analytic_pattern_and_landmarks_survive_resampling() {
    let p = Project::new();
    for d in ["data/imagesTr", "data/labelsTr"] {
        std::fs::create_dir_all(p.path(d)).unwrap();
    }
    let lm = serde_json::to_string(&LANDMARKS).unwrap();
    let facts: serde_json::Value =
        serde_json::from_str(&run_python(WRITE, &[p.dir.path().to_str().unwrap(), &lm])).unwrap();
    assert_eq!(facts["lps"]["axcodes"], "LPS");
    assert_eq!(facts["pir"]["axcodes"], "PIR");
    p.run_ok(PIPELINE);
    let items = p.items("resample", "volumes");
    assert_eq!(items.len(), 2);
    // Trilinear interpolation error bound for a C2 function: sum over axes of
    // h_a^2 / 8 * max |d2f/da2|, with the input spacing h = (0.7, 0.7, 2.5) mm along x, y, z.
    let tau = std::f64::consts::TAU;
    let bound = 0.7f64.powi(2) / 8.0 * 100.0 * (tau / 40.0).powi(2)
        + 0.7f64.powi(2) / 8.0 * 100.0 * (tau / 50.0).powi(2)
        + 2.5f64.powi(2) / 8.0 * 80.0 * (tau / 60.0).powi(2);
    assert!((bound - 0.933).abs() < 1e-3, "{bound}");
    for item in &items {
        let case = item.attr_str("case").unwrap().to_string();
        let (img, attrs) = read_zarr::<f32>(&item.dir.join("image.zarr")).unwrap();
        assert_eq!(attrs["orientation"], "RAS", "{case}");
        assert_eq!(
            attrs["spacing"],
            serde_json::json!([1.5, 1.5, 1.5]),
            "{case}"
        );
        assert_eq!(
            attrs["original_orientation"], facts[&case]["axcodes"],
            "{case}"
        );
        // (179 * 0.7 / 1.5 + 1, 159 * 0.7 / 1.5 + 1, 43 * 2.5 / 1.5 + 1) rounded.
        assert_eq!(img.shape, [85, 75, 73], "{case}");
        let (mut worst, mut sq, mut n) = (0.0f64, 0.0f64, 0usize);
        for i in 0..img.shape[0] {
            for j in 0..img.shape[1] {
                for k in 0..img.shape[2] {
                    let w = apply_affine(&img.affine, [i as f64, j as f64, k as f64]);
                    // Only inside the hull of the input voxel centres (beyond it: border clamp).
                    if w[0] < -65.3 - 1e-3
                        || w[0] > 60.0 + 1e-3
                        || w[1] < -61.3 - 1e-3
                        || w[1] > 50.0 + 1e-3
                        || w[2] < -50.0 - 1e-3
                        || w[2] > 57.5 + 1e-3
                    {
                        continue;
                    }
                    let e = (img.get(i, j, k) as f64 - pattern(w)).abs();
                    worst = worst.max(e);
                    sq += e * e;
                    n += 1;
                }
            }
        }
        let rms = (sq / n as f64).sqrt();
        eprintln!("{case}: max error {worst:.4}, rms {rms:.4}, bound {bound:.4}, {n} voxels");
        assert!(
            n as f64 > 0.95 * img.len() as f64,
            "{case}: {n} of {}",
            img.len()
        );
        assert!(
            worst <= bound,
            "{case}: max error {worst} above the bound {bound}"
        );
        assert!(rms < 0.5 * bound, "{case}: rms {rms}");
        // Landmarks: label centroids keep their world position within half a voxel.
        let (lab, _) = read_zarr::<u8>(&item.dir.join("label.zarr")).unwrap();
        assert_eq!(lab.affine, img.affine);
        for (n, _) in LANDMARKS.iter().enumerate() {
            let v = n as u8 + 1;
            let mut s = [0.0; 3];
            let mut count = 0.0;
            for i in 0..lab.shape[0] {
                for j in 0..lab.shape[1] {
                    for k in 0..lab.shape[2] {
                        if lab.get(i, j, k) == v {
                            let w = apply_affine(&lab.affine, [i as f64, j as f64, k as f64]);
                            (0..3).for_each(|d| s[d] += w[d]);
                            count += 1.0;
                        }
                    }
                }
            }
            assert!(count > 0.0, "{case}: landmark {v} vanished");
            let before = &facts[&case]["centroids"][v.to_string()];
            for d in 0..3 {
                let b = before[d].as_f64().unwrap();
                let a = s[d] / count;
                assert!(
                    (a - b).abs() <= 0.75,
                    "{case}: landmark {v} axis {d}: {a} vs {b}"
                );
            }
        }
    }
}
