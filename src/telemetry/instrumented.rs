//! The instrumented factory: records spans and traffic metrics around any protocol, the way
//! Twisted's wrapping factories add behaviour without touching the protocol they wrap.
//!
//! Per connection: one span (opened when the protocol is built at accept, closed when the
//! protocol is dropped after `connection_lost`), a "connection made" and a "connection lost"
//! event, and the duration histogram. Per read and per write: one relaxed atomic add each; no
//! event per chunk, no span enter on the hot path. Attributes known only at the end (bytes,
//! duration, loss reason) are recorded at the end. Integers are recorded as `i64`: the OTLP
//! bridge exports `u64`/`u16` fields as strings.
//!
//! Memory per open connection matters (idle connections are the product for mesh and load
//! balancer tests), so the live connection carries no span state for export at all:
//!
//! - The `tracing` span is at DEBUG level with target [`CONNECTION_TARGET`], for the debug log
//!   lines only: at the default `info` level it is never created and costs nothing.
//! - The OTLP span is built in one go at close ([`ConnectionSpans`]) from what the protocol
//!   kept anyway (accept time, addresses, byte counts), when export is on.
//! - The debug log lines ("connection made" at accept, target [`LIFECYCLE_LOG_TARGET`];
//!   "connection lost" at close) carry the connection id, the peer and, when exporting, the
//!   trace id the span has (derived from the connection id, so it is known at accept).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::Span;

use super::connection_span::{ConnectionExtras, ConnectionSpans, SpanRecord};
use super::metrics::TrafficMetrics;
use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::{LossReason, Protocol};
use crate::transport::Transport;

/// The tracing target of the connection's debug span and its "connection lost" event.
pub const CONNECTION_TARGET: &str = "echo_service::connection";

/// The tracing target of the per-connection "connection made" debug log line.
pub const LIFECYCLE_LOG_TARGET: &str = "echo_service::lifecycle";

/// What every instrumented protocol shares: the traffic metrics and, when exporting, the
/// span builder.
struct Instruments {
    traffic: TrafficMetrics,
    spans: Option<ConnectionSpans>,
    /// The moment connection open times are counted from (see [`InstrumentedProtocol`]'s
    /// `opened_at`).
    epoch: Instant,
}

impl Instruments {
    /// Nanoseconds since the epoch: 8 bytes per connection instead of an `Instant`'s 16.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Wraps a factory; every protocol it builds is an [`InstrumentedProtocol`].
pub struct InstrumentedFactory<F> {
    inner: F,
    shared: Arc<Instruments>,
}

impl<F> InstrumentedFactory<F> {
    /// Instrument the protocols of `inner`, recording into `metrics`; no span export.
    pub fn new(inner: F, metrics: Arc<TrafficMetrics>) -> Self {
        InstrumentedFactory {
            inner,
            shared: Arc::new(Instruments {
                traffic: (*metrics).clone(),
                spans: None,
                epoch: Instant::now(),
            }),
        }
    }

    /// Also export one span per connection through `spans` (when `Some`).
    pub fn with_spans(self, spans: Option<ConnectionSpans>) -> Self {
        InstrumentedFactory {
            inner: self.inner,
            shared: Arc::new(Instruments {
                traffic: self.shared.traffic.clone(),
                spans,
                epoch: self.shared.epoch,
            }),
        }
    }
}

impl<F: Factory> Factory for InstrumentedFactory<F> {
    type Protocol = InstrumentedProtocol<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        let inner = self.inner.build_protocol(conn)?;
        let span = tracing::debug_span!(target: CONNECTION_TARGET, "echo.connection");
        Ok(InstrumentedProtocol {
            inner,
            span,
            shared: self.shared.clone(),
            opened_at: self.shared.now(),
            received: 0,
            sent: 0,
            id: conn.id,
            peer_ip: conn.peer.ip(),
            peer_port: conn.peer.port(),
            local_ip: conn.local.ip(),
            local_port: conn.local.port(),
            extras: None,
            recorded: false,
        })
    }

    fn start_factory(&self) {
        self.inner.start_factory();
    }

    fn stop_factory(&self) {
        self.inner.stop_factory();
    }
}

