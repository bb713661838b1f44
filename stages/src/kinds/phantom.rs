//! `phantom`: the built-in data. Generates seeded multi-domain CT phantoms and writes each
//! domain as its own dataset folder, exactly like a real one (MSD / nnU-Net layout).
//!
//! Output `datasets` (collection): one item per domain, id = the domain name, attributes
//! `name` and `domain_id`. Item folder:
//!
//! ```text
//! dataset.json                 MSD: name, modality {"0": "CT"}, labels, numTraining, training
//! phantom_truth.json           per case: has_lesion, lesion_ml, organ_ml, content_seed; the style
//! imagesTr/case_000.nii.gz     int16 or float32 HU, the domain's grid and header orientation
//! labelsTr/case_000.nii.gz     uint8 labels on the same grid
//! ```
//!
//! Parameters: `domains` (a count: the presets in order, then seeded variations; or a
//! list of tables `{ preset = "arterial", name = ..., spacing = ..., noise_hu = ... }`
//! overriding preset fields), `subjects_per_domain`, `seed`, `paired` (the same anatomies
//! in every domain: counterfactual pairs), `anatomy_scale`, `lesion_probability`, and
//! `shape` / `spacing` overriding every domain's grid.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meduet_engine::{
    ArtifactType, InputSpec, OutputSpec, Resources, Stage, StageContext, StageError,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::nifti_io::{write_nifti, write_nifti_labels, NiftiDtype};
use crate::data::phantom::{sample_anatomy, LABELS};
use crate::data::phantom_render::{mix_seed, render_case, CaseTruth};
use crate::data::phantom_style::{derived, preset, presets, ContrastPhase, DomainStyle};

/// The artifact type of dataset folders.
pub const DATASETS: ArtifactType = ArtifactType::collection("datasets");

const CONTENT_TAG: u64 = 0xC0_7E47;
const STYLE_TAG: u64 = 0x57_7E00;

/// A domain given as a preset with overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    /// Preset to start from (`venous`, `arterial`, `native`, `lowdose`, `sagittal`, `sharp`).
    pub preset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<[usize; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spacing: Option<[f64; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_thickness_mm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orientation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ContrastPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hu_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hu_offset: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_hu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_corr_mm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur_mm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias_hu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<NiftiDtype>,
}

impl DomainSpec {
    fn resolve(&self) -> Result<DomainStyle, String> {
        let names: Vec<String> = presets().into_iter().map(|p| p.name).collect();
        let mut s = preset(&self.preset).ok_or_else(|| {
            format!(
                "unknown domain preset '{}' (presets: {})",
                self.preset,
                names.join(", ")
            )
        })?;
        macro_rules! set {
            ($($f:ident),*) => {$(if let Some(v) = &self.$f { s.$f = v.clone(); })*};
        }
        set!(name, shape, spacing, slice_thickness_mm, orientation, phase);
        set!(
            hu_scale,
            hu_offset,
            noise_hu,
            noise_corr_mm,
            blur_mm,
            bias_hu,
            dtype
        );
        Ok(s)
    }
}

/// `domains`: a count or a list of domain tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a number of domains or a list of domain tables")]
pub enum Domains {
    Count(usize),
    List(Vec<DomainSpec>),
}

/// Parameters of `phantom`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhantomParams {
    pub domains: Domains,
    pub subjects_per_domain: usize,
    pub seed: u64,
    /// The same anatomies (subject `s`) in every domain.
    pub paired: bool,
    /// Multiplies every anatomical length (1.0: a body of about 200 x 150 mm).
    pub anatomy_scale: f64,
    pub lesion_probability: f64,
    /// Overrides every domain's shape (RAS order).
    pub shape: Option<[usize; 3]>,
    /// Overrides every domain's spacing (mm, RAS order).
    pub spacing: Option<[f64; 3]>,
}

impl Default for PhantomParams {
    fn default() -> Self {
        Self {
            domains: Domains::Count(4),
            subjects_per_domain: 8,
            seed: 0,
            paired: false,
            anatomy_scale: 1.0,
            lesion_probability: 0.5,
            shape: None,
            spacing: None,
        }
    }
}

