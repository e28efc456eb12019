//! Baseline for `make bench`: the echo server exactly as tokio's README shows it.
//!
//! A 1 KiB buffer on the task's stack and Nagle left on: this is what most people write first,
//! so echo-service is measured against it (idle memory parity, CPU per message). Its weakness
//! is known and kept on purpose: with 4 KiB messages it writes the echo in 1 KiB pieces and
//! Nagle + delayed ACK hold each message back ~40 ms.
//!
//! Usage: `tokio_readme_echo 127.0.0.1:8000` (the only difference from the README: the listen
//! address comes from argv[1]).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let listener = TcpListener::bind(&addr).await?;

    loop {
        let (mut socket, _) = listener.accept().await?;

        tokio::spawn(async move {
            let mut buf = [0; 1024];

            // In a loop, read data from the socket and write the data back.
            loop {
                let n = match socket.read(&mut buf).await {
                    // socket closed
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("failed to read from socket; err = {:?}", e);
                        return;
                    }
                };

                // Write the data back
                if let Err(e) = socket.write_all(&buf[0..n]).await {
                    eprintln!("failed to write to socket; err = {:?}", e);
                    return;
                }
            }
        });
    }
}
