//! Telemetry: Prometheus metrics, tracing (logs and one span per connection, exported over
//! OTLP), and the instrumented factory that records both around any protocol.
//!
//! Data flows one way: the server and the protocols update counters and spans; the admin
//! server reads them. Nothing here feeds back into how connections are served.

mod batch;
mod connection_span;
mod exporter;
mod instrumented;
mod log_limit;
mod metrics;
mod otel_env;
mod tracing_setup;

pub use batch::{error_kind, MeteredBatchProcessor};
pub use connection_span::{ConnectionIds, ConnectionRecord, ConnectionSpans};
pub use instrumented::{
    InstrumentedFactory, InstrumentedProtocol, CONNECTION_TARGET, LIFECYCLE_LOG_TARGET,
};
pub use log_limit::{LogLimiter, LOG_INTERVAL};
pub use metrics::{
    Metrics, OtlpMetrics, TrafficMetrics, EXPORT_ERROR_KINDS, SPAN_DROP_REASONS, TEXT_CONTENT_TYPE,
};
pub use otel_env::{BatchSettings, OtelSettings, OtlpProtocol, Warning};
pub use tracing_setup::{init_tracing, LogFormat, OtlpSettings, TracingGuard, TracingSetupError};
