//! Phantoms: determinism, and style vs content: domains differ in intensity statistics,
//! label statistics do not depend on the domain.

use std::collections::BTreeMap;

use meduet_stages::data::nifti_io::{read_nifti, read_nifti_labels};

use crate::common::{read_json, Project};

fn phantom(seed: u64, domains: usize, subjects: usize, paired: bool) -> String {
    format!(
        "name = \"ph\"\n[stages.phantom]\nkind = \"phantom\"\ndomains = {domains}\nsubjects_per_domain = {subjects}\nseed = {seed}\npaired = {paired}\n"
    )
}

#[test]
fn same_seed_gives_identical_bytes() {
    let (a, b, c) = (Project::new(), Project::new(), Project::new());
    a.run_ok(&phantom(7, 2, 2, false));
    b.run_ok(&phantom(7, 2, 2, false));
    c.run_ok(&phantom(8, 2, 2, false));
    let (ia, ib, ic) = (
        a.items("phantom", "datasets"),
        b.items("phantom", "datasets"),
        c.items("phantom", "datasets"),
    );
    assert_eq!(ia.len(), 2);
    assert_eq!(ia[0].id, "venous");
    assert_eq!(ia[1].attr_i64("domain_id"), Some(1));
    for (x, y) in ia.iter().zip(&ib) {
        assert_eq!(x.digest, y.digest, "{}", x.id);
        for f in [
            "imagesTr/case_001.nii.gz",
            "labelsTr/case_001.nii.gz",
            "dataset.json",
            "phantom_truth.json",
        ] {
            assert_eq!(
                std::fs::read(x.dir.join(f)).unwrap(),
                std::fs::read(y.dir.join(f)).unwrap(),
                "{f}"
            );
        }
    }
    for (x, z) in ia.iter().zip(&ic) {
        assert_ne!(x.digest, z.digest, "{}", x.id);
    }
    let ds = read_json(&ia[1].dir.join("dataset.json"));
    assert_eq!(ds["numTraining"], 2);
    assert_eq!(ds["modality"]["0"], "CT");
    assert_eq!(ds["labels"]["1"], "liver");
    assert_eq!(ds["training"][1]["label"], "./labelsTr/case_001.nii.gz");
    let truth = read_json(&ia[0].dir.join("phantom_truth.json"));
    assert!(truth["cases"]["case_000"]["has_lesion"].is_boolean());
    assert!(
        truth["cases"]["case_000"]["organ_ml"]["liver"]
            .as_f64()
            .unwrap()
            > 50.0
    );
}

/// Per-case measurements of one domain: (liver mean HU, liver sd HU, label volumes in ml).
fn measure(dir: &std::path::Path, subjects: usize) -> Vec<(f64, f64, BTreeMap<u8, f64>)> {
    (0..subjects)
        .map(|s| {
            let (img, _) = read_nifti(&dir.join(format!("imagesTr/case_{s:03}.nii.gz"))).unwrap();
            let (lab, _) =
                read_nifti_labels(&dir.join(format!("labelsTr/case_{s:03}.nii.gz"))).unwrap();
            assert_eq!(img.affine, lab.affine);
            let ml = img.spacing().iter().product::<f64>() / 1000.0;
            let liver: Vec<f64> = img
                .data
                .iter()
                .zip(&lab.data)
                .filter(|(_, &l)| l == 1)
                .map(|(&x, _)| x as f64)
                .collect();
            let mean = liver.iter().sum::<f64>() / liver.len() as f64;
            let sd =
                (liver.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / liver.len() as f64).sqrt();
            let mut vols = BTreeMap::new();
            for &l in &lab.data {
                *vols.entry(l).or_insert(0.0) += ml;
            }
            (mean, sd, vols)
        })
        .collect()
}

