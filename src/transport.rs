//! What a protocol may do to its connection, and an in-memory transport to test protocols with.
//!
//! Protocols never see the socket: they write, close and ask for addresses through
//! [`Transport`]. The server's socket transport lives in `connection.rs`;
//! [`MemoryTransport`] here records everything instead, like Twisted's `StringTransport`, so
//! protocol logic is tested without a network.

use std::io::IoSlice;
use std::net::SocketAddr;

use crate::protocol::LossReason;

/// The protocol's handle on its connection.
pub trait Transport {
    /// Queue `data` for the peer. Never blocks: bytes the socket can't take now are buffered,
    /// and while the buffer holds `--write-buffer-limit` bytes the server stops reading from
    /// this peer (backpressure). Reads are sized to the room left, so a protocol that writes no
    /// more than it reads (echo) never exceeds the limit; one that writes more can. Writes after
    /// `lose_connection`, `abort_connection` or a socket error are dropped.
    fn write(&mut self, data: &[u8]);

    /// [`Transport::write`] of each buffer in turn, as one write: the socket transport sends
    /// them with one `writev` (one system call and, with `TCP_NODELAY`, as few packets as
    /// their total size needs, rather than a packet per buffer). The TLS layer hands its
    /// records over this way. The default writes them one by one; wrapping transports that
    /// only forward writes forward this too.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) {
        for buf in bufs {
            self.write(buf);
        }
    }

    /// Close after everything written so far has been sent (FIN, not RST).
    fn lose_connection(&mut self);

    /// Close now, discarding anything not yet sent.
    fn abort_connection(&mut self);

    /// The remote end (IPv4 peers are shown as plain IPv4, not `::ffff:a.b.c.d`).
    fn peer_addr(&self) -> SocketAddr;

    /// Our end of the connection.
    fn local_addr(&self) -> SocketAddr;

    /// What TLS negotiated, when the connection runs inside TLS (the TLS layer's transport
    /// answers; plain transports have none).
    fn tls(&self) -> Option<&TlsInfo> {
        None
    }

    /// The PROXY protocol header this connection started with, when a PROXY header layer
    /// read one with the original client (then `peer_addr()` is that client). `None` by
    /// default: a plain socket has no header.
    fn proxy_header(&self) -> Option<&crate::proxy_protocol::Header> {
        None
    }

    /// Stop reading from the peer until [`Transport::resume_reading`] (Twisted's
    /// `pauseProducing`): its writes back up in the kernel buffers and then block. Timers and
    /// writes go on. Wrapping transports forward it.
    fn pause_reading(&mut self) {}

    /// Read from the peer again after [`Transport::pause_reading`] (not after
    /// [`Transport::stop_reading`], which is final).
    fn resume_reading(&mut self) {}

    /// Stop reading for good (a black hole): like [`Transport::pause_reading`], but the
    /// peer's close or reset, noticed without reading, ends the connection
    /// (`connection_lost(PeerClosed)` or the reset), where a paused connection keeps a
    /// half-closed peer's FIN for when it reads again. Final: `resume_reading` does not undo
    /// it (watching for the hang-up consumes the socket's read readiness, so bytes that came
    /// in meanwhile would wait for the next arrival). Wrapping transports forward it.
    fn stop_reading(&mut self) {
        self.pause_reading();
    }

    /// [`Transport::lose_connection`] with the loss reason to report (flush, FIN, then
    /// `connection_lost(reason)`). The default closes with [`LossReason::Closed`].
    fn close_for(&mut self, reason: LossReason) {
        let _ = reason;
        self.lose_connection();
    }

    /// [`Transport::abort_connection`] with the loss reason to report (RST, then
    /// `connection_lost(reason)`). The default aborts with [`LossReason::Aborted`].
    fn abort_for(&mut self, reason: LossReason) {
        let _ = reason;
        self.abort_connection();
    }

    /// The fault injected into this connection (`echo.fault` on the span), when the fault
    /// layer chose one (its transport answers; every other transport forwards or has none).
    fn fault(&self) -> Option<&'static str> {
        None
    }
}

