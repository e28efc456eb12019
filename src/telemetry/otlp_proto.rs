//! Connection spans straight to OTLP protobuf bytes (an `ExportTraceServiceRequest`), on the
//! export task.
//!
//! Why by hand: the service sends one kind of span, whose shape is fixed, and exporting it
//! through the SDK (an SDK span with an attribute vector and owned strings per connection,
//! converted at export into the generated proto structs, grouped by resource, encoded and
//! freed again) cost most of the server CPU that span export adds per connection. Here the
//! connection's compact [`SpanRecord`] is written field by field into one reused buffer; the
//! resource and the instrumentation scope are encoded once at startup.
//!
//! The wire format is protobuf's: a field is a key (field number << 3 | wire type) and a value;
//! varints for integers and enums, 8 little-endian bytes for `fixed64`/`double`, 4 for
//! `fixed32`, a varint length then the bytes for strings, bytes and embedded messages. Field
//! numbers are those of `opentelemetry/proto/{collector/trace,trace,common,resource}/v1`.

use std::fmt::Write as _;
use std::net::IpAddr;

use opentelemetry::{Array, Value};

use super::connection_span::{ConnectionIds, SpanRecord};

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `Span.kind`: `SPAN_KIND_SERVER`.
const SPAN_KIND_SERVER: u64 = 2;
/// `Status.code`: `STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u64 = 2;
/// `Span.flags`: the W3C sampled flag, and "the is-remote bit is known" (it is clear: the
/// span has no parent), as the SDK's exporter sets them.
const SPAN_FLAGS: u32 = 0x01 | 0x100;

fn key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, u64::from(field << 3 | u32::from(wire)));
}

fn varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn bytes_field(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
    key(buf, field, LEN);
    varint(buf, value.len() as u64);
    buf.extend_from_slice(value);
}

fn fixed64_field(buf: &mut Vec<u8>, field: u32, value: u64) {
    key(buf, field, FIXED64);
    buf.extend_from_slice(&value.to_le_bytes());
}

/// An embedded message written by `body`. The length goes in front of it: one byte is
/// reserved, and the body is moved up in the rare case that its length needs more.
fn message(buf: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(buf, field, LEN);
    buf.push(0);
    let start = buf.len();
    body(buf);
    let len = buf.len() - start;
    if len < 0x80 {
        buf[start - 1] = len as u8;
    } else {
        let mut prefix = Vec::with_capacity(10);
        varint(&mut prefix, len as u64);
        buf.splice(start - 1..start, prefix);
    }
}

/// `AnyValue` (field numbers of its `oneof`).
enum Any<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}

fn any(buf: &mut Vec<u8>, value: Any) {
    match value {
        Any::Str(s) => bytes_field(buf, 1, s.as_bytes()),
        Any::Bool(b) => {
            key(buf, 2, VARINT);
            varint(buf, u64::from(b));
        }
        Any::Int(i) => {
            key(buf, 3, VARINT);
            varint(buf, i as u64);
        }
        Any::Double(d) => fixed64_field(buf, 4, d.to_bits()),
    }
}

/// One `KeyValue` (field `field` of the enclosing message).
fn attribute(buf: &mut Vec<u8>, field: u32, name: &str, value: Any) {
    message(buf, field, |buf| {
        bytes_field(buf, 1, name.as_bytes());
        message(buf, 2, |buf| any(buf, value));
    });
}

/// A `KeyValue` holding an SDK [`Value`] (resource attributes; arrays included).
fn sdk_attribute(buf: &mut Vec<u8>, field: u32, name: &str, value: &Value) {
    message(buf, field, |buf| {
        bytes_field(buf, 1, name.as_bytes());
        message(buf, 2, |buf| sdk_value(buf, value));
    });
}

fn sdk_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(b) => any(buf, Any::Bool(*b)),
        Value::I64(i) => any(buf, Any::Int(*i)),
        Value::F64(d) => any(buf, Any::Double(*d)),
        Value::String(s) => any(buf, Any::Str(s.as_str())),
        Value::Array(array) => {
            // AnyValue.array_value: ArrayValue { repeated AnyValue values = 1 }.
            message(buf, 5, |buf| match array {
                Array::Bool(v) => v
                    .iter()
                    .for_each(|b| message(buf, 1, |buf| any(buf, Any::Bool(*b)))),
                Array::I64(v) => v
                    .iter()
                    .for_each(|i| message(buf, 1, |buf| any(buf, Any::Int(*i)))),
                Array::F64(v) => v
                    .iter()
                    .for_each(|d| message(buf, 1, |buf| any(buf, Any::Double(*d)))),
                Array::String(v) => v
                    .iter()
                    .for_each(|s| message(buf, 1, |buf| any(buf, Any::Str(s.as_str())))),
                _ => {}
            });
        }
        _ => any(buf, Any::Str(&value.to_string())),
    }
}

/// Encodes batches of connection spans into `ExportTraceServiceRequest` bodies.
#[derive(Debug)]
pub struct SpanEncoder {
    ids: ConnectionIds,
    /// `ResourceSpans.resource` (field 1), encoded once.
    resource: Vec<u8>,
    /// `ScopeSpans.scope` (field 1), encoded once.
    scope: Vec<u8>,
    /// The peer, server and client addresses as text, each remembered for the next span:
    /// most spans of a batch share their server address, and often their peer (a load
    /// balancer, a health checker), so `Display` runs only when the address changes.
    texts: [IpText; 3],
}

/// An address and its text.
#[derive(Debug, Default)]
struct IpText {
    ip: Option<IpAddr>,
    text: String,
}

