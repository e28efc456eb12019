//! The OTLP span of a connection, recorded in one go when the connection is lost.
//!
//! Everything the span says is known at close (addresses, byte counts, duration, loss reason;
//! the accept time is kept by the protocol anyway), so nothing about the span exists while the
//! connection is open: no extra memory per open connection while export is on.
//!
//! At close the connection's worker does as little as it can, because that CPU is paid per
//! connection: it asks the sampler, then queues a [`SpanRecord`] (plain numbers and addresses,
//! no strings, no attribute vector; the rare PROXY/TLS/fault facts are moved, not copied). The
//! export task turns records into protobuf (module `otlp_proto`). Measured before this design
//! (SDK span built at close, exported by `opentelemetry-otlp`): 4.7 us of server CPU per
//! connection for export; most of it building, converting, encoding and freeing SDK structs.
//!
//! Trace and span ids are derived from the connection id and a random per-process seed
//! ([`ConnectionIds`]), so the debug log line written at accept can carry the trace id the
//! span will have when it is exported at close, and the ids cost no random numbers at all.

use std::net::SocketAddr;
use std::sync::Arc;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};

use super::batch::MeteredBatchProcessor;
use crate::protocol::LossReason;
use crate::transport::TlsInfo;

/// Trace and span ids from (random per-process seed, connection id).
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

    /// The span id of connection `id`'s span (never the invalid zero id: forced odd).
    pub fn span_id(&self, id: u64) -> SpanId {
        SpanId::from(mix(self.seed[1] ^ id.wrapping_mul(0xD6E8_FEB8_6659_FD93)) | 1)
    }
}

/// Everything a connection's span records, as plain values: what the connection's worker
/// queues at close. The export task turns it into attributes, events and status.
#[derive(Debug)]
pub struct SpanRecord {
    /// `connection.id`; also determines the trace and span ids.
    pub id: u64,
    /// `network.peer.address` / `network.peer.port`.
    pub peer: SocketAddr,
    /// `server.address` / `server.port`.
    pub local: SocketAddr,
    /// `echo.received_bytes`.
    pub received: u64,
    /// `echo.sent_bytes`.
    pub sent: u64,
    /// Accept time (Unix nanoseconds): the span's start and its "connection made" event.
    pub made_at_unix_nanos: u64,
    /// Loss time (Unix nanoseconds): the span's end and its "connection lost" event.
    pub lost_at_unix_nanos: u64,
    /// `echo.duration_seconds` (monotonic clock).
    pub duration_seconds: f64,
    /// `echo.loss_reason`; an unclean one sets the status to ERROR.
    pub reason: LossReason,
    /// What only some connections have: the original client behind a PROXY header, TLS, the
    /// fault injected.
    pub extras: Option<Box<ConnectionExtras>>,
}

/// Facts about a connection that only some connections have, kept (boxed) by the
/// instrumentation only for those, so plain connections pay nothing for them.
#[derive(Debug, Clone, Default)]
pub struct ConnectionExtras {
    /// `client.address` / `client.port`: the original client a PROXY header named (without
    /// one, the client is the peer).
    pub client: Option<SocketAddr>,
    /// `tls.*`: what the TLS handshake negotiated.
    pub tls: Option<TlsInfo>,
    /// `echo.fault`: the fault injected into this connection.
    pub fault: Option<&'static str>,
}

/// Samples connection spans and queues the sampled ones for export.
#[derive(Debug, Clone)]
pub struct ConnectionSpans {
    ids: ConnectionIds,
    sampler: Arc<Sampler>,
    queue: Arc<MeteredBatchProcessor>,
}

impl ConnectionSpans {
    /// Spans with ids from `ids`, sampled by `sampler`, queued to `queue`.
    pub fn new(ids: ConnectionIds, sampler: Sampler, queue: Arc<MeteredBatchProcessor>) -> Self {
        ConnectionSpans {
            ids,
            sampler: Arc::new(sampler),
            queue,
        }
    }

    /// The trace id connection `id`'s span will have.
    pub fn trace_id(&self, id: u64) -> TraceId {
        self.ids.trace_id(id)
    }

    /// Sample the span of a lost connection and, if sampled, queue it for export. A
    /// connection span has no parent: the sampler decides on the trace id alone.
    pub fn record(&self, span: SpanRecord) {
        let sampled = self.sampler.should_sample(
            None,
            self.ids.trace_id(span.id),
            "echo.connection",
            &SpanKind::Server,
            &[],
            &[],
        );
        if sampled.decision == SamplingDecision::RecordAndSample {
            self.queue.push(span);
        }
    }
}
