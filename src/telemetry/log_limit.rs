//! Rate limits for log lines about a failing span export.
//!
//! A collector that refuses every export would otherwise produce a line per failed batch,
//! growing with traffic (47-70 ERROR lines per second were measured). The counts belong in
//! metrics (`echo_otlp_export_errors_total`, `echo_otlp_spans_dropped_total`); the log keeps at
//! most one line per second per distinct error, and that line says how many were suppressed
//! since the previous one.
//!
//! Two pieces:
//! - [`LogLimiter`]: asked before the span processor writes an export-failure line; answers
//!   whether to write it and with which suppressed count.
//! - [`SdkLogLimit`]: a per-layer filter for the OpenTelemetry crates' own log events (their
//!   targets start with `opentelemetry`), one line per second per call site and message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// At most one line per key per this long.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Distinct keys remembered; more share one overflow key, so memory stays bounded whatever the
/// errors say.
const MAX_KEYS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Entry {
    last: Instant,
    suppressed: u64,
}

/// Admits one line per key per [`LOG_INTERVAL`] and counts the others.
#[derive(Debug, Default)]
pub struct LogLimiter {
    entries: Mutex<HashMap<String, Entry>>,
}

impl LogLimiter {
    /// May a line for `key` be written at `now`? `Some(n)`: yes, and `n` lines for this key
    /// were suppressed since the last one written. `None`: suppressed (and counted).
    pub fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let key = if entries.contains_key(key) || entries.len() < MAX_KEYS {
            key
        } else {
            "(other errors)"
        };
        match entries.get_mut(key) {
            Some(entry) if now.saturating_duration_since(entry.last) < LOG_INTERVAL => {
                entry.suppressed += 1;
                None
            }
            Some(entry) => {
                let suppressed = std::mem::take(&mut entry.suppressed);
                entry.last = now;
                Some(suppressed)
            }
            None => {
                entries.insert(
                    key.to_owned(),
                    Entry {
                        last: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// Filters the OpenTelemetry crates' own events to one per second per call site and message;
/// every other event passes untouched.
#[derive(Debug, Default)]
pub struct SdkLogLimit {
    limiter: LogLimiter,
}

impl SdkLogLimit {
    fn is_sdk(metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("opentelemetry")
    }
}

/// Collects an event's fields as text, to tell distinct errors apart.
struct FieldText(String);

impl Visit for FieldText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.0.len() < 512 {
            use std::fmt::Write;
            let _ = write!(self.0, "{}={:?};", field.name(), value);
        }
    }
}

/// Combined with the log level filter (`FilterExt::and`), this filter must not cost anything
/// for other call sites: it never narrows a level (`max_level_hint` is TRACE, so the combined
/// hint stays the level filter's and disabled `debug!` call sites stay disabled statically),
/// and only the OpenTelemetry crates' call sites are re-checked per event.
impl<S> Filter<S> for SdkLogLimit {
    fn enabled(&self, _metadata: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if Self::is_sdk(metadata) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let metadata = event.metadata();
        if !Self::is_sdk(metadata) {
            return true;
        }
        let mut text = FieldText(format!("{}:{}|", metadata.target(), metadata.name()));
        event.record(&mut text);
        self.limiter.admit(&text.0, Instant::now()).is_some()
    }
}
