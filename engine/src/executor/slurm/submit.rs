//! What is handed to `sbatch`: the batch script and its options.
//!
//! The batch script does one thing, `exec meduet exec-stage ...`, so the job's exit
//! status and signals are meduet's own. Scripts are content-addressed under
//! `<cache>/slurm/scripts/`, like specs. A stage's resources become
//! `--cpus-per-task` (threads), `--mem` (memory_gb) and, for GPU stages, the configured
//! GPU request (`--gres=gpu:{n}` by default); its time limit comes from the pipeline's
//! `[executor.slurm]` settings. Output and error go to the stage's log folder,
//! `<cache>/logs/<key>/slurm-<job>.out` (`slurm-<job>_<task>.out` for array tasks).

use std::path::{Path, PathBuf};

use meduet_cache::{ContentDigest, StageKey, Store};

use crate::executor::config::StageSlurm;

/// What a job runs.
#[derive(Debug, Clone)]
pub enum Work {
    /// `exec-stage --spec SPEC` (with `--item-index $SLURM_ARRAY_TASK_ID` for arrays).
    Spec { spec: PathBuf, array: bool },
    /// `exec-stage --pipeline FILE --stage NAME`: a stage whose key is not known at
    /// submission (its inputs are computed by jobs it depends on).
    Stage { pipeline: PathBuf, stage: String },
}

/// Quotes a word for `sh`.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The batch script of `work`, run by `exe` on cache `cache`.
pub fn script_text(exe: &Path, cache: &Path, work: &Work, comment: &str) -> String {
    let exe = sh_quote(&exe.to_string_lossy());
    let cache = sh_quote(&cache.to_string_lossy());
    let cmd = match work {
        Work::Spec { spec, array } => format!(
            "exec {exe} exec-stage --spec {} --cache {cache}{}",
            sh_quote(&spec.to_string_lossy()),
            if *array {
                " --item-index \"$SLURM_ARRAY_TASK_ID\""
            } else {
                ""
            }
        ),
        Work::Stage { pipeline, stage } => format!(
            "exec {exe} exec-stage --pipeline {} --stage {} --cache {cache}",
            sh_quote(&pipeline.to_string_lossy()),
            sh_quote(stage)
        ),
    };
    let comment: String = comment
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    // Logs are files: no colour codes.
    format!("#!/bin/sh\n# meduet: {comment}\nexport NO_COLOR=1\n{cmd}\n")
}

/// Writes a script into `<cache>/slurm/scripts/<blake3>.sh` (executable).
pub fn write_script(store: &Store, text: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let digest = ContentDigest::of_bytes(text.as_bytes());
    let path = store
        .root()
        .join("slurm/scripts")
        .join(format!("{}.sh", digest.to_hex()));
    if !path.exists() {
        meduet_cache::hashing::write_atomic(&path, text.as_bytes(), true)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(path)
}

/// The log folder of a key: `<cache>/logs/<key>/`.
pub fn log_dir(store: &Store, key: &StageKey) -> PathBuf {
    store.root().join("logs").join(key.to_hex())
}

/// The log folder of a stage whose key is not known yet (detached chains).
pub fn stage_log_dir(store: &Store, pipeline: &str, stage: &str) -> PathBuf {
    store
        .root()
        .join("logs")
        .join("pending")
        .join(meduet_cache::store::sanitize(pipeline))
        .join(stage)
}

/// The log file of job `job` (task `task`) in `dir`, as Slurm names it.
pub fn log_file(dir: &Path, job: &str, task: Option<usize>) -> PathBuf {
    match task {
        Some(t) => dir.join(format!("slurm-{job}_{t}.out")),
        None => dir.join(format!("slurm-{job}.out")),
    }
}

/// One `sbatch` submission.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub name: String,
    pub script: PathBuf,
    pub log_dir: PathBuf,
    /// CPUs per task (0: the cluster's default).
    pub cpus: usize,
    pub mem_gb: Option<f64>,
    pub slurm: StageSlurm,
    /// The GPU request form, with `{n}`.
    pub gpu_request: String,
    /// Array task indices and the `%K` limit.
    pub array: Option<(Vec<usize>, usize)>,
    /// Job ids this job runs after (`--dependency=afterok:...`).
    pub after_ok: Vec<String>,
}

