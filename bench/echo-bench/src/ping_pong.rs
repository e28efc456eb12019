//! `ping-pong`: N connections, each sending one M-byte message and waiting for its complete,
//! verified echo before sending the next. Reports messages/s and round-trip latency.
//!
//! A message counts when it was sent inside the measured window and its echo arrived inside it.
//! The whole connection loop is bounded by `end + io_timeout`, not each read, so the hot path
//! has no timer: a stalled echo shows up as an error at the end of the run.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cli::PingPongArgs;
use crate::connect::Connector;
use crate::pattern::Pattern;
use crate::procstat::Server;
use crate::run::{self, Clock, Counters};

/// What one connection measured.
struct ConnResult {
    messages: u64,
    latency: Histogram<u64>,
}

pub async fn run(
    args: &PingPongArgs,
    connector: Arc<Connector>,
    server: Option<Server>,
) -> Result<Value, String> {
    let c = &args.common;
    let streams = open_all(&connector, args.connections).await?;
    let pattern = Arc::new(Pattern::new(args.size));
    let counters = Arc::new(Counters::default());
    let clock = Clock::starting_now(c.warmup, c.duration);
    run::spawn_progress("ping-pong", "msgs", clock, counters.clone(), c.quiet);
    let cpu = server.map(|s| tokio::spawn(run::server_cpu_over_window(s, clock)));

    let mut tasks = Vec::with_capacity(streams.len());
    for (id, stream) in streams.into_iter().enumerate() {
        let (pattern, counters) = (pattern.clone(), counters.clone());
        let size = args.size;
        let bound = clock.end + c.io_timeout;
        tasks.push(tokio::spawn(async move {
            let mut result = ConnResult {
                messages: 0,
                latency: run::latency_histogram(),
            };
            let work = echo_loop(id, stream, size, &pattern, clock, &counters, &mut result);
            match tokio::time::timeout_at(bound, work).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => counters.error(),
            }
            result
        }));
    }

    let mut messages = 0;
    let mut latency = run::latency_histogram();
    for t in tasks {
        let r = t
            .await
            .map_err(|e| format!("connection task failed: {e}"))?;
        messages += r.messages;
        latency
            .add(&r.latency)
            .map_err(|e| format!("merging histograms: {e}"))?;
    }
    let cpu = match cpu {
        Some(h) => Some(h.await.map_err(|e| format!("server sampler failed: {e}"))?),
        None => None,
    };

    let window = clock.window_secs();
    Ok(json!({
        "connections": args.connections,
        "size": args.size,
        "messages": messages,
        "msgs_per_s": messages as f64 / window,
        "latency_us": run::latency_json(&latency),
        "bytes_verified": Counters::get(&counters.bytes_verified),
        "errors": Counters::get(&counters.errors),
        "mismatches": Counters::get(&counters.mismatches),
        "server": run::server_json(server, cpu, messages as f64, "msg"),
    }))
}

/// Opens every connection before the clock starts, so connect time is not load time.
async fn open_all(connector: &Connector, n: usize) -> Result<Vec<TcpStream>, String> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let s = connector
            .connect()
            .await
            .map_err(|e| format!("connection {} of {n}: {e}", streams.len() + 1))?;
        streams.push(s);
    }
    Ok(streams)
}

async fn echo_loop(
    id: usize,
    mut stream: TcpStream,
    size: usize,
    pattern: &Pattern,
    clock: Clock,
    counters: &Counters,
    result: &mut ConnResult,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; size];
    let mut offset = Pattern::start_for(id);
    loop {
        let began = Instant::now();
        if began >= clock.end {
            return Ok(());
        }
        let msg = pattern.window(offset, size);
        run::echo(&mut stream, msg, &mut buf).await?;
        let ended = Instant::now();
        if buf != msg {
            counters.mismatches.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        counters
            .bytes_verified
            .fetch_add(size as u64, Ordering::Relaxed);
        counters.ops.fetch_add(1, Ordering::Relaxed);
        if clock.counts(began, ended) {
            result.messages += 1;
            result
                .latency
                .saturating_record((ended - began).as_nanos() as u64);
        }
        offset += size as u64 + 1;
    }
}
