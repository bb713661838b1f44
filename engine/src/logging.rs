//! Per-stage log files.
//!
//! Every stage execution writes its log into its object (`log.txt`), replayed by
//! `meduet show`. Stages run concurrently on their own threads and thread pools, so the
//! routing is per thread: the engine sets a [`LogSink`] on the stage's thread and on every
//! thread of its rayon pool, and [`StageLogLayer`] (installed by the binary next to the
//! stderr layer) appends each event to the sink of the thread that emitted it.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// A log file.
#[derive(Debug)]
pub struct LogSink {
    file: Mutex<Option<std::fs::File>>,
}

impl LogSink {
    pub fn create(path: &Path) -> std::io::Result<Arc<Self>> {
        let sink = Self::deferred();
        sink.set_path(path)?;
        Ok(sink)
    }

    /// A sink whose file is chosen later (events before that are dropped).
    pub fn deferred() -> Arc<Self> {
        Arc::new(Self {
            file: Mutex::new(None),
        })
    }

    /// Directs the sink to `path` (appending).
    pub fn set_path(&self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        *self.file.lock().expect("log sink lock") = Some(file);
        Ok(())
    }

    pub fn write_line(&self, line: &str) {
        if let Ok(mut f) = self.file.lock() {
            if let Some(f) = f.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

thread_local! {
    static SINK: RefCell<Option<Arc<LogSink>>> = const { RefCell::new(None) };
}

/// Restores the previous sink when dropped.
pub struct SinkGuard(Option<Arc<LogSink>>);

impl Drop for SinkGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        SINK.with(|s| *s.borrow_mut() = prev);
    }
}

/// Routes this thread's events to `sink` until the guard drops.
pub fn enter_sink(sink: Option<Arc<LogSink>>) -> SinkGuard {
    SinkGuard(SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), sink)))
}

/// The sink of this thread (to hand to helper threads a stage spawns).
pub fn current_sink() -> Option<Arc<LogSink>> {
    SINK.with(|s| s.borrow().clone())
}

struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }
}

/// Appends events to the current thread's stage log.
pub struct StageLogLayer;

impl<S: tracing::Subscriber> Layer<S> for StageLogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let Some(sink) = current_sink() else { return };
        let mut f = Fields {
            message: String::new(),
            rest: String::new(),
        };
        event.record(&mut f);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ts = meduet_cache::records::rfc3339_utc(now.as_secs());
        sink.write_line(&format!(
            "{ts} {:>5} {}{}",
            event.metadata().level(),
            f.message,
            f.rest
        ));
    }
}