/// A protocol plus its span and byte counts.
pub struct InstrumentedProtocol<P> {
    inner: P,
    /// The connection's debug span (disabled unless debug logging wants it); closes when this
    /// protocol is dropped.
    span: Span,
    shared: Arc<Instruments>,
    /// When the connection was accepted, in nanoseconds since the factory's epoch (the task of
    /// every idle connection holds this struct: 8 bytes, not an `Instant`'s 16).
    opened_at: u64,
    received: u64,
    sent: u64,
    id: u64,
    peer_ip: IpAddr,
    peer_port: u16,
    local_ip: IpAddr,
    local_port: u16,
    /// The original client a PROXY header layer outside reported (the transport's
    /// `peer_addr()` at `connection_made`, when it differs from the peer) and what TLS
    /// negotiated; boxed and only for connections that have either.
    extras: Option<Box<ConnectionExtras>>,
    /// Set by `connection_lost`; if the protocol is dropped without it (a panic), `Drop`
    /// records the loss so the histogram and the span agree with `lost{reason="panic"}`.
    recorded: bool,
}

impl<P: Protocol> Protocol for InstrumentedProtocol<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        let client = transport.peer_addr();
        let proxied = client != SocketAddr::new(self.peer_ip, self.peer_port);
        let (tls, fault) = (transport.tls(), transport.fault());
        if proxied || tls.is_some() || fault.is_some() {
            self.extras = Some(Box::new(ConnectionExtras {
                client: proxied.then_some(client),
                tls: tls.cloned(),
                fault,
            }));
        }
        if tracing::enabled!(target: LIFECYCLE_LOG_TARGET, tracing::Level::DEBUG) {
            tracing::debug!(
                target: LIFECYCLE_LOG_TARGET,
                parent: &self.span,
                connection_id = self.id,
                peer_address = %self.peer_ip,
                peer_port = self.peer_port,
                client_address = %client.ip(),
                client_port = client.port(),
                trace_id = self.trace_id().as_deref(),
                "connection made"
            );
        }
        let _entered = self.span.enter();
        self.inner.connection_made(transport);
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.received += data.len() as u64;
        self.shared.traffic.received_bytes.inc_by(data.len() as u64);
        self.inner.data_received(data, transport);
    }

    fn bytes_sent(&mut self, n: usize) {
        self.sent += n as u64;
        self.shared.traffic.sent_bytes.inc_by(n as u64);
        self.inner.bytes_sent(n);
    }

    fn connection_lost(&mut self, reason: LossReason) {
        self.record_loss(reason);
        let _entered = self.span.enter();
        self.inner.connection_lost(reason);
    }

    fn deadline(&self) -> Option<(tokio::time::Instant, LossReason)> {
        self.inner.deadline()
    }

    fn timer(&self) -> Option<tokio::time::Instant> {
        self.inner.timer()
    }

    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        self.inner.timer_fired(transport);
    }

    fn write_pending(&self) -> bool {
        self.inner.write_pending()
    }
}

impl<P> Drop for InstrumentedProtocol<P> {
    fn drop(&mut self) {
        if !self.recorded {
            self.record_loss(LossReason::Panic);
        }
    }
}

impl<P> InstrumentedProtocol<P> {
    /// The trace id of this connection's exported span, as hex, when exporting.
    fn trace_id(&self) -> Option<String> {
        self.shared
            .spans
            .as_ref()
            .map(|spans| spans.trace_id(self.id).to_string())
    }

    /// Observe the duration, export the span, log the loss; once.
    fn record_loss(&mut self, reason: LossReason) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let elapsed =
            std::time::Duration::from_nanos(self.shared.now().saturating_sub(self.opened_at));
        let duration = elapsed.as_secs_f64();
        self.shared.traffic.duration.observe(duration);
        let extras_for_log = self.extras.as_ref().is_some_and(|e| e.client.is_some());
        if let Some(spans) = &self.shared.spans {
            let lost_at = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
                });
            spans.record(SpanRecord {
                id: self.id,
                peer: SocketAddr::new(self.peer_ip, self.peer_port),
                local: SocketAddr::new(self.local_ip, self.local_port),
                received: self.received,
                sent: self.sent,
                made_at_unix_nanos: lost_at
                    .saturating_sub(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)),
                lost_at_unix_nanos: lost_at,
                duration_seconds: duration,
                reason,
                // Recorded once: the span takes the extras instead of copying them.
                extras: self.extras.take(),
            });
        }
        if tracing::enabled!(target: CONNECTION_TARGET, tracing::Level::DEBUG) {
            tracing::debug!(
                target: CONNECTION_TARGET,
                parent: &self.span,
                trace_id = self.trace_id().as_deref(),
                reason = reason.label(),
                connection_id = self.id,
                peer_address = %self.peer_ip,
                peer_port = self.peer_port,
                proxied = extras_for_log,
                received_bytes = self.received as i64,
                sent_bytes = self.sent as i64,
                "connection lost"
            );
        }
    }
}