/// `0-9%4`, `1,3,5-7%4`: Slurm's array expression for sorted `indices`.
pub fn array_expr(indices: &[usize], parallelism: usize) -> String {
    let mut v = indices.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    format!("{}%{}", parts.join(","), parallelism.max(1))
}

impl JobRequest {
    /// The sbatch arguments (the script last).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![format!("--job-name={}", self.name)];
        let pattern = if self.array.is_some() {
            "slurm-%A_%a.out"
        } else {
            "slurm-%j.out"
        };
        let log = self.log_dir.join(pattern).to_string_lossy().into_owned();
        a.push(format!("--output={log}"));
        a.push(format!("--error={log}"));
        if self.cpus > 0 {
            a.push(format!("--cpus-per-task={}", self.cpus));
        }
        if let Some(gb) = self.mem_gb {
            a.push(format!("--mem={}M", (gb * 1024.0).ceil().max(1.0) as u64));
        }
        if let Some(t) = &self.slurm.time {
            a.push(format!("--time={}", t.0));
        }
        for (flag, v) in [
            ("--partition", &self.slurm.partition),
            ("--account", &self.slurm.account),
            ("--qos", &self.slurm.qos),
        ] {
            if let Some(v) = v {
                a.push(format!("{flag}={v}"));
            }
        }
        if self.slurm.gpus > 0 {
            a.push(
                self.gpu_request
                    .replace("{n}", &self.slurm.gpus.to_string()),
            );
        }
        if let Some((idx, k)) = &self.array {
            a.push(format!("--array={}", array_expr(idx, *k)));
        }
        if !self.after_ok.is_empty() {
            a.push(format!("--dependency=afterok:{}", self.after_ok.join(":")));
            a.push("--kill-on-invalid-dep=yes".into());
        }
        a.extend(self.slurm.extra_args.iter().cloned());
        a.push(self.script.to_string_lossy().into_owned());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::config::TimeLimit;

    #[test]
    fn array_expressions() {
        assert_eq!(array_expr(&[0, 1, 2, 3], 2), "0-3%2");
        assert_eq!(array_expr(&[5, 1, 3, 6, 7], 4), "1,3,5-7%4");
        assert_eq!(array_expr(&[4], 50), "4%50");
    }

    #[test]
    fn sbatch_arguments_carry_resources_and_gpus() {
        let r = JobRequest {
            name: "meduet:p:train".into(),
            script: "/c/slurm/scripts/x.sh".into(),
            log_dir: "/c/logs/k".into(),
            cpus: 4,
            mem_gb: Some(1.5),
            slurm: StageSlurm {
                partition: Some("gpu".into()),
                account: None,
                qos: Some("high".into()),
                time: Some(TimeLimit("1:00:00".into())),
                extra_args: vec!["--constraint=a100".into()],
                gpus: 2,
            },
            gpu_request: "--gpus={n}".into(),
            array: Some((vec![0, 1, 2], 2)),
            after_ok: vec!["11".into(), "12".into()],
        };
        assert_eq!(
            r.args(),
            [
                "--job-name=meduet:p:train",
                "--output=/c/logs/k/slurm-%A_%a.out",
                "--error=/c/logs/k/slurm-%A_%a.out",
                "--cpus-per-task=4",
                "--mem=1536M",
                "--time=1:00:00",
                "--partition=gpu",
                "--qos=high",
                "--gpus=2",
                "--array=0-2%2",
                "--dependency=afterok:11:12",
                "--kill-on-invalid-dep=yes",
                "--constraint=a100",
                "/c/slurm/scripts/x.sh"
            ]
        );
    }

    #[test]
    fn scripts_exec_meduet_and_quote() {
        let t = script_text(
            Path::new("/opt/meduet"),
            Path::new("/shared/my cache"),
            &Work::Spec {
                spec: "/shared/my cache/specs/a.json".into(),
                array: true,
            },
            "stage 'x'",
        );
        assert!(t.starts_with("#!/bin/sh\n"));
        assert!(t.contains("exec /opt/meduet exec-stage --spec '/shared/my cache/specs/a.json' --cache '/shared/my cache' --item-index \"$SLURM_ARRAY_TASK_ID\""), "{t}");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }
}
