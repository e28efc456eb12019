//! The shared half of the framework: a [`Factory`] builds one protocol per connection.
//!
//! Like Twisted's `Factory`, it is the place for state that outlives a connection, and it may
//! refuse a connection by not building a protocol. Wrapping factories (the policies in
//! `policies/`, the instrumentation in `telemetry/`) are factories that build a wrapped
//! protocol around the one built by the factory they wrap.

use std::fmt;
use std::net::SocketAddr;

use crate::protocol::Protocol;

/// What the server knows about a connection when it asks for a protocol.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    /// Process-unique connection number, in accept order (starts at 1).
    pub id: u64,
    /// The remote end (IPv4-mapped IPv6 addresses already turned into plain IPv4).
    pub peer: SocketAddr,
    /// The local end.
    pub local: SocketAddr,
}

/// Why a factory refused a connection. The labels are the fixed values of
/// `echo_connections_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` reached.
    Limit,
    /// `--max-connections-per-peer` reached for this peer's IP.
    PeerLimit,
}

impl Refusal {
    /// Every label value, in [`Refusal::index`] order.
    pub const LABELS: [&'static str; 2] = ["limit", "peer_limit"];

    /// Position of this refusal in [`Refusal::LABELS`].
    pub fn index(self) -> usize {
        match self {
            Refusal::Limit => 0,
            Refusal::PeerLimit => 1,
        }
    }

    /// The fixed label value.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Builds protocols and holds what they share.
pub trait Factory: Send + Sync + 'static {
    /// The protocol this factory builds.
    type Protocol: Protocol;

    /// Build the protocol for a new connection, or refuse it (the server then closes the
    /// connection at once and counts the refusal).
    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal>;

    /// Runs once when the server starts, before the first connection.
    fn start_factory(&self) {}

    /// Runs once when the server has stopped, after the last connection is gone.
    fn stop_factory(&self) {}
}