impl IpText {
    fn get(&mut self, ip: IpAddr) -> &str {
        if self.ip != Some(ip) {
            self.text.clear();
            let _ = write!(self.text, "{ip}");
            self.ip = Some(ip);
        }
        &self.text
    }
}

impl SpanEncoder {
    /// An encoder for spans whose ids come from `ids`, under a resource with `resource`'s
    /// attributes and the instrumentation scope `scope`.
    pub fn new<'a>(
        ids: ConnectionIds,
        resource: impl IntoIterator<Item = (&'a str, &'a Value)>,
        scope: &str,
    ) -> Self {
        let mut resource_bytes = Vec::new();
        message(&mut resource_bytes, 1, |buf| {
            for (name, value) in resource {
                sdk_attribute(buf, 1, name, value);
            }
        });
        let mut scope_bytes = Vec::new();
        message(&mut scope_bytes, 1, |buf| {
            bytes_field(buf, 1, scope.as_bytes())
        });
        SpanEncoder {
            ids,
            resource: resource_bytes,
            scope: scope_bytes,
            texts: Default::default(),
        }
    }

    /// The request body for `spans`, written into `out` (cleared first).
    pub fn encode(&mut self, spans: &[SpanRecord], out: &mut Vec<u8>) {
        out.clear();
        // ExportTraceServiceRequest.resource_spans (1) -> ResourceSpans.scope_spans (2)
        // -> ScopeSpans.spans (2).
        message(out, 1, |buf| {
            buf.extend_from_slice(&self.resource);
            message(buf, 2, |buf| {
                buf.extend_from_slice(&self.scope);
                for span in spans {
                    message(buf, 2, |buf| {
                        Self::span(&self.ids, &mut self.texts, span, buf);
                    });
                }
            });
        });
    }

    /// One `Span`'s fields.
    fn span(ids: &ConnectionIds, texts: &mut [IpText; 3], c: &SpanRecord, buf: &mut Vec<u8>) {
        let reason = c.reason.label();
        bytes_field(buf, 1, &ids.trace_id(c.id).to_bytes());
        bytes_field(buf, 2, &ids.span_id(c.id).to_bytes());
        bytes_field(buf, 5, b"echo.connection");
        key(buf, 6, VARINT);
        varint(buf, SPAN_KIND_SERVER);
        fixed64_field(buf, 7, c.made_at_unix_nanos);
        fixed64_field(buf, 8, c.lost_at_unix_nanos);

        let [peer_text, local_text, client_text] = texts;
        let ip_type = if c.peer.is_ipv4() { "ipv4" } else { "ipv6" };
        attribute(buf, 9, "network.transport", Any::Str("tcp"));
        attribute(buf, 9, "network.type", Any::Str(ip_type));
        attribute(
            buf,
            9,
            "network.peer.address",
            Any::Str(peer_text.get(c.peer.ip())),
        );
        attribute(buf, 9, "network.peer.port", Any::Int(c.peer.port().into()));
        attribute(
            buf,
            9,
            "server.address",
            Any::Str(local_text.get(c.local.ip())),
        );
        attribute(buf, 9, "server.port", Any::Int(c.local.port().into()));
        attribute(buf, 9, "connection.id", Any::Int(c.id as i64));
        attribute(buf, 9, "echo.received_bytes", Any::Int(c.received as i64));
        attribute(buf, 9, "echo.sent_bytes", Any::Int(c.sent as i64));
        attribute(
            buf,
            9,
            "echo.duration_seconds",
            Any::Double(c.duration_seconds),
        );
        attribute(buf, 9, "echo.loss_reason", Any::Str(reason));
        let extras = c.extras.as_deref();
        let client = extras.and_then(|e| e.client).unwrap_or(c.peer);
        attribute(
            buf,
            9,
            "client.address",
            Any::Str(client_text.get(client.ip())),
        );
        attribute(buf, 9, "client.port", Any::Int(client.port().into()));
        if let Some(fault) = extras.and_then(|e| e.fault) {
            attribute(buf, 9, "echo.fault", Any::Str(fault));
        }
        if let Some(tls) = extras.and_then(|e| e.tls.as_ref()) {
            attribute(buf, 9, "tls.established", Any::Bool(true));
            attribute(buf, 9, "tls.protocol.name", Any::Str("tls"));
            attribute(
                buf,
                9,
                "tls.protocol.version",
                Any::Str(&tls.protocol_version),
            );
            attribute(buf, 9, "tls.cipher", Any::Str(&tls.cipher));
            for (name, value) in [
                ("tls.server_name", &tls.server_name),
                ("tls.next_protocol", &tls.alpn),
                ("tls.client.subject", &tls.client_subject),
            ] {
                if let Some(value) = value {
                    attribute(buf, 9, name, Any::Str(value));
                }
            }
        }

        // Span.events (11): Event { time_unix_nano = 1, name = 2, attributes = 3 }.
        message(buf, 11, |buf| {
            fixed64_field(buf, 1, c.made_at_unix_nanos);
            bytes_field(buf, 2, b"connection made");
        });
        message(buf, 11, |buf| {
            fixed64_field(buf, 1, c.lost_at_unix_nanos);
            bytes_field(buf, 2, b"connection lost");
            attribute(buf, 3, "reason", Any::Str(reason));
        });
        if !c.reason.is_clean() {
            // Span.status (15): Status { message = 2, code = 3 }.
            message(buf, 15, |buf| {
                bytes_field(buf, 2, reason.as_bytes());
                key(buf, 3, VARINT);
                varint(buf, STATUS_CODE_ERROR);
            });
        }
        key(buf, 16, FIXED32);
        buf.extend_from_slice(&SPAN_FLAGS.to_le_bytes());
    }
}
