//! The server: accept connections, run one task per connection, and drain on shutdown.
//!
//! [`Server::run`] takes its listener and its shutdown signal from the caller (so tests run it
//! on port 0 with any future as the signal) and walks the service through its phases:
//!
//! 1. **Serving**: accept, build a protocol with the factory, spawn its task.
//! 2. **Draining** (the signal fired): not ready any more, but keep accepting for
//!    `drain_delay`, because load balancers and Kubernetes endpoints take a while to notice.
//! 3. **Stopping**: drop the listener (the kernel now refuses new connections) and give open
//!    connections `shutdown_timeout` to finish, echoing everything they send.
//! 4. Abort what is still open (loss reason `shutdown`), call the factory's stop hook, return.
//!
//! Each connection task holds a clone of a `done` sender; when every clone is gone the channel
//! closes, which is how the server knows all connections finished (mini-redis does the same).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::connection::{self, ConnectionSettings};
use crate::factory::{ConnectionInfo, Factory};
use crate::protocol::LossReason;
use crate::state::{Phase, ServiceState};

/// The accept back-off schedule when the process or system is out of file descriptors or
/// memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): wait 5 ms, then double up to 1 s, and stay at 1 s
/// while the errors last. The first successful accept resets it to 5 ms.
pub const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
/// The longest wait between two accept attempts while resources are exhausted.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval about accept errors; the rest are counted.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// After the shutdown timeout, how long aborted connections get to unwind before the server
/// returns anyway.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// The phase timing of a graceful shutdown.
#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    /// Keep accepting (not ready) this long after the shutdown signal (`--drain-delay`).
    pub drain_delay: Duration,
    /// Then give open connections this long to finish (`--shutdown-timeout`).
    pub shutdown_timeout: Duration,
}

/// A TCP server running the protocols built by one factory.
pub struct Server<F: Factory> {
    factory: Arc<F>,
    state: Arc<ServiceState>,
    settings: Arc<ConnectionSettings>,
    drain: DrainSettings,
}

impl<F: Factory> Server<F> {
    /// A server for `factory`, counting into `state`.
    pub fn new(
        factory: F,
        state: Arc<ServiceState>,
        settings: ConnectionSettings,
        drain: DrainSettings,
    ) -> Self {
        Server {
            factory: Arc::new(factory),
            state,
            settings: Arc::new(settings),
            drain,
        }
    }

    /// Serve `listener` until `shutdown` completes, then drain as described in the module doc.
    pub async fn run(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        self.factory.start_factory();
        let (abort_tx, abort_rx) = watch::channel(false);
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let mut acceptor = Acceptor {
            server: &self,
            listener,
            abort: abort_rx,
            done: done_tx,
            next_id: 1,
            backoff: ACCEPT_BACKOFF_FIRST,
            errors_log: RateLimitedLog::default(),
        };

        tokio::select! {
            never = acceptor.accept_forever() => match never {},
            _ = shutdown => {}
        }
        self.state.advance(Phase::Draining);
        tracing::info!(
            drain_delay = ?self.drain.drain_delay,
            active = self.state.stats.active.get(),
            "shutdown signal: draining (not ready, still accepting)"
        );
        if !self.drain.drain_delay.is_zero() {
            tokio::select! {
                never = acceptor.accept_forever() => match never {},
                _ = tokio::time::sleep(self.drain.drain_delay) => {}
            }
        }

        let Acceptor { listener, done, .. } = acceptor;
        drop(listener);
        drop(done);
        self.state.advance(Phase::Stopping);
        tracing::info!(
            shutdown_timeout = ?self.drain.shutdown_timeout,
            active = self.state.stats.active.get(),
            "listener closed: waiting for open connections"
        );
        if tokio::time::timeout(self.drain.shutdown_timeout, done_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                active = self.state.stats.active.get(),
                "shutdown timeout: aborting open connections"
            );
            let _ = abort_tx.send(true);
            let _ = tokio::time::timeout(ABORT_GRACE, done_rx.recv()).await;
        }
        self.factory.stop_factory();
        tracing::info!("server stopped");
    }
}

/// The accept loop's state; lives across the serving and draining phases.
struct Acceptor<'a, F: Factory> {
    server: &'a Server<F>,
    listener: TcpListener,
    abort: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
    next_id: u64,
    backoff: Duration,
    errors_log: RateLimitedLog,
}

