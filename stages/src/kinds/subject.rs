//! `subject.json`: what an item of the `subjects` collection holds (written by `ingest`,
//! read by `resample`).
//!
//! Source files are referred to by **content digest** (blake3, the same digest the cache
//! uses), never by absolute path: the key of everything downstream depends on the data,
//! not on where it lives, and `StageContext::locate` finds the file again. `file` is the
//! path inside the dataset folder, kept for messages and reports only.

use serde::{Deserialize, Serialize};

use crate::data::nifti_io::NiftiInfo;
use meduet_cache::ContentDigest;

/// The file name of the record inside an item folder.
pub const SUBJECT_FILE: &str = "subject.json";

/// The artifact type of subject collections.
pub const SUBJECTS: meduet_engine::ArtifactType =
    meduet_engine::ArtifactType::collection("subjects");

/// One source file of a subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path inside the dataset folder (for messages), e.g. `imagesTr/case_000.nii.gz`.
    pub file: String,
    /// blake3 content digest.
    pub digest: ContentDigest,
    /// Header facts.
    pub header: NiftiInfo,
}

/// The `subject.json` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectRecord {
    /// Item id, `<dataset>_<case>`.
    pub id: String,
    pub dataset: String,
    /// Domain name (the dataset's name).
    pub domain: String,
    pub domain_id: i64,
    pub case: String,
    pub image: SourceFile,
    pub label: Option<SourceFile>,
    /// Phantom truth (`has_lesion`, `organ_ml`, ...) when the data is a phantom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phantom_truth: Option<serde_json::Value>,
}

impl SubjectRecord {
    /// Reads `subject.json` from an item folder.
    pub fn read(dir: &std::path::Path) -> Result<Self, meduet_engine::StageError> {
        let p = dir.join(SUBJECT_FILE);
        let text = std::fs::read(&p).map_err(|e| meduet_engine::StageError::io(&p, e))?;
        serde_json::from_slice(&text).map_err(|e| {
            meduet_engine::StageError::input(format!(
                "'{}': not a subject record: {e}",
                p.display()
            ))
        })
    }
}
