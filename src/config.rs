//! Command-line and environment configuration.
//!
//! Every flag can also be set with an `ECHO_*` environment variable (flags win); `--help`
//! shows both and the defaults. Values are checked when parsed: a bad value exits with status 2
//! and one line naming the flag. Durations are written `500ms`, `5s`, `2m`, `1h`; sizes as
//! bytes with an optional `KiB`/`MiB` suffix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::admin::AdminSettings;
use crate::connection::ConnectionSettings;
use crate::faults::FaultSpec;
use crate::proxy_protocol::{ProxyMode, ProxySettings, TrustedNetworks};
use crate::server::DrainSettings;
use crate::telemetry::{LogFormat, OtlpSettings};
use crate::tls::{ClientAuth, TlsSettings};

/// An observable TCP echo server: every byte received is sent back.
#[derive(Debug, Clone, Parser)]
#[command(name = "echo-service", version, about, max_term_width = 100)]
pub struct Config {
    /// Address of the echo port. `[::]` listens on IPv6 and IPv4. Repeat the flag or separate
    /// addresses with commas for several echo ports (`[::]:8000,[::]:8001`).
    #[arg(
        long,
        env = "ECHO_LISTEN",
        default_value = "[::]:8000",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub listen: Vec<SocketAddr>,

    /// Address of the admin HTTP port (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "ECHO_ADMIN_LISTEN",
        default_value = "[::]:9000",
        value_name = "ADDR"
    )]
    pub admin_listen: SocketAddr,

    /// After SIGTERM/SIGINT, keep accepting (but report not ready) this long, so load balancers
    /// stop sending new connections before the listener closes.
    #[arg(long, env = "ECHO_DRAIN_DELAY", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub drain_delay: Duration,

    /// After the drain delay, give open connections this long to finish, then close them.
    #[arg(long, env = "ECHO_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub shutdown_timeout: Duration,

    /// Largest single read from a socket. The buffer is per worker thread, not per connection.
    #[arg(long, env = "ECHO_READ_BUFFER_SIZE", default_value = "64KiB", value_parser = parse_size, allow_hyphen_values = true, value_name = "BYTES")]
    pub read_buffer_size: usize,

    /// Most bytes buffered for a peer that is not reading; reading from it stops while full.
    #[arg(long, env = "ECHO_WRITE_BUFFER_LIMIT", default_value = "64KiB", value_parser = parse_size, allow_hyphen_values = true, value_name = "BYTES")]
    pub write_buffer_limit: usize,

    /// Most unsent bytes the kernel may queue per connection (TCP_NOTSENT_LOWAT; writes resume
    /// when half of it has drained). Past it, bytes wait in the write buffer above, so a peer
    /// that does not read is held by backpressure and seen by --write-stall-timeout.
    #[arg(long, env = "ECHO_SEND_QUEUE_LIMIT", default_value = "64KiB", value_parser = parse_size, allow_hyphen_values = true, value_name = "BYTES")]
    pub send_queue_limit: usize,

    /// TCP keepalive: after this much silence the kernel probes the peer (every quarter of it,
    /// at least 1 s, 4 probes) and closes dead connections (pulled cable, expired NAT entry).
    /// `0s` turns it off; otherwise whole seconds from 1s to 32767s (what Linux accepts).
    #[arg(long, env = "ECHO_TCP_KEEPALIVE", default_value = "60s", value_parser = parse_keepalive, allow_hyphen_values = true, value_name = "DURATION")]
    pub tcp_keepalive: Duration,

    /// Kernel accept backlog of the echo port.
    #[arg(long, env = "ECHO_LISTEN_BACKLOG", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..), allow_negative_numbers = true, value_name = "N")]
    pub listen_backlog: u32,

    /// Refuse new connections (accept and close at once) while this many are open; /readyz
    /// reports at capacity meanwhile. At most 100000000. Unset: derived from the process's
    /// file descriptor limit (RLIMIT_NOFILE) minus a reserve for the admin port and the rest of
    /// the process, so health checks and scrapes never starve (logged at startup).
    #[arg(long, env = "ECHO_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS_CEILING), allow_negative_numbers = true, value_name = "N")]
    pub max_connections: Option<u64>,

    /// Refuse new connections from a peer IP that already has this many open. Unset: no limit.
    #[arg(long, env = "ECHO_MAX_CONNECTIONS_PER_PEER", value_parser = clap::value_parser!(u32).range(1..), allow_negative_numbers = true, value_name = "N")]
    pub max_connections_per_peer: Option<u32>,

    /// Close connections with no bytes in either direction for this long. Unset: never.
    #[arg(long, env = "ECHO_IDLE_TIMEOUT", value_parser = parse_positive_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,

    /// Close connections whose peer has read nothing for this long while data waits for it.
    /// Unset: never.
    #[arg(long, env = "ECHO_WRITE_STALL_TIMEOUT", value_parser = parse_positive_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub write_stall_timeout: Option<Duration>,

    /// Close connections gracefully (flush, then FIN) after this age, so load rebalances after
    /// a scale-up. Unset: never.
    #[arg(long, env = "ECHO_MAX_CONNECTION_AGE", value_parser = parse_positive_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub max_connection_age: Option<Duration>,

    /// Spread max-connection-age by up to +- this much per connection.
    #[arg(long, env = "ECHO_MAX_CONNECTION_AGE_JITTER", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub max_connection_age_jitter: Duration,

    /// Read at most this many bytes per second from each connection (`100KiB`, `1MiB`, up to
    /// 1GiB). Unset: unlimited.
    #[arg(long, env = "ECHO_THROTTLE_BYTES_PER_SECOND", value_parser = parse_rate, allow_hyphen_values = true, value_name = "BYTES")]
    pub throttle_bytes_per_second: Option<u64>,

    /// After a max-connection-age close starts, how long it may take to flush what is pending
    /// before the connection is reset (`lost{reason="max_age_grace"}`), so a peer that does not
    /// read cannot hold it open. `0s`: reset at once if anything is still unsent.
    #[arg(long, env = "ECHO_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub max_connection_age_grace: Duration,

    /// Log filter: comma-separated directives, each a level (`trace`, `debug`, `info`, `warn`,
    /// `error`, `off`) or `TARGET=LEVEL` (e.g. `info,echo_service=debug`).
    #[arg(
        long,
        env = "ECHO_LOG_LEVEL",
        default_value = "info",
        value_parser = parse_log_filter,
        allow_hyphen_values = true,
        value_name = "FILTER"
    )]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "ECHO_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Upper bound of one OTLP export and of the final span flush at shutdown. Unset:
    /// OTEL_EXPORTER_OTLP_TIMEOUT (milliseconds) if set, else 3s.
    #[arg(long, env = "ECHO_EXPORT_TIMEOUT", value_parser = parse_positive_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub export_timeout: Option<Duration>,

    /// Admin connections whose request headers take longer than this are closed.
    #[arg(long, env = "ECHO_ADMIN_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub admin_header_timeout: Duration,

    /// Largest admin request head; larger ones get 431. At least 8KiB.
    #[arg(long, env = "ECHO_ADMIN_MAX_HEADER_BYTES", default_value = "16KiB", value_parser = parse_header_size, allow_hyphen_values = true, value_name = "BYTES")]
    pub admin_max_header_bytes: usize,

    /// Most log bytes queued for stdout. A reader of stdout that stops draining never blocks
    /// the service: once this much waits, new lines are dropped and counted in
    /// `echo_log_lines_dropped_total`.
    #[arg(long, env = "ECHO_LOG_BUFFER_SIZE", default_value = "1MiB", value_parser = parse_size, allow_hyphen_values = true, value_name = "BYTES")]
    pub log_buffer_size: usize,

    /// Most admin connections open at once. Past it, a peer holding fewer admin connections
    /// than the busiest peer takes that peer's oldest connection; any other new connection is
    /// closed at once. Both are counted in `echo_admin_connections_rejected_total`.
    #[arg(long, env = "ECHO_ADMIN_MAX_CONNECTIONS", default_value = "64", value_parser = clap::value_parser!(u32).range(1..=65536), allow_negative_numbers = true, value_name = "N")]
    pub admin_max_connections: u32,

    /// UDP echo ports (off unless given): repeat the flag or separate addresses with commas.
    /// Every datagram goes back to its sender unchanged; replies the socket cannot take are
    /// dropped and counted (UDP has no backpressure).
    #[arg(
        long,
        env = "ECHO_UDP_LISTEN",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub udp_listen: Vec<SocketAddr>,

    /// TLS echo ports (off unless given): repeat the flag or separate addresses with commas.
    /// Needs --tls-cert and --tls-key.
    #[arg(
        long,
        env = "ECHO_TLS_LISTEN",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub tls_listen: Vec<SocketAddr>,

    /// The TLS certificate chain, PEM, leaf first. Re-read when it changes.
    #[arg(long, env = "ECHO_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The TLS private key, PEM (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or Ed25519).
    #[arg(long, env = "ECHO_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) for client certificates: turns on mutual TLS.
    #[arg(long, env = "ECHO_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: refuse clients without a valid certificate (`required`) or only
    /// verify those that present one (`optional`).
    #[arg(
        long,
        env = "ECHO_TLS_CLIENT_AUTH",
        value_enum,
        default_value = "required"
    )]
    pub tls_client_auth: ClientAuth,

    /// ALPN protocols to offer, comma-separated, in preference order (e.g. `h2,http/1.1`).
    /// Unset: accept any client and negotiate nothing.
    #[arg(
        long,
        env = "ECHO_TLS_ALPN",
        value_delimiter = ',',
        value_name = "PROTOCOLS"
    )]
    pub tls_alpn: Vec<String>,

    /// Close TLS connections whose handshake is not complete after this long.
    #[arg(long, env = "ECHO_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub tls_handshake_timeout: Duration,

    /// How often the certificate files are checked for changes (SIGHUP checks at once).
    #[arg(long, env = "ECHO_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_positive_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub tls_reload_interval: Duration,
    /// PROXY protocol on the echo port: `off`, `optional` (use a header when a trusted peer
    /// sends one, else treat the bytes as data) or `required` (trusted peers must send one;
    /// untrusted peers are closed).
    #[arg(long, env = "ECHO_PROXY_PROTOCOL", value_enum, default_value = "off")]
    pub proxy_protocol: ProxyMode,

    /// Peers whose PROXY headers are believed: comma-separated CIDRs, IPv4 and IPv6
    /// (`10.0.0.0/8,fd00::/8`). Empty: any peer.
    #[arg(long, env = "ECHO_PROXY_PROTOCOL_TRUSTED", default_value = "", value_parser = parse_trusted, value_name = "CIDRS")]
    pub proxy_protocol_trusted: TrustedNetworks,

    /// A trusted peer that has not completed its PROXY header after this long is closed
    /// (lost{reason="proxy_timeout"}).
    #[arg(long, env = "ECHO_PROXY_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub proxy_header_timeout: Duration,

    /// Largest PROXY header accepted (a v2 header declaring more is rejected at once);
    /// 232..=65551 bytes.
    #[arg(long, env = "ECHO_PROXY_HEADER_MAX_BYTES", default_value = "4KiB", value_parser = parse_proxy_header_size, value_name = "BYTES")]
    pub proxy_header_max_bytes: usize,

    /// Address of the identity port: every connection (after any PROXY header) gets one JSON
    /// line saying which replica answered, then is closed. Unset: no identity port.
    #[arg(long, env = "ECHO_IDENTITY_LISTEN", value_name = "ADDR")]
    pub identity_listen: Option<SocketAddr>,

    /// Send the identity JSON line first on every echo connection, then echo. Off by default:
    /// the echo stream is byte-exact unless this is set.
    #[arg(long, env = "ECHO_GREETING")]
    pub greeting: bool,
    /// Inject a fault into chosen connections of every stream listener: `KIND[,key=value...]`,
    /// e.g. `latency,delay=50ms,jitter=10ms`, `reset,after-bytes=1024,probability=0.5`,
    /// `refuse,peers=10.0.0.0/8`. Repeatable; `ECHO_FAULTS` separates specs with `;`. Kinds:
    /// accept-delay, latency, bandwidth, close, reset, blackhole, refuse (README: "Fault
    /// injection"). A connection gets at most one: the first that applies.
    #[arg(long = "fault", env = "ECHO_FAULTS", value_delimiter = ';', value_parser = parse_fault, value_name = "SPEC")]
    pub faults: Vec<FaultSpec>,

    /// Seed of the per-connection fault draws: the same seed and the same connections in the
    /// same order fault the same connections. Unset: taken from the clock and logged.
    #[arg(long, env = "ECHO_FAULT_SEED", value_name = "N")]
    pub fault_seed: Option<u64>,

    /// Enable the mutating admin endpoints (`PUT`/`DELETE /faults`, `POST /readyz/disable`,
    /// `POST /readyz/enable`); without it they answer 404. Anyone who reaches the admin port
    /// can then change the service's behaviour: set `ECHO_ADMIN_TOKEN` too.
    #[arg(long, env = "ECHO_ADMIN_CONTROL")]
    pub admin_control: bool,

    /// Bearer token the mutating admin endpoints require (`Authorization: Bearer TOKEN`;
    /// 401 otherwise). Prefer the environment variable: a flag shows up in `ps`.
    #[arg(
        long,
        env = "ECHO_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,
}