impl<F: Factory> Acceptor<'_, F> {
    /// Accept until dropped. Never fails: errors are counted, logged at most once per second,
    /// and resource exhaustion backs off (see [`ACCEPT_BACKOFF_FIRST`]).
    async fn accept_forever(&mut self) -> std::convert::Infallible {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = ACCEPT_BACKOFF_FIRST;
                    self.start_connection(stream, peer);
                }
                Err(err) => {
                    self.server.state.stats.accept_errors.inc();
                    let exhausted = is_resource_exhaustion(&err);
                    if let Some(suppressed) = self.errors_log.should_log() {
                        tracing::warn!(
                            error = %err,
                            suppressed,
                            backoff = ?exhausted.then_some(self.backoff),
                            "accept failed"
                        );
                    }
                    if exhausted {
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                }
            }
        }
    }

    fn start_connection(&mut self, stream: TcpStream, peer: SocketAddr) {
        let state = &self.server.state;
        let info = ConnectionInfo {
            id: self.next_id,
            peer: canonical(peer),
            local: stream
                .local_addr()
                .map(canonical)
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        };
        self.next_id += 1;
        let protocol = match self.server.factory.build_protocol(&info) {
            Ok(protocol) => protocol,
            Err(refusal) => {
                state.stats.rejected(refusal).inc();
                tracing::debug!(peer = %info.peer, %refusal, "connection refused");
                return; // dropping the stream closes it at once
            }
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(peer = %info.peer, error = %err, "could not set TCP_NODELAY");
        }
        state.stats.made.inc();
        let active = ActiveConnection::new(state.clone());
        let settings = self.server.settings.clone();
        let mut abort = self.abort.clone();
        let done = self.done.clone();
        let task = async move {
            let _done = done;
            let mut active = active;
            let mut protocol = protocol;
            let reason =
                connection::drive(stream, &info, &mut protocol, &settings, &mut abort).await;
            if let LossReason::Error(kind) = reason {
                // Resets are everyday events (counted, debug-logged by the instrumentation);
                // other socket errors are worth a line.
                tracing::warn!(connection.id = info.id, peer = %info.peer, error = %kind, "connection failed");
            }
            active.finish(reason);
        };
        tokio::spawn(task);
    }
}

/// Counts one open connection in the shared state: `active` goes up when it is created and
/// down when it is dropped, and `lost{reason}` is counted exactly once, as `panic` if the
/// connection task unwound before finishing.
struct ActiveConnection {
    state: Arc<ServiceState>,
    reason: Option<LossReason>,
}

impl ActiveConnection {
    fn new(state: Arc<ServiceState>) -> Self {
        state.stats.active.inc();
        ActiveConnection {
            state,
            reason: None,
        }
    }

    fn finish(&mut self, reason: LossReason) {
        self.reason = Some(reason);
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or(LossReason::Panic);
        self.state.stats.lost(reason).inc();
        self.state.stats.active.dec();
    }
}

/// Errors that mean "out of descriptors or memory": retrying at once would spin.
fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Show IPv4 peers of a dual-stack socket as plain IPv4 (`1.2.3.4`, not `::ffff:1.2.3.4`).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Lets one log line through per [`ACCEPT_ERROR_LOG_INTERVAL`] and counts the rest.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// `Some(number suppressed since the last line)` if a line may be logged now.
    fn should_log(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < ACCEPT_ERROR_LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Bind a listening socket the way a server should: `SO_REUSEADDR` (a restart binds at once
/// even with connections in TIME_WAIT), dual-stack when the address is the IPv6 wildcard
/// (`[::]` accepts IPv4 too), and the given accept backlog.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_peers_are_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "10.1.2.3:5000");
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn exhaustion_errors_back_off_others_do_not() {
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }

    #[tokio::test(start_paused = true)]
    async fn accept_error_log_is_rate_limited() {
        // Paused time: the limiter is checked against virtual time, not the machine's clock.
        let mut log = RateLimitedLog::default();
        assert_eq!(log.should_log(), Some(0));
        assert_eq!(log.should_log(), None);
        assert_eq!(log.should_log(), None);
        tokio::time::advance(ACCEPT_ERROR_LOG_INTERVAL).await;
        assert_eq!(log.should_log(), Some(2));
    }
}
