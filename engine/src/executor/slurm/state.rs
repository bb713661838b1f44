//! Job states as Slurm reports them, and what each means for a stage.
//!
//! Tracking never relies on accounting: `squeue --states=all -r` lists jobs (and every
//! array task) for `MinJobAge` seconds after they end; `scontrol -o show job` gives the
//! exit code and signal of one job; a job missing from both is judged by the cache
//! alone. Whatever Slurm says, only the object's manifest proves success.

/// A Slurm job state (`%T` of squeue, `JobState=` of scontrol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    /// Configuring, completing, suspended, requeued, resizing, signaling, staging out.
    Busy(String),
    Completed,
    Failed,
    Cancelled,
    Timeout,
    Preempted,
    NodeFail,
    BootFail,
    OutOfMemory,
    Deadline,
    Other(String),
}

impl JobState {
    pub fn parse(s: &str) -> Self {
        // sacct writes "CANCELLED by 0".
        let s = s
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match s.as_str() {
            "PENDING" | "PD" => Self::Pending,
            "RUNNING" | "R" => Self::Running,
            "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "REQUEUE_FED"
            | "REQUEUE_HOLD" | "RESIZING" | "SIGNALING" | "STAGE_OUT" | "STOPPED"
            | "RESV_DEL_HOLD" | "SPECIAL_EXIT" => Self::Busy(s),
            "COMPLETED" | "CD" => Self::Completed,
            "FAILED" | "F" => Self::Failed,
            "CANCELLED" | "CA" => Self::Cancelled,
            "TIMEOUT" | "TO" => Self::Timeout,
            "PREEMPTED" | "PR" => Self::Preempted,
            "NODE_FAIL" | "NF" => Self::NodeFail,
            "BOOT_FAIL" | "BF" => Self::BootFail,
            "OUT_OF_MEMORY" | "OOM" => Self::OutOfMemory,
            "DEADLINE" | "DL" => Self::Deadline,
            _ => Self::Other(s),
        }
    }

    /// Whether the job has not ended yet.
    pub fn is_active(&self) -> bool {
        matches!(self, Self::Pending | Self::Running | Self::Busy(_))
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Busy(s) | Self::Other(s) => s,
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Timeout => "TIMEOUT",
            Self::Preempted => "PREEMPTED",
            Self::NodeFail => "NODE_FAIL",
            Self::BootFail => "BOOT_FAIL",
            Self::OutOfMemory => "OUT_OF_MEMORY",
            Self::Deadline => "DEADLINE",
        };
        f.write_str(s)
    }
}

/// One line of `squeue --states=all -r -o %F|%K|%T|%r`: a job, or one array task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRow {
    /// The (array) job id as sbatch printed it.
    pub job: String,
    /// The array task index, for array tasks.
    pub task: Option<usize>,
    pub state: JobState,
    pub reason: String,
}

/// The squeue format [`parse_squeue`] reads.
pub const SQUEUE_FORMAT: &str = "%F|%K|%T|%r";

/// Parses squeue output in [`SQUEUE_FORMAT`] (with `-r`, one row per array task).
pub fn parse_squeue(text: &str) -> Vec<QueueRow> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split('|');
            let job = f.next()?.trim().to_string();
            let task = f.next()?.trim();
            let state = JobState::parse(f.next()?.trim());
            let reason = f.next().unwrap_or("").trim().to_string();
            if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(QueueRow {
                job,
                task: task.parse().ok(),
                state,
                reason,
            })
        })
        .collect()
}

/// What `scontrol -o show job` says about one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub state: JobState,
    pub reason: String,
    /// `ExitCode=N:S`: exit status and the signal that ended the job (0: none).
    pub exit: Option<(i32, i32)>,
}

/// Parses one record of `scontrol -o show job` (`Key=Value` pairs on one line).
pub fn parse_scontrol(text: &str) -> Option<JobInfo> {
    let line = text.lines().find(|l| l.contains("JobState="))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_string))
    };
    let state = JobState::parse(&field("JobState=")?);
    let exit = field("ExitCode=").and_then(|e| {
        let (c, s) = e.split_once(':')?;
        Some((c.parse().ok()?, s.parse().ok()?))
    });
    Some(JobInfo {
        state,
        reason: field("Reason=").unwrap_or_default(),
        exit,
    })
}

/// What a job's end means for its stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still queued or running.
    Active,
    /// Slurm says it succeeded: the manifest decides.
    Completed,
    /// Worth resubmitting (the stage is idempotent and leased): why.
    Retry(String),
    /// The stage itself failed: why.
    Failed(String),
}

/// Judges a job from its state and, when known, its exit code and signal.
pub fn judge(state: &JobState, exit: Option<(i32, i32)>) -> Verdict {
    match state {
        s if s.is_active() => Verdict::Active,
        JobState::Completed => Verdict::Completed,
        JobState::Timeout => Verdict::Retry("hit its time limit (TIMEOUT)".into()),
        JobState::Preempted => Verdict::Retry("was preempted (PREEMPTED)".into()),
        JobState::NodeFail => Verdict::Retry("lost its node (NODE_FAIL)".into()),
        JobState::BootFail => Verdict::Retry("its node failed to boot (BOOT_FAIL)".into()),
        JobState::Cancelled => Verdict::Retry("was cancelled (scancel or an administrator)".into()),
        JobState::Failed => match exit {
            Some((_, sig)) if sig != 0 => Verdict::Retry(format!("was killed by signal {sig}")),
            Some((code, _)) => Verdict::Failed(format!("exited with status {code}")),
            None => Verdict::Failed("FAILED".into()),
        },
        JobState::OutOfMemory => Verdict::Failed(
            "ran out of memory (OUT_OF_MEMORY; hint: raise the stage's resources.memory_gb)".into(),
        ),
        JobState::Deadline => Verdict::Failed("missed its deadline (DEADLINE)".into()),
        other => Verdict::Failed(format!("ended in state {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_rows_with_array_tasks() {
        // Real output of Slurm 22.05 (squeue --states=all -r -h -o '%F|%K|%T|%r').
        let rows = parse_squeue(
            "3|N/A|CANCELLED|DependencyNeverSatisfied\n2|N/A|FAILED|NonZeroExitCode\n1|2|PENDING|JobArrayTaskLimit\n1|0|RUNNING|None\n",
        );
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].task, None);
        assert_eq!(rows[0].state, JobState::Cancelled);
        assert_eq!(rows[2].job, "1");
        assert_eq!(rows[2].task, Some(2));
        assert_eq!(rows[2].reason, "JobArrayTaskLimit");
        assert!(rows[3].state.is_active());
    }

    #[test]
    fn scontrol_exit_codes() {
        let i = parse_scontrol("JobId=8 JobName=k.sh UserId=root(0) JobState=FAILED Reason=JobLaunchFailure Dependency=(null) ExitCode=0:9 RunTime=00:00:01").unwrap();
        assert_eq!(i.state, JobState::Failed);
        assert_eq!(i.exit, Some((0, 9)));
        assert!(matches!(judge(&i.state, i.exit), Verdict::Retry(m) if m.contains("signal 9")));
        assert_eq!(
            judge(&JobState::Failed, Some((3, 0))),
            Verdict::Failed("exited with status 3".into())
        );
        assert!(matches!(judge(&JobState::Timeout, None), Verdict::Retry(_)));
        assert!(matches!(
            judge(&JobState::parse("CANCELLED by 0"), None),
            Verdict::Retry(_)
        ));
        assert_eq!(judge(&JobState::Pending, None), Verdict::Active);
    }
}
