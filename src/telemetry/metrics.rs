//! Every Prometheus metric of the service, registered in one place.
//!
//! Names and label values are a public interface (dashboards and alerts use them): base units
//! in the names, labels only from fixed lists, never a peer address. The connection counters
//! belong to [`ServiceState`] (the shared state also read by `/healthz`); this module adds the
//! traffic metrics, build info and the standard `process_*` metrics, and encodes the
//! exposition.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::state::ServiceState;

/// The content type of the Prometheus text exposition format 0.0.4, which Prometheus 2.x and
/// 3.x both scrape.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connection duration buckets, 1 ms to 1 h.
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0,
];

/// Per-connection traffic metrics, updated by the instrumented protocol.
#[derive(Debug, Clone)]
pub struct TrafficMetrics {
    /// `echo_received_bytes_total`: bytes read from peers (added once per read).
    pub received_bytes: IntCounter,
    /// `echo_sent_bytes_total`: bytes the kernel took for peers (added once per write).
    pub sent_bytes: IntCounter,
    /// `echo_connection_duration_seconds`: connection lifetimes, observed when lost.
    pub duration: Histogram,
}

/// OTLP export buckets, 1 ms to 30 s (an export is bounded by the export timeout).
const EXPORT_DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// Why a finished span never reached the collector (the `reason` label).
pub const SPAN_DROP_REASONS: [&str; 3] = ["queue_full", "export_failed", "shutdown"];

/// Kinds of failed export (the `kind` label): `timeout` (no answer within the export
/// timeout), `network` (connect, TLS or transport failure, gRPC `UNAVAILABLE`), `http_status`
/// (the collector answered with a non-2xx status), `grpc_status` (any other gRPC status),
/// `other`.
pub const EXPORT_ERROR_KINDS: [&str; 5] =
    ["timeout", "network", "http_status", "grpc_status", "other"];

/// The health of the span export pipeline, updated by the span processor. Registered whether
/// or not export is on: with export off every value stays zero.
#[derive(Debug)]
pub struct OtlpMetrics {
    /// `echo_otlp_spans_exported_total`: spans the collector accepted.
    pub spans_exported: IntCounter,
    /// `echo_otlp_spans_dropped_total{reason}`: spans lost, by reason.
    pub spans_dropped: IntCounterVec,
    /// `echo_otlp_export_errors_total{kind}`: failed export requests, by kind.
    pub export_errors: IntCounterVec,
    /// `echo_otlp_export_duration_seconds`: how long each export request took.
    pub export_duration: Histogram,
    /// `echo_otlp_queue_spans`: finished spans waiting for export.
    pub queue_spans: IntGauge,
}

impl OtlpMetrics {
    /// The metrics, not yet in a registry.
    pub fn new() -> prometheus::Result<OtlpMetrics> {
        let metrics = OtlpMetrics {
            spans_exported: IntCounter::new(
                "echo_otlp_spans_exported_total",
                "Connection spans the OTLP collector accepted.",
            )?,
            spans_dropped: IntCounterVec::new(
                Opts::new(
                    "echo_otlp_spans_dropped_total",
                    "Connection spans that never reached the collector: queue_full (the export queue was full), export_failed (the export request failed), shutdown (still queued when the final flush ran out of time).",
                ),
                &["reason"],
            )?,
            export_errors: IntCounterVec::new(
                Opts::new(
                    "echo_otlp_export_errors_total",
                    "Failed OTLP export requests, by kind: timeout, network, http_status, grpc_status, other.",
                ),
                &["kind"],
            )?,
            export_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "echo_otlp_export_duration_seconds",
                    "Duration of each OTLP export request, retries included.",
                )
                .buckets(EXPORT_DURATION_BUCKETS.to_vec()),
            )?,
            queue_spans: IntGauge::new(
                "echo_otlp_queue_spans",
                "Finished connection spans waiting in the export queue.",
            )?,
        };
        // Every label value exists from the start, so rate() and alerts see zeros, not gaps.
        for reason in SPAN_DROP_REASONS {
            metrics.spans_dropped.with_label_values(&[reason]);
        }
        for kind in EXPORT_ERROR_KINDS {
            metrics.export_errors.with_label_values(&[kind]);
        }
        Ok(metrics)
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.spans_exported.clone()))?;
        registry.register(Box::new(self.spans_dropped.clone()))?;
        registry.register(Box::new(self.export_errors.clone()))?;
        registry.register(Box::new(self.export_duration.clone()))?;
        registry.register(Box::new(self.queue_spans.clone()))
    }
}

/// The registry with everything in it, plus the handles the hot path needs.
pub struct Metrics {
    registry: Registry,
    /// Handed to the instrumented factory.
    pub traffic: Arc<TrafficMetrics>,
    /// Handed to the span processor (all zero while export is off).
    pub otlp: Arc<OtlpMetrics>,
}

impl Metrics {
    /// Register the shared state's counters, the traffic metrics, the OTLP pipeline's
    /// metrics, `echo_build_info` and the process metrics.
    pub fn register(state: &ServiceState) -> prometheus::Result<Self> {
        let registry = Registry::new();
        state.stats.register(&registry)?;
        let otlp = OtlpMetrics::new()?;
        otlp.register(&registry)?;

        let traffic = TrafficMetrics {
            received_bytes: IntCounter::new(
                "echo_received_bytes_total",
                "Bytes received from peers.",
            )?,
            sent_bytes: IntCounter::new(
                "echo_sent_bytes_total",
                "Bytes written to peers (taken by the kernel; not bytes dropped at a close).",
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "echo_connection_duration_seconds",
                    "How long connections lasted, from accept to loss.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
            )?,
        };
        registry.register(Box::new(traffic.received_bytes.clone()))?;
        registry.register(Box::new(traffic.sent_bytes.clone()))?;
        registry.register(Box::new(traffic.duration.clone()))?;

        let build_info = IntGaugeVec::new(
            Opts::new(
                "echo_build_info",
                "Always 1; the version label says which build is running.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Metrics {
            registry,
            traffic: Arc::new(traffic),
            otlp: Arc::new(otlp),
        })
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec only fails on metric families that the registry already rejected.
        if let Err(err) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %err, "could not encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::LossReason;

    #[test]
    fn exposition_has_every_public_metric() {
        let state = ServiceState::new(None);
        let metrics = Metrics::register(&state).unwrap();
        state.stats.lost(LossReason::Reset).inc();
        let text = String::from_utf8(metrics.encode()).unwrap();
        for name in [
            "echo_connections_made_total",
            "echo_connections_lost_total{reason=\"reset\"} 1",
            "echo_connections_lost_total{reason=\"peer_closed\"} 0",
            "echo_connections_active",
            "echo_connections_rejected_total{reason=\"limit\"} 0",
            "echo_received_bytes_total",
            "echo_sent_bytes_total",
            "echo_connection_duration_seconds_bucket{le=\"3600\"}",
            "echo_accept_errors_total",
            "echo_build_info{version=\"",
            "process_resident_memory_bytes",
            "process_open_fds",
            "echo_otlp_spans_exported_total 0",
            "echo_otlp_spans_dropped_total{reason=\"queue_full\"} 0",
            "echo_otlp_spans_dropped_total{reason=\"export_failed\"} 0",
            "echo_otlp_spans_dropped_total{reason=\"shutdown\"} 0",
            "echo_otlp_export_errors_total{kind=\"timeout\"} 0",
            "echo_otlp_export_duration_seconds_count 0",
            "echo_otlp_queue_spans 0",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
    }
}
