//! Progress bars (indicatif), drawn when stderr is a terminal; otherwise (`meduet run >
//! log`, a batch job) each bar's line goes to the log at most every [`LOG_EVERY`].

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// How often a bar is written to the log when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{msg:30!} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// A "terminal" that hands a bar's rendered line to `sink` at most every `every`.
struct LogLines {
    every: Duration,
    last: Mutex<Option<Instant>>,
    sink: Box<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for LogLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLines")
            .field("every", &self.every)
            .finish()
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        let line = s.trim();
        if line.is_empty() {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= self.every) {
            *last = Some(now);
            (self.sink)(line);
        }
        Ok(())
    }
    fn clear_line(&self) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A bar of `len` steps whose line goes to `sink` at most every `every`.
fn logged_bar(
    len: u64,
    msg: &str,
    every: Duration,
    sink: Box<dyn Fn(&str) + Send + Sync>,
) -> ProgressBar {
    let term = LogLines {
        every,
        last: Mutex::new(None),
        sink,
    };
    let pb = ProgressBar::with_draw_target(
        Some(len),
        ProgressDrawTarget::term_like_with_hz(Box::new(term), 1),
    );
    pb.set_style(style());
    pb.set_message(msg.to_string());
    pb
}

/// Hands out progress bars to stages.
#[derive(Clone, Default)]
pub struct Reporter {
    multi: Option<MultiProgress>,
}

impl Reporter {
    /// No bars at all (tests, `exec-stage` under a cluster scheduler).
    pub fn hidden() -> Self {
        Self { multi: None }
    }

    /// Bars drawn through `multi` (the binary routes its log output through
    /// `MultiProgress::suspend` so lines and bars do not garble each other).
    pub fn new(multi: MultiProgress) -> Self {
        Self { multi: Some(multi) }
    }

    pub fn multi(&self) -> Option<&MultiProgress> {
        self.multi.as_ref()
    }

    /// A bar of `len` steps.
    pub fn bar(&self, len: u64, msg: &str) -> ProgressBar {
        match &self.multi {
            None => ProgressBar::hidden(),
            Some(m) if m.is_hidden() => logged_bar(
                len,
                msg,
                LOG_EVERY,
                Box::new(|line| tracing::info!("{line}")),
            ),
            Some(m) => {
                let pb = m.add(ProgressBar::new(len));
                pb.set_style(style());
                pb.set_message(msg.to_string());
                pb
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn collecting(every: Duration) -> (ProgressBar, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let pb = logged_bar(
            10,
            "steps",
            every,
            Box::new(move |l| sink.lock().unwrap().push(l.to_string())),
        );
        (pb, lines)
    }

    #[test]
    fn bars_are_logged_at_most_every_interval() {
        let (pb, lines) = collecting(Duration::ZERO);
        for _ in 0..3 {
            pb.inc(1);
            std::thread::sleep(Duration::from_millis(1050));
        }
        pb.inc(1);
        let got = lines.lock().unwrap().clone();
        assert!(
            got.iter()
                .any(|l| l.starts_with("steps") && l.contains("3/10")),
            "{got:?}"
        );
        // A long interval: only the first drawing gets through.
        let (pb, lines) = collecting(Duration::from_secs(3600));
        for _ in 0..3 {
            pb.inc(1);
            std::thread::sleep(Duration::from_millis(1050));
        }
        assert_eq!(lines.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_hidden_terminal_logs_and_no_reporter_hides() {
        assert!(Reporter::hidden().bar(5, "x").is_hidden());
        let hidden = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
        assert!(!Reporter::new(hidden).bar(5, "x").is_hidden());
    }
}
