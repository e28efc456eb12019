//! Command line of `echo-bench`: one subcommand per mode, a shared set of run options, and the
//! parsers and checks that turn bad input into a one-line error instead of a panic.
//!
//! Every limit below is checked before any socket is opened, so a typo fails in milliseconds
//! with a message that names the flag.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Largest message or write size accepted (the verification pattern is sized from it).
pub const MAX_SIZE: usize = 16 << 20;
/// Longest measured window or warm-up accepted: every run is bounded in time.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most connections any mode will open (idle mode at 1M needs ~40 source addresses).
pub const MAX_CONNECTIONS: usize = 1_000_000;

#[derive(Parser, Debug)]
#[command(
    name = "echo-bench",
    version,
    about = "Load generator for TCP echo servers: ping-pong, bulk, churn and idle modes",
    long_about = "Load generator for TCP echo servers.\n\n\
        Every echoed byte is verified against what was sent. Runs are bounded in time: \
        connect phase, warm-up, measured window, then a short grace period; past the bound \
        the run fails instead of hanging.\n\n\
        Exit status: 0 = clean run; 1 = the run could not be carried out (nothing to connect \
        to, time bound exceeded); 2 = bad input; 3 = the run finished but saw errors or \
        corrupted echoes (the report is still printed)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Subcommand, Debug)]
pub enum Mode {
    /// N connections, each with one M-byte message outstanding: messages/s and latency.
    PingPong(PingPongArgs),
    /// Connections that stream writes while reading the echo back: MB/s.
    Bulk(BulkArgs),
    /// Connect, echo one message, close, as fast as possible: connections/s.
    Churn(ChurnArgs),
    /// Open N connections and hold them: does the server keep them, and what do they cost?
    Idle(IdleArgs),
    /// N UDP sockets, each with one datagram outstanding: datagrams/s, latency, losses.
    Udp(UdpArgs),
    /// Through a load balancer: which replica answered each of N connections, and is the
    /// spread even (chi-square)? Reads echo-service's identity line.
    Spread(SpreadArgs),
}

impl Mode {
    pub fn common(&self) -> &Common {
        match self {
            Mode::PingPong(a) => &a.common,
            Mode::Bulk(a) => &a.common,
            Mode::Churn(a) => &a.common,
            Mode::Idle(a) => &a.common,
            Mode::Udp(a) => &a.common,
            Mode::Spread(a) => &a.common,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::PingPong(_) => "ping-pong",
            Mode::Bulk(_) => "bulk",
            Mode::Churn(_) => "churn",
            Mode::Idle(_) => "idle",
            Mode::Udp(_) => "udp",
            Mode::Spread(_) => "spread",
        }
    }
}

/// Options every mode shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server address (host:port). Must be loopback unless --allow-remote.
    #[arg(
        long,
        short = 't',
        env = "ECHO_BENCH_TARGET",
        default_value = "127.0.0.1:8000"
    )]
    pub target: String,

    /// Measured window (e.g. 10s, 500ms, 2m). In idle mode: how long the connections are held.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Load before the measured window, not counted. In idle mode: settle time between the
    /// last connection opening and the RSS measurement.
    #[arg(long, short = 'w', default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Print one JSON object on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,

    /// Allow a non-loopback target (you are about to load someone's network).
    #[arg(long)]
    pub allow_remote: bool,

    /// PID of the server: report its CPU time per message (utime+stime from /proc/PID/stat
    /// over the measured window) and its RSS (/proc/PID/status VmRSS). Linux only.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Longest wait for one connect or one echo before it counts as an error; also the grace
    /// period after the measured window before the run is declared hung.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub io_timeout: Duration,

    /// Number of 127.0.0.x source addresses to spread connections over (each gives ~28k
    /// ephemeral ports). 0 = let the kernel choose. Default: enough for the mode (idle: one per
    /// 10k connections; churn: 8) when the target is 127.0.0.0/8, otherwise 0.
    #[arg(long)]
    pub source_ips: Option<u8>,

    /// Client runtime worker threads (default: CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,

    /// No progress line on stderr (by default one per second for runs of 5 s or more).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct PingPongArgs {
    /// Concurrent connections, each with one message outstanding.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub connections: usize,
    /// Message size (bytes; k/KiB/m/MiB suffixes accepted).
    #[arg(long, short = 's', default_value = "64", value_parser = parse_size)]
    pub size: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct BulkArgs {
    /// Concurrent streaming connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub connections: usize,
    /// Size of each write and of the read buffer.
    #[arg(long, short = 's', default_value = "64KiB", value_parser = parse_size)]
    pub size: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub common: Common,
}

/// TLS for the bulk and churn modes.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Speak TLS, trusting the CA certificates (PEM) in this file.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name sent as SNI and checked against the server's certificate.
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
}

