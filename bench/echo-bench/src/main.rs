//! `echo-bench`: the load generator for echo-service and the baselines it is measured against.
//!
//! It exists because the usual tools do not fit an echo server: `wrk`/`h2load` speak HTTP,
//! `iperf3` speaks its own protocol, and there is no tcpkali here. Users pick an echo service to
//! load-test their networks, so ours must be shown never to be the bottleneck; that takes a
//! client that verifies every echoed byte, measures latency with a histogram, can hold 50k
//! connections from one process, and can read the server's own CPU and memory cost from `/proc`.
//! `make bench` (see `bench/README.md`) drives it; the fault tests reuse its idle mode.
//!
//! # Layout
//! - `cli.rs`: subcommands and options, parsers, the loopback check.
//! - `connect.rs`: connecting, spread over 127.0.0.x source addresses when ports run short.
//! - `pattern.rs`: the pseudo-random stream we send, so echoes can be compared byte for byte.
//! - `procstat.rs`: server CPU time and RSS from `/proc`; raising RLIMIT_NOFILE.
//! - `run.rs`: the run clock (warm-up, measured window), counters, progress line, summaries.
//! - `ping_pong.rs`, `bulk.rs`, `churn.rs`, `idle.rs`, `spread.rs`: one file per mode.
//!
//! Every run is bounded: each mode stops at the end of its window, and the whole run is wrapped
//! in a deadline (connect phase + warm-up + window + I/O timeouts + grace) past which it exits 1.

mod bulk;
mod churn;
mod cli;
mod connect;
mod idle;
mod pattern;
mod ping_pong;
mod procstat;
mod run;
mod spread;
mod tls;
mod udp;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

use cli::{Cli, Mode};
use connect::Connector;
use procstat::Server;

