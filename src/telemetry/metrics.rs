//! Every Prometheus metric of the service, registered in one place.
//!
//! Names and label values are a public interface (dashboards and alerts use them): base units
//! in the names, labels only from fixed lists, never a peer address. The connection counters
//! belong to [`ServiceState`] (the shared state also read by `/healthz`); this module adds the
//! traffic metrics, build info and the standard `process_*` metrics, and encodes the
//! exposition.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::proxy_protocol::{ProxyResult, Version};
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
#[derive(Debug)]
pub struct TrafficMetrics {
    /// `echo_received_bytes_total`: bytes read from peers (added once per read).
    pub received_bytes: IntCounter,
    /// `echo_sent_bytes_total`: bytes the kernel took for peers (added once per write).
    pub sent_bytes: IntCounter,
    /// `echo_connection_duration_seconds`: connection lifetimes, observed when lost.
    pub duration: Histogram,
}

/// `echo_proxy_headers_total{version, result}`: one counter per outcome of the PROXY header
/// layer, every label pair created up front so dashboards see zeros rather than gaps.
#[derive(Debug)]
pub struct ProxyMetrics {
    /// Indexed by version (`none`, `v1`, `v2`) then [`ProxyResult::index`].
    counters: [[IntCounter; 5]; 3],
}

impl ProxyMetrics {
    /// The `version` label values, in index order.
    pub const VERSIONS: [&'static str; 3] = ["none", "v1", "v2"];

    /// Register `echo_proxy_headers_total` in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let vec = IntCounterVec::new(
            Opts::new(
                "echo_proxy_headers_total",
                "PROXY protocol headers by version (none: no header) and result.",
            ),
            &["version", "result"],
        )?;
        registry.register(Box::new(vec.clone()))?;
        let counters = Self::VERSIONS.map(|version| {
            ProxyResult::LABELS.map(|result| vec.with_label_values(&[version, result]))
        });
        Ok(ProxyMetrics { counters })
    }

    /// Count one header outcome (`version` `None` when no header was seen).
    pub fn count(&self, version: Option<Version>, result: ProxyResult) {
        let v = match version {
            None => 0,
            Some(Version::V1) => 1,
            Some(Version::V2) => 2,
        };
        self.counters[v][result.index()].inc();
    }

    /// The current count of one outcome (for tests).
    pub fn get(&self, version: Option<Version>, result: ProxyResult) -> u64 {
        let v = version.map_or(0, |v| v as usize + 1);
        self.counters[v][result.index()].get()
    }
}

/// The registry with everything in it, plus the handles the hot path needs.
pub struct Metrics {
    registry: Registry,
    /// Handed to the instrumented factory.
    pub traffic: Arc<TrafficMetrics>,
    /// Handed to the PROXY header layer.
    pub proxy: Arc<ProxyMetrics>,
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
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let proxy = ProxyMetrics::register(&registry)?;

        Ok(Metrics {
            registry,
            traffic: Arc::new(traffic),
            proxy: Arc::new(proxy),
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
            "echo_connections_lost_total{listener=\"tcp\",reason=\"reset\"} 1",
            "echo_connections_lost_total{listener=\"tcp\",reason=\"peer_closed\"} 0",
            "echo_connections_active{listener=\"tcp\"} 0",
            "echo_connections_rejected_total{listener=\"tcp\",reason=\"limit\"} 0",
            "echo_received_bytes_total",
            "echo_sent_bytes_total",
            "echo_connection_duration_seconds_bucket{le=\"3600\"}",
            "echo_accept_errors_total",
            "echo_build_info{version=\"",
            "process_resident_memory_bytes",
            "process_open_fds",
            "echo_proxy_headers_total{result=\"timeout\",version=\"none\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
    }
}
