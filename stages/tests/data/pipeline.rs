//! The phantom -> ingest -> resample pipeline, zarr-python interop, export, ingest
//! layouts, bad inputs and the skip policy.

use std::path::Path;

use meduet_stages::data::export::export_volume_item;
use meduet_stages::data::nifti_io::{
    read_nifti_labels, write_nifti, write_nifti_labels, NiftiDtype,
};
use meduet_stages::data::volume::{apply_affine, LabelVolume, Volume, VolumeOf, IDENTITY};
use meduet_stages::data::zarr_store::read_zarr;
use meduet_stages::testing::run_python;

use crate::common::{read_f32, read_json, Project};

const E2E: &str = r#"
name = "e2e"
[stages.phantom]
kind = "phantom"
domains = 2
subjects_per_domain = 2
seed = 5
paired = true
[stages.ingest]
kind = "ingest"
inputs = { datasets = "phantom.datasets" }
[stages.resample]
kind = "resample"
inputs = { subjects = "ingest.subjects" }
"#;

fn centroid(v: &LabelVolume, label: u8) -> [f64; 3] {
    let mut s = [0.0; 3];
    let mut n = 0.0;
    for i in 0..v.shape[0] {
        for j in 0..v.shape[1] {
            for k in 0..v.shape[2] {
                if v.get(i, j, k) == label {
                    let w = apply_affine(&v.affine, [i as f64, j as f64, k as f64]);
                    (0..3).for_each(|d| s[d] += w[d]);
                    n += 1.0;
                }
            }
        }
    }
    s.map(|x| x / n)
}

const ZARR_PYTHON: &str = r#"
import sys, json, numpy as np, zarr, nibabel as nib
item, out = sys.argv[1], sys.argv[2]
facts = {}
for name in ["image", "label"]:
    a = zarr.open_array(f"{item}/{name}.zarr", mode="r")
    x = a[:]
    np.ascontiguousarray(x).tofile(f"{out}/{name}.zarr.bin")
    n = nib.load(f"{out}/nifti/{name}.nii.gz")
    np.ascontiguousarray(np.asarray(n.dataobj)).tofile(f"{out}/{name}.nii.bin")
    facts[name] = {"dtype": str(x.dtype), "shape": list(x.shape), "chunks": list(a.chunks),
                   "attrs": dict(a.attrs), "nifti_affine": n.affine.tolist(),
                   "nifti_dtype": str(n.get_data_dtype()), "zarr_format": a.metadata.zarr_format}
print(json.dumps(facts))
"#;

