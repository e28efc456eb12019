//! Every Prometheus metric of the service, registered in one place.
//!
//! Names and label values are a public interface (dashboards and alerts use them): base units
//! in the names, labels only from fixed lists, never a peer address. The connection counters
//! belong to [`ServiceState`] (the shared state also read by `/healthz`); this module adds the
//! traffic metrics, build info and the standard `process_*` metrics, and encodes the
//! exposition.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::state::ServiceState;

/// The content type of the Prometheus text exposition format 0.0.4, which Prometheus 2.x and
/// 3.x both scrape.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connection duration buckets, 1 ms to 48 h: the top finite bucket stays above the longest
/// max connection age the Helm chart allows (24 h including jitter), so connections closed at
/// their max age land in a real bucket, not only in `+Inf`.
const DURATION_BUCKETS: [f64; 20] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0, 7200.0, 21600.0, 86400.0, 172800.0,
];

/// Per-connection traffic metrics, updated by the instrumented protocol.
#[derive(Debug)]
pub struct TrafficMetrics {
    /// `echo_received_bytes_total`: bytes read from peers (added once per read).
    pub received_bytes: IntCounter,
    /// `echo_sent_bytes_total`: bytes the kernel took for peers (added once per write).
    pub sent_bytes: IntCounter,
    /// `echo_connection_duration_seconds`: connection lifetimes, observed when lost.
    pub duration: Histogram,
}

/// The registry with everything in it, plus the handles the hot path needs.
pub struct Metrics {
    registry: Registry,
    /// Handed to the instrumented factory.
    pub traffic: Arc<TrafficMetrics>,
}

impl Metrics {
    /// Register the shared state's counters, the traffic metrics, `echo_build_info` and the
    /// process metrics.
    pub fn register(state: &ServiceState) -> prometheus::Result<Self> {
        let registry = Registry::new();
        state.stats.register(&registry)?;

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
        // echo_connections_limit: the configured --max-connections, exported only when set, so
        // dashboards can show saturation as active / limit.
        if let Some(limit) = state.max_connections() {
            let gauge = IntGauge::new(
                "echo_connections_limit",
                "The configured total connection limit (--max-connections); absent when unlimited.",
            )?;
            gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
            registry.register(Box::new(gauge))?;
        }
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Metrics {
            registry,
            traffic: Arc::new(traffic),
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
            "echo_connection_duration_seconds_bucket{le=\"172800\"}",
            "echo_accept_errors_total",
            "echo_build_info{version=\"",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
        assert!(
            !text.contains("echo_connections_limit"),
            "no limit, no gauge"
        );
    }

    #[test]
    fn connections_limit_is_exported_when_set() {
        let state = ServiceState::new(Some(250));
        let text = String::from_utf8(Metrics::register(&state).unwrap().encode()).unwrap();
        assert!(text.contains("\necho_connections_limit 250\n"), "{text}");
    }
}
