//! `ingest`: datasets in, one checked item per subject out.
//!
//! Datasets come from the `datasets` input (phantom dataset folders, each item one domain
//! named by its `name` attribute with its `domain_id`) and/or the `datasets` parameter:
//!
//! ```toml
//! datasets = [{ name = "btcv", id = 0, path = "data/BTCV", images = "imagesTr", labels = "labelsTr", on_error = "skip" }]
//! ```
//!
//! `path` is a source path (folder or glob, hashed by content). `images` / `labels` are
//! folders inside it; by default `imagesTr` / `labelsTr` when present, else every NIfTI
//! file is an image and there are no labels (a plain folder). nnU-Net channel files
//! (`case_0000.nii.gz`) are recognised: channel 0000 is the image, other channels are
//! listed as ignored. Hidden files (`._x.nii.gz`) are skipped.
//!
//! Every image (and label) is read completely and checked (see
//! [`crate::data::nifti_io`]); a label must match its image's shape and affine within
//! `geometry_tolerance_mm`. A failing subject fails the stage (`on_error = "fail"`) or is
//! skipped and listed in the report (`"skip"`): a dataset's own `on_error`, else the
//! stage's (default `"fail"`). A dataset with no image is always an error.
//!
//! Output `subjects`: one item per subject, id `<dataset>_<case>`, holding `subject.json`
//! ([`SubjectRecord`]: content digests and header facts, no paths outside the dataset);
//! attributes `domain`, `domain_id`, `dataset`, `case`, `has_label` (and `has_lesion` for
//! phantoms). Output `report`: `report.json` with the skipped subjects and ignored files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meduet_cache::ContentDigest;
use meduet_engine::{
    Arity, ArtifactType, InputSpec, OutputSpec, Resources, SourcePath, Stage, StageContext,
    StageError,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::error::DataError;
use crate::data::nifti_io::{case_name, is_nifti_name, read_nifti, read_nifti_labels};
use crate::data::volume::check_same_grid;
use crate::kinds::phantom::DATASETS;
use crate::kinds::subject::{SourceFile, SubjectRecord, SUBJECTS, SUBJECT_FILE};

/// What to do with a subject that fails its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

/// One dataset of the `datasets` parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Dataset (= domain) name.
    pub name: String,
    /// Domain id.
    pub id: i64,
    /// Folder or glob.
    pub path: SourcePath,
    /// Image folder inside `path` (default: `imagesTr` if present, else all files).
    #[serde(default)]
    pub images: Option<String>,
    /// Label folder inside `path` (default: `labelsTr` if present, else none).
    #[serde(default)]
    pub labels: Option<String>,
    /// This dataset's policy; unset: the stage's `on_error`.
    #[serde(default)]
    pub on_error: Option<OnError>,
}

/// Parameters of `ingest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestParams {
    pub datasets: Vec<DatasetSpec>,
    /// Policy for the datasets of the `datasets` input and for every dataset of the
    /// parameter that does not set its own.
    pub on_error: OnError,
    /// Largest label/image affine difference accepted (mm, at a grid corner).
    pub geometry_tolerance_mm: f64,
}

impl Default for IngestParams {
    fn default() -> Self {
        Self {
            datasets: vec![],
            on_error: OnError::Fail,
            geometry_tolerance_mm: 0.05,
        }
    }
}

/// A file of a dataset: path inside it, absolute path, digest.
struct DsFile {
    rel: String,
    abs: PathBuf,
    digest: ContentDigest,
}

/// A dataset to scan.
struct Dataset {
    name: String,
    id: i64,
    root: PathBuf,
    files: Vec<DsFile>,
    images: Option<String>,
    labels: Option<String>,
    on_error: OnError,
    truth: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One subject to check.
struct Job<'a> {
    ds: &'a Dataset,
    case: String,
    image: &'a DsFile,
    label: Option<&'a DsFile>,
}

/// A skipped or ignored file, for the report.
#[derive(Debug, Clone, Serialize)]
struct Skipped {
    dataset: String,
    case: String,
    file: String,
    error: String,
}

