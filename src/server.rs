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
//! 4. Abort what is still open (loss reason `shutdown`), wait until every connection task is
//!    gone, then call the factory's stop hook and return. `run` never returns while a
//!    connection task is alive.
//!
//! Connection tasks count themselves in the shared `active` gauge (up when created, down when
//! dropped) and the last one out notifies the server, which is how it knows all connections
//! finished; the abort at the end is one flag plus a wake-up of every registered task.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::accept::AcceptBackoff;
use crate::connection::{canonical, ConnectionSettings, ConnectionShared, ConnectionTask};
use crate::factory::{ConnectionInfo, Factory};
use crate::state::{Phase, ServiceState};

/// After the shutdown timeout has aborted the open connections, how long to wait for them to
/// unwind before logging that some are slow to (the wait itself goes on until they are gone).
const ABORT_WARN_AFTER: Duration = Duration::from_secs(1);

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
    shared: Arc<ConnectionShared>,
    drain: DrainSettings,
}

impl<F: Factory> Server<F> {
    /// A server for `factory`, counting into `state`. Buffer sizes of zero are raised to one
    /// byte (a zero-byte read looks like EOF; a zero write limit would never read).
    pub fn new(
        factory: F,
        state: Arc<ServiceState>,
        mut settings: ConnectionSettings,
        drain: DrainSettings,
    ) -> Self {
        settings.read_buffer_size = settings.read_buffer_size.max(1);
        settings.write_buffer_limit = settings.write_buffer_limit.max(1);
        Server {
            factory: Arc::new(factory),
            shared: Arc::new(ConnectionShared::new(settings, state.clone())),
            state,
            drain,
        }
    }

    /// Serve `listener` until `shutdown` completes, then drain as described in the module doc.
    pub async fn run(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        if let Err(err) = set_inherited_options(&listener, &self.shared.settings) {
            tracing::warn!(error = %err, "could not set TCP options on the listener");
        }
        self.factory.start_factory();
        let mut acceptor = Acceptor {
            server: &self,
            listener,
            next_id: 1,
            backoff: AcceptBackoff::default(),
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

        drop(acceptor); // closes the listener
        self.state.advance(Phase::Stopping);
        tracing::info!(
            shutdown_timeout = ?self.drain.shutdown_timeout,
            active = self.state.stats.active.get(),
            "listener closed: waiting for open connections"
        );
        if tokio::time::timeout(self.drain.shutdown_timeout, self.all_closed())
            .await
            .is_err()
        {
            tracing::warn!(
                active = self.state.stats.active.get(),
                "shutdown timeout: aborting open connections"
            );
            self.shared.abort.abort_all();
            // An aborted task ends at its next poll; only a protocol callback that blocks its
            // thread can hold one up. Wait for every one anyway: returning earlier would let
            // the runtime drop live tasks and run `stop_factory` while connections still use
            // the factory's state.
            if tokio::time::timeout(ABORT_WARN_AFTER, self.all_closed())
                .await
                .is_err()
            {
                tracing::warn!(
                    active = self.state.stats.active.get(),
                    "connections slow to unwind after the abort: still waiting"
                );
                self.all_closed().await;
            }
        }
        self.factory.stop_factory();
        tracing::info!("server stopped");
    }
}

impl<F: Factory> Server<F> {
    /// Resolves once no connection is open.
    async fn all_closed(&self) {
        loop {
            // Created before the check, so a notification in between is not missed.
            let notified = self.shared.all_closed.notified();
            if self.state.stats.active.get() <= 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The accept loop's state; lives across the serving and draining phases.
struct Acceptor<'a, F: Factory> {
    server: &'a Server<F>,
    listener: TcpListener,
    next_id: u64,
    backoff: AcceptBackoff,
}

impl<F: Factory> Acceptor<'_, F> {
    /// Accept until dropped. Never fails: errors are counted, logged at most once per second,
    /// and resource exhaustion backs off (see [`crate::accept`]).
    async fn accept_forever(&mut self) -> std::convert::Infallible {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff.succeeded();
                    self.start_connection(stream, peer);
                }
                Err(err) => {
                    self.server.state.stats.accept_errors.inc();
                    self.backoff.failed(&err, "echo").await;
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
        // TCP_NODELAY, TCP_NOTSENT_LOWAT and keepalive were inherited from the listener.
        state.stats.made.inc();
        tokio::spawn(ConnectionTask::new(
            stream,
            protocol,
            info.id,
            self.server.shared.clone(),
        ));
    }
}

/// Set the per-connection TCP options once, on the listener: Linux copies them to every
/// accepted socket, which saves syscalls per accept. `TCP_NODELAY` (echo replies must not wait
/// for Nagle), `TCP_NOTSENT_LOWAT` (`--send-queue-limit`) and keepalive (`--tcp-keepalive`:
/// probes start after that much silence, then every quarter of it (at least 1 s), 4 probes).
fn set_inherited_options(listener: &TcpListener, settings: &ConnectionSettings) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_notsent_lowat(settings.send_queue_limit)?;
    match settings.tcp_keepalive {
        Some(idle) => {
            let interval = (idle / 4).max(Duration::from_secs(1));
            socket.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(idle)
                    .with_interval(interval)
                    .with_retries(4),
            )
        }
        None => socket.set_keepalive(false),
    }
}

/// Bind a listening socket the way a server should: `SO_REUSEADDR` (a restart binds at once
/// even with connections in TIME_WAIT), dual-stack when the address is the IPv6 wildcard
/// (`[::]` accepts IPv4 too), and the given accept backlog. On a host without IPv6 (kernel
/// booted with `ipv6.disable=1`, or IPv6 turned off), the `[::]` wildcard falls back to
/// `0.0.0.0` on the same port with a warning, so the default works everywhere.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    match bind_exactly(addr, backlog) {
        Err(err) => match ipv4_fallback(addr, &err) {
            Some(v4) => {
                tracing::warn!(requested = %addr, using = %v4, error = %err, "no IPv6 here: listening on IPv4 only");
                bind_exactly(v4, backlog)
            }
            None => Err(err),
        },
        ok => ok,
    }
}

