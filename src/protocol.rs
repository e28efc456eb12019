//! The per-connection half of the framework: a [`Protocol`] reacts to events on one connection.
//!
//! This is Twisted's `IProtocol` in Rust. The API is small on purpose: implement
//! [`Protocol::data_received`], write replies through the [`Transport`], and override
//! [`Protocol::connection_made`] or [`Protocol::connection_lost`] only if you care. Every callback
//! is named for the event it reports and, except `data_received`, defaults to doing nothing.
//!
//! Data arrives in arbitrary pieces: one `write` by the peer can be split across many
//! `data_received` calls and many writes can be merged into one. Protocols must not assume any
//! framing the bytes don't carry themselves (the tests feed data one byte at a time).

use std::io;

use crate::transport::Transport;

/// Per-connection event handler, built by a [`Factory`](crate::Factory) for each accepted
/// connection and dropped when that connection is gone. `Unpin` lets the connection task hold
/// it inline (protocols are plain objects; box anything self-referential).
pub trait Protocol: Send + Unpin + 'static {
    /// The connection is up; `transport` is how the protocol reaches it from now on.
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        let _ = transport;
    }

    /// Some bytes arrived. `data` is only valid during the call; copy what must be kept.
    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport);

    /// `n` more bytes of what this protocol wrote were taken by the kernel for the peer.
    /// Bytes still buffered when the connection is lost are never reported. Instrumentation
    /// uses this to count bytes actually sent; most protocols ignore it.
    fn bytes_sent(&mut self, n: usize) {
        let _ = n;
    }

    /// The connection is gone, for `reason`. Called once, after the last `data_received`: when
    /// the connection ends, and with [`LossReason::Shutdown`] if the runtime drops the
    /// connection unfinished; not if the protocol panicked (the server still counts that loss
    /// as `panic`). The transport can no longer be used.
    fn connection_lost(&mut self, reason: LossReason) {
        let _ = reason;
    }

    /// A moment by which the protocol needs something to have happened, and the reason to end
    /// the connection with if it has not (the PROXY header layer uses it for
    /// `--proxy-header-timeout`). The driver asks after every callback and closes the
    /// connection (without flushing) once the deadline passes; `None`, the default, sets none.
    /// Wrapping protocols forward it.
    fn deadline(&self) -> Option<(tokio::time::Instant, LossReason)> {
        None
    }

    /// When the protocol next wants [`Protocol::timer_fired`] (Twisted's `callLater`, one
    /// pending call per protocol). The driver asks after every callback and shares its policy
    /// timer for it (created on demand, so protocols that set none pay nothing). After
    /// `timer_fired` the protocol must answer a later instant or `None`. Wrapping protocols
    /// forward it (combined with their own, if they have one).
    fn timer(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// The instant [`Protocol::timer`] asked for has come; `transport` is usable as in any
    /// callback (write, pause or resume reading, close).
    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        let _ = transport;
    }

    /// Does the protocol still hold bytes it will write later (a delay queue)? After the
    /// peer's EOF the driver ends the connection only once everything is flushed and this
    /// says `false`. Wrapping protocols forward it.
    fn write_pending(&self) -> bool {
        false
    }
}

