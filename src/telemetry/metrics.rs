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

use crate::faults::{FaultCounters, FaultKind};
use crate::proxy_protocol::{ProxyResult, Version};
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
#[derive(Debug, Clone)]
pub struct TrafficMetrics {
    /// `echo_received_bytes_total`: bytes read from peers (added once per read).
    pub received_bytes: IntCounter,
    /// `echo_sent_bytes_total`: bytes the kernel took for peers (added once per write).
    pub sent_bytes: IntCounter,
    /// `echo_connection_duration_seconds`: connection lifetimes, observed when lost.
    pub duration: Histogram,
}

/// The admin port's own connection metrics.
#[derive(Debug)]
pub struct AdminMetrics {
    /// `echo_admin_connections_active`: admin connections open now.
    pub active: IntGauge,
    /// `echo_admin_connections_rejected_total{reason="limit"}`: closed at once at the cap.
    pub refused: IntCounter,
    /// `echo_admin_connections_rejected_total{reason="evicted"}`: closed to make room for a
    /// peer holding fewer admin connections.
    pub evicted: IntCounter,
    /// `echo_admin_accept_errors_total`: failed `accept()` calls on the admin port.
    pub accept_errors: IntCounter,
}

impl AdminMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let active = IntGauge::new(
            "echo_admin_connections_active",
            "Admin (metrics and health) connections open now.",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "echo_admin_connections_rejected_total",
                "Admin connections closed by --admin-max-connections: refused at once (limit) or closed to make room for another peer (evicted).",
            ),
            &["reason"],
        )?;
        let accept_errors = IntCounter::new(
            "echo_admin_accept_errors_total",
            "accept() calls on the admin port that failed (EMFILE, ENFILE, ...).",
        )?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(accept_errors.clone()))?;
        Ok(AdminMetrics {
            active,
            refused: rejected.with_label_values(&["limit"]),
            evicted: rejected.with_label_values(&["evicted"]),
            accept_errors,
        })
    }
}

/// The datagram counters of every UDP listener, labelled by `listener`.
#[derive(Debug)]
pub struct DatagramFamilies {
    received: IntCounterVec,
    sent: IntCounterVec,
    dropped: IntCounterVec,
    receive_errors: IntCounterVec,
}

/// One UDP listener's datagram counters.
#[derive(Debug, Clone)]
pub struct DatagramMetrics {
    /// `echo_datagrams_received_total{listener}`.
    pub received: IntCounter,
    /// `echo_datagrams_sent_total{listener}`.
    pub sent: IntCounter,
    /// `echo_datagrams_dropped_total{listener, reason="would_block"}`: the socket's send
    /// buffer was full.
    pub dropped_would_block: IntCounter,
    /// `echo_datagrams_dropped_total{listener, reason="no_buffers"}`: ENOBUFS or ENOMEM.
    pub dropped_no_buffers: IntCounter,
    /// `echo_datagrams_dropped_total{listener, reason="error"}`: any other send error.
    pub dropped_error: IntCounter,
    /// `echo_datagram_receive_errors_total{listener}`: failed receives.
    pub receive_errors: IntCounter,
}

impl DatagramFamilies {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let family =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(vec.clone()))?;
                Ok(vec)
            };
        Ok(DatagramFamilies {
            received: family(
                "echo_datagrams_received_total",
                "UDP datagrams received, by listener.",
                &["listener"],
            )?,
            sent: family(
                "echo_datagrams_sent_total",
                "UDP datagrams sent, by listener.",
                &["listener"],
            )?,
            dropped: family(
                "echo_datagrams_dropped_total",
                "UDP replies dropped because the socket could not take them (UDP has no backpressure), by listener and reason.",
                &["listener", "reason"],
            )?,
            receive_errors: family(
                "echo_datagram_receive_errors_total",
                "Failed UDP receives, by listener.",
                &["listener"],
            )?,
        })
    }

    /// The counters of the listener named `listener` (`udp`, or `udp:PORT` when there are
    /// several), created at zero so dashboards see them before the first datagram.
    pub fn listener(&self, listener: &str) -> DatagramMetrics {
        DatagramMetrics {
            received: self.received.with_label_values(&[listener]),
            sent: self.sent.with_label_values(&[listener]),
            dropped_would_block: self.dropped.with_label_values(&[listener, "would_block"]),
            dropped_no_buffers: self.dropped.with_label_values(&[listener, "no_buffers"]),
            dropped_error: self.dropped.with_label_values(&[listener, "error"]),
            receive_errors: self.receive_errors.with_label_values(&[listener]),
        }
    }
}

/// The `result` label values of `echo_tls_handshakes_total`.
pub const TLS_HANDSHAKE_RESULTS: [&str; 6] = [
    "ok",
    "timeout",
    "bad_certificate",
    "unknown_ca",
    "protocol",
    "other",
];

/// The TLS metric families of every TLS listener, labelled by `listener`.
#[derive(Debug)]
pub struct TlsFamilies {
    handshakes: IntCounterVec,
    reloads: IntCounterVec,
    expiry: IntGaugeVec,
}

