//! Signals: SIGTERM (what Kubernetes sends to start a graceful shutdown) and SIGINT (Ctrl-C)
//! start the drain, and a second one of them means "stop now". SIGHUP re-reads the TLS
//! certificates when there are TLS listeners; SIGHUP, SIGUSR1 and SIGUSR2 are otherwise logged
//! and ignored: their default action would end the process at once with no drain, and a stray
//! `kill -HUP` (a terminal closing, a log rotator) must never cut connections.

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

    /// Handle each of these signals as it arrives, forever: SIGHUP runs `on_hangup` when
    /// there is one; everything else is logged and ignored.
    pub async fn handle_forever(mut self, on_hangup: Option<Box<dyn Fn() + Send>>) {
        loop {
            let name = tokio::select! {
                _ = self.hup.recv() => "SIGHUP",
                _ = self.usr1.recv() => "SIGUSR1",
                _ = self.usr2.recv() => "SIGUSR2",
            };
            match (&on_hangup, name) {
                (Some(reload), "SIGHUP") => {
                    tracing::info!(signal = name, "re-reading the TLS certificates");
                    reload();
                }
                _ => tracing::info!(
                    signal = name,
                    "signal ignored; SIGTERM or SIGINT drains and stops"
                ),
            }
        }
    }
}
