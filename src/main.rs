//! The `echo-service` binary: configuration, telemetry, bind, serve, drain. Everything else
//! lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use echo_service::admin::{self, Admin};
use echo_service::identity::{GreetingFactory, Identity, IdentityFactory, IDENTITY_LISTENER};
use echo_service::policies::{ConnectionLimit, PeerConnectionLimit};
use echo_service::proxy_protocol::{ProxyProtocolFactory, ProxySettings};
use echo_service::signal::ShutdownSignals;
use echo_service::state::ECHO_LISTENER;
use echo_service::telemetry::{
    init_tracing, InstrumentedFactory, Metrics, ProxyMetrics, TrafficMetrics,
};
use echo_service::{server, Config, EchoFactory, Factory, Refusal, Server, ServiceState};

fn main() -> ExitCode {
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
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    let tracing = init_tracing(&config.log_level, config.log_format, config.otlp_settings())
        .map_err(|err| err.to_string())?;
    let state = Arc::new(ServiceState::new(config.max_connections));
    let metrics = Metrics::register(&state).map_err(|err| format!("metrics: {err}"))?;
    let traffic = metrics.traffic.clone();
    let proxy_metrics = metrics.proxy.clone();
    let proxy = config.proxy_settings();

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
    let mut signals = ShutdownSignals::install()
        .map_err(|err| format!("cannot install signal handlers: {err}"))?;

    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin::new(state.clone(), metrics).with_proxy_mode(config.proxy_protocol)),
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
        listen = %listener.local_addr().map_err(|e| e.to_string())?,
        admin = %admin_addr,
        identity = identity_addr.as_deref(),
        version = env!("CARGO_PKG_VERSION"),
        otlp = tracing.exporting(),
        proxy_protocol = config.proxy_protocol.as_str(),
        proxy_protocol_trusted = %config.proxy_protocol_trusted,
        greeting = config.greeting,
        "echo-service serving"
    );

    // One shutdown signal for every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let signal = signals.recv().await;
        tracing::info!(signal, "shutdown requested; a second signal exits at once");
        let _ = stop_tx.send(true);
        let signal = signals.recv().await;
        tracing::warn!(signal, "second signal: exiting now");
        std::process::exit(1);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let layers = Layers {
        state: state.clone(),
        traffic,
        proxy_metrics,
        proxy,
    };
    let identity_server = identity_listener.map(|listener| {
        let layers = Layers {
            state: Arc::new(state.for_listener(IDENTITY_LISTENER)),
            ..layers.clone()
        };
        let app = IdentityFactory::new(identity.clone());
        tokio::spawn(serve_app(
            app,
            layers,
            config.clone(),
            listener,
            None,
            stopped(),
        ))
    });
    let echo = if config.greeting {
        let app = GreetingFactory::new(EchoFactory, identity, ECHO_LISTENER);
        serve_app(
            app,
            layers,
            config.clone(),
            listener,
            config.max_connections_per_peer,
            stopped(),
        )
        .await
    } else {
        serve_app(
            EchoFactory,
            layers,
            config.clone(),
            listener,
            config.max_connections_per_peer,
            stopped(),
        )
        .await
    };
    echo?;
    if let Some(server) = identity_server {
        server
            .await
            .map_err(|err| format!("identity server task failed: {err}"))??;
    }
    tracing.shutdown().await;
    Ok(())
}

/// What every listener's stack shares.
#[derive(Clone)]
struct Layers {
    state: Arc<ServiceState>,
    traffic: Arc<TrafficMetrics>,
    proxy_metrics: Arc<ProxyMetrics>,
    proxy: Option<ProxySettings>,
}

/// Serve `app` on `listener` inside the shared layers, outermost first: the PROXY header layer
/// (when on, so everything inside sees the original client), instrumentation, the total limit,
/// the per-peer limit (`per_peer`); until `shutdown`, then drain.
async fn serve_app<F: Factory>(
    app: F,
    layers: Layers,
    config: Config,
    listener: tokio::net::TcpListener,
    per_peer: Option<u32>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let Layers {
        state,
        traffic,
        proxy_metrics,
        proxy,
    } = layers;
    // Behind a PROXY header layer the per-peer limit counts the original client, known only
    // once the header is read, so it checks at connection_made instead of at accept.
    let peer_limit = match proxy {
        None => PeerConnectionLimit::new(app, per_peer),
        Some(_) => PeerConnectionLimit::when_made(
            app,
            per_peer,
            state.stats.rejected(Refusal::PeerLimit).clone(),
        ),
    };
    let factory =
        InstrumentedFactory::new(ConnectionLimit::new(peer_limit, state.clone()), traffic);
    match proxy {
        None => serve(factory, state, &config, listener, shutdown).await,
        Some(settings) => {
            let factory = ProxyProtocolFactory::new(factory, settings, proxy_metrics);
            serve(factory, state, &config, listener, shutdown).await
        }
    }
}

/// Run the echo server with `factory` until `shutdown`, then drain.
async fn serve<F: Factory>(
    factory: F,
    state: Arc<ServiceState>,
    config: &Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let server = Server::new(
        factory,
        state,
        config.connection_settings(),
        config.drain_settings(),
    );
    // Run the accept loop on a worker thread, not on this block_on thread: connection tasks it
    // spawns then start on the same worker without a cross-thread wake-up per accept.
    tokio::spawn(server.run(listener, shutdown))
        .await
        .map_err(|err| format!("server task failed: {err}"))
}