/// File descriptors kept free beyond the connections themselves (stdio, runtime, probes).
const FD_HEADROOM: u64 = 256;
/// Connections per source address in idle mode. Each has ~28k ports, but connect() slows down
/// sharply as one address fills up (19.5k took 4 s from one, 0.3 s per 10k from several).
const CONNS_PER_SOURCE_IP: usize = 10_000;
/// Source addresses churn uses, so TIME_WAIT on the client never runs out of ports.
const CHURN_SOURCE_IPS: u8 = 8;
/// Slack added to a run's time bound for start-up and reporting.
const BOUND_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    // clap prints usage errors itself and exits 2.
    let cli = Cli::parse();
    let plan = match Plan::new(&cli.mode) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("echo-bench: error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("echo-bench: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let common = cli.mode.common();
    let result = runtime.block_on(async {
        match tokio::time::timeout(plan.bound, run_mode(&cli.mode, &plan)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the run exceeded its time bound of {:.0}s (server stalled?)",
                plan.bound.as_secs_f64()
            )),
        }
    });
    // Connection tasks still blocked on a stalled server must not keep us alive.
    runtime.shutdown_timeout(Duration::from_millis(100));
    let body = match result {
        Ok(b) => b,
        Err(e) => {
            eprintln!("echo-bench: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = json!({
        "mode": cli.mode.name(),
        "target": plan.target.to_string(),
        "warmup_s": common.warmup.as_secs_f64(),
        "duration_s": common.duration.as_secs_f64(),
        "client_threads": plan.threads,
    });
    if let (Some(obj), Value::Object(fields)) = (report.as_object_mut(), body) {
        obj.extend(fields);
    }
    if common.json {
        println!("{report}");
    } else if matches!(cli.mode, Mode::Spread(_)) {
        spread::print_table(&report);
    } else {
        print_human(&report, "");
    }
    let bad = ["errors", "mismatches"]
        .iter()
        .any(|k| report[k].as_u64().unwrap_or(0) > 0);
    if bad {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// Everything checked and decided before the first socket opens.
struct Plan {
    target: std::net::SocketAddr,
    sources: Vec<std::net::IpAddr>,
    server: Option<Server>,
    threads: usize,
    bound: Duration,
}

impl Plan {
    fn new(mode: &Mode) -> Result<Self, String> {
        let c = mode.common();
        let (connections, flag) = match mode {
            Mode::PingPong(a) => (a.connections, "--connections"),
            Mode::Bulk(a) => (a.connections, "--connections"),
            Mode::Churn(a) => (a.connections, "--connections"),
            Mode::Idle(a) => (a.connections, "--connections"),
            Mode::Spread(a) => (a.connections, "--connections"),
            Mode::Udp(a) => (a.connections, "--connections"),
        };
        cli::check_connections(flag, connections)?;
        if !matches!(mode, Mode::Idle(_)) && c.duration.is_zero() {
            return Err("--duration must be longer than 0".into());
        }
        if let Mode::Idle(a) = mode {
            if a.prewarm > 10_000 {
                return Err(format!(
                    "--prewarm must be at most 10000 (got {})",
                    a.prewarm
                ));
            }
            if a.connect_concurrency == 0 || a.connect_concurrency > 10_000 {
                return Err(format!(
                    "--connect-concurrency must be between 1 and 10000 (got {})",
                    a.connect_concurrency
                ));
            }
        }
        if c.io_timeout.is_zero() {
            return Err("--io-timeout must be longer than 0".into());
        }
        let threads = match c.threads {
            Some(0) => return Err("--threads must be at least 1".into()),
            Some(n) if n > 1024 => return Err(format!("--threads {n} is more than 1024")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let target = cli::resolve_target(c)?;
        let wanted_sources = match mode {
            Mode::Idle(a) if a.connections > CONNS_PER_SOURCE_IP => {
                u8::try_from(a.connections.div_ceil(CONNS_PER_SOURCE_IP)).unwrap_or(u8::MAX)
            }
            Mode::Churn(_) => CHURN_SOURCE_IPS,
            _ => 0,
        };
        let sources = cli::source_addresses(c, target, wanted_sources)?;
        let server = c.server_pid.map(Server::open).transpose()?;

        let needed = connections as u64 + FD_HEADROOM;
        let limit = procstat::raise_nofile(needed)?;
        if limit < needed {
            return Err(format!(
                "{connections} connections need about {needed} file descriptors but \
                 RLIMIT_NOFILE is {limit}; raise it (ulimit -n) or use fewer connections"
            ));
        }
        let ports = if sources.is_empty() { 1 } else { sources.len() };
        if matches!(mode, Mode::Idle(_)) && connections > ports * 28_000 {
            return Err(format!(
                "{connections} connections from {ports} source address(es) exceed the ~28k \
                 ephemeral ports each has; use --source-ips {}",
                connections.div_ceil(CONNS_PER_SOURCE_IP)
            ));
        }
        // Opening connections: generous per connection (idle opens tens of thousands).
        let per_conn = if matches!(mode, Mode::Idle(_)) { 2 } else { 1 };
        let bound = c.warmup
            + c.duration
            + c.io_timeout * 3
            + Duration::from_millis(per_conn * connections as u64)
            + BOUND_GRACE;
        Ok(Plan {
            target,
            sources,
            server,
            threads,
            bound,
        })
    }
}

async fn run_mode(mode: &Mode, plan: &Plan) -> Result<Value, String> {
    let c = mode.common();
    let connector = Arc::new(Connector::new(
        plan.target,
        plan.sources.clone(),
        c.io_timeout,
    ));
    match mode {
        Mode::PingPong(a) => ping_pong::run(a, connector, plan.server).await,
        Mode::Bulk(a) => bulk::run(a, connector, plan.server).await,
        Mode::Churn(a) => churn::run(a, connector, plan.server).await,
        Mode::Idle(a) => idle::run(a, connector, plan.server).await,
        Mode::Spread(a) => spread::run(a, connector).await,
        Mode::Udp(a) => udp::run(a, plan.target, plan.server).await,
    }
}

/// The report as `key: value` lines, nested objects as `outer.inner`.
fn print_human(v: &Value, prefix: &str) {
    if let Value::Object(map) = v {
        for (k, v) in map {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Object(_) => print_human(v, &key),
                Value::Null => {}
                Value::Number(n) if n.is_f64() => {
                    println!("{key:<28} {:.3}", n.as_f64().unwrap_or(0.0))
                }
                other => println!("{key:<28} {other}"),
            }
        }
    }
}
