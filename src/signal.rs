//! Signals: SIGTERM (what Kubernetes sends to start a graceful shutdown) and SIGINT (Ctrl-C)
//! start the drain, and a second one of them means "stop now". SIGHUP, SIGUSR1 and SIGUSR2,
//! whose default action would end the process at once with no drain, are logged and ignored:
//! a stray `kill -HUP` (a terminal closing, a log rotator) must never cut connections.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Listens for SIGTERM and SIGINT.
pub struct ShutdownSignals {
    term: Signal,
    int: Signal,
}

impl ShutdownSignals {
    /// Install the handlers. Do this before serving, so an early signal is not lost.
    pub fn install() -> std::io::Result<Self> {
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Wait for the next SIGTERM or SIGINT; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Catches SIGHUP, SIGUSR1 and SIGUSR2 so they do not kill the process.
pub struct IgnoredSignals {
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl IgnoredSignals {
    /// Install the handlers (from then on these signals no longer end the process).
    pub fn install() -> std::io::Result<Self> {
        Ok(IgnoredSignals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Log each of these signals as it arrives, forever.
    pub async fn log_forever(mut self) {
        loop {
            let name = tokio::select! {
                _ = self.hup.recv() => "SIGHUP",
                _ = self.usr1.recv() => "SIGUSR1",
                _ = self.usr2.recv() => "SIGUSR2",
            };
            tracing::info!(
                signal = name,
                "signal ignored; SIGTERM or SIGINT drains and stops"
            );
        }
    }
}