/// The largest `--max-connections` accepted (far above any file descriptor limit).
pub const MAX_CONNECTIONS_CEILING: u64 = 100_000_000;

impl Config {
    /// Checks that involve more than one setting; the error names them.
    pub fn validate(&self) -> Result<(), String> {
        if !self.tls_listen.is_empty() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err("'--tls-listen' needs '--tls-cert' and '--tls-key' (PEM files)".to_owned());
        }
        if self.tls_listen.is_empty()
            && (self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_client_ca.is_some())
        {
            return Err(
                "'--tls-cert', '--tls-key' and '--tls-client-ca' need '--tls-listen'".to_owned(),
            );
        }
        let streams = self
            .listen
            .iter()
            .chain(&self.tls_listen)
            .chain(&self.identity_listen);
        for (i, &a) in streams.clone().enumerate() {
            if a.port() == 0 {
                continue;
            }
            if same_socket(a, self.admin_listen) {
                return Err(format!(
                    "invalid value for '--admin-listen': {} is the same port as the stream listener {a}",
                    self.admin_listen
                ));
            }
            if let Some(b) = streams.clone().skip(i + 1).find(|&&b| same_socket(a, b)) {
                return Err(format!(
                    "invalid value for '--listen', '--tls-listen' or '--identity-listen': {a} and {b} are the same port"
                ));
            }
        }
        if let Some(age) = self.max_connection_age {
            if self.max_connection_age_jitter > age {
                return Err(format!(
                    "invalid value for '--max-connection-age-jitter': {:?} is larger than --max-connection-age {:?}",
                    self.max_connection_age_jitter, age
                ));
            }
        }
        Ok(())
    }

    /// The per-connection settings.
    pub fn connection_settings(&self) -> ConnectionSettings {
        ConnectionSettings {
            read_buffer_size: self.read_buffer_size,
            write_buffer_limit: self.write_buffer_limit,
            // parse_size caps sizes at 64 MiB, so this always fits.
            send_queue_limit: u32::try_from(self.send_queue_limit).unwrap_or(u32::MAX),
            tcp_keepalive: (!self.tcp_keepalive.is_zero()).then_some(self.tcp_keepalive),
            idle_timeout: self.idle_timeout,
            write_stall_timeout: self.write_stall_timeout,
            max_age: self.max_connection_age,
            max_age_jitter: self.max_connection_age_jitter,
            throttle_bytes_per_second: self.throttle_bytes_per_second,
            max_age_grace: self.max_connection_age_grace,
        }
    }

    /// The graceful shutdown timing.
    pub fn drain_settings(&self) -> DrainSettings {
        DrainSettings {
            drain_delay: self.drain_delay,
            shutdown_timeout: self.shutdown_timeout,
        }
    }

    /// The admin server limits.
    pub fn admin_settings(&self) -> AdminSettings {
        AdminSettings {
            header_read_timeout: self.admin_header_timeout,
            max_header_bytes: self.admin_max_header_bytes,
            max_connections: self.admin_max_connections as usize,
        }
    }

    /// The TLS listeners' settings, when there are TLS listeners.
    pub fn tls_settings(&self) -> Option<TlsSettings> {
        if self.tls_listen.is_empty() {
            return None;
        }
        Some(TlsSettings {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
            client_auth: self.tls_client_auth,
            alpn: self.tls_alpn.clone(),
            handshake_timeout: self.tls_handshake_timeout,
            reload_interval: self.tls_reload_interval,
        })
    }

    /// The PROXY header layer's settings (`None` when `--proxy-protocol off`).
    pub fn proxy_settings(&self) -> Option<ProxySettings> {
        (self.proxy_protocol != ProxyMode::Off).then(|| ProxySettings {
            mode: self.proxy_protocol,
            trusted: self.proxy_protocol_trusted.clone(),
            max_header_bytes: self.proxy_header_max_bytes,
            header_timeout: self.proxy_header_timeout,
        })
    }

    /// OTLP settings of ours.
    pub fn otlp_settings(&self) -> OtlpSettings {
        OtlpSettings {
            export_timeout: self.export_timeout,
        }
    }
}

