//! Per-step loss logs (JSON lines) and their PNG curves.

use std::io::Write;
use std::path::{Path, PathBuf};

use meduet_stages::plot::{line_plot, Series};

/// Appends one JSON object per line. On resume, lines of steps at or after the resume
/// step are dropped first, so the log of a resumed run equals an uninterrupted one.
pub struct JsonlLog {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlLog {
    pub fn open(path: &Path, resume_from_step: u64) -> std::io::Result<Self> {
        if let Ok(text) = std::fs::read_to_string(path) {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s < resume_from_step)
                })
                .collect();
            let mut out = kept.join("\n");
            if !out.is_empty() {
                out.push('\n');
            }
            std::fs::write(path, out)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> std::io::Result<()> {
        writeln!(
            self.file,
            "{}",
            serde_json::to_string(record).expect("json")
        )?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a JSONL log and plots the given numeric fields against `step`.
pub fn plot_jsonl(
    log: &Path,
    png: &Path,
    title: &str,
    fields: &[&str],
    log_y: bool,
) -> Result<(), String> {
    let text = std::fs::read_to_string(log)
        .map_err(|e| format!("cannot read '{}': {e}", log.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let series: Vec<Series> = fields
        .iter()
        .map(|f| Series {
            name: (*f).to_string(),
            points: rows
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r[*f].as_f64()?)))
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    line_plot(png, title, "step", "loss", &series, log_y).map_err(|e| e.to_string())
}

/// Reads the numeric column `field` of a JSONL log.
pub fn read_column(log: &Path, field: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| Some((r["step"].as_u64()?, r[field].as_f64()?)))
        .collect()
}

/// The mean of a loss column over its first and its last tenth (single steps are noisy);
/// `None` below two points.
pub fn first_and_last_tenth(col: &[(u64, f64)]) -> Option<(f64, f64)> {
    if col.len() < 2 {
        return None;
    }
    let k = (col.len() / 10).max(1);
    let avg = |v: &[(u64, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
    Some((avg(&col[..k]), avg(&col[col.len() - k..])))
}
