//! Telemetry: Prometheus metrics, tracing (logs and one span per connection, exported over
//! OTLP), and the instrumented factory that records both around any protocol.
//!
//! Data flows one way: the server and the protocols update counters and spans; the admin
//! server reads them. Nothing here feeds back into how connections are served.

mod instrumented;
mod log_writer;
mod metrics;
mod tracing_setup;

pub use instrumented::{
    InstrumentedFactory, InstrumentedProtocol, CONNECTION_TARGET, LIFECYCLE_LOG_TARGET,
};
pub use log_writer::StdoutLog;
pub use metrics::{
    DatagramFamilies, DatagramMetrics, Metrics, ProxyMetrics, TlsFamilies, TlsMetrics,
    TrafficMetrics, TEXT_CONTENT_TYPE,
};
pub use tracing_setup::{init_tracing, LogFormat, OtlpSettings, TracingGuard, TracingSetupError};
