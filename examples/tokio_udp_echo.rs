//! Baseline for `make bench`: the bare tokio UDP echo, the bar for echo-service's UDP port.
//!
//! One socket, one task, one 64 KiB buffer: receive, send back with `send_to`, repeat. This is
//! the simplest correct UDP echo in tokio, and echo-service's UDP server does the same work
//! plus its counters.
//!
//! Usage: `tokio_udp_echo 127.0.0.1:7000`.

use tokio::net::UdpSocket;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".to_string());
    let socket = UdpSocket::bind(&addr).await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await?;
        // Like echo-service: a reply the socket cannot take now is dropped, not awaited.
        let _ = socket.try_send_to(&buf[..n], peer);
    }
}
