//! Errors: user errors in pipeline files (with file, line and column), stage errors,
//! and infrastructure errors.

use std::path::{Path, PathBuf};

use meduet_cache::CacheError;

/// A place in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl serde::Serialize for Location {
    /// As `file:line:column`, the form editors and terminals jump to.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A problem in a pipeline file, found before anything runs. Nothing in the cache is
/// touched when one is reported.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{file}: cannot read pipeline file: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: TOML syntax error: {message}")]
    Syntax { at: Location, message: String },
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
    #[error("{at}: stage '{stage}': unknown stage kind '{kind}' (known kinds: {known})")]
    UnknownKind {
        at: Location,
        stage: String,
        kind: String,
        known: String,
    },
    #[error("{at}: stage '{stage}': parameter '{param}': {message}")]
    Param {
        at: Location,
        stage: String,
        param: String,
        message: String,
    },
    #[error("{at}: stage '{stage}': input '{input}': {message}")]
    Input {
        at: Location,
        stage: String,
        input: String,
        message: String,
    },
    #[error("{file}: the stages form a cycle: {}", cycle.join(" -> "))]
    Cycle { file: PathBuf, cycle: Vec<String> },
    #[error("{file}: include cycle: {}", chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> "))]
    IncludeCycle { file: PathBuf, chain: Vec<PathBuf> },
    #[error("{file}: no stage named '{stage}' (stages: {known})")]
    NoSuchStage {
        file: PathBuf,
        stage: String,
        known: String,
    },
}

/// An error while a stage runs.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Bad data or a bad parameter value found while running: the message names the
    /// file and the problem.
    #[error("{0}")]
    Input(String),
    /// Anything else that made the stage fail.
    #[error("{0}")]
    Failed(String),
    /// The run was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl StageError {
    pub fn failed(msg: impl std::fmt::Display) -> Self {
        Self::Failed(msg.to_string())
    }
    pub fn input(msg: impl std::fmt::Display) -> Self {
        Self::Input(msg.to_string())
    }
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Failed(format!("i/o error on '{}': {e}", path.display()))
    }
}

impl From<CacheError> for StageError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Cancelled(_) => StageError::Cancelled,
            other => StageError::Failed(other.to_string()),
        }
    }
}

/// An error of the engine as a whole.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("stage '{stage}' failed: {message}")]
    StageFailed { stage: String, message: String },
    #[error("{} stage(s) failed: {}", failures.len(), failures.iter().map(|(s, m)| format!("'{s}': {m}")).collect::<Vec<_>>().join("; "))]
    StagesFailed { failures: Vec<(String, String)> },
    #[error("run cancelled")]
    Cancelled,
    #[error("{}", crate::pipeline::missing_files_report(.0))]
    MissingFiles(Vec<crate::pipeline::MissingFile>),
    #[error("{0}")]
    Other(String),
}