#[derive(Args, Debug)]
pub struct UdpArgs {
    /// Concurrent sockets, each with one datagram outstanding.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub connections: usize,
    /// Datagram size (at most 65507).
    #[arg(long, short = 's', default_value = "64", value_parser = parse_size)]
    pub size: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct ChurnArgs {
    /// Concurrent connect/echo/close loops.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub connections: usize,
    /// Size of the one message echoed per connection.
    #[arg(long, short = 's', default_value = "64", value_parser = parse_size)]
    pub size: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Start every connection with a PROXY protocol v2 header (as a load balancer would), sent
    /// in the same write as the message; for servers with `--proxy-protocol`.
    #[arg(long)]
    pub proxy_v2: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// Bytes echoed on each connection once after it opens and once before it closes, to
    /// prove the server serves it (0 = connect only; then "held" means "not closed by the
    /// server").
    #[arg(long, short = 's', default_value = "16", value_parser = parse_size_or_zero)]
    pub size: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Connections opened, echoed on and closed before "RSS before" is read, so one-time
    /// set-up on the server's first connections (lazy exporters, pools, allocator arenas) is
    /// not charged to the idle connections.
    #[arg(long, default_value_t = 100)]
    pub prewarm: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct SpreadArgs {
    /// Connections to open through the balancer, one identity read on each.
    #[arg(long, short = 'c', default_value_t = 300)]
    pub connections: usize,
    /// Connections open at the same time (1 = strictly one after another).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// The target is an echo port with `--greeting`: read the identity line, then verify an
    /// echo on the same connection. Default: an identity port (`--identity-listen`).
    #[arg(long)]
    pub greeting: bool,
    /// Replicas behind the balancer, if known: ones that got no connection then count as 0
    /// in the chi-square test. Default: the replicas seen.
    #[arg(long)]
    pub expected_replicas: Option<usize>,
    #[command(flatten)]
    pub common: Common,
}

/// Parses `1.5s`, `500ms`, `2m`, `100us`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 10s, 500ms, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use us, ms, s, m or h)"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("`{s}` is longer than the 1h limit"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte count: `64`, `4k`, `4KiB`, `1m`, `1MiB` (k and m are binary).
pub fn parse_size_or_zero(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 64, 4KiB, 1MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        other => return Err(format!("unknown size unit `{other}` in `{s}` (use k or m)")),
    };
    let bytes = n
        .checked_mul(mult)
        .filter(|b| *b <= MAX_SIZE)
        .ok_or_else(|| format!("`{s}` is larger than the {} MiB limit", MAX_SIZE >> 20))?;
    Ok(bytes)
}

/// Like [`parse_size_or_zero`] but a message must have at least one byte.
pub fn parse_size(s: &str) -> Result<usize, String> {
    match parse_size_or_zero(s)? {
        0 => Err("size must be at least 1 byte".into()),
        n => Ok(n),
    }
}

/// Checks a connection count against the mode's bounds.
pub fn check_connections(flag: &str, n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_CONNECTIONS {
        return Err(format!(
            "{flag} must be between 1 and {MAX_CONNECTIONS} (got {n})"
        ));
    }
    Ok(())
}

/// Resolves `--target` and refuses non-loopback addresses unless allowed.
pub fn resolve_target(common: &Common) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = common
        .target
        .to_socket_addrs()
        .map_err(|e| format!("--target `{}`: {e} (expected host:port)", common.target))?
        .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| format!("--target `{}` resolves to no address", common.target))?;
    if !common.allow_remote {
        if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "--target `{}` resolves to {remote}, which is not loopback; \
                 pass --allow-remote if you really mean to load another machine",
                common.target
            ));
        }
    }
    if first.port() == 0 {
        return Err(format!("--target `{}` has port 0", common.target));
    }
    Ok(first)
}

/// Picks the source addresses to bind before connecting, given the mode's need for ports.
///
/// Each 127.0.0.x address has its own ~28k ephemeral ports towards one server address, so
/// spreading over several lets one client hold more than 28k connections (idle) or outrun
/// TIME_WAIT (churn). Only possible towards an IPv4 loopback target.
pub fn source_addresses(
    common: &Common,
    target: SocketAddr,
    wanted: u8,
) -> Result<Vec<IpAddr>, String> {
    let v4_loopback = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
    let n = match common.source_ips {
        Some(n) if n > 0 && !v4_loopback => {
            return Err(format!(
                "--source-ips needs a 127.0.0.0/8 target, not {target}; use --source-ips 0"
            ))
        }
        Some(n) => n,
        None if v4_loopback => wanted,
        None => 0,
    };
    Ok((1..=n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert!(parse_size("1000m").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }
}