/// One TLS listener's metrics.
#[derive(Debug, Clone)]
pub struct TlsMetrics {
    /// `echo_tls_handshakes_total{listener, result}`, one child per [`TLS_HANDSHAKE_RESULTS`].
    handshakes: Vec<IntCounter>,
    /// `echo_tls_reloads_total{listener, result="ok"}`.
    pub reloads_ok: IntCounter,
    /// `echo_tls_reloads_total{listener, result="error"}`: changed files that could not be used.
    pub reloads_error: IntCounter,
    /// `echo_tls_certificate_expiry_timestamp_seconds{listener}`: the served leaf's notAfter.
    pub expiry: IntGauge,
}

impl TlsMetrics {
    /// The handshake counter for `result` (one of [`TLS_HANDSHAKE_RESULTS`]; anything else
    /// counts as `other`).
    pub fn handshake(&self, result: &str) -> &IntCounter {
        let index = TLS_HANDSHAKE_RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(TLS_HANDSHAKE_RESULTS.len() - 1);
        &self.handshakes[index]
    }
}

impl TlsFamilies {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let handshakes = IntCounterVec::new(
            Opts::new(
                "echo_tls_handshakes_total",
                "TLS handshakes by listener and result (ok, timeout, bad_certificate, unknown_ca, protocol, other).",
            ),
            &["listener", "result"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "echo_tls_reloads_total",
                "Certificate reloads after the files changed, by listener and result (ok, error: the old certificate is kept).",
            ),
            &["listener", "result"],
        )?;
        let expiry = IntGaugeVec::new(
            Opts::new(
                "echo_tls_certificate_expiry_timestamp_seconds",
                "When the served certificate expires (its notAfter, Unix seconds), by listener.",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(expiry.clone()))?;
        Ok(TlsFamilies {
            handshakes,
            reloads,
            expiry,
        })
    }

    /// The metrics of the TLS listener named `listener`, created at zero.
    pub fn listener(&self, listener: &str) -> TlsMetrics {
        TlsMetrics {
            handshakes: TLS_HANDSHAKE_RESULTS
                .iter()
                .map(|result| self.handshakes.with_label_values(&[listener, result]))
                .collect(),
            reloads_ok: self.reloads.with_label_values(&[listener, "ok"]),
            reloads_error: self.reloads.with_label_values(&[listener, "error"]),
            expiry: self.expiry.with_label_values(&[listener]),
        }
    }
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

/// Register `echo_faults_enabled{fault}` and `echo_faults_injected_total{fault}`, one child
/// per [`FaultKind::LABELS`] entry, created up front; the fault layer updates them.
fn register_faults(registry: &Registry) -> prometheus::Result<FaultCounters> {
    let enabled = IntGaugeVec::new(
        Opts::new(
            "echo_faults_enabled",
            "1 while a fault of this kind is configured (--fault or PUT /faults) with a probability above 0.",
        ),
        &["fault"],
    )?;
    let injected = IntCounterVec::new(
        Opts::new(
            "echo_faults_injected_total",
            "Connections a fault of this kind was injected into.",
        ),
        &["fault"],
    )?;
    registry.register(Box::new(enabled.clone()))?;
    registry.register(Box::new(injected.clone()))?;
    Ok(FaultCounters {
        enabled: FaultKind::LABELS.map(|fault| enabled.with_label_values(&[fault])),
        injected: FaultKind::LABELS.map(|fault| injected.with_label_values(&[fault])),
    })
}

/// The registry with everything in it, plus the handles the hot path needs.
pub struct Metrics {
    registry: Registry,
    /// Handed to the instrumented factory.
    pub traffic: Arc<TrafficMetrics>,
    /// The admin server's own counters.
    pub admin: AdminMetrics,
    /// The UDP listeners' counters.
    pub datagrams: DatagramFamilies,
    /// The TLS listeners' metrics.
    pub tls: TlsFamilies,
    /// Handed to the PROXY header layer.
    pub proxy: Arc<ProxyMetrics>,
    /// Handed to the span processor (all zero while export is off).
    pub otlp: Arc<OtlpMetrics>,
    /// Handed to the fault layer.
    pub faults: Arc<FaultCounters>,
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
        registry.register(Box::new(super::log_writer::lines_dropped().clone()))?;
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

        let admin = AdminMetrics::register(&registry)?;
        let datagrams = DatagramFamilies::register(&registry)?;
        let tls = TlsFamilies::register(&registry)?;
        let proxy = ProxyMetrics::register(&registry)?;
        let faults = register_faults(&registry)?;
        Ok(Metrics {
            faults: Arc::new(faults),
            registry,
            traffic: Arc::new(traffic),
            admin,
            datagrams,
            tls,
            proxy: Arc::new(proxy),
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
            "echo_connections_lost_total{listener=\"tcp\",reason=\"reset\"} 1",
            "echo_connections_lost_total{listener=\"tcp\",reason=\"peer_closed\"} 0",
            "echo_connections_active{listener=\"tcp\"} 0",
            "echo_connections_rejected_total{listener=\"tcp\",reason=\"limit\"} 0",
            "echo_received_bytes_total",
            "echo_sent_bytes_total",
            "echo_connection_duration_seconds_bucket{le=\"172800\"}",
            "echo_accept_errors_total",
            "echo_build_info{version=\"",
            "echo_log_lines_dropped_total",
            "echo_admin_connections_rejected_total{reason=\"evicted\"} 0",
            "echo_admin_connections_rejected_total{reason=\"limit\"} 0",
            "echo_admin_connections_active",
            "echo_admin_accept_errors_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "echo_proxy_headers_total{result=\"timeout\",version=\"none\"} 0",
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