#[test]
fn phantom_ingest_resample_end_to_end() {
    let p = Project::new();
    p.run_ok(E2E);
    let subjects = p.items("ingest", "subjects");
    let ids: Vec<&str> = subjects.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "arterial_case_000",
            "arterial_case_001",
            "venous_case_000",
            "venous_case_001"
        ]
    );
    assert_eq!(subjects[0].attr_str("domain"), Some("arterial"));
    assert_eq!(subjects[0].attr_i64("domain_id"), Some(1));
    assert_eq!(subjects[2].attr_i64("domain_id"), Some(0));
    assert_eq!(subjects[0].attrs["has_label"], true);
    assert!(subjects[0].attrs["has_lesion"].is_boolean());
    let text = std::fs::read_to_string(subjects[0].dir.join("subject.json")).unwrap();
    let root = p.dir.path().to_string_lossy().into_owned();
    assert!(!text.contains(&root) && !text.contains("/tmp"), "{text}");
    let rec = read_json(&subjects[0].dir.join("subject.json"));
    assert_eq!(rec["image"]["file"], "imagesTr/case_000.nii.gz");
    assert_eq!(rec["image"]["header"]["orientation"], "LPS");
    assert_eq!(rec["image"]["digest"].as_str().unwrap().len(), 64);
    let phantom = p.items("phantom", "datasets");
    let volumes = p.items("resample", "volumes");
    assert_eq!(volumes.len(), 4);
    for (v, s) in volumes.iter().zip(&subjects) {
        assert_eq!(v.id, s.id);
        let (img, attrs) = read_zarr::<f32>(&v.dir.join("image.zarr")).unwrap();
        let (lab, lattrs) = read_zarr::<u8>(&v.dir.join("label.zarr")).unwrap();
        assert_eq!(img.shape, lab.shape);
        assert_eq!(img.affine, lab.affine);
        assert!(
            img.shape.iter().all(|&n| n >= 96 && n % 4 == 0),
            "{:?}",
            img.shape
        );
        assert_eq!(v.attrs["shape"], serde_json::json!(img.shape));
        assert_eq!(attrs["orientation"], "RAS");
        assert_eq!(attrs["spacing"], serde_json::json!([1.5, 1.5, 1.5]));
        let (lo, hi) = img
            .data
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo == 0.0 && hi <= 1.0 && hi > 0.5, "{lo} {hi}");
        assert!(lab.data.iter().all(|&l| l <= 8));
        let sd = read_json(&s.dir.join("subject.json"));
        assert_eq!(attrs["source_digest"], sd["image"]["digest"]);
        assert_eq!(lattrs["label_digest"], sd["label"]["digest"]);
        assert_eq!(attrs["domain"], s.attrs["domain"]);
        assert_eq!(
            attrs["intensity"]["window"],
            serde_json::json!([-175.0, 250.0])
        );
        let want_spacing = if s.attr_str("domain") == Some("venous") {
            [2.4, 2.4, 2.0]
        } else {
            [2.2, 2.2, 2.5]
        };
        let os: Vec<f64> = attrs["original_spacing"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for a in 0..3 {
            assert!((os[a] - want_spacing[a]).abs() < 1e-5, "{os:?}");
        }
        // Organ centroids keep their world position (within half an output voxel).
        let ds = phantom
            .iter()
            .find(|d| Some(d.id.as_str()) == s.attr_str("domain"))
            .unwrap();
        let case = s.attr_str("case").unwrap();
        let (orig, _) = read_nifti_labels(&ds.dir.join(format!("labelsTr/{case}.nii.gz"))).unwrap();
        for label in [1u8, 2, 3, 4, 6] {
            let (a, b) = (centroid(&orig, label), centroid(&lab, label));
            for d in 0..3 {
                assert!(
                    (a[d] - b[d]).abs() <= 0.75,
                    "{} label {label}: {a:?} vs {b:?}",
                    s.id
                );
            }
        }
    }
    // zarr-python reads the arrays unchanged; nibabel reads the exported NIfTI with the same affine.
    let out = tempfile::tempdir().unwrap();
    let written = export_volume_item(&volumes[0].dir, &out.path().join("nifti")).unwrap();
    assert_eq!(written.len(), 2);
    let facts: serde_json::Value = serde_json::from_str(&run_python(
        ZARR_PYTHON,
        &[
            volumes[0].dir.to_str().unwrap(),
            out.path().to_str().unwrap(),
        ],
    ))
    .unwrap();
    let (img, attrs) = read_zarr::<f32>(&volumes[0].dir.join("image.zarr")).unwrap();
    let (lab, _) = read_zarr::<u8>(&volumes[0].dir.join("label.zarr")).unwrap();
    assert_eq!(facts["image"]["dtype"], "float32");
    assert_eq!(facts["label"]["dtype"], "uint8");
    assert_eq!(facts["image"]["zarr_format"], 3);
    assert_eq!(facts["image"]["shape"], serde_json::json!(img.shape));
    assert_eq!(facts["image"]["chunks"], serde_json::json!([64, 64, 64]));
    assert_eq!(facts["image"]["attrs"]["affine"], attrs["affine"]);
    assert_eq!(facts["image"]["attrs"]["domain_id"], 1);
    assert_eq!(read_f32(&out.path().join("image.zarr.bin")), img.data);
    assert_eq!(
        std::fs::read(out.path().join("label.zarr.bin")).unwrap(),
        lab.data
    );
    assert_eq!(read_f32(&out.path().join("image.nii.bin")), img.data);
    assert_eq!(
        std::fs::read(out.path().join("label.nii.bin")).unwrap(),
        lab.data
    );
    assert_eq!(facts["label"]["nifti_dtype"], "uint8");
    let d = crate::common::affine_diff(&img.affine, &facts["image"]["nifti_affine"]);
    assert!(d < 1e-4, "exported affine differs by {d}");
}

