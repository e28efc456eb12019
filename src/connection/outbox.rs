//! The protocol's side of a driven connection: [`StreamTransport`] implements [`Transport`]
//! over the stream, and [`Outbox`] holds what it could not send yet and how the protocol asked
//! to close.

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use bytes::BytesMut;

use super::io::ConnectionIo;
use crate::protocol::LossReason;
use crate::transport::Transport;

/// How the connection is being closed, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closing {
    /// Not closing.
    No,
    /// Flush everything pending, send FIN, end with this reason.
    Graceful(LossReason),
    /// Close now without flushing (RST), end with this reason.
    Abort(LossReason),
}

/// What the protocol has asked of the stream, and what is waiting to be sent.
pub(super) struct Outbox {
    /// Bytes the stream would not take yet, in order.
    pub pending: BytesMut,
    pub closing: Closing,
    /// A write error seen by `Transport::write`, reported by the driver.
    pub error: Option<io::Error>,
    /// Bytes the stream took during the current protocol callback, reported to the protocol
    /// (`Protocol::bytes_sent`) once the callback returns.
    pub sent_in_callback: usize,
    /// The protocol paused reading (`Transport::pause_reading`).
    pub read_paused: bool,
    /// ... for good (`Transport::stop_reading`): the driver watches for the peer leaving.
    pub read_stopped: bool,
}

impl Outbox {
    pub fn new() -> Self {
        Outbox {
            pending: BytesMut::new(),
            closing: Closing::No,
            error: None,
            sent_in_callback: 0,
            read_paused: false,
            read_stopped: false,
        }
    }

    pub fn take_sent(&mut self) -> usize {
        std::mem::take(&mut self.sent_in_callback)
    }
}

/// Show IPv4 peers of a dual-stack socket as plain IPv4 (`1.2.3.4`, not `::ffff:1.2.3.4`).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The [`Transport`] a protocol sees while the driver calls it.
pub(super) struct StreamTransport<'a, S> {
    pub stream: &'a mut S,
    pub outbox: &'a mut Outbox,
}

impl<S: ConnectionIo> Transport for StreamTransport<'_, S> {
    fn write(&mut self, data: &[u8]) {
        let outbox = &mut *self.outbox;
        if data.is_empty() || outbox.closing != Closing::No || outbox.error.is_some() {
            return;
        }
        let mut rest = data;
        if outbox.pending.is_empty() {
            match self.stream.try_write(data) {
                Ok(n) => {
                    outbox.sent_in_callback += n;
                    rest = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    outbox.error = Some(e);
                    return;
                }
            }
        }
        if !rest.is_empty() {
            outbox.pending.extend_from_slice(rest);
        }
    }

    /// One `writev` when nothing is pending (the socket keeps their order), and what it did
    /// not take is buffered exactly as [`Transport::write`] buffers: the same backpressure.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) {
        let outbox = &mut *self.outbox;
        if outbox.closing != Closing::No || outbox.error.is_some() {
            return;
        }
        let mut taken = 0;
        if outbox.pending.is_empty() && bufs.iter().any(|buf| !buf.is_empty()) {
            match self.stream.try_write_vectored(bufs) {
                Ok(n) => {
                    outbox.sent_in_callback += n;
                    taken = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    outbox.error = Some(e);
                    return;
                }
            }
        }
        for buf in bufs {
            let skip = taken.min(buf.len());
            taken -= skip;
            if skip < buf.len() {
                outbox.pending.extend_from_slice(&buf[skip..]);
            }
        }
    }

    fn lose_connection(&mut self) {
        self.close_for(LossReason::Closed);
    }

    fn abort_connection(&mut self) {
        self.abort_for(LossReason::Aborted);
    }

    fn pause_reading(&mut self) {
        self.outbox.read_paused = true;
    }

    /// Not after `stop_reading`, which is final (see [`Transport::stop_reading`]).
    fn resume_reading(&mut self) {
        self.outbox.read_paused = self.outbox.read_stopped;
    }

    fn stop_reading(&mut self) {
        self.outbox.read_paused = true;
        self.outbox.read_stopped = true;
    }

    fn close_for(&mut self, reason: LossReason) {
        if self.outbox.closing == Closing::No {
            self.outbox.closing = Closing::Graceful(reason);
        }
    }

    fn abort_for(&mut self, reason: LossReason) {
        if !matches!(self.outbox.closing, Closing::Abort(_)) {
            self.outbox.closing = Closing::Abort(reason);
        }
    }

    fn peer_addr(&self) -> SocketAddr {
        self.stream
            .peer_addr()
            .map(canonical)
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn local_addr(&self) -> SocketAddr {
        self.stream
            .local_addr()
            .map(canonical)
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}
