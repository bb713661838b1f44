//! Logging of the meduet binaries: tracing to stderr (through the progress bars) and
//! into each stage's log file ([`crate::logging::StageLogLayer`]).

use std::io::Write;

use indicatif::MultiProgress;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Writes to stderr with the progress bars suspended.
#[derive(Clone)]
struct SuspendingStderr(MultiProgress);

impl Write for SuspendingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for SuspendingStderr {
    type Writer = SuspendingStderr;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the subscriber; returns the progress-bar container.
pub fn init(verbose: u8, quiet: bool) -> MultiProgress {
    init_with(verbose, quiet)
}

fn init_with(verbose: u8, quiet: bool) -> MultiProgress {
    let multi = MultiProgress::new();
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("MEDUET_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},zarrs=warn")));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(SuspendingStderr(multi.clone()))
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .compact();
    let file_filter = EnvFilter::new("info,meduet_engine=debug,meduet_stages=debug,zarrs=warn");
    tracing_subscriber::registry()
        .with(stderr.with_filter(filter))
        .with(tracing_subscriber::Layer::with_filter(
            crate::logging::StageLogLayer,
            file_filter,
        ))
        .init();
    multi
}

use tracing_subscriber::Layer as _;
