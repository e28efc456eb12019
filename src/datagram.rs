//! The datagram half of the framework: Twisted's `DatagramProtocol`, for UDP.
//!
//! There is no connection: one protocol instance serves a whole socket, and every datagram
//! arrives with its sender. Reply through the [`DatagramTransport`], which sends one datagram
//! per `write`. UDP has no backpressure: a datagram the socket cannot take now is dropped (and
//! counted by the server), never queued, so memory does not grow with load.

use std::net::SocketAddr;

/// Reacts to datagrams arriving on one socket.
pub trait DatagramProtocol: Send + 'static {
    /// A datagram arrived from `peer`. `data` is only valid during the call; it may be empty
    /// (an empty datagram is a datagram).
    fn datagram_received(
        &mut self,
        data: &[u8],
        peer: SocketAddr,
        transport: &mut dyn DatagramTransport,
    );
}

/// The protocol's handle on its socket.
pub trait DatagramTransport {
    /// Send `data` as one datagram to `peer`, now or never: if the socket cannot take it, it is
    /// dropped and counted in `echo_datagrams_dropped_total`.
    fn write(&mut self, data: &[u8], peer: SocketAddr);
    /// The socket's own address.
    fn local_addr(&self) -> SocketAddr;
}

/// A datagram transport that records what is sent, for unit tests of datagram protocols.
#[derive(Debug, Default)]
pub struct MemoryDatagramTransport {
    /// Every datagram written, with its destination, in order.
    pub sent: Vec<(Vec<u8>, SocketAddr)>,
}

impl DatagramTransport for MemoryDatagramTransport {
    fn write(&mut self, data: &[u8], peer: SocketAddr) {
        self.sent.push((data.to_vec(), peer));
    }

    fn local_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8000))
    }
}