impl PhantomParams {
    /// The resolved domain styles, in order.
    pub fn styles(&self) -> Result<Vec<DomainStyle>, String> {
        let mut styles = match &self.domains {
            Domains::Count(n) => (0..*n).map(|d| derived(d, self.seed)).collect(),
            Domains::List(list) => list
                .iter()
                .enumerate()
                .map(|(i, d)| d.resolve().map_err(|e| format!("domains[{i}]: {e}")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        for s in &mut styles {
            if let Some(shape) = self.shape {
                s.shape = shape;
            }
            if let Some(sp) = self.spacing {
                s.spacing = sp;
                s.slice_thickness_mm = sp[2];
            }
        }
        Ok(styles)
    }

    /// Seed of the anatomy of subject `s` of domain `d`.
    pub fn content_seed(&self, d: usize, s: usize) -> u64 {
        let domain = if self.paired { 0 } else { d as u64 };
        mix_seed(mix_seed(self.seed, CONTENT_TAG ^ domain), s as u64)
    }

    /// Seed of the noise and bias of subject `s` of domain `d`.
    pub fn style_seed(&self, d: usize, s: usize) -> u64 {
        mix_seed(mix_seed(self.seed, STYLE_TAG ^ d as u64), s as u64)
    }
}

/// The case name of subject `s`.
pub fn case_name(s: usize) -> String {
    format!("case_{s:03}")
}

/// `dataset.json` of a domain, MSD style.
pub fn dataset_json(style: &DomainStyle, cases: usize) -> serde_json::Value {
    let labels: BTreeMap<String, &str> = LABELS
        .iter()
        .enumerate()
        .map(|(v, n)| (v.to_string(), *n))
        .collect();
    let training: Vec<serde_json::Value> = (0..cases)
        .map(|s| {
            serde_json::json!({
                "image": format!("./imagesTr/{}.nii.gz", case_name(s)),
                "label": format!("./labelsTr/{}.nii.gz", case_name(s)),
            })
        })
        .collect();
    serde_json::json!({
        "name": style.name,
        "description": "meduet multi-domain CT phantom (synthetic)",
        "reference": "generated by the meduet phantom stage",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
    })
}

/// `phantom`.
pub struct Phantom;

impl Stage for Phantom {
    type Params = PhantomParams;
    const KIND: &'static str = "phantom";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "generates seeded multi-domain CT phantoms as MSD-style dataset folders";

    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "datasets",
            ty: DATASETS,
            doc: "one dataset folder per domain (imagesTr/, labelsTr/, dataset.json, phantom_truth.json)",
        }]
    }

    fn default_resources(&self) -> Resources {
        Resources {
            threads: 0,
            ..Resources::default()
        }
    }

    fn validate(&self, p: &PhantomParams) -> Result<(), String> {
        if p.subjects_per_domain == 0 || p.subjects_per_domain > 1000 {
            return Err("subjects_per_domain must be 1..=1000".into());
        }
        if !(0.0..=1.0).contains(&p.lesion_probability) {
            return Err("lesion_probability must be in [0, 1]".into());
        }
        if !(0.2..=5.0).contains(&p.anatomy_scale) {
            return Err("anatomy_scale must be in [0.2, 5]".into());
        }
        // Counted before anything is built (the fuzzer's `domains = 9999999999` asked for
        // 1.6 TB of domain styles).
        let n = match &p.domains {
            Domains::Count(n) => *n,
            Domains::List(list) => list.len(),
        };
        if n == 0 || n > 100 {
            return Err(format!("domains: {n} domains; give 1..=100"));
        }
        let styles = p.styles()?;
        let mut names = std::collections::BTreeSet::new();
        for s in &styles {
            s.validate()?;
            if !names.insert(s.name.clone()) {
                return Err(format!("two domains are named '{}'", s.name));
            }
        }
        Ok(())
    }

    fn seed(&self, p: &PhantomParams) -> Option<u64> {
        Some(p.seed)
    }

