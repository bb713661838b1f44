//! Executor settings of a pipeline file, validated with the file and line of each value.
//!
//! ```toml
//! [executor]
//! default = "slurm"              # executor when `meduet run` gets no --executor (default "local")
//!
//! [executor.slurm]
//! partition = "gpu"              # sbatch --partition / --account / --qos
//! account = "imaging"
//! qos = "normal"
//! time = "2:00:00"               # default time limit (Slurm forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)
//! time_per_kind = { vae_train = "1-00:00:00", resample = "20" }
//! extra_args = ["--constraint=a100"]
//! poll_interval = 5              # seconds between scheduler queries (one squeue per poll)
//! max_jobs = 100                 # jobs (array tasks count one each, up to array_parallelism) in flight
//! array_parallelism = 50         # K of --array=0-N%K
//! retries = 2                    # resubmissions after TIMEOUT, PREEMPTED, NODE_FAIL or a killed job
//! gpu_request = "--gres=gpu:{n}" # how a GPU is asked for ("--gpus={n}", "--gres=gpu:a100:{n}", ...)
//! meduet = "/shared/bin/meduet"  # the meduet binary as the nodes see it (default: this one)
//!
//! [stages.train]
//! executor = "local"             # or: executor = { run_on = "slurm", slurm = { time = "3-00:00:00", gpus = 2 } }
//! ```
//!
//! Nothing here enters a cache key: where a stage runs never changes what it produces.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Location, PipelineError};

/// Where stages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// On this machine (the local scheduler).
    #[default]
    Local,
    /// As Slurm jobs running `meduet exec-stage` on a shared cache.
    Slurm,
}

impl std::fmt::Display for ExecutorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        })
    }
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "slurm" => Ok(Self::Slurm),
            _ => Err(format!(
                "unknown executor '{s}' (expected \"local\" or \"slurm\")"
            )),
        }
    }
}

/// A Slurm time limit, as written (checked against Slurm's accepted forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeLimit(pub String);

impl TimeLimit {
    /// Parses a Slurm time limit: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`, or
    /// `UNLIMITED` / `infinite`. Returns the limit in seconds (`None`: unlimited).
    pub fn parse(s: &str) -> Result<(Self, Option<u64>), String> {
        let err = || {
            format!("invalid time limit '{s}' (expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, as sbatch --time takes)")
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
            return Ok((Self(t.to_string()), None));
        }
        let num = |x: &str| -> Result<u64, String> {
            if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) || x.len() > 9 {
                return Err(err());
            }
            x.parse().map_err(|_| err())
        };
        let (days, rest) = match t.split_once('-') {
            Some((d, r)) => (Some(num(d)?), r),
            None => (None, t),
        };
        let parts: Vec<u64> = rest.split(':').map(num).collect::<Result<_, _>>()?;
        let secs = match (days, parts.as_slice()) {
            (None, [m]) => m * 60,
            (None, [m, s]) => m * 60 + s,
            (None, [h, m, s]) => h * 3600 + m * 60 + s,
            (Some(d), [h]) => d * 86400 + h * 3600,
            (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
            (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
            _ => return Err(err()),
        };
        if secs == 0 {
            return Err(format!("{} (a zero limit)", err()));
        }
        Ok((Self(t.to_string()), Some(secs)))
    }
}

/// `[executor.slurm]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<TimeLimit>,
    pub time_per_kind: BTreeMap<String, TimeLimit>,
    pub extra_args: Vec<String>,
    pub poll_interval: Duration,
    pub max_jobs: usize,
    pub array_parallelism: usize,
    pub retries: u32,
    /// Contains `{n}`, replaced by the number of GPUs.
    pub gpu_request: String,
    pub meduet: Option<PathBuf>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            partition: None,
            account: None,
            qos: None,
            time: None,
            time_per_kind: BTreeMap::new(),
            extra_args: Vec::new(),
            poll_interval: Duration::from_secs(5),
            max_jobs: 100,
            array_parallelism: 50,
            retries: 2,
            gpu_request: "--gres=gpu:{n}".into(),
            meduet: None,
        }
    }
}

/// A stage's `executor` setting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageExecutor {
    /// Forces the executor of this stage whatever the run's executor.
    pub run_on: Option<ExecutorKind>,
    pub slurm: SlurmOverride,
}

