//! The `echo-service` binary: configuration, telemetry, bind, serve, drain. Everything else
//! lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use echo_service::admin::{self, Admin};
use echo_service::policies::{ConnectionLimit, PeerConnectionLimit};
use echo_service::signal::ShutdownSignals;
use echo_service::telemetry::{init_tracing, InstrumentedFactory, Metrics, OtelSettings};
use echo_service::{server, Config, EchoFactory, Server, ServiceState};

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
    // OTEL_* values that make export impossible are configuration errors too.
    let otel = match OtelSettings::from_env() {
        Ok(otel) => otel,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
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
    match runtime.block_on(run(config, otel)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, otel: OtelSettings) -> Result<(), String> {
    let state = Arc::new(ServiceState::new(config.max_connections));
    let metrics = Metrics::register(&state).map_err(|err| format!("metrics: {err}"))?;
    let tracing = init_tracing(
        &config.log_level,
        config.log_format,
        config.otlp_settings(),
        otel,
        metrics.otlp.clone(),
    )
    .map_err(|err| err.to_string())?;
    let traffic = metrics.traffic.clone();

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
        Arc::new(Admin::new(state.clone(), metrics)),
        config.admin_settings(),
    ));

    let factory = InstrumentedFactory::new(
        ConnectionLimit::new(
            PeerConnectionLimit::new(EchoFactory, config.max_connections_per_peer),
            state.clone(),
        ),
        traffic,
    )
    .with_spans(tracing.connection_spans());
    let server = Server::new(
        factory,
        state,
        config.connection_settings(),
        config.drain_settings(),
    );
    tracing::info!(
        listen = %listener.local_addr().map_err(|e| e.to_string())?,
        admin = %admin_addr,
        version = env!("CARGO_PKG_VERSION"),
        otlp = tracing.exporting(),
        "echo-service serving"
    );

    let shutdown = async move {
        let signal = signals.recv().await;
        tracing::info!(signal, "shutdown requested; a second signal exits at once");
        tokio::spawn(async move {
            let signal = signals.recv().await;
            tracing::warn!(signal, "second signal: exiting now");
            std::process::exit(1);
        });
    };
    // Run the accept loop on a worker thread, not on this block_on thread: connection tasks it
    // spawns then start on the same worker without a cross-thread wake-up per accept.
    tokio::spawn(server.run(listener, shutdown))
        .await
        .map_err(|err| format!("server task failed: {err}"))?;
    tracing.shutdown().await;
    Ok(())
}
