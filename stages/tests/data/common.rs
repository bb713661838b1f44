//! Helpers: temporary projects with a pipeline file, and raw-array exchange with Python.

use std::path::{Path, PathBuf};

use meduet_cache::Store;
use meduet_engine::{run, EngineError, ExecEnv, Item, Pipeline, RunOptions, RunSummary};

/// A temporary folder with `pipeline.toml` and its cache.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn pipeline(&self) -> Pipeline {
        Pipeline::load(&self.path("pipeline.toml"), &meduet_stages::registry()).unwrap()
    }

    /// Writes `pipeline.toml` and runs it.
    pub fn run(&self, toml: &str) -> Result<RunSummary, EngineError> {
        std::fs::write(self.path("pipeline.toml"), toml).unwrap();
        let p = self.pipeline();
        let store = Store::open(&p.cache_dir).unwrap();
        run(&p, &ExecEnv::new(store), &RunOptions::default())
    }

    /// Runs and expects success.
    pub fn run_ok(&self, toml: &str) -> RunSummary {
        let s = self.run(toml).unwrap_or_else(|e| panic!("run failed: {e}"));
        assert!(s.failures().is_empty(), "{:?}", s.failures());
        s
    }

    /// Runs and returns the failure message of `stage`.
    pub fn run_err(&self, toml: &str, stage: &str) -> String {
        match self.run(toml) {
            Ok(s) => s
                .failures()
                .into_iter()
                .find(|(n, _)| n == stage)
                .map(|(_, m)| m)
                .unwrap_or_else(|| panic!("stage '{stage}' did not fail: {:?}", s.stages)),
            Err(e) => e.to_string(),
        }
    }

    fn object_dir(&self, stage: &str) -> (Store, PathBuf) {
        let p = self.pipeline();
        let store = Store::open(&p.cache_dir).unwrap();
        let h = meduet_engine::plan::load_history(&store, &p);
        let key = h.stages[stage].key;
        let dir = store.object_dir(&key);
        (store, dir)
    }

    /// The items of a collection output of the last run.
    pub fn items(&self, stage: &str, output: &str) -> Vec<Item> {
        let (store, dir) = self.object_dir(stage);
        meduet_engine::collection::read_items(&store, &dir, output).unwrap()
    }

    /// The folder of a single output of the last run.
    pub fn output(&self, stage: &str, output: &str) -> PathBuf {
        self.object_dir(stage).1.join("out").join(output)
    }

    /// The metrics of a stage's object.
    pub fn metrics(&self, stage: &str) -> serde_json::Value {
        let (_, dir) = self.object_dir(stage);
        let text = std::fs::read(dir.join("metrics.json")).unwrap();
        serde_json::from_slice(&text).unwrap()
    }
}

/// Reads a raw little-endian `f32` file (written by numpy's `tofile`).
pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The largest absolute difference of two affines.
pub fn affine_diff(a: &[[f64; 4]; 4], b: &serde_json::Value) -> f64 {
    let mut worst: f64 = 0.0;
    for r in 0..4 {
        for c in 0..4 {
            worst = worst.max((a[r][c] - b[r][c].as_f64().unwrap()).abs());
        }
    }
    worst
}
