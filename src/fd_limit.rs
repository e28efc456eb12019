//! File descriptors: use all the process may have, and keep some for the admin port.
//!
//! Every echo connection is a descriptor. Without a limit, echo connections that reach
//! RLIMIT_NOFILE also starve the admin port: `/healthz` stops answering and the kubelet restarts
//! a pod that was only busy. So, at startup:
//!
//! - the soft RLIMIT_NOFILE is raised to the hard limit (as Go and nginx do): the soft default
//!   of 1024 is a relic of `select(2)`, which nothing here uses;
//! - when `--max-connections` is unset, it defaults to the limit minus [`reserve`]: room for
//!   every admin connection (`--admin-max-connections`) plus [`FD_RESERVE_BASE`] for the
//!   listeners, the runtime (epoll, eventfd), stdio, the OTLP exporter's connections and
//!   `/proc` reads by the process metrics. Connections past it are refused and counted, and
//!   `/readyz` says `at_capacity`, as with an explicit limit.

use std::io;

use rlimit::Resource;

/// Descriptors kept for everything but echo and admin connections.
pub const FD_RESERVE_BASE: u64 = 32;

/// How many descriptors the default connection limit leaves for the rest of the process.
pub fn reserve(admin_max_connections: u32) -> u64 {
    FD_RESERVE_BASE + u64::from(admin_max_connections)
}

/// The soft RLIMIT_NOFILE before and after raising it to the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
}

/// Raise the soft RLIMIT_NOFILE to the hard limit.
pub fn raise_nofile() -> io::Result<NofileLimit> {
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft < hard {
        Resource::NOFILE.set(hard, hard)?;
    }
    let (now, _) = Resource::NOFILE.get()?;
    Ok(NofileLimit { before: soft, now })
}

/// The default `--max-connections` for a process allowed `nofile` descriptors, or `None` when
/// the limit leaves no room beyond the reserve (then accept errors, counted and backed off, are
/// the only limit).
pub fn default_max_connections(nofile: u64, admin_max_connections: u32) -> Option<u64> {
    nofile
        .checked_sub(reserve(admin_max_connections))
        .filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limit_leaves_the_reserve() {
        assert_eq!(default_max_connections(1_048_576, 64), Some(1_048_480));
        assert_eq!(default_max_connections(200, 64), Some(104));
        assert_eq!(default_max_connections(96, 64), None);
        assert_eq!(default_max_connections(64, 64), None);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let limit = raise_nofile().unwrap();
        assert!(limit.now >= limit.before);
    }
}
