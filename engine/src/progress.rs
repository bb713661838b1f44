//! Progress bars (indicatif), drawn only when stderr is a terminal.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

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
            Some(m) => {
                let pb = m.add(ProgressBar::new(len));
                pb.set_style(
                    ProgressStyle::with_template(
                        "{msg:30!} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                pb.set_message(msg.to_string());
                pb
            }
        }
    }
}
