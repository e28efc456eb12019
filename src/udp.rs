//! The UDP server: one task per socket runs a [`DatagramProtocol`] over it.
//!
//! Each datagram is read into one 64 KiB buffer (larger than any UDP payload, so nothing is
//! truncated), handed to the protocol with its sender, and the protocol's replies are sent at
//! once with `try_send_to`. UDP has no backpressure: when the socket cannot take a reply
//! (EAGAIN: its send buffer is full; ENOBUFS/ENOMEM), the reply is dropped and counted in
//! `echo_datagrams_dropped_total{reason}`. Nothing is queued, so memory never grows with load.
//!
//! There is no span per datagram: a span per packet would multiply the tracing cost by the
//! packet rate and carry no lifecycle to describe. UDP sockets keep serving through the drain
//! and close when the process exits; connection limits, timeouts and the drain phases apply to
//! stream listeners only.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

use crate::datagram::{DatagramProtocol, DatagramTransport};
use crate::telemetry::{DatagramMetrics, TrafficMetrics};

/// Largest datagram read: more than the largest UDP payload (65,507 bytes over IPv4, 65,527
/// over IPv6), so a datagram is never truncated.
pub const MAX_DATAGRAM: usize = 64 * 1024;

/// A UDP socket and the protocol serving it.
pub struct UdpServer<P> {
    socket: UdpSocket,
    protocol: P,
    metrics: DatagramMetrics,
    traffic: Arc<TrafficMetrics>,
}

impl<P: DatagramProtocol> UdpServer<P> {
    /// Serve `socket` with `protocol`, counting into `metrics` (this listener's children) and
    /// the shared byte counters.
    pub fn new(
        socket: UdpSocket,
        protocol: P,
        metrics: DatagramMetrics,
        traffic: Arc<TrafficMetrics>,
    ) -> Self {
        UdpServer {
            socket,
            protocol,
            metrics,
            traffic,
        }
    }

    /// Receive and dispatch datagrams until the task is dropped.
    pub async fn run(mut self) {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        loop {
            let (len, peer) = match self.socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(err) => {
                    // Per-datagram errors (a port-unreachable report, ...) say nothing about
                    // the socket: count, note at debug level, and keep serving.
                    self.metrics.receive_errors.inc();
                    tracing::debug!(error = %err, "UDP receive failed");
                    if is_resource_exhaustion(&err) {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                    continue;
                }
            };
            self.metrics.received.inc();
            self.traffic.received_bytes.inc_by(len as u64);
            let mut transport = SocketDatagramTransport {
                socket: &self.socket,
                metrics: &self.metrics,
                traffic: &self.traffic,
            };
            self.protocol
                .datagram_received(&buffer[..len], peer, &mut transport);
        }
    }
}

fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM))
}

/// The transport a datagram protocol sees: sends now or drops.
struct SocketDatagramTransport<'a> {
    socket: &'a UdpSocket,
    metrics: &'a DatagramMetrics,
    traffic: &'a TrafficMetrics,
}

impl DatagramTransport for SocketDatagramTransport<'_> {
    fn write(&mut self, data: &[u8], peer: SocketAddr) {
        match self.socket.try_send_to(data, peer) {
            Ok(sent) => {
                self.metrics.sent.inc();
                self.traffic.sent_bytes.inc_by(sent as u64);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                self.metrics.dropped_would_block.inc();
            }
            Err(err) if is_resource_exhaustion(&err) => self.metrics.dropped_no_buffers.inc(),
            Err(err) => {
                self.metrics.dropped_error.inc();
                tracing::debug!(error = %err, %peer, "UDP send failed");
            }
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// Bind a UDP socket on `addr`. `[::]` is dual-stack, and falls back to `0.0.0.0` on hosts
/// without IPv6, as the stream listeners do.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    match bind_exactly(addr) {
        Err(err) => match crate::server::ipv4_fallback(addr, &err) {
            Some(v4) => {
                tracing::warn!(requested = %addr, using = %v4, error = %err, "no IPv6 here: UDP on IPv4 only");
                bind_exactly(v4)
            }
            None => Err(err),
        },
        ok => ok,
    }
}

fn bind_exactly(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::EchoDatagram;
    use crate::state::ServiceState;
    use crate::telemetry::Metrics;

    #[tokio::test]
    async fn echoes_datagrams_of_every_size_and_counts_them() {
        let state = ServiceState::new(None);
        let metrics = Metrics::register(&state).unwrap();
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = metrics.datagrams.listener("udp");
        let server = UdpServer::new(socket, EchoDatagram, listener, metrics.traffic.clone());
        let task = tokio::spawn(server.run());

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut back = vec![0u8; MAX_DATAGRAM];
        let sizes = [0usize, 1, 1472, 8192, 65_507];
        for (i, &size) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|b| (b * 31 + i) as u8).collect();
            client.send_to(&data, addr).await.unwrap();
            let (n, from) = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                client.recv_from(&mut back),
            )
            .await
            .expect("an echo")
            .unwrap();
            assert_eq!(from, addr);
            assert_eq!(&back[..n], &data[..], "size {size}");
        }
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("echo_datagrams_received_total{listener=\"udp\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("echo_datagrams_sent_total{listener=\"udp\"} 5"),
            "{text}"
        );
        let total: usize = sizes.iter().sum();
        assert!(
            text.contains(&format!("echo_received_bytes_total {total}")),
            "{text}"
        );
        task.abort();
    }
}
