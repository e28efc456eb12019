//! The `echo-service` binary: configuration, telemetry, bind, serve, drain. Everything else
//! lives in the library.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use echo_service::admin::control::{faults_json, Control};
use echo_service::admin::{self, Admin};
use echo_service::echo::EchoDatagram;
use echo_service::faults::{FaultControl, FaultFactory};
use echo_service::policies::{ConnectionLimit, PeerConnectionLimit};
use echo_service::proxy_protocol::{ProxyProtocolFactory, ProxySettings};
use echo_service::signal::{IgnoredSignals, ShutdownSignals};
use echo_service::telemetry::{
    init_tracing, InstrumentedFactory, Metrics, ProxyMetrics, StdoutLog,
};
use echo_service::tls::{CertStore, TlsFactory};
use echo_service::udp::{self, UdpServer};
use echo_service::{fd_limit, server, Config, EchoFactory, Factory, Refusal, Server, ServiceState};

fn main() -> ExitCode {
    // An empty `ECHO_*` variable (`ECHO_LOG_LEVEL=`, a blank Helm value) means "not set", as
    // for the OTEL_* variables; still single-threaded here, so changing the environment is safe.
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(key, value)| {
            key.to_str().is_some_and(|k| k.starts_with("ECHO_")) && value.is_empty()
        })
        .map(|(key, _)| key)
        .collect();
    for key in empty {
        std::env::remove_var(key);
    }
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(err) if !err.use_stderr() => {
            // --help and --version
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // One line that names the setting; no usage dump, no backtrace.
            let rendered = err.render().to_string();
            eprintln!(
                "{}",
                rendered
                    .lines()
                    .next()
                    .unwrap_or("error: invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    if let Err(message) = config.validate() {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    let log = match StdoutLog::start(config.log_buffer_size) {
        Ok(log) => log,
        Err(err) => {
            eprintln!("error: could not start the log writer: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config, log.clone()));
    // Whatever stdout's reader does, exit within this bound; lines it never took are lost.
    log.flush(LOG_FLUSH_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(RunError::Failed(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `--max-connections`, or when unset the limit derived from RLIMIT_NOFILE (raised to its hard
/// limit first), so echo connections can never take the admin port's descriptors.
fn connection_limit(config: &Config) -> Option<u64> {
    let nofile = match fd_limit::raise_nofile() {
        Ok(limit) => {
            if limit.now > limit.before {
                tracing::info!(
                    from = limit.before,
                    to = limit.now,
                    "raised the RLIMIT_NOFILE soft limit to the hard limit"
                );
            }
            limit.now
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not read or raise RLIMIT_NOFILE");
            return config.max_connections;
        }
    };
    if config.max_connections.is_some() {
        return config.max_connections;
    }
    let derived = fd_limit::default_max_connections(nofile, config.admin_max_connections);
    match derived {
        Some(limit) => tracing::info!(
            max_connections = limit,
            rlimit_nofile = nofile,
            reserve = fd_limit::reserve(config.admin_max_connections),
            "no --max-connections: derived from RLIMIT_NOFILE minus the reserve"
        ),
        None => tracing::warn!(
            rlimit_nofile = nofile,
            reserve = fd_limit::reserve(config.admin_max_connections),
            "RLIMIT_NOFILE leaves no room beyond the reserve: no connection limit; raise it (ulimit -n)"
        ),
    }
    derived
}

/// The shutdown signal, told to every server: the first SIGTERM/SIGINT starts the drain of all
/// of them; a second one exits at once.
struct ShutdownBroadcast {
    requested: tokio::sync::watch::Receiver<bool>,
}

impl ShutdownBroadcast {
    fn start(mut signals: ShutdownSignals) -> Self {
        let (tell, requested) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let signal = signals.recv().await;
            tracing::info!(signal, "shutdown requested; a second signal exits at once");
            let _ = tell.send(true);
            signals.recv().await;
            // Nothing first, not even a log line: this is the operator's way out.
            std::process::exit(1);
        });
        ShutdownBroadcast { requested }
    }

    /// Completes when shutdown was requested.
    fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut requested = self.requested.clone();
        async move {
            let _ = requested.wait_for(|&yes| yes).await;
        }
    }
}

/// The `listener` label of a listener of `kind`: the kind alone when it is the only one of its
/// kind, else `kind:port`.
fn listener_name(kind: &str, local: std::net::SocketAddr, of_kind: usize) -> String {
    if of_kind > 1 {
        format!("{kind}:{}", local.port())
    } else {
        kind.to_owned()
    }
}

/// How long the process waits at exit for queued log lines to reach stdout.
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the service stopped early: a setting it cannot use (exit 2), or a failure (exit 1).
enum RunError {
    Config(String),
    Failed(String),
}

impl From<String> for RunError {
    fn from(message: String) -> Self {
        RunError::Failed(message)
    }
}

async fn run(config: Config, log: StdoutLog) -> Result<(), RunError> {
    let tracing = init_tracing(
        &config.log_level,
        config.log_format,
        log,
        config.otlp_settings(),
    )
    .map_err(|err| RunError::Config(err.to_string()))?;
    let max_connections = connection_limit(&config);
    let state = Arc::new(ServiceState::new(max_connections));
    let metrics = Metrics::register(&state).map_err(|err| format!("metrics: {err}"))?;
    let traffic = metrics.traffic.clone();
    let proxy_metrics = metrics.proxy.clone();
    let proxy = config.proxy_settings();
    let fault_seed = config.fault_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let faults = Arc::new(FaultControl::new(
        config.faults.clone(),
        fault_seed,
        metrics.faults.clone(),
    ));
    if !config.faults.is_empty() || config.admin_control {
        tracing::info!(
            faults = %faults_json(&faults.current()),
            fault_seed,
            admin_control = config.admin_control,
            admin_token = config.admin_token.is_some(),
            "fault injection layer installed on every stream listener"
        );
    }

    let listener = server::bind(config.listen, config.listen_backlog)
        .map_err(|err| format!("cannot listen on '--listen {}': {err}", config.listen))?;
    let admin_listener = server::bind(config.admin_listen, 128).map_err(|err| {
        format!(
            "cannot listen on '--admin-listen {}': {err}",
            config.admin_listen
        )
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|err| format!("admin listener: {err}"))?;
    let signals = ShutdownSignals::install()
        .map_err(|err| format!("cannot install signal handlers: {err}"))?;
    let other_signals = IgnoredSignals::install()
        .map_err(|err| format!("cannot install signal handlers: {err}"))?;

    for &addr in &config.udp_listen {
        let socket = udp::bind(addr)
            .map_err(|err| format!("cannot listen on '--udp-listen {addr}': {err}"))?;
        let local = socket
            .local_addr()
            .map_err(|err| format!("UDP listener: {err}"))?;
        let name = listener_name("udp", local, config.udp_listen.len());
        let counters = metrics.datagrams.listener(&name);
        tracing::info!(udp = %local, listener = %name, "UDP echo serving");
        tokio::spawn(UdpServer::new(socket, EchoDatagram, counters, traffic.clone()).run());
    }

    // TLS listeners: bound and loaded before serving, so a bad certificate is a startup error.
    let mut tls_listeners = Vec::new();
    let mut cert_stores = Vec::new();
    if let Some(tls_settings) = config.tls_settings() {
        for &addr in &config.tls_listen {
            let listener = server::bind(addr, config.listen_backlog)
                .map_err(|err| format!("cannot listen on '--tls-listen {addr}': {err}"))?;
            let local = listener
                .local_addr()
                .map_err(|err| format!("TLS listener: {err}"))?;
            let name = listener_name("tls", local, config.tls_listen.len());
            let store = CertStore::load(tls_settings.clone(), metrics.tls.listener(&name))
                .map_err(RunError::Config)?;
            tokio::spawn(store.clone().watch());
            tracing::info!(tls = %local, listener = %name, "TLS echo serving");
            cert_stores.push(store.clone());
            tls_listeners.push((listener, store));
        }
    }
    let on_hangup: Option<Box<dyn Fn() + Send>> = (!cert_stores.is_empty()).then(|| {
        Box::new(move || {
            for store in &cert_stores {
                store.reload_if_changed();
            }
        }) as Box<dyn Fn() + Send>
    });
    tokio::spawn(other_signals.handle_forever(on_hangup));

    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(
            Admin::new(state.clone(), metrics)
                .with_proxy_mode(config.proxy_protocol)
                .with_control(Control {
                    faults: faults.clone(),
                    enabled: config.admin_control,
                    token: config.admin_token.clone(),
                }),
        ),
        config.admin_settings(),
    ));

    tracing::info!(
        listen = %listener.local_addr().map_err(|e| e.to_string())?,
        admin = %admin_addr,
        version = env!("CARGO_PKG_VERSION"),
        otlp = tracing.exporting(),
        proxy_protocol = config.proxy_protocol.as_str(),
        proxy_protocol_trusted = %config.proxy_protocol_trusted,
        "echo-service serving"
    );

    let shutdown = ShutdownBroadcast::start(signals);
    let proxied = Proxied {
        settings: proxy,
        metrics: proxy_metrics,
        faults: (!config.faults.is_empty() || config.admin_control).then_some(faults),
    };
    let mut servers = Vec::new();
    let factory = InstrumentedFactory::new(
        ConnectionLimit::new(
            peer_limited(EchoFactory, &config, &state, &proxied),
            state.clone(),
        ),
        traffic.clone(),
    );
    servers.push(proxied.spawn(factory, listener, &state, &config, shutdown.wait()));
    for (listener, store) in tls_listeners {
        // TLS inside the PROXY layer (HAProxy sends the header before the handshake) and
        // outside the instrumentation: spans and byte counts see the plaintext echo, and the
        // span covers the handshake.
        let factory = ConnectionLimit::new(
            peer_limited(
                TlsFactory::new(
                    InstrumentedFactory::new(EchoFactory, traffic.clone()),
                    store,
                ),
                &config,
                &state,
                &proxied,
            ),
            state.clone(),
        );
        servers.push(proxied.spawn(factory, listener, &state, &config, shutdown.wait()));
    }
    for server in servers {
        server
            .await
            .map_err(|err| format!("server task failed: {err}"))?;
    }
    tracing.shutdown().await;
    Ok(())
}

/// The per-peer connection limit around `inner`. Behind a PROXY header layer it counts the
/// original client, known only once the header is read, so it checks at `connection_made`
/// instead of at accept.
fn peer_limited<F: Factory>(
    inner: F,
    config: &Config,
    state: &ServiceState,
    proxied: &Proxied,
) -> PeerConnectionLimit<F> {
    match proxied.settings {
        None => PeerConnectionLimit::new(inner, config.max_connections_per_peer),
        Some(_) => PeerConnectionLimit::when_made(
            inner,
            config.max_connections_per_peer,
            state.stats.rejected(Refusal::PeerLimit).clone(),
        ),
    }
}

/// The outer layers of every stream listener: the PROXY header layer, when `--proxy-protocol`
/// is on, wraps the whole stack, so every layer inside sees the original client; inside it the
/// fault layer, only when a fault is configured or `--admin-control` is on, wraps everything
/// else (the instrumentation inside it reads the fault for the span).
struct Proxied {
    settings: Option<ProxySettings>,
    metrics: Arc<ProxyMetrics>,
    faults: Option<Arc<FaultControl>>,
}

impl Proxied {
    /// Serve `listener` with `factory` (behind the fault and PROXY layers when they are on)
    /// until `shutdown`, then drain.
    fn spawn<F: Factory>(
        &self,
        factory: F,
        listener: tokio::net::TcpListener,
        state: &Arc<ServiceState>,
        config: &Config,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        match &self.faults {
            Some(control) => {
                let factory =
                    FaultFactory::new(factory, control.clone(), config.write_buffer_limit);
                self.spawn_proxied(factory, listener, state, config, shutdown)
            }
            None => self.spawn_proxied(factory, listener, state, config, shutdown),
        }
    }

    /// Serve `listener` with `factory` (behind the PROXY layer when it is on) until
    /// `shutdown`, then drain. The accept loop runs on a worker thread, not on the block_on
    /// thread: connection tasks it spawns then start on the same worker without a
    /// cross-thread wake-up per accept.
    fn spawn_proxied<F: Factory>(
        &self,
        factory: F,
        listener: tokio::net::TcpListener,
        state: &Arc<ServiceState>,
        config: &Config,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (settings, drain) = (config.connection_settings(), config.drain_settings());
        match &self.settings {
            None => {
                let server = Server::new(factory, state.clone(), settings, drain);
                tokio::spawn(server.run(listener, shutdown))
            }
            Some(proxy) => {
                let factory =
                    ProxyProtocolFactory::new(factory, proxy.clone(), self.metrics.clone());
                let server = Server::new(factory, state.clone(), settings, drain);
                tokio::spawn(server.run(listener, shutdown))
            }
        }
    }
}
