//! Telemetry: Prometheus metrics, tracing (logs and one span per connection, exported over
//! OTLP), and the instrumented factory that records both around any protocol.
//!
//! Data flows one way: the server and the protocols update counters and spans; the admin
//! server reads them. Nothing here feeds back into how connections are served.
//!
//! # Layout
//!
//! - `instrumented`: the wrapping factory/protocol (byte counters, duration, debug log lines).
//! - `connection_span`: the connection's OTLP span, built in one go at close, and its ids.
//! - `otel_env`: every `OTEL_*` variable, read and checked per the specification.
//! - `exporter`: the OTLP client (gRPC or HTTP, rustls, gzip, headers) from those settings.
//! - `otlp_proto`: connection spans encoded straight to OTLP protobuf, on the export task.
//! - `batch`: the span queue and export task that count what they do (`echo_otlp_*`).
//! - `log_limit`: one log line per second per distinct export error.
//! - `metrics`: every Prometheus metric, registered in one place.
//! - `tracing_setup`: the log subscriber and the export pipeline, wired together.

mod batch;
mod connection_span;
mod exporter;
mod instrumented;
mod log_limit;
mod log_writer;
mod metrics;
mod otel_env;
mod otlp_proto;
mod tracing_setup;

pub use batch::MeteredBatchProcessor;
pub use connection_span::{ConnectionExtras, ConnectionIds, ConnectionSpans, SpanRecord};
pub use instrumented::{
    InstrumentedFactory, InstrumentedProtocol, CONNECTION_TARGET, LIFECYCLE_LOG_TARGET,
};
pub use log_limit::{LogLimiter, LOG_INTERVAL};
pub use log_writer::StdoutLog;
pub use metrics::{
    DatagramFamilies, DatagramMetrics, Metrics, OtlpMetrics, ProxyMetrics, TlsFamilies, TlsMetrics,
    TrafficMetrics, EXPORT_ERROR_KINDS, SPAN_DROP_REASONS, TEXT_CONTENT_TYPE,
};
pub use otel_env::{BatchSettings, OtelSettings, OtlpProtocol, Warning};
pub use tracing_setup::{init_tracing, LogFormat, OtlpSettings, TracingGuard, TracingSetupError};