/// Would binding both addresses clash (same port, and the same or an overlapping wildcard IP)?
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || a.ip().is_unspecified()
            || b.ip().is_unspecified()
            || a.ip().to_canonical() == b.ip().to_canonical())
}

fn parse_fault(text: &str) -> Result<FaultSpec, String> {
    FaultSpec::parse(text).map_err(|err| err.to_string())
}

fn parse_trusted(text: &str) -> Result<TrustedNetworks, String> {
    text.parse()
}

/// A PROXY header cap: room for the largest address block (AF_UNIX, 16 + 216 bytes), at most
/// the largest header the format can express.
fn parse_proxy_header_size(text: &str) -> Result<usize, String> {
    let size = parse_size(text)?;
    let max = crate::proxy_protocol::parser::V2_MAX_LEN;
    if !(232..=max).contains(&size) {
        return Err(format!("must be between 232 and {max} bytes"));
    }
    Ok(size)
}

/// Parse `500ms`, `5s`, `2m`, `1h` (a number, then a unit; decimals allowed: `1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("'{text}' is negative; durations are 0 or more"));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{text}' has no unit; write e.g. 500ms, 5s, 2m or 1h"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; write e.g. 500ms, 5s, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit '{other}'; use ms, s, m or h")),
    };
    // Timers add durations to the clock: keep them far below where that could overflow.
    const LONGEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if duration <= LONGEST => Ok(duration),
        _ => Err(format!("'{text}' is out of range (at most 10 years)")),
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be greater than zero (leave it unset to disable)".into());
    }
    Ok(duration)
}

