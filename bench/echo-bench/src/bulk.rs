//! `bulk`: each connection streams `size`-byte writes as fast as the server takes them while a
//! second task reads the echo back and compares it with the stream it sent. Reports MB/s
//! (10^6 bytes) of verified echo over the measured window.
//!
//! Writer and reader are separate tasks, so the server's backpressure (not our ping-pong) sets
//! the pace; both stop at the end of the window. With `--tls-ca` the connections speak TLS
//! (handshakes done before the clock starts).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cli::BulkArgs;
use crate::connect::Connector;
use crate::pattern::Pattern;
use crate::procstat::Server;
use crate::run::{self, Clock, Counters};
use crate::tls::TlsClient;

pub async fn run(
    args: &BulkArgs,
    connector: Arc<Connector>,
    server: Option<Server>,
) -> Result<Value, String> {
    let mut streams = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let s = connector
            .connect()
            .await
            .map_err(|e| format!("connection {} of {}: {e}", i + 1, args.connections))?;
        streams.push(s);
    }
    match &args.tls.tls_ca {
        None => {
            let halves = streams.into_iter().map(TcpStream::into_split).collect();
            stream(args, halves, server).await
        }
        Some(ca) => {
            let client = TlsClient::new(ca, &args.tls.tls_server_name)?;
            let mut halves = Vec::with_capacity(streams.len());
            for s in streams {
                let tls = client
                    .handshake(s)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                halves.push(tokio::io::split(tls));
            }
            stream(args, halves, server).await
        }
    }
}

/// Streams over every (read half, write half) pair: plain TCP halves or TLS ones, the same
/// code monomorphised for each.
async fn stream<R, W>(
    args: &BulkArgs,
    halves: Vec<(R, W)>,
    server: Option<Server>,
) -> Result<Value, String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let c = &args.common;
    let pattern = Arc::new(Pattern::new(args.size));
    let counters = Arc::new(Counters::default());
    let clock = Clock::starting_now(c.warmup, c.duration);
    run::spawn_progress("bulk", "bytes", clock, counters.clone(), c.quiet);
    let cpu = server.map(|s| tokio::spawn(run::server_cpu_over_window(s, clock)));

    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (id, (rd, wr)) in halves.into_iter().enumerate() {
        let start = Pattern::start_for(id);
        let (p, k) = (pattern.clone(), counters.clone());
        let size = args.size;
        writers.push(tokio::spawn(async move {
            let (wr, result) = write_loop(wr, start, size, &p, clock).await;
            if result.is_err() {
                k.error();
            }
            // Handed back, not dropped: dropping a write half sends FIN, and the server's
            // answering FIN could reach a reader that has not yet seen the window end.
            wr
        }));
        let (p, k) = (pattern.clone(), counters.clone());
        readers.push(tokio::spawn(async move {
            let (measured, result) = read_loop(rd, start, size, &p, clock, &k).await;
            if result.is_err() {
                k.error();
            }
            measured
        }));
    }
    let mut write_halves = Vec::new();
    for w in writers {
        write_halves.push(w.await.map_err(|e| format!("writer task failed: {e}"))?);
    }
    let mut measured = 0u64;
    for r in readers {
        measured += r.await.map_err(|e| format!("reader task failed: {e}"))?;
    }
    drop(write_halves);
    let cpu = match cpu {
        Some(h) => Some(h.await.map_err(|e| format!("server sampler failed: {e}"))?),
        None => None,
    };
    let window = clock.window_secs();
    let mib = measured as f64 / (1u64 << 20) as f64;
    Ok(json!({
        "connections": args.connections,
        "size": args.size,
        "bytes": measured,
        "mb_per_s": measured as f64 / window / 1e6,
        "bytes_verified": Counters::get(&counters.bytes_verified),
        "errors": Counters::get(&counters.errors),
        "mismatches": Counters::get(&counters.mismatches),
        "server": run::server_json(server, cpu, mib, "mib"),
    }))
}

/// Writes the pattern stream until the window ends (a write blocked at the end is abandoned).
/// Returns the write half so the caller decides when the FIN goes out.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut offset: u64,
    size: usize,
    pattern: &Pattern,
    clock: Clock,
) -> (W, std::io::Result<()>) {
    while Instant::now() < clock.end {
        let chunk = pattern.window(offset, size);
        match tokio::time::timeout_at(clock.end, wr.write_all(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (wr, Err(e)),
            Err(_) => break,
        }
        offset += size as u64;
    }
    (wr, Ok(()))
}

/// Reads and verifies the echo; returns the bytes that arrived inside the measured window,
/// and whether the connection failed (an early EOF is a failure).
async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    mut offset: u64,
    size: usize,
    pattern: &Pattern,
    clock: Clock,
    counters: &Counters,
) -> (u64, std::io::Result<()>) {
    let mut buf = vec![0u8; size];
    let mut measured = 0u64;
    loop {
        let n = match tokio::time::timeout_at(clock.end, rd.read(&mut buf)).await {
            Ok(Ok(0)) => return (measured, Err(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return (measured, Err(e)),
            Err(_) => return (measured, Ok(())),
        };
        if buf[..n] != *pattern.window(offset, n) {
            counters.mismatches.fetch_add(1, Ordering::Relaxed);
            return (measured, Ok(()));
        }
        offset += n as u64;
        counters
            .bytes_verified
            .fetch_add(n as u64, Ordering::Relaxed);
        counters.ops.fetch_add(n as u64, Ordering::Relaxed);
        let now = Instant::now();
        if now >= clock.measure_start && now <= clock.end {
            measured += n as u64;
        }
    }
}
