//! echo-service: an observable TCP echo server on a small Twisted-style protocol framework.
//!
//! A [`Factory`] builds one [`Protocol`] per accepted connection; the protocol reacts to
//! `connection_made`, `data_received` and `connection_lost` and acts on its connection only
//! through a [`Transport`]. The [`Server`] accepts, drives one task per connection with
//! backpressure, and drains gracefully on shutdown. Echo is the first protocol: a few lines in
//! [`echo`].
//!
//! # Layout
//!
//! - [`protocol`]: the `Protocol` trait and [`LossReason`] (why a connection ended).
//! - [`transport`]: the `Transport` trait and [`MemoryTransport`] for protocol unit tests.
//! - [`factory`]: the `Factory` trait, [`ConnectionInfo`] and [`Refusal`].
//! - [`state`]: [`ServiceState`], the shared counters and lifecycle phase that `/metrics`,
//!   `/healthz` and `/readyz` read.
//! - [`connection`]: the per-connection driver (reads, writes, backpressure, half-close,
//!   policy timers) and [`ConnectionSettings`]; generic over its stream
//!   ([`connection::ConnectionIo`]: TCP, and `tokio::io::duplex` for tests).
//! - [`server`]: accept loop, connection tasks, graceful drain; `bind`. (`accept.rs`: the
//!   accept back-off schedule and rate-limited error log shared with the admin port;
//!   `abort.rs`: the end-of-shutdown wake-up of every connection.)
//! - [`policies`]: connection policies: wrapping factories that refuse connections (total and
//!   per-peer limits) and the per-connection time policies (idle, write stall, max age,
//!   throttle) the driver consults.
//! - [`telemetry`]: Prometheus metrics, logs, OTLP spans, the instrumented factory.
//! - [`admin`]: the admin HTTP server.
//! - [`config`]: flags and `ECHO_*` variables.
//! - [`signal`]: SIGTERM and SIGINT start the drain; SIGHUP re-reads TLS certificates; SIGHUP
//!   and SIGUSR1/2 are otherwise logged and ignored.
//! - [`fd_limit`]: raise RLIMIT_NOFILE and derive the default connection limit from it, with a
//!   reserve for the admin port.
//! - [`echo`]: the echo protocol and factory, and the echo datagram protocol.
//! - [`identity`]: the identity protocol (`--identity-listen`) and the echo greeting.
//! - [`proxy_protocol`]: the PROXY protocol header parser and the wrapping layer that reads it.
//! - [`datagram`]: the `DatagramProtocol` / `DatagramTransport` traits (Twisted's UDP side).
//! - [`tls`]: TLS as a wrapping protocol over rustls's sans-I/O session, with certificate
//!   reload and the TLS metrics.
//! - [`faults`]: fault injection (`--fault`, `PUT /faults`): a wrapping factory and protocol
//!   that delays, throttles, closes, resets, refuses or blackholes chosen connections.
//! - [`udp`]: the UDP server: one task per socket, replies sent now or dropped and counted.
//!
//! Data flows one way: socket → server → (policies → instrumentation) → protocol → transport
//! → socket; telemetry and the admin server read the shared state, never the other way round.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod abort;
mod accept;
pub mod admin;
pub mod config;
pub mod connection;
pub mod datagram;
pub mod echo;
pub mod factory;
pub mod faults;
pub mod fd_limit;
pub mod identity;
mod mix;
pub mod policies;
pub mod protocol;
pub mod proxy_protocol;
pub mod server;
pub mod signal;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod udp;

pub use config::Config;
pub use connection::ConnectionSettings;
pub use echo::{Echo, EchoFactory};
pub use factory::{ConnectionInfo, Factory, Refusal};
pub use protocol::{LossReason, Protocol};
pub use server::{DrainSettings, Server};
pub use state::{Phase, ServiceState};
pub use transport::{MemoryTransport, Transport};
