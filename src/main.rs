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
use echo_service::identity::{GreetingFactory, Identity, IdentityFactory, IDENTITY_LISTENER};
use echo_service::policies::{ConnectionLimit, PeerConnectionLimit};
use echo_service::proxy_protocol::{ProxyProtocolFactory, ProxySettings};
use echo_service::signal::{IgnoredSignals, ShutdownSignals};
use echo_service::telemetry::{
    init_tracing, ConnectionSpans, InstrumentedFactory, Metrics, OtelSettings, ProxyMetrics,
    StdoutLog, TrafficMetrics,
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
    // OTEL_* values that make export impossible are configuration errors too.
    let otel = match OtelSettings::from_env() {
        Ok(otel) => otel,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
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
    let result = runtime.block_on(run(config, log.clone(), otel));
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

/// The connection limit in force and how it was chosen, logged once logging is up.
struct ConnectionLimitChoice {
    limit: Option<u64>,
    /// RLIMIT_NOFILE, raised to its hard limit, or why it could not be read.
    nofile: std::io::Result<fd_limit::NofileLimit>,
    reserve: u64,
    derived: bool,
}

impl ConnectionLimitChoice {
    /// `--max-connections`, or when unset the limit derived from RLIMIT_NOFILE (raised to its
    /// hard limit first), so echo connections can never take the admin port's descriptors.
    fn choose(config: &Config) -> Self {
        let nofile = fd_limit::raise_nofile();
        let reserve = fd_limit::reserve(config.admin_max_connections);
        let (limit, derived) = match (&nofile, config.max_connections) {
            (_, Some(limit)) => (Some(limit), false),
            (Ok(nofile), None) => (
                fd_limit::default_max_connections(nofile.now, config.admin_max_connections),
                true,
            ),
            (Err(_), None) => (None, false),
        };
        ConnectionLimitChoice {
            limit,
            nofile,
            reserve,
            derived,
        }
    }

    fn log(&self) {
        match &self.nofile {
            Ok(nofile) if nofile.now > nofile.before => tracing::info!(
                from = nofile.before,
                to = nofile.now,
                "raised the RLIMIT_NOFILE soft limit to the hard limit"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "could not read or raise RLIMIT_NOFILE"),
        }
        let Ok(nofile) = &self.nofile else { return };
        match (self.derived, self.limit) {
            (true, Some(limit)) => tracing::info!(
                max_connections = limit,
                rlimit_nofile = nofile.now,
                reserve = self.reserve,
                "no --max-connections: derived from RLIMIT_NOFILE minus the reserve"
            ),
            (true, None) => tracing::warn!(
                rlimit_nofile = nofile.now,
                reserve = self.reserve,
                "RLIMIT_NOFILE leaves no room beyond the reserve: no connection limit; raise it (ulimit -n)"
            ),
            _ => {}
        }
    }
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
/// Names live as long as the process (they label its metrics and greetings), and there is one
/// per listener flag: leaking the few that carry a port is the simple way to get `'static`.
fn listener_name(kind: &'static str, local: std::net::SocketAddr, of_kind: usize) -> &'static str {
    if of_kind > 1 {
        Box::leak(format!("{kind}:{}", local.port()).into_boxed_str())
    } else {
        kind
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

async fn run(config: Config, log: StdoutLog, otel: OtelSettings) -> Result<(), RunError> {
    // Echo ports first: the first one's listener name labels the service's own state (its
    // phase is what /readyz reports); the others count under their own listener label.
    let mut echo_listeners = Vec::new();
    for &addr in &config.listen {
        let listener = server::bind(addr, config.listen_backlog)
            .map_err(|err| format!("cannot listen on '--listen {addr}': {err}"))?;
        let local = listener
            .local_addr()
            .map_err(|err| format!("echo listener: {err}"))?;
        echo_listeners.push((
            listener,
            local,
            listener_name("tcp", local, config.listen.len()),
        ));
    }
    let limit = ConnectionLimitChoice::choose(&config);
    let state = Arc::new(ServiceState::for_first_listener(
        limit.limit,
        echo_listeners[0].2,
    ));
    let metrics = Metrics::register(&state).map_err(|err| format!("metrics: {err}"))?;
    let tracing = init_tracing(
        &config.log_level,
        config.log_format,
        log,
        config.otlp_settings(),
        otel,
        metrics.otlp.clone(),
    )
    .map_err(|err| RunError::Config(err.to_string()))?;
    limit.log();
    for (_, local, name) in &echo_listeners {
        tracing::info!(tcp = %local, listener = name, "TCP echo serving");
    }
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
        let counters = metrics.datagrams.listener(name);
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
            let store = CertStore::load(tls_settings.clone(), metrics.tls.listener(name))
                .map_err(RunError::Config)?;
            tokio::spawn(store.clone().watch());
            tracing::info!(tls = %local, listener = %name, "TLS echo serving");
            cert_stores.push(store.clone());
            tls_listeners.push((listener, store, name));
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

    let identity = Arc::new(Identity::from_env());
    let identity_listener = match config.identity_listen {
        Some(addr) => Some(
            server::bind(addr, config.listen_backlog)
                .map_err(|err| format!("cannot listen on '--identity-listen {addr}': {err}"))?,
        ),
        None => None,
    };
    let identity_addr = match &identity_listener {
        Some(listener) => Some(
            listener
                .local_addr()
                .map_err(|e| e.to_string())?
                .to_string(),
        ),
        None => None,
    };
    tracing::info!(
        listen = %echo_listeners[0].1,
        listen_ports = echo_listeners.len(),
        admin = %admin_addr,
        identity = identity_addr.as_deref(),
        version = env!("CARGO_PKG_VERSION"),
        otlp = tracing.exporting(),
        proxy_protocol = config.proxy_protocol.as_str(),
        proxy_protocol_trusted = %config.proxy_protocol_trusted,
        greeting = config.greeting,
        "echo-service serving"
    );

    let shutdown = ShutdownBroadcast::start(signals);
    let layers = Layers {
        state: state.clone(),
        traffic,
        spans: tracing.connection_spans(),
        proxy_metrics,
        proxy,
        faults: (!config.faults.is_empty() || config.admin_control).then_some(faults),
    };
    let mut servers = Vec::new();
    if let Some(listener) = identity_listener {
        let app = IdentityFactory::new(identity.clone());
        let layers = layers.for_listener(IDENTITY_LISTENER);
        servers.push(layers.spawn(app, None, &config, listener, None, shutdown.wait()));
    }
    for (listener, store, name) in tls_listeners {
        let layers = layers.for_listener(name);
        let per_peer = config.max_connections_per_peer;
        servers.push(if config.greeting {
            let app = GreetingFactory::new(EchoFactory, identity.clone(), name);
            layers.spawn(
                app,
                Some(store),
                &config,
                listener,
                per_peer,
                shutdown.wait(),
            )
        } else {
            layers.spawn(
                EchoFactory,
                Some(store),
                &config,
                listener,
                per_peer,
                shutdown.wait(),
            )
        });
    }
    let per_peer = config.max_connections_per_peer;
    for (i, (listener, _, name)) in echo_listeners.into_iter().enumerate() {
        let layers = if i == 0 {
            layers.clone()
        } else {
            layers.for_listener(name)
        };
        servers.push(if config.greeting {
            let app = GreetingFactory::new(EchoFactory, identity.clone(), name);
            layers.spawn(app, None, &config, listener, per_peer, shutdown.wait())
        } else {
            layers.spawn(
                EchoFactory,
                None,
                &config,
                listener,
                per_peer,
                shutdown.wait(),
            )
        });
    }
    for server in servers {
        server
            .await
            .map_err(|err| format!("server task failed: {err}"))?;
    }
    tracing.shutdown().await;
    Ok(())
}

/// What every stream listener's stack shares.
#[derive(Clone)]
struct Layers {
    /// This listener's state (its counters; the connection limit is the process's).
    state: Arc<ServiceState>,
    traffic: Arc<TrafficMetrics>,
    /// One OTLP span per connection, when exporting.
    spans: Option<ConnectionSpans>,
    proxy_metrics: Arc<ProxyMetrics>,
    proxy: Option<ProxySettings>,
    /// The fault layer, only when a fault is configured or `--admin-control` is on.
    faults: Option<Arc<FaultControl>>,
}

impl Layers {
    /// The same layers for another listener, counting under its `listener` label.
    fn for_listener(&self, listener: &str) -> Layers {
        Layers {
            state: Arc::new(self.state.for_listener(listener)),
            ..self.clone()
        }
    }

    /// Serve `app` on `listener` inside the layers, outermost first: the PROXY header layer
    /// (when on, so everything inside sees the original client; on a TLS port the header
    /// comes before the handshake, as HAProxy sends it), the fault layer (when on; the
    /// instrumentation inside it reads the fault for the span), TLS (when `tls`),
    /// instrumentation (inside TLS, so spans and byte counts see the plaintext and the span
    /// covers the handshake), the total limit, the per-peer limit (`per_peer`), then the app;
    /// until `shutdown`, then drain. The accept loop runs on a worker thread, not on the
    /// block_on thread: connection tasks it spawns then start on the same worker without a
    /// cross-thread wake-up per accept.
    fn spawn<F: Factory>(
        &self,
        app: F,
        tls: Option<Arc<CertStore>>,
        config: &Config,
        listener: tokio::net::TcpListener,
        per_peer: Option<u32>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let state = &self.state;
        // Behind a PROXY header layer the per-peer limit counts the original client, known
        // only once the header is read, so it checks at connection_made instead of at accept.
        let peer_limit = match self.proxy {
            None => PeerConnectionLimit::new(app, per_peer),
            Some(_) => PeerConnectionLimit::when_made(
                app,
                per_peer,
                state.stats.rejected(Refusal::PeerLimit).clone(),
            ),
        };
        let factory = InstrumentedFactory::new(
            ConnectionLimit::new(peer_limit, state.clone()),
            self.traffic.clone(),
        )
        .with_spans(self.spans.clone());
        match tls {
            None => self.spawn_faulted(factory, config, listener, shutdown),
            Some(store) => {
                self.spawn_faulted(TlsFactory::new(factory, store), config, listener, shutdown)
            }
        }
    }

    /// `factory` behind the fault layer, when it is on.
    fn spawn_faulted<F: Factory>(
        &self,
        factory: F,
        config: &Config,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        match &self.faults {
            Some(control) => {
                let factory =
                    FaultFactory::new(factory, control.clone(), config.write_buffer_limit);
                self.spawn_proxied(factory, config, listener, shutdown)
            }
            None => self.spawn_proxied(factory, config, listener, shutdown),
        }
    }

    /// `factory` behind the PROXY header layer, when it is on; served until `shutdown`.
    fn spawn_proxied<F: Factory>(
        &self,
        factory: F,
        config: &Config,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (settings, drain) = (config.connection_settings(), config.drain_settings());
        let state = self.state.clone();
        match &self.proxy {
            None => {
                tokio::spawn(Server::new(factory, state, settings, drain).run(listener, shutdown))
            }
            Some(proxy) => {
                let factory =
                    ProxyProtocolFactory::new(factory, proxy.clone(), self.proxy_metrics.clone());
                tokio::spawn(Server::new(factory, state, settings, drain).run(listener, shutdown))
            }
        }
    }
}