fn vol(shape: [usize; 3], spacing: f64) -> Volume {
    let mut affine = IDENTITY;
    (0..3).for_each(|c| affine[c][c] = spacing);
    Volume {
        data: (0..shape.iter().product::<usize>())
            .map(|x| (x % 97) as f32 - 40.0)
            .collect(),
        shape,
        affine,
    }
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

const INGEST: &str = r#"
name = "ingest"
[stages.ingest]
kind = "ingest"
datasets = [{ name = "bad", id = 3, path = "data", on_error = "ON_ERROR" }]
"#;

/// A project whose `data/` folder is filled by `fill`.
fn dataset(fill: impl FnOnce(&Path)) -> Project {
    let p = Project::new();
    std::fs::create_dir_all(p.path("data/imagesTr")).unwrap();
    std::fs::create_dir_all(p.path("data/labelsTr")).unwrap();
    fill(&p.path("data"));
    p
}

#[test]
fn bad_inputs_fail_ingest_naming_the_file_and_the_problem() {
    let good_label = |d: &Path, name: &str, v: &Volume| {
        write_nifti_labels(
            &d.join(format!("labelsTr/{name}")),
            &v.map(|x| (x.abs() as u8) % 3),
        )
        .unwrap()
    };
    type Fill = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Fill, &str)> = vec![
        (
            "truncated gzip",
            Box::new(|d: &Path| {
                let f = d.join("imagesTr/trunc.nii.gz");
                write_nifti(&f, &vol([6, 5, 4], 1.0), NiftiDtype::Int16).unwrap();
                let b = std::fs::read(&f).unwrap();
                std::fs::write(&f, &b[..b.len() - 20]).unwrap();
            }),
            "imagesTr/trunc.nii.gz': truncated or corrupt gzip data",
        ),
        (
            "2D image",
            Box::new(|d: &Path| {
                let f = d.join("imagesTr/flat.nii");
                write_nifti(&f, &vol([6, 5, 4], 1.0), NiftiDtype::Int16).unwrap();
                patch(&f, 40, &2u16.to_le_bytes());
            }),
            "imagesTr/flat.nii': is a 2D image (dim = [6, 5])",
        ),
        (
            "4D image",
            Box::new(|d: &Path| {
                let f = d.join("imagesTr/multi.nii");
                write_nifti(&f, &vol([6, 5, 4], 1.0), NiftiDtype::Int16).unwrap();
                patch(&f, 40, &4u16.to_le_bytes());
                patch(&f, 48, &3u16.to_le_bytes());
            }),
            "imagesTr/multi.nii': is a 4D image with 3 volumes",
        ),
        (
            "NaN voxels",
            Box::new(|d: &Path| {
                let mut w = vol([6, 5, 4], 1.0);
                w.data[7] = f32::NAN;
                write_nifti(&d.join("imagesTr/nan.nii.gz"), &w, NiftiDtype::Float32).unwrap();
            }),
            "imagesTr/nan.nii.gz': 1 voxel(s) are NaN or Inf (first at voxel [0, 1, 3])",
        ),
        (
            "zero spacing",
            Box::new(|d: &Path| {
                let f = d.join("imagesTr/zero.nii");
                write_nifti(&f, &vol([6, 5, 4], 1.0), NiftiDtype::Int16).unwrap();
                patch(&f, 88, &0f32.to_le_bytes());
            }),
            "imagesTr/zero.nii': zero or negative spacing (pixdim = [1.0, 1.0, 0.0])",
        ),
        (
            "label shape",
            Box::new(move |d: &Path| {
                write_nifti(
                    &d.join("imagesTr/s.nii.gz"),
                    &vol([6, 5, 4], 1.0),
                    NiftiDtype::Int16,
                )
                .unwrap();
                good_label(d, "s.nii.gz", &vol([6, 5, 5], 1.0));
            }),
            "labelsTr/s.nii.gz' does not match image '",
        ),
        (
            "label affine",
            Box::new(move |d: &Path| {
                write_nifti(
                    &d.join("imagesTr/a.nii.gz"),
                    &vol([6, 5, 4], 1.0),
                    NiftiDtype::Int16,
                )
                .unwrap();
                good_label(d, "a.nii.gz", &vol([6, 5, 4], 1.1));
            }),
            "imagesTr/a.nii.gz': affine differs by 0.707 mm",
        ),
        (
            "empty folder",
            Box::new(|d: &Path| {
                std::fs::write(d.join("README.txt"), "no images here").unwrap();
            }),
            "dataset 'bad': folder '",
        ),
    ];
    for (what, fill, want) in cases {
        let p = dataset(|d| fill(d));
        let e = p.run_err(&INGEST.replace("ON_ERROR", "fail"), "ingest");
        assert!(e.contains(want), "{what}: {e}");
        if what == "empty folder" {
            assert!(
                e.contains("imagesTr' contains no .nii or .nii.gz image"),
                "{e}"
            );
        }
    }
}