fn under<'a>(rel: &'a str, folder: &str) -> Option<&'a str> {
    if folder.is_empty() || folder == "." {
        Some(rel)
    } else {
        rel.strip_prefix(folder.trim_end_matches('/'))
            .and_then(|r| r.strip_prefix('/'))
    }
}

fn hidden(rel: &str) -> bool {
    rel.split('/').any(|c| c.starts_with('.'))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A channel suffix `_dddd`, if any.
fn channel(case: &str) -> Option<(&str, &str)> {
    let (stem, ch) = case.rsplit_once('_')?;
    (ch.len() == 4 && ch.chars().all(|c| c.is_ascii_digit())).then_some((stem, ch))
}

impl Dataset {
    /// Pairs images with labels. Returns the jobs and the ignored files.
    fn jobs(&self) -> Result<(Vec<Job<'_>>, Vec<Skipped>), StageError> {
        let nifti: Vec<&DsFile> = self
            .files
            .iter()
            .filter(|f| is_nifti_name(&f.rel) && !hidden(&f.rel))
            .collect();
        let img_dir = self.images.clone().unwrap_or_else(|| {
            if nifti.iter().any(|f| f.rel.starts_with("imagesTr/"))
                || self.root.join("imagesTr").is_dir()
            {
                "imagesTr".into()
            } else {
                String::new()
            }
        });
        let lab_dir = self.labels.clone().or_else(|| {
            nifti
                .iter()
                .any(|f| f.rel.starts_with("labelsTr/"))
                .then(|| "labelsTr".into())
        });
        let is_label = |f: &DsFile| {
            lab_dir
                .as_deref()
                .is_some_and(|l| !l.is_empty() && under(&f.rel, l).is_some())
        };
        let images: Vec<&DsFile> = nifti
            .iter()
            .copied()
            .filter(|f| under(&f.rel, &img_dir).is_some() && !is_label(f))
            .collect();
        let shown = if img_dir.is_empty() {
            self.root.clone()
        } else {
            self.root.join(&img_dir)
        };
        if images.is_empty() {
            return Err(StageError::input(format!(
                "dataset '{}': folder '{}' contains no .nii or .nii.gz image",
                self.name,
                shown.display()
            )));
        }
        let labels: BTreeMap<String, &DsFile> = nifti
            .iter()
            .copied()
            .filter(|f| is_label(f))
            .map(|f| (case_name(&f.rel), f))
            .collect();
        if let Some(l) = &lab_dir {
            if labels.is_empty() && self.labels.is_some() {
                return Err(StageError::input(format!(
                    "dataset '{}': label folder '{}' contains no .nii or .nii.gz file",
                    self.name,
                    self.root.join(l).display()
                )));
            }
        }
        let nnunet = images.iter().all(|f| channel(&case_name(&f.rel)).is_some())
            && !images
                .iter()
                .any(|f| labels.contains_key(&case_name(&f.rel)));
        let mut jobs = Vec::new();
        let mut ignored = Vec::new();
        for f in images {
            let mut case = case_name(&f.rel);
            if nnunet {
                let (stem, ch) = channel(&case).expect("checked");
                if ch != "0000" {
                    ignored.push(Skipped {
                        dataset: self.name.clone(),
                        case: stem.to_string(),
                        file: f.rel.clone(),
                        error: format!("nnU-Net channel {ch} ignored (only channel 0000 is used)"),
                    });
                    continue;
                }
                case = stem.to_string();
            }
            let label = labels.get(&case).copied();
            jobs.push(Job {
                ds: self,
                case,
                image: f,
                label,
            });
        }
        let used: std::collections::BTreeSet<&str> = jobs.iter().map(|j| j.case.as_str()).collect();
        for (case, f) in &labels {
            if !used.contains(case.as_str()) {
                ignored.push(Skipped {
                    dataset: self.name.clone(),
                    case: case.clone(),
                    file: f.rel.clone(),
                    error: "label without an image".into(),
                });
            }
        }
        Ok((jobs, ignored))
    }
}

/// Checks one subject and builds its record.
fn check(job: &Job<'_>, tol: f64) -> Result<SubjectRecord, DataError> {
    let (img, info) = read_nifti(&job.image.abs)?;
    drop(img);
    let label = match job.label {
        Some(l) => {
            let (lab, linfo) = read_nifti_labels(&l.abs)?;
            check_same_grid(info.shape, &info.affine, lab.shape, &linfo.affine, tol).map_err(
                |message| DataError::GeometryMismatch {
                    image: job.image.abs.clone(),
                    label: l.abs.clone(),
                    message,
                },
            )?;
            Some(SourceFile {
                file: l.rel.clone(),
                digest: l.digest,
                header: linfo,
            })
        }
        None => None,
    };
    let ds = job.ds;
    Ok(SubjectRecord {
        id: format!("{}_{}", sanitize(&ds.name), sanitize(&job.case)),
        dataset: ds.name.clone(),
        domain: ds.name.clone(),
        domain_id: ds.id,
        case: job.case.clone(),
        image: SourceFile {
            file: job.image.rel.clone(),
            digest: job.image.digest,
            header: info,
        },
        label,
        phantom_truth: ds.truth.as_ref().and_then(|t| t.get(&job.case).cloned()),
    })
}

fn phantom_dataset(item: &meduet_engine::Item, policy: OnError) -> Result<Dataset, StageError> {
    let files = meduet_cache::hashing::list_files(&item.dir)
        .map_err(|e| StageError::io(&item.dir, e))?
        .into_par_iter()
        .map(|(rel, abs)| {
            let digest = meduet_cache::hash_file(&abs).map_err(|e| StageError::io(&abs, e))?;
            Ok(DsFile { rel, abs, digest })
        })
        .collect::<Result<Vec<_>, StageError>>()?;
    let truth_path = item.dir.join("phantom_truth.json");
    let truth = std::fs::read(&truth_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("cases").and_then(|c| c.as_object()).cloned());
    Ok(Dataset {
        name: item.attr_str("name").unwrap_or(&item.id).to_string(),
        id: item.attr_i64("domain_id").unwrap_or(0),
        root: item.dir.clone(),
        files,
        images: None,
        labels: None,
        on_error: policy,
        truth,
    })
}

/// `ingest`.
pub struct Ingest;

impl Stage for Ingest {
    type Params = IngestParams;
    const KIND: &'static str = "ingest";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "reads and checks NIfTI datasets; one item per subject, files by content digest";

    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "datasets",
            ty: DATASETS,
            arity: Arity::Any,
            doc: "dataset folders (e.g. from phantom)",
        }]
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "subjects",
                ty: SUBJECTS,
                doc: "one item per subject (subject.json)",
            },
            OutputSpec {
                name: "report",
                ty: ArtifactType::single("ingest_report"),
                doc: "report.json: skipped subjects, ignored files",
            },
        ]
    }

    fn default_resources(&self) -> Resources {
        Resources {
            threads: 0,
            ..Resources::default()
        }
    }

    fn validate(&self, p: &IngestParams) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for (i, d) in p.datasets.iter().enumerate() {
            if d.name.is_empty() || d.name.starts_with('.') || sanitize(&d.name) != d.name {
                return Err(format!(
                    "datasets[{i}].name: '{}' must be letters, digits, '-', '_' or '.', not starting with '.'",
                    d.name
                ));
            }
            if !names.insert(&d.name) {
                return Err(format!(
                    "datasets[{i}]: two datasets are named '{}'",
                    d.name
                ));
            }
        }
        if p.geometry_tolerance_mm.is_nan() || p.geometry_tolerance_mm < 0.0 {
            return Err("geometry_tolerance_mm must be >= 0".into());
        }
        Ok(())
    }

    fn run(&self, p: &IngestParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut datasets = Vec::new();
        for a in ctx.inputs("datasets").to_vec() {
            for item in &a.items {
                datasets.push(phantom_dataset(item, p.on_error)?);
            }
        }
        for d in &p.datasets {
            let tree = ctx.source(&d.path)?.clone();
            let files = tree
                .files
                .iter()
                .map(|f| DsFile {
                    rel: f.path.clone(),
                    abs: tree.path_of(&f.path),
                    digest: f.digest,
                })
                .collect();
            datasets.push(Dataset {
                name: d.name.clone(),
                id: d.id,
                root: tree.root.clone(),
                files,
                images: d.images.clone(),
                labels: d.labels.clone(),
                on_error: d.on_error.unwrap_or(p.on_error),
                truth: None,
            });
        }
        if datasets.is_empty() {
            return Err(StageError::input(
                "no dataset: wire the 'datasets' input or set the 'datasets' parameter",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &datasets {
            if !seen.insert(d.name.clone()) {
                return Err(StageError::input(format!(
                    "two datasets are named '{}'",
                    d.name
                )));
            }
        }
        let mut jobs = Vec::new();
        let mut ignored = Vec::new();
        for d in &datasets {
            let (j, ig) = d.jobs()?;
            jobs.extend(j);
            ignored.extend(ig);
        }
        let cancel = ctx.cancel_flag().clone();
        let bar = ctx.progress(jobs.len() as u64, "subjects");
        let tol = p.geometry_tolerance_mm;
        let results: Vec<Result<SubjectRecord, String>> = jobs
            .par_iter()
            .map(|j| {
                if cancel.is_cancelled() {
                    return Err("cancelled".into());
                }
                let r = check(j, tol).map_err(|e| e.to_string());
                bar.inc(1);
                r
            })
            .collect();
        bar.finish_and_clear();
        ctx.check_cancelled()?;
        let mut records = Vec::new();
        let mut skipped = Vec::new();
        let mut failures = Vec::new();
        for (j, r) in jobs.iter().zip(results) {
            match r {
                Ok(rec) => records.push(rec),
                Err(e) if j.ds.on_error == OnError::Skip => {
                    tracing::warn!("skipped {}/{}: {e}", j.ds.name, j.image.rel);
                    // The report holds paths inside the dataset only (it is an output:
                    // no machine's absolute paths in it).
                    let root = format!("{}/", j.ds.root.display());
                    skipped.push(Skipped {
                        dataset: j.ds.name.clone(),
                        case: j.case.clone(),
                        file: j.image.rel.clone(),
                        error: e.replace(&root, ""),
                    })
                }
                Err(e) => failures.push(e),
            }
        }
        if !failures.is_empty() {
            let n = failures.len();
            failures.truncate(5);
            return Err(StageError::input(format!(
                "{n} subject(s) failed their checks (set on_error = \"skip\" on the dataset to skip them): {}",
                failures.join("; ")
            )));
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        for w in records.windows(2) {
            if w[0].id == w[1].id {
                return Err(StageError::input(format!(
                    "two subjects have the id '{}' (case names collide after sanitising)",
                    w[0].id
                )));
            }
        }
        for rec in &records {
            let mut attrs = BTreeMap::new();
            attrs.insert("domain".to_string(), serde_json::json!(rec.domain));
            attrs.insert("domain_id".to_string(), serde_json::json!(rec.domain_id));
            attrs.insert("dataset".to_string(), serde_json::json!(rec.dataset));
            attrs.insert("case".to_string(), serde_json::json!(rec.case));
            attrs.insert(
                "has_label".to_string(),
                serde_json::json!(rec.label.is_some()),
            );
            if let Some(h) = rec.phantom_truth.as_ref().and_then(|t| t.get("has_lesion")) {
                attrs.insert("has_lesion".to_string(), h.clone());
            }
            let dir = ctx.emit_item("subjects", &rec.id, attrs)?;
            let path = dir.join(SUBJECT_FILE);
            let text = serde_json::to_vec_pretty(rec).expect("json serializes");
            std::fs::write(&path, text).map_err(|e| StageError::io(&path, e))?;
        }
        let report = serde_json::json!({
            "subjects": records.len(),
            "skipped": skipped,
            "ignored": ignored,
        });
        let path = ctx.output_dir("report")?.join("report.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&report).expect("json serializes"),
        )
        .map_err(|e| StageError::io(&path, e))?;
        ctx.set_metric("subjects", records.len());
        ctx.set_metric("skipped", skipped.len());
        ctx.set_metric("ignored_files", ignored.len());
        ctx.set_metric("datasets", datasets.len());
        Ok(())
    }
}
