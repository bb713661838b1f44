//! Helpers shared by the integration tests of `meduet-torch` (`controlnet.rs`,
//! `diffusion.rs`, `meduet.rs`, `segmentation.rs`): the lock around libtorch's global
//! generator, the PyTorch reference folder, error measures, and running a small pipeline in
//! a temporary folder and reading its outputs.
//!
//! Each test file declares `mod common;` and uses the part it needs.

// Each test file uses a part of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tch::Tensor;

/// libtorch's global generator is shared by the tests of a binary, which run in parallel:
/// everything that seeds it or draws from it holds this lock, or a concurrent draw would
/// give two "identical" builds different weights.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn global_rng() -> std::sync::MutexGuard<'static, ()> {
    GLOBAL_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The repository's `reference/` folder (the PyTorch references).
pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../reference")
}

/// `|a - b| / |b|` in the Frobenius norm.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

/// `max |a - b|`.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The data prefix of the small pipelines: 3 mm phantoms (48 x 48 x 40 voxels, padded to
/// 64^3 by `resample`), a VAE trained a few steps on crops, and its latents.
pub struct TinyData {
    pub domains: usize,
    pub subjects_per_domain: usize,
    pub vae_steps: usize,
    pub vae_crop: usize,
    /// More `vae` lines (architecture, batch, learning rate), or "".
    pub vae_extra: &'static str,
}

impl TinyData {
    /// `name = ...` and the stages `phantom`, `ingest`, `resample`, `vae`, `encode`.
    pub fn toml(&self, name: &str) -> String {
        format!(
            r#"name = "{name}"
[stages.phantom]
kind = "phantom"
domains = {domains}
subjects_per_domain = {subjects}
shape = [48, 48, 40]
spacing = [3.0, 3.0, 3.0]
seed = 1
[stages.ingest]
kind = "ingest"
inputs = {{ datasets = "phantom.datasets" }}
[stages.resample]
kind = "resample"
inputs = {{ subjects = "ingest.subjects" }}
spacing = [3.0, 3.0, 3.0]
min_size = [64, 64, 64]
[stages.vae]
kind = "vae_train"
inputs = {{ volumes = "resample.volumes" }}
steps = {vae_steps}
crop = [{c}, {c}, {c}]
heldout = 1
{extra}
[stages.encode]
kind = "vae_encode"
inputs = {{ vae = "vae.vae", volumes = "resample.volumes" }}
"#,
            domains = self.domains,
            subjects = self.subjects_per_domain,
            vae_steps = self.vae_steps,
            c = self.vae_crop,
            extra = self.vae_extra,
        )
    }
}

/// Writes `toml` to `dir/p.toml` and runs it on the CPU with 2 threads; fails the test when
/// a stage fails.
pub fn run_pipeline(dir: &Path, toml: &str) -> meduet_engine::RunSummary {
    std::fs::write(dir.join("p.toml"), toml).unwrap();
    let reg = meduet_torch::registry();
    let p = meduet_engine::Pipeline::load(&dir.join("p.toml"), &reg).unwrap();
    let store = meduet_cache::Store::open(&p.cache_dir).unwrap();
    let opts = meduet_engine::RunOptions {
        cuda_devices: Some(vec![]),
        threads: 2,
        ..Default::default()
    };
    let s = meduet_engine::run(&p, &meduet_engine::ExecEnv::new(store), &opts).unwrap();
    assert!(s.failures().is_empty(), "{:?}", s.failures());
    s
}

/// The folder of `stage`'s output `output` from the latest run of `dir/p.toml`.
pub fn output_of(dir: &Path, stage: &str, output: &str) -> PathBuf {
    let reg = meduet_torch::registry();
    let p = meduet_engine::Pipeline::load(&dir.join("p.toml"), &reg).unwrap();
    let store = meduet_cache::Store::open(&p.cache_dir).unwrap();
    let h = meduet_engine::plan::load_history(&store, &p);
    store
        .object_dir(&h.stages[stage].key)
        .join("out")
        .join(output)
}

/// A JSON file, parsed; the panic names the file.
pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