    fn run(&self, p: &PhantomParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let styles = p.styles().map_err(StageError::input)?;
        let t0 = std::time::Instant::now();
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (d, s) in styles.iter().enumerate() {
            let mut attrs = BTreeMap::new();
            attrs.insert("name".to_string(), serde_json::json!(s.name));
            attrs.insert("domain_id".to_string(), serde_json::json!(d));
            dirs.push(ctx.emit_item("datasets", &s.name, attrs)?);
        }
        let n = p.subjects_per_domain;
        let jobs: Vec<(usize, usize)> = (0..styles.len())
            .flat_map(|d| (0..n).map(move |s| (d, s)))
            .collect();
        let cancel = ctx.cancel_flag().clone();
        let bar = ctx.progress(jobs.len() as u64, "cases");
        let truths: Vec<CaseTruth> = jobs
            .par_iter()
            .map(|&(d, s)| {
                if cancel.is_cancelled() {
                    return Err(StageError::Cancelled);
                }
                let seed = p.content_seed(d, s);
                let anatomy = sample_anatomy(seed, p.anatomy_scale, p.lesion_probability);
                let (img, lab, truth) = render_case(&anatomy, seed, &styles[d], p.style_seed(d, s))
                    .map_err(StageError::input)?;
                let case = case_name(s);
                let ip = dirs[d].join("imagesTr").join(format!("{case}.nii.gz"));
                write_nifti(&ip, &img, styles[d].dtype)?;
                let lp = dirs[d].join("labelsTr").join(format!("{case}.nii.gz"));
                write_nifti_labels(&lp, &lab)?;
                bar.inc(1);
                Ok(truth)
            })
            .collect::<Result<_, StageError>>()?;
        bar.finish_and_clear();
        let mut lesions = 0usize;
        for (d, s) in styles.iter().enumerate() {
            let cases: BTreeMap<String, &CaseTruth> =
                (0..n).map(|i| (case_name(i), &truths[d * n + i])).collect();
            lesions += cases.values().filter(|t| t.has_lesion).count();
            let truth = serde_json::json!({ "domain": s, "domain_id": d, "cases": cases });
            for (file, value) in [
                ("dataset.json", dataset_json(s, n)),
                ("phantom_truth.json", truth),
            ] {
                let path = dirs[d].join(file);
                let text = serde_json::to_vec_pretty(&value).expect("json serializes");
                std::fs::write(&path, text).map_err(|e| StageError::io(&path, e))?;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        ctx.set_metric("domains", styles.len());
        ctx.set_metric("cases", jobs.len());
        ctx.set_metric("cases_with_lesion", lesions);
        ctx.set_metric(
            "cases_per_minute",
            jobs.len() as f64 / secs.max(1e-9) * 60.0,
        );
        tracing::info!(
            "generated {} cases in {} domains in {secs:.2} s",
            jobs.len(),
            styles.len()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_from_a_count_or_a_list_of_presets_with_overrides() {
        let p: PhantomParams = serde_json::from_value(serde_json::json!({"domains": 7})).unwrap();
        let s = p.styles().unwrap();
        assert_eq!(s.len(), 7);
        assert_eq!(s[1].name, "arterial");
        assert_eq!(s[6].name, "domain6");
        Phantom.validate(&p).unwrap();
        let p: PhantomParams = serde_json::from_value(serde_json::json!({
            "domains": [
                {"preset": "arterial", "name": "siteA", "noise_hu": 5.0, "orientation": "RAS"},
                {"preset": "native", "spacing": [3.0, 3.0, 3.0]}
            ],
            "shape": [40, 40, 30],
        }))
        .unwrap();
        let s = p.styles().unwrap();
        assert_eq!(
            (s[0].name.as_str(), s[0].noise_hu, s[0].orientation.as_str()),
            ("siteA", 5.0, "RAS")
        );
        assert_eq!(s[0].phase, ContrastPhase::Arterial);
        assert_eq!((s[1].spacing, s[1].shape), ([3.0, 3.0, 3.0], [40, 40, 30]));
        Phantom.validate(&p).unwrap();
        let bad: PhantomParams = serde_json::from_value(serde_json::json!({
            "domains": [{"preset": "nope"}]
        }))
        .unwrap();
        let e = Phantom.validate(&bad).unwrap_err();
        assert!(
            e.contains("domains[0]: unknown domain preset 'nope' (presets: venous, arterial"),
            "{e}"
        );
        let twice: PhantomParams = serde_json::from_value(serde_json::json!({
            "domains": [{"preset": "native"}, {"preset": "native"}]
        }))
        .unwrap();
        assert_eq!(
            Phantom.validate(&twice).unwrap_err(),
            "two domains are named 'native'"
        );
        let huge: PhantomParams =
            serde_json::from_value(serde_json::json!({"domains": 9_999_999_999u64})).unwrap();
        let e = Phantom.validate(&huge).unwrap_err();
        assert!(e.contains("9999999999 domains; give 1..=100"), "{e}");
        let e = serde_json::from_value::<PhantomParams>(serde_json::json!({"domains": "four"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a number of domains or a list of domain tables"),
            "{e}"
        );
        let e = serde_json::from_value::<PhantomParams>(serde_json::json!({"domain": 3}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `domain`"), "{e}");
        // Paired subjects share their anatomy seed across domains, unpaired ones do not.
        let mut p = PhantomParams::default();
        assert_ne!(p.content_seed(0, 3), p.content_seed(1, 3));
        p.paired = true;
        assert_eq!(p.content_seed(0, 3), p.content_seed(1, 3));
        assert_ne!(p.style_seed(0, 3), p.style_seed(1, 3));
    }
}