#[test]
fn skip_policy_lists_skipped_subjects() {
    let p = dataset(|d| {
        for (n, s) in [("good1", 1.0), ("good2", 1.5)] {
            write_nifti(
                &d.join(format!("imagesTr/{n}.nii.gz")),
                &vol([6, 5, 4], s),
                NiftiDtype::Int16,
            )
            .unwrap();
        }
        let mut w = vol([6, 5, 4], 1.0);
        w.data[0] = f32::INFINITY;
        write_nifti(&d.join("imagesTr/inf.nii.gz"), &w, NiftiDtype::Float32).unwrap();
        std::fs::write(d.join("imagesTr/junk.nii"), b"not a nifti file at all").unwrap();
        // Hostile headers (issue 19, item 5) are skipped too, not a panic of the stage.
        let hostile = |name: &str, at: usize, value: f32| {
            let p = d.join(format!("imagesTr/{name}"));
            write_nifti(&p, &vol([6, 5, 4], 1.0), NiftiDtype::Int16).unwrap();
            let mut b = std::fs::read(&p).unwrap();
            b[at..at + 4].copy_from_slice(&value.to_le_bytes());
            std::fs::write(&p, b).unwrap();
        };
        hostile("offset.nii", 108, 1e30);
        hostile("spacing.nii", 280, 1e6);
    });
    p.run_ok(&INGEST.replace("ON_ERROR", "skip"));
    let items = p.items("ingest", "subjects");
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["bad_good1", "bad_good2"]);
    assert_eq!(items[0].attrs["has_label"], false);
    assert_eq!(items[0].attr_i64("domain_id"), Some(3));
    let report = read_json(&p.output("ingest", "report").join("report.json"));
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    let error_of = |file: &str| {
        skipped
            .iter()
            .find(|s| s["file"] == file)
            .map(|s| s["error"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{file} not skipped: {skipped:?}"))
    };
    assert!(error_of("imagesTr/inf.nii.gz").contains("NaN or Inf"));
    assert!(error_of("imagesTr/junk.nii").contains("not a valid NIfTI-1 file"));
    assert!(error_of("imagesTr/offset.nii")
        .contains("offset.nii': not a valid NIfTI-1 file: vox_offset"));
    assert!(error_of("imagesTr/spacing.nii").contains(
        "spacing.nii': not a valid NIfTI-1 file: spacing 1000000.000000 mm along axis 0"
    ));
    assert_eq!(p.metrics("ingest")["skipped"], 4);
    // No absolute path of this machine in the report (issue 19, item 6).
    let text = std::fs::read_to_string(p.output("ingest", "report").join("report.json")).unwrap();
    assert!(!text.contains(p.path("").to_str().unwrap()), "{text}");
    assert!(
        text.contains("'imagesTr/offset.nii': not a valid NIfTI-1 file"),
        "{text}"
    );
}

/// Issue 19, item 6: the stage's `on_error` applies to parameter datasets that do not set
/// their own (it was accepted and ignored); a dataset's own policy wins; a dataset named
/// `..` is a validation error, not a run-time failure.
#[test]
fn stage_on_error_applies_to_parameter_datasets_and_bad_names_are_refused() {
    let p = dataset(|d| {
        write_nifti(
            &d.join("imagesTr/good.nii.gz"),
            &vol([6, 5, 4], 1.0),
            NiftiDtype::Int16,
        )
        .unwrap();
        std::fs::write(d.join("imagesTr/junk.nii"), b"not a nifti file at all").unwrap();
    });
    let stage_skip = "[stages.ingest]\nkind = \"ingest\"\non_error = \"skip\"\n\
        datasets = [{ name = \"d\", id = 0, path = \"data\" }]\n";
    p.run_ok(stage_skip);
    assert_eq!(p.metrics("ingest")["skipped"], 1);
    let own_fail = stage_skip.replace("path = \"data\"", "path = \"data\", on_error = \"fail\"");
    let e = p.run_err(&own_fail, "ingest");
    assert!(
        e.contains("junk.nii") && e.contains("failed their checks"),
        "{e}"
    );
    std::fs::write(
        p.path("pipeline.toml"),
        stage_skip.replace("\"d\"", "\"..\""),
    )
    .unwrap();
    let e = meduet_engine::Pipeline::load(&p.path("pipeline.toml"), &meduet_stages::registry())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pipeline.toml:4:12: stage 'ingest': parameter 'datasets[0].name': '..' must be letters"),
        "{e}"
    );
}

