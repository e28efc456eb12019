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
//! balancer tests), so the live span is kept lean:
//!
//! - It is at DEBUG level with target [`CONNECTION_TARGET`]: when neither OTLP export nor debug
//!   logging wants it, it is never created and costs nothing.
//! - Every attribute, including the peer and local addresses known at accept, is set at close
//!   (through `OpenTelemetrySpanExt`); while the connection lives the OTLP layer holds a bare
//!   span builder, not a vector of attributes (it reserves room for every declared field, so
//!   only `otel.kind` is declared). The protocol keeps the few addresses it needs to do that.
//! - The "connection made" span event is added at close with the accept timestamp, for the same
//!   reason; the debug log line for it is written at accept (target
//!   [`LIFECYCLE_LOG_TARGET`], which the OTLP layer does not export) and carries the trace id
//!   when exporting. Both log lines carry the connection id and peer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use opentelemetry::trace::Status;
use opentelemetry::Value;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::TrafficMetrics;
use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::{LossReason, Protocol};
use crate::transport::{TlsInfo, Transport};

/// The tracing target of connection spans and their events (the OTLP layer exports exactly
/// this target).
pub const CONNECTION_TARGET: &str = "echo_service::connection";

/// The tracing target of the per-connection debug log lines that are not span events.
pub const LIFECYCLE_LOG_TARGET: &str = "echo_service::lifecycle";

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
        // Only `otel.kind` is declared: the OTLP layer reserves attribute room for every
        // declared field, so everything else is set on the span at close.
        let span = tracing::debug_span!(target: CONNECTION_TARGET, "echo.connection", otel.kind = "server");
        Ok(InstrumentedProtocol {
            inner,
            span,
            metrics: self.metrics.clone(),
            opened_at: Instant::now(),
            received: 0,
            sent: 0,
            id: conn.id,
            peer_ip: conn.peer.ip(),
            peer_port: conn.peer.port(),
            local_ip: conn.local.ip(),
            local_port: conn.local.port(),
            proxied: false,
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
    /// The connection's span; closes when this protocol is dropped.
    span: Span,
    metrics: Arc<TrafficMetrics>,
    opened_at: Instant,
    received: u64,
    sent: u64,
    id: u64,
    peer_ip: IpAddr,
    peer_port: u16,
    local_ip: IpAddr,
    local_port: u16,
    /// A PROXY header layer outside reported an original client other than the peer (the
    /// transport's `peer_addr()` at `connection_made`); its `client.*` attributes were set on
    /// the span then (a flag, not the address: it costs no bytes in every connection's task).
    proxied: bool,
    /// Set by `connection_lost`; if the protocol is dropped without it (a panic), `Drop`
    /// records the loss so the histogram and the span agree with `lost{reason="panic"}`.
    recorded: bool,
}

impl<P: Protocol> Protocol for InstrumentedProtocol<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        let client = transport.peer_addr();
        if client != SocketAddr::new(self.peer_ip, self.peer_port) {
            self.proxied = true;
            if !self.span.is_disabled() {
                set_client(&self.span, client);
            }
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
                trace_id = trace_id(&self.span).as_deref(),
                "connection made"
            );
        }
        if let Some(tls) = transport.tls() {
            record_tls(&self.span, tls);
        }
        if let Some(fault) = transport.fault() {
            if !self.span.is_disabled() {
                self.span.set_attribute("echo.fault", fault);
            }
        }
        let _entered = self.span.enter();
        self.inner.connection_made(transport);
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.received += data.len() as u64;
        self.metrics.received_bytes.inc_by(data.len() as u64);
        self.inner.data_received(data, transport);
    }

    fn bytes_sent(&mut self, n: usize) {
        self.sent += n as u64;
        self.metrics.sent_bytes.inc_by(n as u64);
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

/// The TLS attributes of the semantic conventions. Set at once rather than at close: a TLS
/// connection already holds a TLS session many times the size of these attributes.
fn record_tls(span: &Span, tls: &TlsInfo) {
    if span.is_disabled() {
        return;
    }
    span.set_attribute("tls.established", true);
    span.set_attribute("tls.protocol.name", "tls");
    span.set_attribute("tls.protocol.version", tls.protocol_version.clone());
    span.set_attribute("tls.cipher", tls.cipher.clone());
    for (key, value) in [
        ("tls.server_name", &tls.server_name),
        ("tls.next_protocol", &tls.alpn),
        ("tls.client.subject", &tls.client_subject),
    ] {
        if let Some(value) = value {
            span.set_attribute(key, value.clone());
        }
    }
}

/// The OpenTelemetry `client.*` attributes: the original client (`network.peer.*` is the
/// socket's peer, which is the proxy when a PROXY header was used).
fn set_client(span: &Span, client: SocketAddr) {
    span.set_attribute("client.address", client.ip().to_string());
    span.set_attribute("client.port", i64::from(client.port()));
}

/// The OTLP trace id of `span`, when it is being exported. Only called while debug logging is
/// on: asking for the id starts the SDK span, which a lean idle connection avoids.
fn trace_id(span: &Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

impl<P> InstrumentedProtocol<P> {
    /// Observe the duration and finish the span's attributes, once.
    fn record_loss(&mut self, reason: LossReason) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let elapsed = self.opened_at.elapsed();
        let duration = elapsed.as_secs_f64();
        self.metrics.duration.observe(duration);
        let span = &self.span;
        if !span.is_disabled() {
            let ip_type = if self.peer_ip.is_ipv4() {
                "ipv4"
            } else {
                "ipv6"
            };
            let made_at = SystemTime::now()
                .checked_sub(elapsed)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            span.add_event_with_timestamp("connection made", made_at, Vec::new());
            for (key, value) in [
                ("network.transport", Value::from("tcp")),
                ("network.type", Value::from(ip_type)),
                (
                    "network.peer.address",
                    Value::from(self.peer_ip.to_string()),
                ),
                ("network.peer.port", Value::from(i64::from(self.peer_port))),
                ("server.address", Value::from(self.local_ip.to_string())),
                ("server.port", Value::from(i64::from(self.local_port))),
                ("connection.id", Value::from(self.id as i64)),
                ("echo.received_bytes", Value::from(self.received as i64)),
                ("echo.sent_bytes", Value::from(self.sent as i64)),
                ("echo.duration_seconds", Value::from(duration)),
                ("echo.loss_reason", Value::from(reason.label())),
            ] {
                span.set_attribute(key, value);
            }
            if !self.proxied {
                set_client(span, SocketAddr::new(self.peer_ip, self.peer_port));
            }
            if !reason.is_clean() {
                span.set_status(Status::error(reason.label()));
            }
        }
        let trace = tracing::enabled!(target: LIFECYCLE_LOG_TARGET, tracing::Level::DEBUG)
            .then(|| trace_id(span))
            .flatten();
        tracing::debug!(
            target: CONNECTION_TARGET,
            parent: span,
            trace_id = trace.as_deref(),
            reason = reason.label(),
            connection_id = self.id,
            peer_address = %self.peer_ip,
            peer_port = self.peer_port,
            proxied = self.proxied,
            received_bytes = self.received as i64,
            sent_bytes = self.sent as i64,
            "connection lost"
        );
    }
}