/// Why a connection ended. The label of each variant is a fixed metric label value and the
/// span's loss reason, so dashboards can rely on the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// The peer shut down its write side (EOF); everything it sent was answered, then we sent FIN.
    PeerClosed,
    /// The protocol called [`Transport::lose_connection`]; pending data was flushed, then FIN.
    Closed,
    /// The connection outlived `--max-connection-age`; it was closed gracefully (flush, then FIN)
    /// and the peer closed its side, or did not within the linger. A peer that resets the
    /// connection during the linger (it closed without reading everything we echoed) is counted
    /// as [`LossReason::Reset`] instead: bytes were lost.
    MaxAge,
    /// The peer reset the connection (ECONNRESET, EPIPE, ...).
    Reset,
    /// Any other I/O error on the socket.
    Error(io::ErrorKind),
    /// No bytes moved in either direction for `--idle-timeout`.
    IdleTimeout,
    /// The peer read nothing for `--write-stall-timeout` while we had data for it.
    WriteStall,
    /// The server was shutting down and the connection outlived `--shutdown-timeout`.
    Shutdown,
    /// The protocol called [`Transport::abort_connection`].
    Aborted,
    /// The protocol panicked; the connection task was unwound.
    Panic,
    /// A trusted peer did not complete its PROXY header within `--proxy-header-timeout`.
    ProxyTimeout,
    /// A TLS client did not complete its handshake within `--tls-handshake-timeout`.
    HandshakeTimeout,
    /// A `--max-connection-age` close did not finish flushing within
    /// `--max-connection-age-grace` (the peer was not reading); the connection was reset and
    /// the unsent bytes were dropped.
    MaxAgeGrace,
    /// A fault (`--fault close`, `refuse`) closed the connection on purpose: flushed, then FIN.
    FaultClose,
    /// A fault (`--fault reset`) reset the connection on purpose (RST).
    FaultReset,
}

impl LossReason {
    /// Every label value, in [`LossReason::index`] order.
    pub const LABELS: [&'static str; 15] = [
        "peer_closed",
        "closed",
        "max_age",
        "reset",
        "error",
        "idle_timeout",
        "write_stall",
        "shutdown",
        "aborted",
        "panic",
        "proxy_timeout",
        "handshake_timeout",
        "max_age_grace",
        "fault_close",
        "fault_reset",
    ];

    /// Position of this reason in [`LossReason::LABELS`] (for per-reason counter arrays).
    pub fn index(self) -> usize {
        match self {
            LossReason::PeerClosed => 0,
            LossReason::Closed => 1,
            LossReason::MaxAge => 2,
            LossReason::Reset => 3,
            LossReason::Error(_) => 4,
            LossReason::IdleTimeout => 5,
            LossReason::WriteStall => 6,
            LossReason::Shutdown => 7,
            LossReason::Aborted => 8,
            LossReason::Panic => 9,
            LossReason::ProxyTimeout => 10,
            LossReason::HandshakeTimeout => 11,
            LossReason::MaxAgeGrace => 12,
            LossReason::FaultClose => 13,
            LossReason::FaultReset => 14,
        }
    }

    /// The fixed label value (`peer_closed`, `reset`, ...).
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// A clean close is one where nothing the peer sent was dropped: the peer closed, or we
    /// closed on purpose after flushing everything.
    pub fn is_clean(self) -> bool {
        matches!(
            self,
            LossReason::PeerClosed
                | LossReason::Closed
                | LossReason::MaxAge
                | LossReason::FaultClose
        )
    }

    /// Classify a socket error: resets are an everyday event for a server, other errors are not.
    pub fn from_io_error(err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => LossReason::Reset,
            kind => LossReason::Error(kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_indices() {
        let all = [
            LossReason::PeerClosed,
            LossReason::Closed,
            LossReason::MaxAge,
            LossReason::Reset,
            LossReason::Error(io::ErrorKind::Other),
            LossReason::IdleTimeout,
            LossReason::WriteStall,
            LossReason::Shutdown,
            LossReason::Aborted,
            LossReason::Panic,
            LossReason::ProxyTimeout,
            LossReason::HandshakeTimeout,
            LossReason::MaxAgeGrace,
            LossReason::FaultClose,
            LossReason::FaultReset,
        ];
        for (i, reason) in all.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        assert_eq!(LossReason::Reset.label(), "reset");
    }

    #[test]
    fn resets_are_told_apart_from_errors() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        let other = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(LossReason::from_io_error(&reset), LossReason::Reset);
        assert_eq!(LossReason::from_io_error(&pipe), LossReason::Reset);
        assert_eq!(
            LossReason::from_io_error(&other),
            LossReason::Error(io::ErrorKind::TimedOut)
        );
        assert!(LossReason::PeerClosed.is_clean());
        assert!(!LossReason::Shutdown.is_clean());
    }
}
