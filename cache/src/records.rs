//! Run records: one JSON file per stage execution, successful or not.
//!
//! This is what MLflow and W&B users expect to find, and what makes a result
//! reproducible: which key, which resolved parameters, which input and output digests,
//! which code (crate version, git commit, torch version), where (host, device, threads),
//! how long, how much memory, and the stage's metrics. Records are written to
//! `runs/` for every execution and copied into the object as `record.json` on success.
//!
//! A record must survive the failure it records, a full disk included: an execution
//! reserves [`RESERVE_BYTES`] under `runs/` when it starts ([`Store::reserve_run_record`]),
//! and a record that cannot be written frees the reserve and is written again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::{ContentDigest, StageKey};
use crate::error::{IoContext, Result};
use crate::hashing::write_atomic;
use crate::store::{sanitize, Store};

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Succeeded,
    Failed,
    Cancelled,
}

/// Code and library versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    pub meduet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch: Option<String>,
}

/// One execution of a stage (or of one item of a fan-out stage).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub stage: String,
    pub kind: String,
    pub kind_version: u32,
    pub key: StageKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// Resolved parameters (canonical JSON).
    pub params: serde_json::Value,
    /// Input name -> digests of the outputs wired to it.
    pub inputs: BTreeMap<String, Vec<ContentDigest>>,
    /// Output name -> digest (empty unless succeeded).
    pub outputs: BTreeMap<String, ContentDigest>,
    pub versions: Versions,
    pub host: String,
    pub pid: u32,
    pub device: String,
    pub threads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// RFC 3339 UTC start time.
    pub started: String,
    pub wall_seconds: f64,
    /// Peak resident memory of the executing process, in bytes.
    pub peak_rss_bytes: u64,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub metrics: serde_json::Value,
}

/// Space reserved for an execution's run record (a record is a few KiB).
pub const RESERVE_BYTES: usize = 64 * 1024;

/// Space held for one run record; dropping it frees the space.
#[derive(Debug)]
pub struct RecordReserve {
    path: Option<std::path::PathBuf>,
}

impl RecordReserve {
    /// Frees the space now (to write the record on a full disk).
    fn release(&mut self) -> bool {
        match self.path.take() {
            Some(p) => std::fs::remove_file(p).is_ok(),
            None => false,
        }
    }
}

impl Drop for RecordReserve {
    fn drop(&mut self) {
        self.release();
    }
}

/// The name prefix of reserve files (`runs/.reserve-<key>-<unique>`); `gc` removes those
/// whose key nobody holds a lease on (their execution died).
pub const RESERVE_PREFIX: &str = ".reserve-";

impl Store {
    /// Reserves room for the run record of the execution of `key` starting now (under its
    /// lease). When even that cannot be written (the disk is full already), the reserve is
    /// empty.
    pub fn reserve_run_record(&self, key: &StageKey) -> RecordReserve {
        let dir = self.root().join("runs");
        let path = dir.join(format!(
            "{RESERVE_PREFIX}{}-{}",
            key.to_hex(),
            crate::hashing::unique_suffix()
        ));
        let ok = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&path, vec![b' '; RESERVE_BYTES]))
            .is_ok();
        if !ok {
            let _ = std::fs::remove_file(&path);
        }
        RecordReserve {
            path: ok.then_some(path),
        }
    }

    /// Writes a run record; when that fails (a full disk), frees `reserve` and writes it
    /// again.
    pub fn write_run_record_reserved(
        &self,
        record: &RunRecord,
        reserve: &mut RecordReserve,
    ) -> Result<std::path::PathBuf> {
        match self.write_run_record(record) {
            Err(e) if reserve.release() => {
                tracing::warn!(
                    "writing the run record failed ({e}); wrote it into the space reserved for it"
                );
                self.write_run_record(record)
            }
            r => r,
        }
    }

    /// Appends a run record under `runs/` and returns its path.
    pub fn write_run_record(&self, record: &RunRecord) -> Result<std::path::PathBuf> {
        let name = format!(
            "{}-{}-{}{}.json",
            record.started.replace([':', '-'], ""),
            sanitize(&record.stage),
            record.key.short(),
            record
                .item
                .as_deref()
                .map(|i| format!("-{}", sanitize(i)))
                .unwrap_or_default()
        );
        let path = self.root().join("runs").join(name);
        let text = serde_json::to_vec_pretty(record).expect("record serializes");
        write_atomic(&path, &text, false).at(&path)?;
        Ok(path)
    }
}

/// Peak resident set size of this process, in bytes.
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills a plain struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
            (ru.ru_maxrss as u64) * 1024
        } else {
            0
        }
    }
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-28T14:03:05Z`).
pub fn rfc3339_utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil-from-days algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_795_962_185), "2026-11-29T14:23:05Z");
    }

    #[test]
    fn peak_rss_is_positive() {
        assert!(peak_rss_bytes() > 0);
    }
}
