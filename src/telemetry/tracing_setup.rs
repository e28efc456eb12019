//! Logging and span export setup: `tracing-subscriber` for logs, OpenTelemetry over OTLP for
//! connection spans.
//!
//! Logs go to stdout as text or JSON, filtered by `--log-level` (RUST_LOG syntax), through the
//! non-blocking [`StdoutLog`]. Spans of target [`CONNECTION_TARGET`] are exported over OTLP
//! when, and only when, an endpoint is configured with the standard variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); otherwise no exporter exists and nothing is
//! attempted. `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn export off (the
//! Rust SDK does not read those itself). Protocol, service name, resource attributes, sampler
//! and batch sizes come from the SDK's own handling of `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]` and
//! `OTEL_BSP_*`.
//!
//! A collector that is down, refuses or never answers cannot slow connections: spans go to the
//! batch processor's bounded queue (2048 by default, `OTEL_BSP_MAX_QUEUE_SIZE`) and are
//! dropped when it is full (the SDK logs when dropping starts); every export is bounded by
//! `--export-timeout`, and so is the final flush at shutdown.

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, OTEL_EXPORTER_OTLP_PROTOCOL};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use super::instrumented::CONNECTION_TARGET;
use super::log_writer::StdoutLog;

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
    /// Upper bound of one export and of the final flush at shutdown (`--export-timeout`).
    pub export_timeout: Duration,
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

/// Keeps the span exporter alive; [`TracingGuard::shutdown`] flushes it.
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
    export_timeout: Duration,
}

impl TracingGuard {
    /// Is OTLP export on?
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flush queued spans and stop the exporter, waiting at most the export timeout (plus a
    /// second of slack) even if the collector never answers.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let timeout = self.export_timeout;
        // The SDK's shutdown blocks the calling thread: keep it off the runtime's workers.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => tracing::debug!("span exporter flushed"),
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "span exporter shutdown failed"),
            Ok(Err(err)) => tracing::warn!(error = %err, "span exporter shutdown panicked"),
            Err(_) => tracing::warn!(?timeout, "span exporter shutdown timed out"),
        }
    }
}

/// Install the global subscriber: logs filtered by `log_filter` and written to `log` (never
/// blocking), plus the OTLP layer when the environment configures an endpoint. Must run inside
/// the tokio runtime (the gRPC exporter spawns onto it).
pub fn init_tracing(
    log_filter: &str,
    format: LogFormat,
    log: StdoutLog,
    otlp: OtlpSettings,
) -> Result<TracingGuard, TracingSetupError> {
    let filter = EnvFilter::builder().parse(log_filter).map_err(|err| {
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
    .with_filter(filter);

    let provider = build_provider(otlp)?;
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("echo-service"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_level(false)
            .with_target(false)
            // Entering a span would start the SDK span (attributes, events, context): keep
            // the live span a lean builder until it closes.
            .with_context_activation(false)
            .with_filter(Targets::new().with_target(CONNECTION_TARGET, Level::DEBUG))
    });
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|err| TracingSetupError(format!("could not install the log subscriber: {err}")))?;
    if provider.is_some() {
        tracing::info!(
            protocol = %otlp_protocol().unwrap_or_default(),
            "exporting connection spans over OTLP"
        );
    }
    Ok(TracingGuard {
        provider,
        export_timeout: otlp.export_timeout,
    })
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The OTLP protocol from the environment (`grpc` or `http/protobuf`, the default).
fn otlp_protocol() -> Result<String, TracingSetupError> {
    let (name, value) = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        OTEL_EXPORTER_OTLP_PROTOCOL,
    ]
    .into_iter()
    .find_map(|name| env_nonempty(name).map(|v| (name, v)))
    .unwrap_or(("", "http/protobuf".to_owned()));
    match value.trim() {
        "grpc" | "http/protobuf" => Ok(value.trim().to_owned()),
        other => Err(TracingSetupError(format!(
            "invalid value '{other}' for '{name}': supported are 'grpc' and 'http/protobuf'"
        ))),
    }
}

/// Is OTLP export wanted? Only with an endpoint, and not when disabled.
fn export_wanted() -> Result<bool, TracingSetupError> {
    if env_nonempty("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    match env_nonempty("OTEL_TRACES_EXPORTER")
        .as_deref()
        .map(str::trim)
    {
        None | Some("otlp") => {}
        Some("none") => return Ok(false),
        Some(other) => {
            return Err(TracingSetupError(format!(
            "invalid value '{other}' for 'OTEL_TRACES_EXPORTER': supported are 'otlp' and 'none'"
        )))
        }
    }
    Ok(env_nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env_nonempty("OTEL_EXPORTER_OTLP_ENDPOINT").is_some())
}

fn build_provider(otlp: OtlpSettings) -> Result<Option<SdkTracerProvider>, TracingSetupError> {
    if !export_wanted()? {
        return Ok(None);
    }
    let exporter = match otlp_protocol()?.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(otlp.export_timeout)
            .build(),
        _ => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_timeout(otlp.export_timeout)
            .build(),
    }
    .map_err(|err| {
        TracingSetupError(format!(
            "invalid OTLP exporter settings (OTEL_EXPORTER_OTLP_*): {err}"
        ))
    })?;
    // Queue size and batching from OTEL_BSP_*; each export is bounded by the exporter timeout.
    let batch = BatchConfigBuilder::default().build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build();

    // service.name: OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES, else "echo-service".
    let named = env_nonempty("OTEL_SERVICE_NAME").is_some()
        || env_nonempty("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
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
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build(),
    ))
}
