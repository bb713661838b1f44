//! Helpers shared by the integration tests of the `meduet` binary (`tests/cli.rs`,
//! `tests/e2e.rs`, `tests/slurm.rs`): running the binary, reading its outputs, pipeline
//! folders, and (in [`pipelines`]) the small pipelines several of them run.
//!
//! Each test file declares `mod common;` and uses the part it needs. Paths come from
//! Cargo (`CARGO_BIN_EXE_meduet`, `CARGO_TARGET_TMPDIR`) and temporary folders, never
//! from HOME or the clone's location.

// Each test file uses a part of these helpers.
#![allow(dead_code)]

pub mod pipelines;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `meduet` binary under test, with `MEDUET_CACHE` unset and info logging.
pub fn meduet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meduet"));
    c.env_remove("MEDUET_CACHE").env("MEDUET_LOG", "info");
    c
}

/// Runs `cmd` with `args` and returns its output; fails the test, with both streams,
/// when the command fails.
pub fn output_ok(mut cmd: Command, args: &[&str]) -> Output {
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "meduet {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `meduet ARGS...`, which must succeed.
pub fn run_ok(args: &[&str]) -> Output {
    output_ok(meduet(), args)
}

/// Standard output then standard error, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A JSON file, parsed.
pub fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A pipeline folder in a fresh temporary folder (removed when dropped); its cache is
/// the default `.meduet/` beside the pipeline files.
pub struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    /// In the system's temporary folder.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    /// Under Cargo's target tmp folder (a filesystem a local Slurm cluster sees), named
    /// `PREFIX...`.
    pub fn in_target_tmp(prefix: &str) -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .unwrap(),
        }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// Writes a file (creating its folder) and returns its path.
    pub fn write(&self, rel: &str, t: &str) -> String {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, t).unwrap();
        p.to_string_lossy().into_owned()
    }
    pub fn cache(&self) -> PathBuf {
        self.path(".meduet")
    }
    /// How many objects the cache holds.
    pub fn objects(&self) -> usize {
        std::fs::read_dir(self.cache().join("objects"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Successful run records per (stage, item).
pub fn succeeded_runs(cache: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(cache.join("runs")).unwrap() {
        let r = read_json(e.unwrap().path());
        if r["status"] == "succeeded" {
            v.push(format!(
                "{}{}",
                r["stage"].as_str().unwrap(),
                r["item"]
                    .as_str()
                    .map(|i| format!("[{i}]"))
                    .unwrap_or_default()
            ));
        }
    }
    v.sort();
    v
}