/// Per-stage Slurm settings (each replaces the pipeline's; `extra_args` are appended).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlurmOverride {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<TimeLimit>,
    pub extra_args: Vec<String>,
    /// GPUs to request (default: 1 for a stage whose device is `cuda` or `cuda:N`, 0 otherwise).
    pub gpus: Option<u32>,
}

/// The `[executor]` table, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutorConfig {
    /// `default = ...`: the executor of runs that do not choose one.
    pub default: Option<ExecutorKind>,
    pub slurm: SlurmConfig,
}

/// The effective Slurm settings of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSlurm {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<TimeLimit>,
    pub extra_args: Vec<String>,
    pub gpus: u32,
}

impl SlurmConfig {
    /// The settings of a stage of kind `kind` with device request `device`.
    pub fn for_stage(
        &self,
        kind: &str,
        device: crate::resources::DeviceRequest,
        o: &SlurmOverride,
    ) -> StageSlurm {
        use crate::resources::DeviceRequest;
        let default_gpus = match device {
            DeviceRequest::AnyCuda | DeviceRequest::Cuda(_) => 1,
            DeviceRequest::Cpu | DeviceRequest::Auto => 0,
        };
        StageSlurm {
            partition: o.partition.clone().or_else(|| self.partition.clone()),
            account: o.account.clone().or_else(|| self.account.clone()),
            qos: o.qos.clone().or_else(|| self.qos.clone()),
            time: o
                .time
                .clone()
                .or_else(|| self.time_per_kind.get(kind).cloned())
                .or_else(|| self.time.clone()),
            extra_args: self
                .extra_args
                .iter()
                .chain(o.extra_args.iter())
                .cloned()
                .collect(),
            gpus: o.gpus.unwrap_or(default_gpus),
        }
    }
}

/// Reads values of an executor table, reporting errors at each key's own line.
struct Reader<'a> {
    spans: &'a BTreeMap<String, Location>,
    fallback: Location,
    /// Dotted path of the table (`executor.slurm`).
    path: String,
}

impl Reader<'_> {
    fn at(&self, key: &str) -> Location {
        self.spans
            .get(&format!("{}.{key}", self.path))
            .or_else(|| self.spans.get(&self.path))
            .cloned()
            .unwrap_or_else(|| self.fallback.clone())
    }
    fn err(&self, key: &str, message: String) -> PipelineError {
        PipelineError::Invalid {
            at: self.at(key),
            message: format!("[{}] '{key}': {message}", self.path),
        }
    }
    fn check_keys(&self, t: &toml::Table, known: &[&str]) -> Result<(), PipelineError> {
        for k in t.keys() {
            if !known.contains(&k.as_str()) {
                return Err(PipelineError::Invalid {
                    at: self.at(k),
                    message: format!(
                        "[{}]: unknown key '{k}' (known keys: {})",
                        self.path,
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }
    fn string(&self, t: &toml::Table, key: &str) -> Result<Option<String>, PipelineError> {
        match t.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
            Some(v) => Err(self.err(
                key,
                format!("expected a non-empty string, got {}", describe(v)),
            )),
        }
    }
    fn time(&self, t: &toml::Table, key: &str) -> Result<Option<TimeLimit>, PipelineError> {
        match self.string(t, key)? {
            None => Ok(None),
            Some(s) => TimeLimit::parse(&s)
                .map(|(t, _)| Some(t))
                .map_err(|m| self.err(key, m)),
        }
    }
    fn uint(&self, t: &toml::Table, key: &str, min: i64) -> Result<Option<i64>, PipelineError> {
        match t.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if *n >= min => Ok(Some(*n)),
            Some(v) => Err(self.err(
                key,
                format!("expected an integer >= {min}, got {}", describe(v)),
            )),
        }
    }
    fn strings(&self, t: &toml::Table, key: &str) -> Result<Vec<String>, PipelineError> {
        match t.get(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    toml::Value::String(s) if s.starts_with('-') => Ok(s.clone()),
                    other => Err(self.err(
                        key,
                        format!(
                            "expected sbatch options such as \"--constraint=a100\", got {}",
                            describe(other)
                        ),
                    )),
                })
                .collect(),
            Some(v) => Err(self.err(
                key,
                format!("expected a list of sbatch options, got {}", describe(v)),
            )),
        }
    }
    fn table<'t>(
        &self,
        t: &'t toml::Table,
        key: &str,
    ) -> Result<Option<&'t toml::Table>, PipelineError> {
        match t.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(x)) => Ok(Some(x)),
            Some(v) => Err(self.err(key, format!("expected a table, got {}", describe(v)))),
        }
    }
    fn sub(&self, key: &str) -> Reader<'_> {
        Reader {
            spans: self.spans,
            fallback: self.at(key),
            path: format!("{}.{key}", self.path),
        }
    }
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string \"{s}\""),
        toml::Value::Integer(n) => format!("the integer {n}"),
        toml::Value::Float(x) => format!("the number {x}"),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the date {d}"),
        toml::Value::Array(_) => "a list".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

