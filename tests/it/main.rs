//! Black-box tests of the real `echo-service` binary, one test binary with a module per
//! concern (a single binary keeps link time down).

mod admin;
mod bench_smoke;
mod config;
mod drain;
mod echo;
mod fault_injection;
mod faults;
mod hardening;
mod identity;
mod log_limit;
mod metrics;
mod otel_env;
mod otel_tls;
mod otlp_health;
mod otlp_receiver;
mod policies;
mod proxy;
mod proxy_interop;
mod support;
mod tls;
mod tracing;
mod udp;
