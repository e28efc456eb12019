//! The OTLP span of a connection, built in one go when the connection is lost.
//!
//! Everything the span says is known at close (addresses, byte counts, duration, loss reason;
//! the accept time is kept by the protocol anyway), so the SDK span is built, sampled and ended
//! at once with an exact-capacity attribute vector, instead of being fed attribute by attribute
//! through the `tracing` bridge (`tracing-opentelemetry`), which kept a span builder alive per
//! open connection and looked the span up in the registry once per attribute. No extra memory
//! per open connection while export is on.
//!
//! Trace and span ids are derived from the connection id and a random per-process seed
//! ([`ConnectionIds`], the provider's id generator), so the debug log line written at accept
//! can carry the trace id the span will have when it is exported at close.

use std::cell::Cell;
use std::net::IpAddr;
use std::time::SystemTime;

use opentelemetry::trace::{Event, SpanId, SpanKind, Status, TraceId, Tracer as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer};

use crate::protocol::LossReason;
use crate::transport::TlsInfo;

thread_local! {
    /// The connection whose span this thread is starting, read by [`ConnectionIds`].
    static STARTING: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Ids from (seed, connection id) while a connection span is being started on this thread;
/// random ids otherwise.
#[derive(Debug, Clone)]
pub struct ConnectionIds {
    seed: [u64; 2],
}

impl Default for ConnectionIds {
    fn default() -> Self {
        Self::new()
    }
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ConnectionIds {
    /// A fresh random seed.
    pub fn new() -> Self {
        let random = u128::from_be_bytes(RandomIdGenerator::default().new_trace_id().to_bytes());
        ConnectionIds {
            seed: [(random >> 64) as u64, random as u64],
        }
    }

    /// The trace id of connection `id`'s span (never the invalid all-zero id: `mix` is a
    /// bijection, so at most one connection id per process could map the high half to zero,
    /// and the low half is forced odd).
    pub fn trace_id(&self, id: u64) -> TraceId {
        let high = mix(self.seed[0] ^ id);
        let low = mix(self.seed[1].wrapping_add(id.rotate_left(32))) | 1;
        TraceId::from(u128::from(high) << 64 | u128::from(low))
    }

    fn span_id(&self, id: u64) -> SpanId {
        SpanId::from(mix(self.seed[1] ^ id.wrapping_mul(0xD6E8_FEB8_6659_FD93)) | 1)
    }
}

impl IdGenerator for ConnectionIds {
    fn new_trace_id(&self) -> TraceId {
        match STARTING.get() {
            Some(id) => self.trace_id(id),
            None => RandomIdGenerator::default().new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match STARTING.get() {
            Some(id) => self.span_id(id),
            None => RandomIdGenerator::default().new_span_id(),
        }
    }
}

/// Everything a connection's span records.
pub struct ConnectionRecord<'a> {
    /// `connection.id`; also determines the trace id.
    pub id: u64,
    /// `network.peer.address`.
    pub peer_ip: IpAddr,
    /// `network.peer.port`.
    pub peer_port: u16,
    /// `server.address`.
    pub local_ip: IpAddr,
    /// `server.port`.
    pub local_port: u16,
    /// `echo.received_bytes`.
    pub received: u64,
    /// `echo.sent_bytes`.
    pub sent: u64,
    /// Accept time: the span's start and its "connection made" event.
    pub made_at: SystemTime,
    /// Loss time: the span's end and its "connection lost" event.
    pub lost_at: SystemTime,
    /// `echo.duration_seconds` (monotonic clock).
    pub duration_seconds: f64,
    /// `echo.loss_reason`; an unclean one sets the status to ERROR.
    pub reason: LossReason,
    /// What only some connections have: the original client behind a PROXY header, TLS.
    pub extras: Option<&'a ConnectionExtras>,
}

/// Facts about a connection that only some connections have, kept (boxed) by the
/// instrumentation only for those, so plain connections pay nothing for them.
#[derive(Debug, Clone, Default)]
pub struct ConnectionExtras {
    /// `client.address` / `client.port`: the original client a PROXY header named (without
    /// one, the client is the peer).
    pub client: Option<std::net::SocketAddr>,
    /// `tls.*`: what the TLS handshake negotiated.
    pub tls: Option<TlsInfo>,
    /// `echo.fault`: the fault injected into this connection.
    pub fault: Option<&'static str>,
}

/// Builds connection spans with the exporting tracer.
#[derive(Debug, Clone)]
pub struct ConnectionSpans {
    tracer: SdkTracer,
    ids: ConnectionIds,
}

impl ConnectionSpans {
    /// Spans from `tracer`, whose provider uses `ids` as its id generator.
    pub fn new(tracer: SdkTracer, ids: ConnectionIds) -> Self {
        ConnectionSpans { tracer, ids }
    }

    /// The trace id connection `id`'s span will have.
    pub fn trace_id(&self, id: u64) -> TraceId {
        self.ids.trace_id(id)
    }

    /// Build, sample and end the span of a lost connection (it goes to the span processor).
    pub fn record(&self, c: &ConnectionRecord) {
        use opentelemetry::trace::Span as _;
        let ip_type = if c.peer_ip.is_ipv4() { "ipv4" } else { "ipv6" };
        let mut attributes = vec![
            KeyValue::new("network.transport", "tcp"),
            KeyValue::new("network.type", ip_type),
            KeyValue::new("network.peer.address", c.peer_ip.to_string()),
            KeyValue::new("network.peer.port", i64::from(c.peer_port)),
            KeyValue::new("server.address", c.local_ip.to_string()),
            KeyValue::new("server.port", i64::from(c.local_port)),
            KeyValue::new("connection.id", c.id as i64),
            KeyValue::new("echo.received_bytes", c.received as i64),
            KeyValue::new("echo.sent_bytes", c.sent as i64),
            KeyValue::new("echo.duration_seconds", c.duration_seconds),
            KeyValue::new("echo.loss_reason", Value::from(c.reason.label())),
        ];
        let client = c
            .extras
            .and_then(|e| e.client)
            .unwrap_or(std::net::SocketAddr::new(c.peer_ip, c.peer_port));
        attributes.push(KeyValue::new("client.address", client.ip().to_string()));
        attributes.push(KeyValue::new("client.port", i64::from(client.port())));
        if let Some(fault) = c.extras.and_then(|e| e.fault) {
            attributes.push(KeyValue::new("echo.fault", fault));
        }
        if let Some(tls) = c.extras.and_then(|e| e.tls.as_ref()) {
            attributes.extend([
                KeyValue::new("tls.established", true),
                KeyValue::new("tls.protocol.name", "tls"),
                KeyValue::new("tls.protocol.version", tls.protocol_version.clone()),
                KeyValue::new("tls.cipher", tls.cipher.clone()),
            ]);
            for (key, value) in [
                ("tls.server_name", &tls.server_name),
                ("tls.next_protocol", &tls.alpn),
                ("tls.client.subject", &tls.client_subject),
            ] {
                if let Some(value) = value {
                    attributes.push(KeyValue::new(key, value.clone()));
                }
            }
        }
        let events = vec![
            Event::new("connection made", c.made_at, Vec::new(), 0),
            Event::new(
                "connection lost",
                c.lost_at,
                vec![KeyValue::new("reason", c.reason.label())],
                0,
            ),
        ];
        let builder = self
            .tracer
            .span_builder("echo.connection")
            .with_kind(SpanKind::Server)
            .with_start_time(c.made_at)
            .with_attributes(attributes)
            .with_events(events);
        STARTING.set(Some(c.id));
        let mut span = builder.start(&self.tracer);
        STARTING.set(None);
        if !c.reason.is_clean() {
            span.set_status(Status::error(c.reason.label()));
        }
        span.end_with_timestamp(c.lost_at);
    }
}
