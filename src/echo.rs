//! The echo protocol: every byte received is written back. That is the whole service; the rest
//! of the crate is the framework, the policies and the telemetry around it.

use std::net::SocketAddr;

use crate::datagram::{DatagramProtocol, DatagramTransport};
use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::Protocol;
use crate::transport::Transport;

/// Writes back whatever it receives.
#[derive(Debug, Default)]
pub struct Echo;

impl Protocol for Echo {
    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        transport.write(data);
    }
}

/// Builds an [`Echo`] for every connection.
#[derive(Debug, Default)]
pub struct EchoFactory;

impl Factory for EchoFactory {
    type Protocol = Echo;

    fn build_protocol(&self, _conn: &ConnectionInfo) -> Result<Echo, Refusal> {
        Ok(Echo)
    }
}

/// Sends every datagram back to its sender, unchanged (empty ones too).
#[derive(Debug, Default)]
pub struct EchoDatagram;

impl DatagramProtocol for EchoDatagram {
    fn datagram_received(
        &mut self,
        data: &[u8],
        peer: SocketAddr,
        transport: &mut dyn DatagramTransport,
    ) {
        transport.write(data, peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagram::MemoryDatagramTransport;
    use crate::transport::MemoryTransport;

    #[test]
    fn datagrams_go_back_to_their_senders_unchanged() {
        let (a, b) = (
            SocketAddr::from(([10, 0, 0, 1], 5000)),
            SocketAddr::from(([10, 0, 0, 2], 6000)),
        );
        let mut echo = EchoDatagram;
        let mut transport = MemoryDatagramTransport::default();
        echo.datagram_received(b"one", a, &mut transport);
        echo.datagram_received(b"", b, &mut transport);
        assert_eq!(transport.sent, vec![(b"one".to_vec(), a), (Vec::new(), b)]);
    }

    #[test]
    fn echoes_bytes_fed_one_at_a_time() {
        let payload: Vec<u8> = (0..=255u8).chain([0, 0xff, 0xc3, 0x28]).collect();
        let mut echo = Echo;
        let mut transport = MemoryTransport::new();
        echo.connection_made(&mut transport);
        for byte in &payload {
            echo.data_received(std::slice::from_ref(byte), &mut transport);
        }
        assert_eq!(transport.written(), payload.as_slice());
        assert!(!transport.is_disconnecting());
    }

    #[test]
    fn echoes_arbitrary_chunking_unchanged() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut echo = Echo;
        let mut transport = MemoryTransport::new();
        for chunk in payload.chunks(7) {
            echo.data_received(chunk, &mut transport);
        }
        assert_eq!(transport.take_written(), payload);
        assert!(transport.written().is_empty());
    }
}
