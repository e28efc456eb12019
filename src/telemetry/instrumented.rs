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
//! The span is at DEBUG level with target [`CONNECTION_TARGET`]: when neither OTLP export nor
//! debug logging wants it, it is never created and costs nothing (no registry entry per idle
//! connection).

use std::sync::Arc;
use std::time::Instant;

use tracing::field::Empty;
use tracing::Span;

use super::metrics::TrafficMetrics;
use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::{LossReason, Protocol};
use crate::transport::Transport;

/// The tracing target of connection spans and their events (the OTLP layer exports exactly
/// this target).
pub const CONNECTION_TARGET: &str = "echo_service::connection";

/// Wraps a factory; every protocol it builds is an [`InstrumentedProtocol`].
pub struct InstrumentedFactory<F> {
    inner: F,
    metrics: Arc<TrafficMetrics>,
}

impl<F> InstrumentedFactory<F> {
    /// Instrument the protocols of `inner`, recording into `metrics`.
    pub fn new(inner: F, metrics: Arc<TrafficMetrics>) -> Self {
        InstrumentedFactory { inner, metrics }
    }
}

impl<F: Factory> Factory for InstrumentedFactory<F> {
    type Protocol = InstrumentedProtocol<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        let inner = self.inner.build_protocol(conn)?;
        let span = tracing::debug_span!(
            target: CONNECTION_TARGET,
            "connection",
            otel.name = "echo.connection",
            otel.kind = "server",
            otel.status_code = Empty,
            network.transport = "tcp",
            network.type = if conn.peer.is_ipv4() { "ipv4" } else { "ipv6" },
            network.peer.address = %conn.peer.ip(),
            network.peer.port = i64::from(conn.peer.port()),
            server.address = %conn.local.ip(),
            server.port = i64::from(conn.local.port()),
            connection.id = conn.id as i64,
            echo.received_bytes = Empty,
            echo.sent_bytes = Empty,
            echo.duration_seconds = Empty,
            echo.loss_reason = Empty,
        );
        Ok(InstrumentedProtocol {
            inner,
            span,
            metrics: self.metrics.clone(),
            opened_at: Instant::now(),
            received: 0,
            sent: 0,
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
    /// The connection's span; closes when this protocol is dropped.
    span: Span,
    metrics: Arc<TrafficMetrics>,
    opened_at: Instant,
    received: u64,
    sent: u64,
}

impl<P> InstrumentedProtocol<P> {
    /// The connection's span.
    pub fn span(&self) -> &Span {
        &self.span
    }
}

/// Counts what the wrapped protocol writes, then passes it on.
struct CountingTransport<'a> {
    inner: &'a mut dyn Transport,
    metrics: &'a TrafficMetrics,
    sent: &'a mut u64,
}

impl Transport for CountingTransport<'_> {
    fn write(&mut self, data: &[u8]) {
        *self.sent += data.len() as u64;
        self.metrics.sent_bytes.inc_by(data.len() as u64);
        self.inner.write(data);
    }

    fn lose_connection(&mut self) {
        self.inner.lose_connection();
    }

    fn abort_connection(&mut self) {
        self.inner.abort_connection();
    }

    fn peer_addr(&self) -> std::net::SocketAddr {
        self.inner.peer_addr()
    }

    fn local_addr(&self) -> std::net::SocketAddr {
        self.inner.local_addr()
    }
}

impl<P: Protocol> Protocol for InstrumentedProtocol<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        tracing::debug!(target: CONNECTION_TARGET, parent: &self.span, "connection made");
        let _entered = self.span.enter();
        self.inner.connection_made(&mut CountingTransport {
            inner: transport,
            metrics: &self.metrics,
            sent: &mut self.sent,
        });
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.received += data.len() as u64;
        self.metrics.received_bytes.inc_by(data.len() as u64);
        self.inner.data_received(
            data,
            &mut CountingTransport {
                inner: transport,
                metrics: &self.metrics,
                sent: &mut self.sent,
            },
        );
    }

    fn connection_lost(&mut self, reason: LossReason) {
        let duration = self.opened_at.elapsed().as_secs_f64();
        self.metrics.duration.observe(duration);
        let span = &self.span;
        span.record("echo.received_bytes", self.received as i64);
        span.record("echo.sent_bytes", self.sent as i64);
        span.record("echo.duration_seconds", duration);
        span.record("echo.loss_reason", reason.label());
        if !reason.is_clean() {
            span.record("otel.status_code", "ERROR");
        }
        tracing::debug!(
            target: CONNECTION_TARGET,
            parent: span,
            reason = reason.label(),
            received_bytes = self.received as i64,
            sent_bytes = self.sent as i64,
            "connection lost"
        );
        let _entered = span.enter();
        self.inner.connection_lost(reason);
    }
}
