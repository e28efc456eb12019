//! Logging and span export setup: `tracing-subscriber` for logs, OpenTelemetry over OTLP for
//! connection spans.
//!
//! Logs go to stdout as text or JSON, filtered by `--log-level`, through the non-blocking
//! [`StdoutLog`]. Connection spans (built at close by [`ConnectionSpans`]) are exported over
//! OTLP when, and only when, the standard variables configure an endpoint; [`OtelSettings`]
//! (module `otel_env`) reads and checks every `OTEL_*` variable the service honours, and this
//! module builds the pipeline from it: exporter (module `exporter`), the counting batch
//! processor (module `batch`), sampler and resource. Invalid `OTEL_*` values that were ignored
//! are logged here, once each, as soon as the logger is up.
//!
//! A collector that is down, refuses or never answers cannot slow connections: spans go to a
//! bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`) and are dropped and counted when it is full; every
//! export is bounded by the export timeout, and so is the final flush at shutdown. Log lines
//! about failed exports, including the OpenTelemetry crates' own, are rate-limited (module
//! `log_limit`); the metrics carry the counts.

use std::fmt;
use std::time::Duration;

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use super::batch::MeteredBatchProcessor;
use super::connection_span::{ConnectionIds, ConnectionSpans};
use super::exporter::build_client;
use super::log_limit::SdkLogLimit;
use super::log_writer::StdoutLog;
use super::metrics::OtlpMetrics;
use super::otel_env::{ExportSettings, OtelSettings, DEFAULT_EXPORT_TIMEOUT};
use super::otlp_proto::SpanEncoder;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// OTLP export settings that are ours rather than standard `OTEL_*` variables.
#[derive(Debug, Clone, Copy)]
pub struct OtlpSettings {
    /// Upper bound of one export and of the final flush at shutdown (`--export-timeout`);
    /// unset: `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`, else 3 s.
    pub export_timeout: Option<Duration>,
}

/// A setup error that names the setting at fault.
#[derive(Debug)]
pub struct TracingSetupError(String);

impl fmt::Display for TracingSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TracingSetupError {}

impl TracingSetupError {
    /// An error with this one-line message (it names the setting at fault).
    pub fn new(message: impl Into<String>) -> Self {
        TracingSetupError(message.into())
    }
}

/// Keeps the span exporter alive; [`TracingGuard::shutdown`] flushes it.
pub struct TracingGuard {
    processor: Option<Arc<MeteredBatchProcessor>>,
    spans: Option<ConnectionSpans>,
    export_timeout: Duration,
}

impl TracingGuard {
    /// The connection span builder, when exporting (for the instrumented factory).
    pub fn connection_spans(&self) -> Option<ConnectionSpans> {
        self.spans.clone()
    }

    /// Is OTLP export on?
    pub fn exporting(&self) -> bool {
        self.processor.is_some()
    }

    /// Flush queued spans and stop the exporter, waiting at most the export timeout (plus a
    /// second of slack) even if the collector never answers.
    pub async fn shutdown(self) {
        let Some(processor) = self.processor else {
            return;
        };
        let timeout = self.export_timeout;
        match tokio::time::timeout(timeout + Duration::from_secs(1), processor.shutdown(timeout))
            .await
        {
            Ok(true) => tracing::debug!("span exporter flushed"),
            Ok(false) => tracing::warn!(
                ?timeout,
                "span exporter shutdown: not every span was exported (echo_otlp_spans_dropped_total)"
            ),
            Err(_) => tracing::warn!(?timeout, "span exporter shutdown timed out"),
        }
    }
}

/// Install the global subscriber: logs filtered by `log_filter` and written to `log` (never
/// blocking), plus the OTLP layer when the environment configures an endpoint. Must run inside
/// the tokio runtime (the gRPC exporter spawns onto it).
/// Install the global subscriber (logs filtered by `log_filter`) and, when `otel` configures
/// export, the span pipeline counting into `metrics`; the guard hands out the
/// [`ConnectionSpans`] for the instrumented factory. Must run inside the tokio runtime (the
/// exporter and the batch processor run on it).
pub fn init_tracing(
    log_filter: &str,
    format: LogFormat,
    log: StdoutLog,
    otlp: OtlpSettings,
    otel: OtelSettings,
    metrics: Arc<OtlpMetrics>,
) -> Result<TracingGuard, TracingSetupError> {
    let filter: Targets = log_filter.parse().map_err(|err| {
        TracingSetupError(format!(
            "invalid value '{log_filter}' for '--log-level': {err}"
        ))
    })?;
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(log)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(log)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
    .with_filter(filter.and(SdkLogLimit::default()));

    let export_timeout = otlp
        .export_timeout
        .or(otel.export.as_ref().and_then(|e| e.timeout))
        .unwrap_or(DEFAULT_EXPORT_TIMEOUT);
    let (processor, spans) = match &otel.export {
        Some(export) => {
            let ids = ConnectionIds::new();
            let processor = Arc::new(build_processor(
                export,
                export_timeout,
                metrics,
                ids.clone(),
            )?);
            let spans = ConnectionSpans::new(ids, export.sampler.clone(), processor.clone());
            (Some(processor), Some(spans))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt_layer)
        .try_init()
        .map_err(|err| TracingSetupError(format!("could not install the log subscriber: {err}")))?;
    for warning in &otel.warnings {
        tracing::warn!(
            variable = warning.variable,
            value = %warning.value,
            used = %warning.used,
            reason = %warning.reason,
            "{warning}"
        );
    }
    if let Some(export) = &otel.export {
        tracing::info!(
            protocol = export.protocol.as_str(),
            endpoint = %export.endpoint,
            gzip = export.gzip,
            sampler = %export.sampler_name,
            timeout = ?export_timeout,
            max_queue_size = export.batch.max_queue_size,
            "exporting connection spans over OTLP"
        );
    }
    Ok(TracingGuard {
        processor,
        spans,
        export_timeout,
    })
}

/// The export pipeline: client, encoder (with the resource) and the counting batch processor.
fn build_processor(
    export: &ExportSettings,
    export_timeout: Duration,
    metrics: Arc<OtlpMetrics>,
    ids: ConnectionIds,
) -> Result<MeteredBatchProcessor, TracingSetupError> {
    let client = build_client(export, export_timeout)?;

    // service.name: OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES, else "echo-service".
    let env = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if !named {
        resource = resource.with_service_name("echo-service");
    }
    let resource = resource.build();
    let encoder = SpanEncoder::new(
        ids,
        resource.iter().map(|(key, value)| (key.as_str(), value)),
        "echo-service",
    );
    Ok(MeteredBatchProcessor::start(
        encoder,
        client,
        export.batch,
        metrics,
    ))
}
