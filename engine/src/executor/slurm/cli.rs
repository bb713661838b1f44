//! The Slurm commands (`sbatch`, `squeue`, `scontrol`, `scancel`), run with
//! `std::process`. Every call is counted: scheduler load is what cluster admins watch.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::state::{parse_scontrol, parse_squeue, JobInfo, QueueRow, SQUEUE_FORMAT};

/// A failed Slurm command.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("'{command}' is not on PATH (hint: run meduet on a Slurm login node, or start a local cluster with scripts/slurm-local start)")]
    Missing { command: String },
    #[error("'{command}' could not run: {message}")]
    Spawn { command: String, message: String },
    #[error("{command} failed ({status}): {stderr}")]
    Refused {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{command} printed '{output}', not a job id")]
    Unparsable { command: String, output: String },
}

/// Runs the Slurm commands and counts them.
#[derive(Debug, Clone, Default)]
pub struct SlurmCli {
    calls: Arc<AtomicU64>,
}

/// Whether `sbatch` is on PATH.
pub fn sbatch_on_path() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("sbatch").is_file()))
        .unwrap_or(false)
}

fn shell_words(cmd: &str, args: &[String]) -> String {
    let mut s = cmd.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

impl SlurmCli {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scheduler calls made so far (sbatch, squeue, scontrol, scancel).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn run(&self, cmd: &str, args: &[String]) -> Result<Output, SlurmError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        tracing::trace!("{}", shell_words(cmd, args));
        Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SlurmError::Missing {
                    command: cmd.to_string(),
                },
                _ => SlurmError::Spawn {
                    command: cmd.to_string(),
                    message: e.to_string(),
                },
            })
    }

    fn refused(cmd: &str, args: &[String], out: &Output) -> SlurmError {
        SlurmError::Refused {
            command: shell_words(cmd, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
    }

    /// `sbatch --parsable ARGS...`; returns the job id (an array's job id for arrays).
    pub fn sbatch(&self, args: &[String]) -> Result<String, SlurmError> {
        let mut all = vec!["--parsable".to_string()];
        all.extend(args.iter().cloned());
        let out = self.run("sbatch", &all)?;
        if !out.status.success() {
            return Err(Self::refused("sbatch", &all, &out));
        }
        // `--parsable` prints "jobid" or "jobid;cluster".
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SlurmError::Unparsable {
                command: shell_words("sbatch", &all),
                output: text.trim().to_string(),
            });
        }
        Ok(id)
    }

    /// The queue rows (one per job or array task, ended ones included for `MinJobAge`)
    /// of `jobs`, in one call. Jobs Slurm no longer knows are simply absent.
    pub fn squeue(&self, jobs: &[String]) -> Result<Vec<QueueRow>, SlurmError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let args = vec![
            "--states=all".to_string(),
            "--array".to_string(),
            "--noheader".to_string(),
            format!("--format={SQUEUE_FORMAT}"),
            format!("--jobs={}", jobs.join(",")),
        ];
        let out = self.run("squeue", &args)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            // Every listed job is unknown (ended more than MinJobAge ago).
            if err.contains("Invalid job id") {
                return Ok(Vec::new());
            }
            return Err(Self::refused("squeue", &args, &out));
        }
        Ok(parse_squeue(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `scontrol -o show job JOB` (JOB may be `ID_TASK`); `None` if Slurm forgot it.
    pub fn show_job(&self, job: &str) -> Result<Option<JobInfo>, SlurmError> {
        let args = vec!["-o".to_string(), "show".into(), "job".into(), job.into()];
        let out = self.run("scontrol", &args)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Invalid job id") {
                return Ok(None);
            }
            return Err(Self::refused("scontrol", &args, &out));
        }
        Ok(parse_scontrol(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The cluster's nodes (`scontrol -o show nodes`).
    pub fn nodes(&self) -> Result<Vec<super::nodes::Node>, SlurmError> {
        let args = vec!["-o".to_string(), "show".into(), "nodes".into()];
        let out = self.run("scontrol", &args)?;
        if !out.status.success() {
            return Err(Self::refused("scontrol", &args, &out));
        }
        Ok(super::nodes::parse_nodes(&String::from_utf8_lossy(
            &out.stdout,
        )))
    }

    /// `scancel JOBS...` in one call.
    pub fn scancel(&self, jobs: &[String]) -> Result<(), SlurmError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let out = self.run("scancel", jobs)?;
        if !out.status.success() {
            return Err(Self::refused("scancel", jobs, &out));
        }
        Ok(())
    }
}
