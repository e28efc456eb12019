//! What every mode shares while it runs: the clock that splits warm-up from the measured window,
//! live counters, the once-a-second progress line, the server's CPU over the window, and the
//! latency histogram summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::procstat::Server;

/// The phases of a run: load starts at `start`, counting at `measure_start`, all stops at `end`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub start: Instant,
    pub measure_start: Instant,
    pub end: Instant,
}

impl Clock {
    pub fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now();
        let measure_start = start + warmup;
        Clock {
            start,
            measure_start,
            end: measure_start + duration,
        }
    }

    /// Length of the measured window in seconds.
    pub fn window_secs(&self) -> f64 {
        (self.end - self.measure_start).as_secs_f64()
    }

    /// Whether an operation that began at `began` and ended at `ended` counts.
    pub fn counts(&self, began: Instant, ended: Instant) -> bool {
        began >= self.measure_start && ended <= self.end
    }
}

/// Live totals, shared by all connection tasks and read by the progress line.
#[derive(Default)]
pub struct Counters {
    /// Completed operations (messages, connections) since load started, warm-up included.
    pub ops: AtomicU64,
    /// Echoed bytes compared equal to what was sent, warm-up included.
    pub bytes_verified: AtomicU64,
    /// Connects, reads or writes that failed or timed out.
    pub errors: AtomicU64,
    /// Echoes that came back different from what was sent.
    pub mismatches: AtomicU64,
}

impl Counters {
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Messages up to this size are written, then read back. Larger ones are written and read at
/// the same time: the echo of a big message fills the socket buffers before we finish writing
/// it, and a client that only reads afterwards deadlocks with the server.
const SEQUENTIAL_MAX: usize = 16 * 1024;

/// Sends `msg` and reads its echo into `buf` (same length).
pub async fn echo(stream: &mut TcpStream, msg: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    if msg.len() <= SEQUENTIAL_MAX {
        stream.write_all(msg).await?;
        stream.read_exact(buf).await?;
    } else {
        let (mut rd, mut wr) = stream.split();
        tokio::try_join!(wr.write_all(msg), rd.read_exact(buf))?;
    }
    Ok(())
}

/// [`echo`] over any stream (TLS): small messages only (churn).
pub async fn echo_any<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
    buf: &mut [u8],
) -> std::io::Result<()> {
    stream.write_all(msg).await?;
    stream.read_exact(buf).await?;
    Ok(())
}

/// Like [`echo`], with `prefix` (a PROXY header) sent in the same write as the message and not
/// expected back. Small messages only (churn).
pub async fn echo_after(
    stream: &mut TcpStream,
    prefix: &[u8],
    msg: &[u8],
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut first = Vec::with_capacity(prefix.len() + msg.len());
    first.extend_from_slice(prefix);
    first.extend_from_slice(msg);
    stream.write_all(&first).await?;
    stream.read_exact(buf).await?;
    Ok(())
}

/// Prints one line a second on stderr until `end`: elapsed time, operations and their rate.
pub fn spawn_progress(
    mode: &'static str,
    unit: &'static str,
    clock: Clock,
    counters: Arc<Counters>,
    quiet: bool,
) {
    if quiet || clock.end - clock.start < Duration::from_secs(5) {
        return;
    }
    tokio::spawn(async move {
        let total = (clock.end - clock.start).as_secs();
        let mut last = 0u64;
        let mut tick =
            tokio::time::interval_at(clock.start + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            let now = tick.tick().await;
            if now > clock.end {
                break;
            }
            let ops = Counters::get(&counters.ops);
            let phase = if now < clock.measure_start {
                "warm-up"
            } else {
                "measuring"
            };
            eprintln!(
                "echo-bench {mode}: {:>3}s/{total}s {phase:<9} {unit} {ops} ({}/s) errors {}",
                (now - clock.start).as_secs(),
                ops - last,
                Counters::get(&counters.errors),
            );
            last = ops;
        }
    });
}

/// The server's CPU time over the measured window, sampled at its start and end.
pub async fn server_cpu_over_window(server: Server, clock: Clock) -> Result<Duration, String> {
    tokio::time::sleep_until(clock.measure_start).await;
    let before = server.cpu_time()?;
    tokio::time::sleep_until(clock.end).await;
    let after = server.cpu_time()?;
    Ok(after.saturating_sub(before))
}

/// A histogram of nanoseconds from 1 ns to 60 s at 3 significant digits.
/// Waits for per-task (operations counted, latency histogram) results and sums them.
pub async fn gather(
    tasks: Vec<tokio::task::JoinHandle<(u64, Histogram<u64>)>>,
    what: &str,
) -> Result<(u64, Histogram<u64>), String> {
    let mut total = 0u64;
    let mut latency = latency_histogram();
    for t in tasks {
        let (done, hist) = t.await.map_err(|e| format!("{what} task failed: {e}"))?;
        total += done;
        latency
            .add(&hist)
            .map_err(|e| format!("merging histograms: {e}"))?;
    }
    Ok((total, latency))
}

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Percentiles in microseconds.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    let us = |ns: u64| ns as f64 / 1000.0;
    json!({
        "samples": h.len(),
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "max": us(h.max()),
        "mean": h.mean() / 1000.0,
    })
}

/// The `server` object of a report: CPU per operation over the window and RSS at the end.
pub fn server_json(
    server: Option<Server>,
    cpu: Option<Result<Duration, String>>,
    ops: f64,
    op_name: &str,
) -> Value {
    let Some(server) = server else {
        return Value::Null;
    };
    let mut obj = json!({ "pid": server.pid });
    match cpu {
        Some(Ok(cpu)) => {
            obj["cpu_s"] = json!(cpu.as_secs_f64());
            if ops > 0.0 {
                obj[format!("cpu_us_per_{op_name}")] = json!(cpu.as_secs_f64() * 1e6 / ops);
            }
        }
        Some(Err(e)) => obj["cpu_error"] = json!(e),
        None => {}
    }
    match server.rss_kib() {
        Ok(kib) => obj["rss_kib"] = json!(kib),
        Err(e) => obj["rss_error"] = json!(e),
    }
    obj
}