/// The IPv4 wildcard to use instead of `addr` when binding it failed because IPv6 is missing.
pub(crate) fn ipv4_fallback(addr: SocketAddr, err: &io::Error) -> Option<SocketAddr> {
    let ipv6_missing = matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    );
    (addr.is_ipv6() && addr.ip().is_unspecified() && ipv6_missing)
        .then(|| SocketAddr::from(([0, 0, 0, 0], addr.port())))
}

fn bind_exactly(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
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
    use crate::factory::Refusal;
    use crate::protocol::{LossReason, Protocol};
    use crate::transport::Transport;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Echoes, but panics on a byte `!`.
    struct Fragile;

    impl Protocol for Fragile {
        fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
            assert!(!data.contains(&b'!'), "fragile protocol hit a '!'");
            transport.write(data);
        }
    }

    struct FragileFactory;

    impl Factory for FragileFactory {
        type Protocol = Fragile;

        fn build_protocol(&self, _conn: &ConnectionInfo) -> Result<Fragile, Refusal> {
            Ok(Fragile)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_protocol_is_counted_and_the_server_keeps_serving() {
        let state = Arc::new(ServiceState::new(None));
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = DrainSettings {
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(5),
        };
        let server = Server::new(
            FragileFactory,
            state.clone(),
            ConnectionSettings::default(),
            drain,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));

        let mut doomed = tokio::net::TcpStream::connect(addr).await.unwrap();
        doomed.write_all(b"boom!").await.unwrap();
        let mut buf = [0u8; 8];
        // The task unwound: the socket is closed without an echo.
        assert!(matches!(doomed.read(&mut buf).await, Ok(0) | Err(_)));

        let mut fine = tokio::net::TcpStream::connect(addr).await.unwrap();
        fine.write_all(b"still here").await.unwrap();
        fine.shutdown().await.unwrap();
        let mut back = Vec::new();
        fine.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"still here");

        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while state.stats.active.get() != 0 || state.stats.lost_total() != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "connections not settled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state.stats.lost(LossReason::Panic).get(), 1);
        assert_eq!(state.stats.lost(LossReason::PeerClosed).get(), 1);
        assert_eq!(state.stats.made.get(), 2);
        stop.send(()).unwrap();
        running.await.unwrap();
    }

    /// Echoes after blocking its worker thread for a while on each read: a protocol that
    /// cannot see the shutdown abort until its callback returns.
    struct Sluggish;

    impl Protocol for Sluggish {
        fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
            std::thread::sleep(Duration::from_millis(2500));
            transport.write(data);
        }
    }

    /// Builds `Sluggish` protocols and records how many connections were still open when
    /// `stop_factory` ran.
    struct SluggishFactory {
        state: Arc<ServiceState>,
        active_at_stop: Arc<std::sync::Mutex<Option<i64>>>,
    }

    impl Factory for SluggishFactory {
        type Protocol = Sluggish;

        fn build_protocol(&self, _conn: &ConnectionInfo) -> Result<Sluggish, Refusal> {
            Ok(Sluggish)
        }

        fn stop_factory(&self) {
            *self.active_at_stop.lock().unwrap() = Some(self.state.stats.active.get());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_returns_and_stops_the_factory_only_after_the_last_connection_is_gone() {
        let state = Arc::new(ServiceState::new(None));
        let active_at_stop = Arc::default();
        let factory = SluggishFactory {
            state: state.clone(),
            active_at_stop: Arc::clone(&active_at_stop),
        };
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = DrainSettings {
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_millis(100),
        };
        let server = Server::new(factory, state.clone(), ConnectionSettings::default(), drain);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(b"slow").await.unwrap();
        while state.stats.made.get() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // inside data_received now
        stop.send(()).unwrap();
        // The connection outlives the shutdown timeout and the abort by its blocked callback.
        running.await.unwrap();
        assert_eq!(
            state.stats.active.get(),
            0,
            "run returned with a live connection"
        );
        assert_eq!(
            *active_at_stop.lock().unwrap(),
            Some(0),
            "stop_factory ran too early"
        );
        assert_eq!(state.stats.lost(LossReason::Shutdown).get(), 1);
    }

    #[test]
    fn only_the_ipv6_wildcard_falls_back_and_only_when_ipv6_is_missing() {
        let wildcard: SocketAddr = "[::]:8000".parse().unwrap();
        let no_ipv6 = io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        assert_eq!(
            ipv4_fallback(wildcard, &no_ipv6),
            Some("0.0.0.0:8000".parse().unwrap())
        );
        let in_use = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(ipv4_fallback(wildcard, &in_use), None);
        assert_eq!(ipv4_fallback("[::1]:8000".parse().unwrap(), &no_ipv6), None);
        assert_eq!(
            ipv4_fallback("127.0.0.1:8000".parse().unwrap(), &no_ipv6),
            None
        );
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listener_options() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let settings = ConnectionSettings {
            send_queue_limit: 12_345,
            tcp_keepalive: Some(Duration::from_secs(77)),
            ..ConnectionSettings::default()
        };
        set_inherited_options(&listener, &settings).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().unwrap(), "TCP_NODELAY not inherited");
        assert_eq!(socket.tcp_notsent_lowat().unwrap(), 12_345);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(77)
        );
    }

    #[test]
    fn mapped_ipv4_peers_are_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "10.1.2.3:5000");
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