/// Parse a byte size: `4096`, `16KiB`, `1MiB` (also `K`/`KB`/`M`/`MB`, all powers of 1024).
/// Zero is refused.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("'{text}' is negative; sizes are at least 1 byte"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: usize = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size; write e.g. 4096, 16KiB or 1MiB"))?;
    let multiplier = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" => 1024,
        "M" | "MB" | "MiB" => 1024 * 1024,
        other => return Err(format!("unknown unit '{other}'; use KiB or MiB")),
    };
    let bytes = value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    if bytes == 0 {
        return Err("must be at least 1 byte".into());
    }
    if bytes > 64 * 1024 * 1024 {
        return Err("must be at most 64MiB".into());
    }
    Ok(bytes)
}

/// Parse a byte rate like a size (`100KiB`, `1MiB`, `1GiB`, or plain bytes), up to 1 GiB.
fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, multiplier) = match text.strip_suffix("GiB").or(text.strip_suffix("GB")) {
        Some(number) => (number, 1024 * 1024 * 1024),
        None => (text, 1),
    };
    let bytes = if multiplier == 1 {
        parse_size(number).map(|b| b as u64)?
    } else {
        let value: u64 = number
            .trim()
            .parse()
            .map_err(|_| format!("'{text}' is not a size; write e.g. 100KiB or 1MiB"))?;
        value.saturating_mul(multiplier)
    };
    if bytes == 0 || bytes > 1024 * 1024 * 1024 {
        return Err("must be between 1 byte and 1GiB per second".into());
    }
    Ok(bytes)
}

