//! `idle`: open N connections, prove each is served (one verified echo), hold them all for
//! `--duration`, prove they are still served, close them. Reports how many were held and, with
//! `--server-pid`, what they cost the server: RSS per connection =
//! (RSS with N held - RSS before) / N, where "before" is read after `--prewarm` connections
//! have come and gone, so it is the marginal cost of a connection, not the server's start-up.
//!
//! While holding, a fresh connection echoes once a second (the "probe"), to show a server full
//! of idle connections still answers promptly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::cli::IdleArgs;
use crate::connect::Connector;
use crate::pattern::Pattern;
use crate::procstat::Server;
use crate::run::{self, Counters};

/// Pause between closing the pre-warm connections and reading "RSS before".
const PREWARM_SETTLE: Duration = Duration::from_millis(200);
/// How long after closing everything the server's RSS is read again.
const AFTER_CLOSE_WAIT: Duration = Duration::from_secs(1);

pub async fn run(
    args: &IdleArgs,
    connector: Arc<Connector>,
    server: Option<Server>,
) -> Result<Value, String> {
    let c = &args.common;
    let pattern = Arc::new(Pattern::new(args.size.max(1)));
    let counters = Arc::new(Counters::default());
    let rss = |s: Option<Server>| s.and_then(|s| s.rss_kib().ok());
    prewarm(args, &connector, &pattern).await;
    let rss_before = rss(server);

    // Open: a few workers pull connection numbers from a shared counter.
    let opened_at = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::with_capacity(args.connections)));
    let progress = spawn_open_progress(args.connections, counters.clone(), c.quiet);
    let mut workers = Vec::new();
    for _ in 0..args.connect_concurrency.min(args.connections) {
        let (next, held, k, p, conn) = (
            next.clone(),
            held.clone(),
            counters.clone(),
            pattern.clone(),
            connector.clone(),
        );
        let (n, size) = (args.connections, args.size);
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= n {
                    break;
                }
                match open_one(&conn, id, size, &p, &k).await {
                    Some(s) => mine.push((id, s)),
                    None => k.error(),
                }
            }
            held.lock().await.extend(mine);
        }));
    }
    for w in workers {
        w.await.map_err(|e| format!("connect task failed: {e}"))?;
    }
    progress.abort();
    let open_secs = opened_at.elapsed().as_secs_f64();
    let streams = std::mem::take(&mut *held.lock().await);
    let opened = streams.len();
    if opened == 0 {
        return Err(format!("no connection to {} could be opened", c.target));
    }
    if !c.quiet {
        eprintln!("echo-bench idle: {opened} connections open in {open_secs:.1}s; holding");
    }

    // Settle, then measure what holding them costs.
    tokio::time::sleep(c.warmup).await;
    let rss_held = rss(server);

    // Hold, probing with a fresh connection once a second.
    let hold_end = Instant::now() + c.duration;
    let mut probe = run::latency_histogram();
    let mut probe_failures = 0u64;
    let mut rss_max = rss_held;
    while Instant::now() < hold_end {
        let began = Instant::now();
        match open_one(
            &connector,
            usize::MAX / 2,
            args.size.max(1),
            &pattern,
            &counters,
        )
        .await
        {
            Some(_) => probe.saturating_record(began.elapsed().as_nanos() as u64),
            None => probe_failures += 1,
        }
        rss_max = rss_max.max(rss(server));
        let next_probe = (began + Duration::from_secs(1)).min(hold_end);
        tokio::time::sleep_until(next_probe).await;
    }

    // Prove every held connection is still served.
    let still_held = check_all(
        streams,
        args.size,
        args.connect_concurrency,
        c.io_timeout,
        pattern.clone(),
        counters.clone(),
    )
    .await;
    tokio::time::sleep(AFTER_CLOSE_WAIT).await;
    let rss_after = rss(server);

    let per_conn = match (rss_before, rss_held) {
        (Some(b), Some(h)) => json!((h as f64 - b as f64) / opened as f64),
        _ => Value::Null,
    };
    let server_obj = server.map(|s| {
        json!({
            "pid": s.pid,
            "rss_before_kib": rss_before,
            "rss_held_kib": rss_held,
            "rss_max_kib": rss_max,
            "rss_after_close_kib": rss_after,
            "rss_kib": rss_held,
            "rss_per_conn_kib": per_conn,
        })
    });
    Ok(json!({
        "connections": args.connections,
        "size": args.size,
        "source_ips": connector.source_count(),
        "opened": opened,
        "held": still_held,
        "open_s": open_secs,
        "opens_per_s": opened as f64 / open_secs,
        "probe_latency_us": run::latency_json(&probe),
        "probe_failures": probe_failures,
        "bytes_verified": Counters::get(&counters.bytes_verified),
        "errors": Counters::get(&counters.errors),
        "mismatches": Counters::get(&counters.mismatches),
        "server": server_obj.unwrap_or(Value::Null),
    }))
}