/// The parameters of an established TLS session, as the semantic conventions name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// `tls.protocol.version`: `1.2` or `1.3`.
    pub protocol_version: String,
    /// `tls.cipher`: the negotiated cipher suite (`TLS13_AES_128_GCM_SHA256`, ...).
    pub cipher: String,
    /// `tls.server_name`: the SNI the client sent.
    pub server_name: Option<String>,
    /// `tls.next_protocol`: the ALPN protocol negotiated.
    pub alpn: Option<String>,
    /// `tls.client.subject`: the client certificate's subject, when one was given.
    pub client_subject: Option<String>,
}

/// A transport that keeps what is written in memory, for unit tests of protocols. It obeys the
/// [`Transport`] contract exactly as the server's transport does (the driver's tests check both
/// against the same rules).
#[derive(Debug)]
pub struct MemoryTransport {
    written: Vec<u8>,
    disconnecting: bool,
    aborted: bool,
    read_paused: bool,
    read_stopped: bool,
    close_reason: Option<LossReason>,
    peer: SocketAddr,
    local: SocketAddr,
}

impl MemoryTransport {
    /// A transport between two fixed loopback addresses.
    pub fn new() -> Self {
        Self::with_addrs(
            SocketAddr::from(([127, 0, 0, 1], 40000)),
            SocketAddr::from(([127, 0, 0, 1], 8000)),
        )
    }

    /// A transport between `peer` and `local`.
    pub fn with_addrs(peer: SocketAddr, local: SocketAddr) -> Self {
        MemoryTransport {
            written: Vec::new(),
            disconnecting: false,
            aborted: false,
            read_paused: false,
            read_stopped: false,
            close_reason: None,
            peer,
            local,
        }
    }

    /// Everything written so far.
    pub fn written(&self) -> &[u8] {
        &self.written
    }

    /// Take what was written so far, leaving the record empty.
    pub fn take_written(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.written)
    }

    /// Did the protocol ask for a graceful close?
    pub fn is_disconnecting(&self) -> bool {
        self.disconnecting
    }

    /// Did the protocol abort the connection?
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// Is reading paused ([`Transport::pause_reading`] or [`Transport::stop_reading`])?
    pub fn is_read_paused(&self) -> bool {
        self.read_paused
    }

    /// Is reading stopped for good ([`Transport::stop_reading`])?
    pub fn is_read_stopped(&self) -> bool {
        self.read_stopped
    }

    /// The reason the protocol closed or aborted with, if it did.
    pub fn close_reason(&self) -> Option<LossReason> {
        self.close_reason
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl Transport for MemoryTransport {
    /// Like the server's transport: writes after `lose_connection` or `abort_connection` are
    /// dropped, so a protocol cannot pass here with behaviour production does not have.
    fn write(&mut self, data: &[u8]) {
        if !self.aborted && !self.disconnecting {
            self.written.extend_from_slice(data);
        }
    }

    fn lose_connection(&mut self) {
        self.close_for(LossReason::Closed);
    }

    fn abort_connection(&mut self) {
        self.abort_for(LossReason::Aborted);
    }

    fn pause_reading(&mut self) {
        self.read_paused = true;
    }

    fn resume_reading(&mut self) {
        self.read_paused = self.read_stopped;
    }

    fn stop_reading(&mut self) {
        self.read_paused = true;
        self.read_stopped = true;
    }

    fn close_for(&mut self, reason: LossReason) {
        if !self.disconnecting && !self.aborted {
            self.close_reason = Some(reason);
        }
        self.disconnecting = true;
    }

    fn abort_for(&mut self, reason: LossReason) {
        if !self.aborted {
            self.close_reason = Some(reason);
        }
        self.aborted = true;
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }
}