/// Keepalive idle time: `0s` (off), or whole seconds from 1 to 32767 (Linux's TCP_KEEPIDLE
/// range; outside it the kernel refuses the option and keepalive would silently fall back to
/// its 2 h default).
fn parse_keepalive(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Ok(duration);
    }
    if duration.subsec_nanos() != 0 || !(1..=32_767).contains(&duration.as_secs()) {
        return Err("must be 0s (off) or whole seconds from 1s to 32767s".into());
    }
    Ok(duration)
}

/// The levels a log directive may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A log filter: comma-separated directives, each `LEVEL` or `TARGET=LEVEL` (tracing's
/// `Targets` syntax: RUST_LOG without its `[span{field}]` selectors and regexes, which would
/// cost the binary a regex engine). Stricter than RUST_LOG on purpose: a bare word that is not
/// a level (`warning`, `verbose`) would select a target nobody logs to and silently turn
/// logging off.
pub fn parse_log_filter(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("is empty; write a level such as 'info'".into());
    }
    for directive in text.split(',') {
        let directive = directive.trim();
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            _ => directive,
        };
        if !LOG_LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(format!(
                "'{directive}' is not a level or TARGET=LEVEL (levels: {})",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    text.parse::<tracing_subscriber::filter::Targets>()
        .map_err(|err| format!("'{text}' is not a valid filter: {err}"))?;
    Ok(text.to_owned())
}

fn parse_header_size(text: &str) -> Result<usize, String> {
    let bytes = parse_size(text)?;
    if bytes < 8192 {
        return Err("must be at least 8KiB (hyper's minimum)".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_duration("3000000000000000h")
            .unwrap_err()
            .contains("out of range"));
        assert!(parse_duration("87600h").is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16KiB"), Ok(16384));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("1000000MiB").is_err());
    }

    #[test]
    fn strict_values() {
        assert!(parse_keepalive("10h").is_err());
        assert!(parse_keepalive("1ms").is_err());
        assert!(parse_keepalive("1500ms").is_err());
        assert_eq!(parse_keepalive("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_keepalive("32767s"), Ok(Duration::from_secs(32767)));
        assert_eq!(parse_rate("100KiB"), Ok(102_400));
        assert_eq!(parse_rate("1GiB"), Ok(1 << 30));
        assert_eq!(parse_rate("7"), Ok(7));
        assert!(parse_rate("2GiB").is_err());
        assert!(parse_rate("0").is_err());
        for bad in [
            "warning",
            "verbose",
            ",",
            "",
            "info,",
            "foo=bar=baz",
            "info,[{",
            "=info",
        ] {
            assert!(parse_log_filter(bad).is_err(), "{bad:?} was accepted");
        }
        for good in [
            "info",
            "WARN",
            "info,echo_service=debug",
            "echo_service::server=trace",
        ] {
            assert_eq!(parse_log_filter(good).as_deref(), Ok(good), "{good:?}");
        }
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
        let clash = |listen: &str, admin: &str| {
            Config::try_parse_from(["echo-service", "--listen", listen, "--admin-listen", admin])
                .unwrap()
                .validate()
        };
        assert!(clash("[::]:8000", "0.0.0.0:8000").is_err());
        assert!(clash("127.0.0.1:8000", "127.0.0.1:8000").is_err());
        assert!(clash("127.0.0.1:8000", "127.0.0.2:8000").is_ok());
        assert!(clash("127.0.0.1:0", "127.0.0.1:0").is_ok());
    }

    #[test]
    fn defaults_parse_and_validate() {
        let config = Config::try_parse_from(["echo-service"]).unwrap();
        assert_eq!(config.listen, vec!["[::]:8000".parse().unwrap()]);
        assert_eq!(config.admin_listen.to_string(), "[::]:9000");
        assert!(config.validate().is_ok());
        let bad = Config::try_parse_from([
            "echo-service",
            "--max-connection-age=1s",
            "--max-connection-age-jitter=2s",
        ])
        .unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("--max-connection-age-jitter"));
    }
}