/// One-way ANOVA F statistic of groups of values.
fn f_stat(groups: &[Vec<f64>]) -> f64 {
    let all: Vec<f64> = groups.iter().flatten().copied().collect();
    let grand = all.iter().sum::<f64>() / all.len() as f64;
    let k = groups.len() as f64;
    let n = all.len() as f64;
    let mut between = 0.0;
    let mut within = 0.0;
    for g in groups {
        let m = g.iter().sum::<f64>() / g.len() as f64;
        between += g.len() as f64 * (m - grand).powi(2);
        within += g.iter().map(|x| (x - m).powi(2)).sum::<f64>();
    }
    (between / (k - 1.0)) / (within / (n - k)).max(1e-12)
}

#[test]
fn domains_differ_in_intensity_while_labels_do_not() {
    let (d, s) = (4, 8);
    for paired in [true, false] {
        let p = Project::new();
        let t0 = std::time::Instant::now();
        p.run_ok(&phantom(1, d, s, paired));
        let secs = t0.elapsed().as_secs_f64();
        let items = p.items("phantom", "datasets");
        let per_domain: Vec<_> = items.iter().map(|it| measure(&it.dir, s)).collect();
        let means: Vec<Vec<f64>> = per_domain
            .iter()
            .map(|c| c.iter().map(|x| x.0).collect())
            .collect();
        let sds: Vec<Vec<f64>> = per_domain
            .iter()
            .map(|c| c.iter().map(|x| x.1).collect())
            .collect();
        let f_mean = f_stat(&means);
        let f_sd = f_stat(&sds);
        let mut f_vol = BTreeMap::new();
        for label in [1u8, 2, 3, 4, 5, 6] {
            let g: Vec<Vec<f64>> = per_domain
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|x| x.2.get(&label).copied().unwrap_or(0.0))
                        .collect()
                })
                .collect();
            f_vol.insert(label, f_stat(&g));
        }
        let domain_means: Vec<String> = means
            .iter()
            .map(|m| format!("{:.0}", m.iter().sum::<f64>() / s as f64))
            .collect();
        let domain_sds: Vec<String> = sds
            .iter()
            .map(|m| format!("{:.1}", m.iter().sum::<f64>() / s as f64))
            .collect();
        eprintln!(
            "paired={paired}: {} cases in {secs:.2} s; liver HU by domain {domain_means:?} (F = {f_mean:.1}), liver sd {domain_sds:?} (F = {f_sd:.1}); label volume F by label {f_vol:.2?}",
            d * s
        );
        // Style: the domain explains most of the variance of the intensity statistics.
        assert!(f_mean > 20.0, "liver mean HU F = {f_mean}");
        assert!(f_sd > 20.0, "liver sd F = {f_sd}");
        // Content: label volumes do not depend on the domain. Paired (the same subjects in
        // every domain): F is ~0, only discretisation differs. Unpaired: F stays below 6
        // (p < 0.003 for F(3, 28); the 5% critical value is 2.95).
        for (label, f) in &f_vol {
            let limit = if paired { 0.1 } else { 6.0 };
            assert!(*f < limit, "label {label}: F = {f}");
        }
        if paired {
            // The same subject in every domain: volumes agree up to discretisation.
            for c in 0..s {
                for label in [1u8, 2, 3, 4, 5] {
                    let v: Vec<f64> = per_domain.iter().map(|dm| dm[c].2[&label]).collect();
                    let (lo, hi) = v
                        .iter()
                        .fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
                    assert!((hi - lo) / hi < 0.08, "case {c} label {label}: {v:?}");
                }
            }
            let truths: Vec<serde_json::Value> = items
                .iter()
                .map(|it| read_json(&it.dir.join("phantom_truth.json")))
                .collect();
            for c in 0..s {
                let case = format!("case_{c:03}");
                let lesion: Vec<&serde_json::Value> = truths
                    .iter()
                    .map(|t| &t["cases"][&case]["has_lesion"])
                    .collect();
                assert!(lesion.iter().all(|x| *x == lesion[0]), "{case}: {lesion:?}");
            }
        }
        let m = p.metrics("phantom");
        assert_eq!(m["cases"], 32);
        let lesions = m["cases_with_lesion"].as_u64().unwrap();
        assert!((8..=24).contains(&lesions), "{lesions}");
    }
}