impl ExecutorConfig {
    /// Validates the `[executor]` table of a pipeline file.
    pub fn from_table(
        t: &toml::Table,
        spans: &BTreeMap<String, Location>,
        fallback: Location,
        known_kinds: &[&str],
    ) -> Result<Self, PipelineError> {
        let r = Reader {
            spans,
            fallback,
            path: "executor".into(),
        };
        r.check_keys(t, &["default", "slurm"])?;
        let default = match r.string(t, "default")? {
            None => None,
            Some(s) => Some(s.parse().map_err(|m| r.err("default", m))?),
        };
        let mut slurm = SlurmConfig::default();
        if let Some(st) = r.table(t, "slurm")? {
            let r = r.sub("slurm");
            r.check_keys(
                st,
                &[
                    "partition",
                    "account",
                    "qos",
                    "time",
                    "time_per_kind",
                    "extra_args",
                    "poll_interval",
                    "max_jobs",
                    "array_parallelism",
                    "retries",
                    "gpu_request",
                    "meduet",
                ],
            )?;
            slurm.partition = r.string(st, "partition")?;
            slurm.account = r.string(st, "account")?;
            slurm.qos = r.string(st, "qos")?;
            slurm.time = r.time(st, "time")?;
            if let Some(per) = r.table(st, "time_per_kind")? {
                let rk = r.sub("time_per_kind");
                for kind in per.keys() {
                    if !known_kinds.contains(&kind.as_str()) {
                        return Err(rk.err(
                            kind,
                            format!(
                                "unknown stage kind '{kind}' (known kinds: {})",
                                known_kinds.join(", ")
                            ),
                        ));
                    }
                    if let Some(tl) = rk.time(per, kind)? {
                        slurm.time_per_kind.insert(kind.clone(), tl);
                    }
                }
            }
            slurm.extra_args = r.strings(st, "extra_args")?;
            match st.get("poll_interval") {
                None => {}
                Some(toml::Value::Integer(n)) if *n > 0 => {
                    slurm.poll_interval = Duration::from_secs(*n as u64)
                }
                Some(toml::Value::Float(x)) if *x > 0.0 && x.is_finite() => {
                    slurm.poll_interval = Duration::from_secs_f64(*x)
                }
                Some(v) => {
                    return Err(r.err(
                        "poll_interval",
                        format!("expected seconds (a number > 0), got {}", describe(v)),
                    ))
                }
            }
            if let Some(n) = r.uint(st, "max_jobs", 1)? {
                slurm.max_jobs = n as usize;
            }
            if let Some(n) = r.uint(st, "array_parallelism", 1)? {
                slurm.array_parallelism = n as usize;
            }
            if let Some(n) = r.uint(st, "retries", 0)? {
                slurm.retries = n.min(u32::MAX as i64) as u32;
            }
            if let Some(g) = r.string(st, "gpu_request")? {
                if !g.starts_with("--") || !g.contains("{n}") {
                    return Err(r.err(
                        "gpu_request",
                        format!("'{g}' must be an sbatch option containing {{n}} (for example \"--gres=gpu:{{n}}\" or \"--gpus={{n}}\")"),
                    ));
                }
                slurm.gpu_request = g;
            }
            slurm.meduet = r.string(st, "meduet")?.map(PathBuf::from);
            if let Some(m) = &slurm.meduet {
                if !m.is_absolute() {
                    return Err(r.err(
                        "meduet",
                        format!("'{}' must be an absolute path (the nodes run it from their own working folder)", m.display()),
                    ));
                }
            }
        }
        Ok(Self { default, slurm })
    }
}

