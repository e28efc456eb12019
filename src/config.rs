//! Command-line and environment configuration.
//!
//! Every flag can also be set with an `ECHO_*` environment variable (flags win); `--help`
//! shows both and the defaults. Values are checked when parsed: a bad value exits with status 2
//! and one line naming the flag. Durations are written `500ms`, `5s`, `2m`, `1h`; sizes as
//! bytes with an optional `KiB`/`MiB` suffix.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::admin::AdminSettings;
use crate::connection::ConnectionSettings;
use crate::server::DrainSettings;
use crate::telemetry::{LogFormat, OtlpSettings};

/// An observable TCP echo server: every byte received is sent back.
#[derive(Debug, Clone, Parser)]
#[command(name = "echo-service", version, about, max_term_width = 100)]
pub struct Config {
    /// Address of the echo port. `[::]` listens on IPv6 and IPv4.
    #[arg(
        long,
        env = "ECHO_LISTEN",
        default_value = "[::]:8000",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

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
    #[arg(long, env = "ECHO_DRAIN_DELAY", default_value = "0s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_delay: Duration,

    /// After the drain delay, give open connections this long to finish, then close them.
    #[arg(long, env = "ECHO_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_timeout: Duration,

    /// Largest single read from a socket. The buffer is per worker thread, not per connection.
    #[arg(long, env = "ECHO_READ_BUFFER_SIZE", default_value = "64KiB", value_parser = parse_size, value_name = "BYTES")]
    pub read_buffer_size: usize,

    /// Most bytes buffered for a peer that is not reading; reading from it stops while full.
    #[arg(long, env = "ECHO_WRITE_BUFFER_LIMIT", default_value = "64KiB", value_parser = parse_size, value_name = "BYTES")]
    pub write_buffer_limit: usize,

    /// Most unsent bytes the kernel may queue per connection (TCP_NOTSENT_LOWAT; writes resume
    /// when half of it has drained). Past it, bytes wait in the write buffer above, so a peer
    /// that does not read is held by backpressure and seen by --write-stall-timeout.
    #[arg(long, env = "ECHO_SEND_QUEUE_LIMIT", default_value = "64KiB", value_parser = parse_size, value_name = "BYTES")]
    pub send_queue_limit: usize,

    /// TCP keepalive: after this much silence the kernel probes the peer (every quarter of it,
    /// at least 1 s, 4 probes) and closes dead connections (pulled cable, expired NAT entry).
    /// `0s` turns it off.
    #[arg(long, env = "ECHO_TCP_KEEPALIVE", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub tcp_keepalive: Duration,

    /// Kernel accept backlog of the echo port.
    #[arg(long, env = "ECHO_LISTEN_BACKLOG", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..), allow_negative_numbers = true, value_name = "N")]
    pub listen_backlog: u32,

    /// Refuse new connections (accept and close at once) while this many are open; /readyz
    /// reports at capacity meanwhile. Unset: no limit.
    #[arg(long, env = "ECHO_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true, value_name = "N")]
    pub max_connections: Option<u64>,

    /// Refuse new connections from a peer IP that already has this many open. Unset: no limit.
    #[arg(long, env = "ECHO_MAX_CONNECTIONS_PER_PEER", value_parser = clap::value_parser!(u32).range(1..), allow_negative_numbers = true, value_name = "N")]
    pub max_connections_per_peer: Option<u32>,

    /// Close connections with no bytes in either direction for this long. Unset: never.
    #[arg(long, env = "ECHO_IDLE_TIMEOUT", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,

    /// Close connections whose peer has read nothing for this long while data waits for it.
    /// Unset: never.
    #[arg(long, env = "ECHO_WRITE_STALL_TIMEOUT", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub write_stall_timeout: Option<Duration>,

    /// Close connections gracefully (flush, then FIN) after this age, so load rebalances after
    /// a scale-up. Unset: never.
    #[arg(long, env = "ECHO_MAX_CONNECTION_AGE", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub max_connection_age: Option<Duration>,

    /// Spread max-connection-age by up to +- this much per connection.
    #[arg(long, env = "ECHO_MAX_CONNECTION_AGE_JITTER", default_value = "0s", value_parser = parse_duration, value_name = "DURATION")]
    pub max_connection_age_jitter: Duration,

    /// Read at most this many bytes per second from each connection. Unset: unlimited.
    #[arg(long, env = "ECHO_THROTTLE_BYTES_PER_SECOND", value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true, value_name = "BYTES")]
    pub throttle_bytes_per_second: Option<u64>,

    /// Log filter, RUST_LOG syntax (e.g. `info`, `echo_service=debug`).
    #[arg(
        long,
        env = "ECHO_LOG_LEVEL",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "ECHO_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Upper bound of one OTLP export and of the final span flush at shutdown. Unset:
    /// OTEL_EXPORTER_OTLP_TIMEOUT (milliseconds) if set, else 3s.
    #[arg(long, env = "ECHO_EXPORT_TIMEOUT", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub export_timeout: Option<Duration>,

    /// Admin connections whose request headers take longer than this are closed.
    #[arg(long, env = "ECHO_ADMIN_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub admin_header_timeout: Duration,

    /// Largest admin request head; larger ones get 431. At least 8KiB.
    #[arg(long, env = "ECHO_ADMIN_MAX_HEADER_BYTES", default_value = "16KiB", value_parser = parse_header_size, value_name = "BYTES")]
    pub admin_max_header_bytes: usize,
}

impl Config {
    /// Checks that involve more than one setting; the error names them.
    pub fn validate(&self) -> Result<(), String> {
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
        }
    }

    /// OTLP settings of ours.
    pub fn otlp_settings(&self) -> OtlpSettings {
        OtlpSettings {
            export_timeout: self.export_timeout,
        }
    }
}

/// Parse `500ms`, `5s`, `2m`, `1h` (a number, then a unit; decimals allowed: `1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
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
    fn defaults_parse_and_validate() {
        let config = Config::try_parse_from(["echo-service"]).unwrap();
        assert_eq!(config.listen.to_string(), "[::]:8000");
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