/// Opens, echoes on and closes `--prewarm` connections, then lets the server settle.
async fn prewarm(args: &IdleArgs, connector: &Arc<Connector>, pattern: &Arc<Pattern>) {
    if args.prewarm == 0 {
        return;
    }
    let scratch = Counters::default();
    let mut warm = Vec::with_capacity(args.prewarm);
    for id in 0..args.prewarm {
        if let Some(s) = open_one(connector, id, args.size.max(1), pattern, &scratch).await {
            warm.push(s);
        }
    }
    drop(warm);
    tokio::time::sleep(PREWARM_SETTLE).await;
}

/// Connects and, if `size > 0`, echoes one verified message, within the I/O timeout.
async fn open_one(
    conn: &Connector,
    id: usize,
    size: usize,
    pattern: &Pattern,
    counters: &Counters,
) -> Option<TcpStream> {
    let mut s = conn.connect().await.ok()?;
    if size > 0 {
        let msg = pattern.window(Pattern::start_for(id), size);
        if !echo_verified(&mut s, msg, counters, conn.io_timeout()).await {
            return None;
        }
    }
    counters.ops.fetch_add(1, Ordering::Relaxed);
    Some(s)
}

/// Sends `msg`, reads the echo and compares it, all within `timeout`.
async fn echo_verified(
    s: &mut TcpStream,
    msg: &[u8],
    counters: &Counters,
    timeout: Duration,
) -> bool {
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(timeout, run::echo(s, msg, &mut buf)).await {
        Ok(Ok(())) if buf == msg => {
            counters
                .bytes_verified
                .fetch_add(msg.len() as u64, Ordering::Relaxed);
            true
        }
        Ok(Ok(())) => {
            counters.mismatches.fetch_add(1, Ordering::Relaxed);
            false
        }
        _ => false,
    }
}

/// Echoes once more on every held connection (or, with `--size 0`, checks that the server has
/// not closed it), `workers` at a time; returns how many passed. Closes them all.
async fn check_all(
    streams: Vec<(usize, TcpStream)>,
    size: usize,
    workers: usize,
    timeout: Duration,
    pattern: Arc<Pattern>,
    counters: Arc<Counters>,
) -> usize {
    let per_task = streams.len().div_ceil(workers.max(1)).max(1);
    let mut streams = streams.into_iter();
    let mut tasks = Vec::new();
    loop {
        let chunk: Vec<_> = streams.by_ref().take(per_task).collect();
        if chunk.is_empty() {
            break;
        }
        let (p, k) = (pattern.clone(), counters.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for (id, mut s) in chunk {
                let served = if size == 0 {
                    // Still open means nothing to read (WouldBlock); Ok(0) is the server's FIN.
                    let mut b = [0u8; 1];
                    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                } else {
                    let msg = p.window(Pattern::start_for(id) + 1, size);
                    echo_verified(&mut s, msg, &k, timeout).await
                };
                if served {
                    ok += 1;
                } else {
                    k.error();
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap_or(0);
    }
    ok
}

/// A progress line per second while connections are being opened.
fn spawn_open_progress(
    total: usize,
    counters: Arc<Counters>,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!(
                "echo-bench idle: opened {}/{total} errors {}",
                Counters::get(&counters.ops),
                Counters::get(&counters.errors)
            );
        }
    })
}