impl StageExecutor {
    /// Validates the `executor` entry of stage `stage`.
    pub fn from_value(
        stage: &str,
        v: &toml::Value,
        spans: &BTreeMap<String, Location>,
        fallback: Location,
    ) -> Result<Self, PipelineError> {
        let r = Reader {
            spans,
            fallback,
            path: format!("stages.{stage}.executor"),
        };
        match v {
            toml::Value::String(s) => Ok(Self {
                run_on: Some(s.parse().map_err(|m: String| PipelineError::Invalid {
                    at: r.at(""),
                    message: format!("stage '{stage}': 'executor': {m}"),
                })?),
                slurm: SlurmOverride::default(),
            }),
            toml::Value::Table(t) => {
                r.check_keys(t, &["run_on", "slurm"])?;
                let run_on = match r.string(t, "run_on")? {
                    None => None,
                    Some(s) => Some(s.parse().map_err(|m| r.err("run_on", m))?),
                };
                let mut slurm = SlurmOverride::default();
                if let Some(st) = r.table(t, "slurm")? {
                    let r = r.sub("slurm");
                    r.check_keys(
                        st,
                        &["partition", "account", "qos", "time", "extra_args", "gpus"],
                    )?;
                    slurm.partition = r.string(st, "partition")?;
                    slurm.account = r.string(st, "account")?;
                    slurm.qos = r.string(st, "qos")?;
                    slurm.time = r.time(st, "time")?;
                    slurm.extra_args = r.strings(st, "extra_args")?;
                    slurm.gpus = r.uint(st, "gpus", 0)?.map(|n| n.min(u32::MAX as i64) as u32);
                }
                Ok(Self { run_on, slurm })
            }
            other => Err(PipelineError::Invalid {
                at: r.at(""),
                message: format!(
                    "stage '{stage}': 'executor' must be \"local\", \"slurm\" or a table such as {{ run_on = \"slurm\", slurm = {{ time = \"1:00:00\" }} }}, got {}",
                    describe(other)
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits() {
        for (s, secs) in [
            ("30", 1800),
            ("1:30", 90),
            ("2:00:00", 7200),
            ("1-0", 86400),
            ("1-2:30", 86400 + 2 * 3600 + 1800),
            ("0-0:0:5", 5),
        ] {
            assert_eq!(TimeLimit::parse(s).unwrap().1, Some(secs), "{s}");
        }
        assert_eq!(TimeLimit::parse("UNLIMITED").unwrap().1, None);
        for bad in ["1h", "", "1:2:3:4", "-1", "0", "1-", "a:b"] {
            let e = TimeLimit::parse(bad).unwrap_err();
            assert!(e.contains("HH:MM:SS"), "{bad}: {e}");
        }
    }

    #[test]
    fn stage_settings_override_the_pipeline() {
        let mut c = SlurmConfig {
            partition: Some("cpu".into()),
            time: Some(TimeLimit("10".into())),
            extra_args: vec!["--a".into()],
            ..Default::default()
        };
        c.time_per_kind
            .insert("text".into(), TimeLimit("20".into()));
        use crate::resources::DeviceRequest;
        let plain = c.for_stage("concat", DeviceRequest::Cpu, &SlurmOverride::default());
        assert_eq!(plain.time, Some(TimeLimit("10".into())));
        assert_eq!(plain.gpus, 0);
        let kind = c.for_stage("text", DeviceRequest::AnyCuda, &SlurmOverride::default());
        assert_eq!(kind.time, Some(TimeLimit("20".into())));
        assert_eq!(kind.gpus, 1);
        let o = SlurmOverride {
            partition: Some("gpu".into()),
            time: Some(TimeLimit("30".into())),
            extra_args: vec!["--b".into()],
            gpus: Some(2),
            ..Default::default()
        };
        let s = c.for_stage("text", DeviceRequest::Cpu, &o);
        assert_eq!(s.partition.as_deref(), Some("gpu"));
        assert_eq!(s.time, Some(TimeLimit("30".into())));
        assert_eq!(s.extra_args, ["--a", "--b"]);
        assert_eq!(s.gpus, 2);
    }
}
