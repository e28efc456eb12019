//! `churn`: loops that connect, echo one message, verify it, and close, over and over. Reports
//! connections/s and the latency of the whole connect-echo cycle.
//!
//! The client closes first, so TIME_WAIT lands on the client's ports; connections are spread
//! over several 127.0.0.x source addresses (see `connect.rs`) so the run is not limited by the
//! ephemeral port range. A failed connect is counted and retried after a short pause, never in a
//! tight loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::cli::ChurnArgs;
use crate::connect::Connector;
use crate::pattern::Pattern;
use crate::procstat::Server;
use crate::run::{self, Clock, Counters};
use crate::tls::TlsClient;

/// Pause after a failed connection, so a refusing server is not hammered in a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

pub async fn run(
    args: &ChurnArgs,
    connector: Arc<Connector>,
    server: Option<Server>,
) -> Result<Value, String> {
    let c = &args.common;
    // Fail fast with a clear message if nothing listens, before starting the clock.
    drop(
        connector
            .connect()
            .await
            .map_err(|e| format!("cannot start: {e}"))?,
    );
    let pattern = Arc::new(Pattern::new(args.size));
    let counters = Arc::new(Counters::default());
    let clock = Clock::starting_now(c.warmup, c.duration);
    run::spawn_progress("churn", "conns", clock, counters.clone(), c.quiet);
    let cpu = server.map(|s| tokio::spawn(run::server_cpu_over_window(s, clock)));

    let tls = match &args.tls.tls_ca {
        Some(ca) => Some(TlsClient::new(ca, &args.tls.tls_server_name)?),
        None => None,
    };
    let mut tasks = Vec::new();
    for id in 0..args.connections {
        let (p, k, conn) = (pattern.clone(), counters.clone(), connector.clone());
        let tls = tls.clone();
        let size = args.size;
        let proxy_v2 = args.proxy_v2;
        let io_timeout = c.io_timeout;
        tasks.push(tokio::spawn(async move {
            let mut hist = run::latency_histogram();
            let mut done = 0u64;
            let mut offset = Pattern::start_for(id);
            let mut buf = vec![0u8; size];
            while Instant::now() < clock.end {
                let began = Instant::now();
                let msg = p.window(offset, size);
                offset += size as u64 + 1;
                let cycle = async {
                    let mut s = conn.connect().await?;
                    if let Some(tls) = &tls {
                        // A new TLS session per connection: full handshakes, no resumption.
                        let mut s = tls.handshake(s).await?;
                        return run::echo_any(&mut s, msg, &mut buf).await;
                    }
                    if proxy_v2 {
                        let header = proxy_v2_header(&s);
                        run::echo_after(&mut s, &header, msg, &mut buf).await
                    } else {
                        run::echo(&mut s, msg, &mut buf).await
                    }
                };
                match tokio::time::timeout(io_timeout, cycle).await {
                    Ok(Ok(())) if buf == msg => {
                        let ended = Instant::now();
                        k.ops.fetch_add(1, Ordering::Relaxed);
                        k.bytes_verified.fetch_add(size as u64, Ordering::Relaxed);
                        if clock.counts(began, ended) {
                            done += 1;
                            hist.saturating_record((ended - began).as_nanos() as u64);
                        }
                    }
                    Ok(Ok(())) => {
                        k.mismatches.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(Err(_)) | Err(_) => {
                        k.error();
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            (done, hist)
        }));
    }

    let (connections, latency) = run::gather(tasks, "churn").await?;
    let cpu = match cpu {
        Some(h) => Some(h.await.map_err(|e| format!("server sampler failed: {e}"))?),
        None => None,
    };
    Ok(json!({
        "connections": args.connections,
        "size": args.size,
        "source_ips": connector.source_count(),
        "messages": connections,
        "conns_per_s": connections as f64 / clock.window_secs(),
        "latency_us": run::latency_json(&latency),
        "bytes_verified": Counters::get(&counters.bytes_verified),
        "errors": Counters::get(&counters.errors),
        "mismatches": Counters::get(&counters.mismatches),
        "server": run::server_json(server, cpu, connections as f64, "conn"),
    }))
}

/// A PROXY v2 header (PROXY command, TCP over IPv4 or IPv6) naming this connection's own
/// endpoints, as a load balancer in front of the server would send.
fn proxy_v2_header(stream: &tokio::net::TcpStream) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let (src, dst) = match (stream.local_addr(), stream.peer_addr()) {
        (Ok(s), Ok(d)) => (s, d),
        _ => return Vec::new(),
    };
    match (src, dst) {
        (std::net::SocketAddr::V4(s), std::net::SocketAddr::V4(d)) => {
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            let v6 = |a: std::net::SocketAddr| match a {
                std::net::SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
                std::net::SocketAddr::V6(a) => *a.ip(),
            };
            h.extend_from_slice(&[0x21, 0x21, 0, 36]);
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&v6(d).octets());
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}
