//! `udp`: N sockets, each sending one datagram and waiting for its verified echo before the
//! next. Reports datagrams/s and round-trip latency, and counts losses: a datagram whose echo
//! does not come back within [`LOSS_TIMEOUT`] is lost (UDP may drop; the run goes on).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::cli::UdpArgs;
use crate::pattern::Pattern;
use crate::procstat::Server;
use crate::run::{self, Clock, Counters};

/// How long a datagram's echo may take before it counts as lost.
pub const LOSS_TIMEOUT: Duration = Duration::from_millis(200);
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

pub async fn run(
    args: &UdpArgs,
    target: SocketAddr,
    server: Option<Server>,
) -> Result<Value, String> {
    if args.size > MAX_DATAGRAM {
        return Err(format!(
            "--size {} is larger than a UDP datagram ({MAX_DATAGRAM})",
            args.size
        ));
    }
    let c = &args.common;
    let mut sockets = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("a valid wildcard");
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(|e| format!("bind: {e}"))?;
        socket
            .connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
        sockets.push(socket);
    }
    let pattern = Arc::new(Pattern::new(args.size));
    let counters = Arc::new(Counters::default());
    let lost = Arc::new(AtomicU64::new(0));
    let clock = Clock::starting_now(c.warmup, c.duration);
    run::spawn_progress("udp", "datagrams", clock, counters.clone(), c.quiet);
    let cpu = server.map(|s| tokio::spawn(run::server_cpu_over_window(s, clock)));

    let mut tasks = Vec::new();
    for (id, socket) in sockets.into_iter().enumerate() {
        let (p, k, lost) = (pattern.clone(), counters.clone(), lost.clone());
        let size = args.size;
        tasks.push(tokio::spawn(async move {
            let mut hist = run::latency_histogram();
            let mut done = 0u64;
            let mut offset = Pattern::start_for(id);
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            while Instant::now() < clock.end {
                let began = Instant::now();
                let msg = p.window(offset, size);
                offset += size as u64 + 1;
                if socket.send(msg).await.is_err() {
                    k.error();
                    continue;
                }
                // Read until this datagram's echo: a late echo of an earlier (lost) one is
                // skipped, since it no longer matches what is outstanding.
                let answered = loop {
                    match tokio::time::timeout(LOSS_TIMEOUT, socket.recv(&mut buf)).await {
                        Ok(Ok(n)) if buf[..n] == *msg => break true,
                        Ok(Ok(_)) => continue,
                        Ok(Err(_)) => {
                            k.error();
                            break false;
                        }
                        Err(_) => break false,
                    }
                };
                if !answered {
                    lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let ended = Instant::now();
                k.ops.fetch_add(1, Ordering::Relaxed);
                k.bytes_verified.fetch_add(size as u64, Ordering::Relaxed);
                if clock.counts(began, ended) {
                    done += 1;
                    hist.saturating_record((ended - began).as_nanos() as u64);
                }
            }
            (done, hist)
        }));
    }
    let (datagrams, latency) = run::gather(tasks, "udp").await?;
    let cpu = match cpu {
        Some(h) => Some(h.await.map_err(|e| format!("server sampler failed: {e}"))?),
        None => None,
    };
    Ok(json!({
        "connections": args.connections,
        "size": args.size,
        "messages": datagrams,
        "msgs_per_s": datagrams as f64 / clock.window_secs(),
        "lost": lost.load(Ordering::Relaxed),
        "latency_us": run::latency_json(&latency),
        "bytes_verified": Counters::get(&counters.bytes_verified),
        "errors": Counters::get(&counters.errors),
        "mismatches": Counters::get(&counters.mismatches),
        "server": run::server_json(server, cpu, datagrams as f64, "msg"),
    }))
}