#[test]
fn plain_nnunet_and_glob_layouts_and_moved_data() {
    let p = Project::new();
    let img = vol([6, 5, 4], 1.0);
    let lab: VolumeOf<u8> = img.map(|x| (x.abs() as u8) % 4);
    write_nifti(&p.path("plain/p1.nii"), &img, NiftiDtype::Int16).unwrap();
    write_nifti(&p.path("plain/sub/p2.nii.gz"), &img, NiftiDtype::Float32).unwrap();
    write_nifti(
        &p.path("nn/imagesTr/x_0000.nii.gz"),
        &img,
        NiftiDtype::Int16,
    )
    .unwrap();
    write_nifti(
        &p.path("nn/imagesTr/x_0001.nii.gz"),
        &img,
        NiftiDtype::Int16,
    )
    .unwrap();
    write_nifti_labels(&p.path("nn/labelsTr/x.nii.gz"), &lab).unwrap();
    write_nifti(&p.path("globbed/g1.nii"), &img, NiftiDtype::Int16).unwrap();
    std::fs::write(p.path("globbed/notes.txt"), "x").unwrap();
    let toml = r#"
name = "layouts"
[stages.ingest]
kind = "ingest"
datasets = [
  { name = "plain", id = 0, path = "plain" },
  { name = "nn", id = 1, path = "nn" },
  { name = "glob", id = 2, path = "globbed/*.nii" },
]
"#;
    p.run_ok(toml);
    let items = p.items("ingest", "subjects");
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["glob_g1", "nn_x", "plain_p1", "plain_p2"]);
    assert_eq!(items[1].attrs["has_label"], true);
    assert_eq!(items[3].attrs["has_label"], false);
    let report = read_json(&p.output("ingest", "report").join("report.json"));
    assert_eq!(report["ignored"][0]["file"], "imagesTr/x_0001.nii.gz");
    // The same data elsewhere gives the same items (paths never enter digests).
    let q = Project::new();
    for d in ["plain", "nn", "globbed"] {
        copy_dir(&p.path(d), &q.path(&format!("moved/{d}")));
    }
    q.run_ok(&toml.replace("path = \"", "path = \"moved/"));
    let moved = q.items("ingest", "subjects");
    for (a, b) in items.iter().zip(&moved) {
        assert_eq!((&a.id, a.digest), (&b.id, b.digest));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}
