//! Baseline for `make bench`: the tokio README echo with a 64 KiB buffer and `TCP_NODELAY`.
//!
//! The "tuned bare tokio" bar: no Nagle collapse on 4 KiB messages and big reads for bulk
//! throughput, at the price of ~64 KiB per busy connection (heap, so idle connections that
//! have read once still hold it). echo-service must match its throughput while keeping the
//! README echo's idle memory.
//!
//! Usage: `tokio_nodelay_echo 127.0.0.1:8000`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Read buffer per connection.
const BUF_SIZE: usize = 64 * 1024;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let listener = TcpListener::bind(&addr).await?;

    loop {
        let (mut socket, _) = listener.accept().await?;
        if let Err(e) = socket.set_nodelay(true) {
            eprintln!("failed to set TCP_NODELAY; err = {:?}", e);
        }

        tokio::spawn(async move {
            let mut buf = vec![0; BUF_SIZE];

            loop {
                let n = match socket.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("failed to read from socket; err = {:?}", e);
                        return;
                    }
                };

                if let Err(e) = socket.write_all(&buf[0..n]).await {
                    eprintln!("failed to write to socket; err = {:?}", e);
                    return;
                }
            }
        });
    }
}
