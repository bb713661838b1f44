//! Resumable training checkpoints in a stage's scratch folder.
//!
//! A checkpoint is a folder `checkpoint-<step>/` holding safetensors files (model,
//! teacher, optimiser, ...) and `state.json` (the step and whatever the training loop
//! needs to continue identically). It is written under a temporary name and renamed
//! into place, then `latest` (a one-line file) is replaced atomically to point at it,
//! and older checkpoints are removed. A run killed at any moment leaves the previous
//! checkpoint intact. Randomness in the training loops is derived from `(seed, step)`,
//! so a resumed run continues with exactly the losses of an uninterrupted one.

use std::path::{Path, PathBuf};

use tch::nn::VarStore;

/// The scratch folder's checkpoints.
pub struct Checkpoints {
    dir: PathBuf,
}

/// Errors name the file.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint '{path}': {message}")]
pub struct CheckpointError {
    pub path: String,
    pub message: String,
}

fn cerr(path: &Path, m: impl std::fmt::Display) -> CheckpointError {
    CheckpointError {
        path: path.display().to_string(),
        message: m.to_string(),
    }
}

impl Checkpoints {
    pub fn new(scratch: &Path) -> Self {
        Self {
            dir: scratch.to_path_buf(),
        }
    }

    /// The latest complete checkpoint folder and its step, if any.
    pub fn latest(&self) -> Option<(u64, PathBuf)> {
        let name = std::fs::read_to_string(self.dir.join("latest")).ok()?;
        let p = self.dir.join(name.trim());
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p.join("state.json")).ok()?).ok()?;
        Some((state["step"].as_u64()?, p))
    }

    /// Writes a checkpoint for `step`: `write` writes its files (safetensors of the
    /// networks and optimisers, ...) into the folder it is given and returns the JSON state
    /// (an object without the key `step`, added here) kept as `state.json`.
    pub fn save(
        &self,
        step: u64,
        write: &mut dyn FnMut(&Path) -> Result<serde_json::Value, String>,
    ) -> Result<PathBuf, CheckpointError> {
        let final_dir = self.dir.join(format!("checkpoint-{step:08}"));
        let tmp = self.dir.join(format!(".checkpoint-{step:08}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| cerr(&tmp, e))?;
        let mut state = write(&tmp).map_err(|e| cerr(&tmp, e))?;
        state["step"] = serde_json::json!(step);
        let sp = tmp.join("state.json");
        std::fs::write(&sp, serde_json::to_vec_pretty(&state).expect("json"))
            .map_err(|e| cerr(&sp, e))?;
        for e in std::fs::read_dir(&tmp).map_err(|e| cerr(&tmp, e))? {
            let p = e.map_err(|e| cerr(&tmp, e))?.path();
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| cerr(&p, e))?;
        }
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| cerr(&final_dir, e))?;
        let latest = self.dir.join("latest");
        meduet_cache::hashing::write_atomic(
            &latest,
            final_dir.file_name().unwrap().to_string_lossy().as_bytes(),
            true,
        )
        .map_err(|e| cerr(&latest, e))?;
        // Remove older checkpoints.
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("checkpoint-") && e.path() != final_dir {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(final_dir)
    }

    /// Loads `file` of checkpoint folder `dir` into `vs` (every variable must be present).
    pub fn load_into(dir: &Path, file: &str, vs: &mut VarStore) -> Result<(), CheckpointError> {
        let p = dir.join(file);
        vs.load(&p).map_err(|e| {
            // The first line of libtorch's message names the variable; its stack trace is noise.
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default().to_string();
            let scratch = dir.parent().unwrap_or(dir);
            cerr(
                &p,
                format!(
                    "{first}: the checkpoint does not fit this model (written by a build whose                      preset differed?); delete '{}' to train from the start",
                    scratch.display()
                ),
            )
        })
    }

    /// The `state.json` of a checkpoint folder.
    pub fn state(dir: &Path) -> Result<serde_json::Value, CheckpointError> {
        let p = dir.join("state.json");
        serde_json::from_slice(&std::fs::read(&p).map_err(|e| cerr(&p, e))?)
            .map_err(|e| cerr(&p, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn save_load_and_keep_only_latest() {
        let d = tempfile::tempdir().unwrap();
        let cps = Checkpoints::new(d.path());
        assert!(cps.latest().is_none());
        let vs = VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1.0f32, 2.0]));
        let vs_ref = &vs;
        let save_with = |loss: f64| {
            move |dir: &Path| {
                vs_ref
                    .save(dir.join("model.safetensors"))
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "loss": loss }))
            }
        };
        cps.save(10, &mut save_with(0.5)).unwrap();
        tch::no_grad(|| w.shallow_clone().copy_(&Tensor::from_slice(&[5.0f32, 6.0])));
        cps.save(20, &mut save_with(0.25)).unwrap();
        let (step, dir) = cps.latest().unwrap();
        assert_eq!(step, 20);
        assert_eq!(Checkpoints::state(&dir).unwrap()["loss"], 0.25);
        let mut vs2 = VarStore::new(tch::Device::Cpu);
        let w2 = vs2.root().var("w", &[2], tch::nn::Init::Const(0.0));
        Checkpoints::load_into(&dir, "model.safetensors", &mut vs2).unwrap();
        assert_eq!(Vec::<f32>::try_from(&w2).unwrap(), vec![5.0, 6.0]);
        // A model of another size is refused with the fix, not a stack trace.
        let mut vs3 = VarStore::new(tch::Device::Cpu);
        let _w3 = vs3.root().var("w", &[3], tch::nn::Init::Const(0.0));
        let e = Checkpoints::load_into(&dir, "model.safetensors", &mut vs3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not fit this model") && e.contains("delete"),
            "{e}"
        );
        assert!(!e.contains("frame #"), "{e}");
        let n = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("checkpoint-")
            })
            .count();
        assert_eq!(n, 1);
    }
}
