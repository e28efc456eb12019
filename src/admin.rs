//! The admin HTTP server, on its own port (default `[::]:9000`), separate from the echo port.
//!
//! | endpoint   | meaning |
//! |------------|---------|
//! | `/metrics` | Prometheus text exposition (format 0.0.4) of every metric |
//! | `/healthz` | liveness: 200 and the shared connection state as JSON; depends on nothing external |
//! | `/readyz`  | readiness: 200 while serving; 503 while draining, stopping, at the connection limit or disabled (`POST /readyz/disable`), with the reason as JSON |
//! | `/faults`, `/readyz/disable`, `/readyz/enable` | fault injection and readiness control (`control.rs`; mutating only with `--admin-control`) |
//!
//! `GET` and `HEAD` work on all three; other methods get 405 with `Allow`; other paths 404.
//! HTTP/1.1 and HTTP/2 with prior knowledge are both served. Headers must arrive within
//! `--admin-header-timeout` (slow clients are disconnected) and fit in
//! `--admin-max-header-bytes` (larger ones get 431); a request target over [`MAX_URI_BYTES`]
//! gets 414; malformed requests get 400. At most `--admin-max-connections` are open at once,
//! shared fairly between peers (`slots.rs`), so a flood can neither grow memory nor lock out
//! probes. It keeps serving through the whole drain, so probes and scrapes see it happen.
//! Routing is a plain `match`, and [`respond`] is tested without a socket.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::accept::AcceptBackoff;
use crate::proxy_protocol::ProxyMode;
use crate::state::ServiceState;
use crate::telemetry::{Metrics, TEXT_CONTENT_TYPE};

pub mod control;
mod slots;

use control::Control;
use slots::{AdminSlots, Admission};

/// The longest request target (path and query) answered; longer ones get 414. Room for it is
/// added to hyper's read buffer on top of `--admin-max-header-bytes`, so a long URI is told
/// apart from oversized headers (431).
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Admin server limits.
#[derive(Debug, Clone, Copy)]
pub struct AdminSettings {
    /// Close a connection whose request headers are not complete after this long.
    pub header_read_timeout: Duration,
    /// Largest request head accepted (at least 8192); larger ones get 431.
    pub max_header_bytes: usize,
    /// Most admin connections open at once (`--admin-max-connections`).
    pub max_connections: usize,
}

/// What the handlers read.
pub struct Admin {
    state: Arc<ServiceState>,
    metrics: Metrics,
    /// `--proxy-protocol`, shown in `/healthz`.
    proxy_protocol: ProxyMode,
    /// The fault and readiness controls (`control.rs`), when wired.
    control: Option<Control>,
}

impl Admin {
    /// Serve the shared `state` and the `metrics` registry.
    pub fn new(state: Arc<ServiceState>, metrics: Metrics) -> Self {
        Admin {
            state,
            metrics,
            proxy_protocol: ProxyMode::Off,
            control: None,
        }
    }

    /// Serve `/faults` and `/readyz/disable|enable` (`control.rs`).
    pub fn with_control(mut self, control: Control) -> Self {
        self.control = Some(control);
        self
    }

    /// Show `mode` as `proxy_protocol` in `/healthz`.
    pub fn with_proxy_mode(mut self, mode: ProxyMode) -> Self {
        self.proxy_protocol = mode;
        self
    }
}

/// Serve admin requests on `listener` until the process exits. HTTP/1.1 and HTTP/2 (prior
/// knowledge, as gRPC-style clients send it) are both served. Accept errors back off and are
/// logged at most once a second, like the echo port's (the admin port must outlive them).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, settings: AdminSettings) {
    let slots = AdminSlots::new(settings.max_connections);
    let mut backoff = AcceptBackoff::default();
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192) + MAX_URI_BYTES)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(16)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let http = Arc::new(http);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(err) => {
                admin.metrics.admin.accept_errors.inc();
                backoff.failed(&err, "admin").await;
                continue;
            }
        };
        let slot = match slots.admit(peer.ip()) {
            Admission::Admitted(slot) => slot,
            Admission::AdmittedByEviction(slot) => {
                admin.metrics.admin.evicted.inc();
                slot
            }
            Admission::Refused => {
                // Closed at once: the peer sees the connection end, the process keeps nothing.
                admin.metrics.admin.refused.inc();
                drop(stream);
                continue;
            }
        };
        admin.metrics.admin.active.set(slots.open() as i64);
        let (admin, http, slots) = (admin.clone(), http.clone(), slots.clone());
        tokio::spawn(async move {
            serve_connection(stream, &admin, &http, &slot, settings).await;
            drop(slot);
            admin.metrics.admin.active.set(slots.open() as i64);
        });
    }
}

/// One admin connection, until it ends, is evicted, or sends no first request within the
/// header timeout (hyper's own timeout covers HTTP/1 requests once the protocol is known;
/// this one also covers a client that never sends enough to tell HTTP/1 from HTTP/2).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    admin: &Arc<Admin>,
    http: &auto::Builder<TokioExecutor>,
    slot: &slots::Slot,
    settings: AdminSettings,
) {
    let spoke = Arc::new(AtomicBool::new(false));
    let service = {
        let (admin, spoke) = (admin.clone(), spoke.clone());
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            spoke.store(true, Ordering::Relaxed);
            let admin = admin.clone();
            async move {
                let response = match respond_to(&admin, &req, settings.max_header_bytes) {
                    Routed::Done(response) => response,
                    Routed::Control => match &admin.control {
                        Some(ctl) => control::handle(ctl, &admin.state, req).await,
                        None => plain(StatusCode::NOT_FOUND, "not found\n"),
                    },
                };
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let first_request = async {
        tokio::time::sleep(settings.header_read_timeout).await;
        if spoke.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = conn => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
        }
        () = slot.evicted() => tracing::debug!("admin connection closed to make room for another peer"),
        () = first_request => tracing::debug!("admin connection sent no request in time"),
    }
}

/// Where a request goes after the size checks.
enum Routed {
    /// Answered.
    Done(Response<Full<Bytes>>),
    /// A control endpoint (`control.rs`), which may read the body.
    Control,
}

/// Check the request's size limits, then route it.
fn respond_to<B>(admin: &Admin, req: &Request<B>, max_header_bytes: usize) -> Routed {
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        return Routed::Done(plain(StatusCode::URI_TOO_LONG, "request target too long\n"));
    }
    let head: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if head > max_header_bytes {
        return Routed::Done(plain(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large\n",
        ));
    }
    if control::is_control_path(req.uri().path()) {
        return Routed::Control;
    }
    Routed::Done(respond(admin, req.method(), req.uri().path()))
}

/// Route one request. HEAD gets the GET response; hyper drops the body for HEAD.
pub fn respond(admin: &Admin, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => with_type(StatusCode::OK, TEXT_CONTENT_TYPE, admin.metrics.encode()),
        "/healthz" => {
            let mut body = healthz(&admin.state);
            body["proxy_protocol"] = admin.proxy_protocol.as_str().into();
            if let Some(ctl) = &admin.control {
                body["faults"] = control::faults_json(&ctl.faults.current());
            }
            json(StatusCode::OK, body)
        }
        _ => {
            let reason = admin.state.not_ready_reason();
            let status = if reason.is_some() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            json(
                status,
                serde_json::json!({
                    "ready": reason.is_none(),
                    "reason": reason.unwrap_or("accepting"),
                }),
            )
        }
    }
}

/// The `/healthz` body: the shared connection state.
fn healthz(state: &ServiceState) -> serde_json::Value {
    let (made, lost) = state.stats.totals_made_lost();
    serde_json::json!({
        "status": state.phase().as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": (state.uptime_seconds() * 1000.0).round() / 1000.0,
        "connections_active": state.stats.total_active(),
        "connections_made_total": made,
        "connections_lost_total": lost,
    })
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut bytes = body.to_string().into_bytes();
    bytes.push(b'\n');
    with_type(status, "application/json", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Phase;

    fn admin(max: Option<u64>) -> Admin {
        let state = Arc::new(ServiceState::new(max));
        let metrics = Metrics::register(&state).unwrap();
        Admin::new(state, metrics)
    }

    fn body(response: Response<Full<Bytes>>) -> serde_json::Value {
        use http_body_util::BodyExt;
        let bytes = block_on(response.into_body().collect()).unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn routes_methods_and_paths() {
        let admin = admin(None);
        assert_eq!(respond(&admin, &Method::GET, "/nope").status(), 404);
        let post = respond(&admin, &Method::POST, "/healthz");
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
        assert_eq!(respond(&admin, &Method::HEAD, "/readyz").status(), 200);
        let metrics = respond(&admin, &Method::GET, "/metrics");
        assert_eq!(metrics.headers()[CONTENT_TYPE], TEXT_CONTENT_TYPE);
    }

    #[test]
    fn healthz_reports_the_shared_state() {
        let admin = admin(None);
        admin.state.stats.made.inc_by(3);
        admin.state.stats.opened();
        // Totals are over every listener.
        admin.state.for_listener("tls").stats.opened();
        let health = body(respond(&admin, &Method::GET, "/healthz"));
        assert_eq!(health["status"], "serving");
        assert_eq!(health["connections_active"], 2);
        assert_eq!(health["connections_made_total"], 3);
        assert_eq!(health["proxy_protocol"], "off");
        let proxied = self::admin(None).with_proxy_mode(ProxyMode::Required);
        let health = body(respond(&proxied, &Method::GET, "/healthz"));
        assert_eq!(health["proxy_protocol"], "required");
    }

    #[test]
    fn readyz_fails_while_draining_or_full() {
        let admin = admin(Some(1));
        assert_eq!(respond(&admin, &Method::GET, "/readyz").status(), 200);
        admin.state.stats.opened();
        let full = respond(&admin, &Method::GET, "/readyz");
        assert_eq!(full.status(), 503);
        assert_eq!(body(full)["reason"], "at_capacity");
        admin.state.stats.closed();
        admin.state.advance(Phase::Draining);
        let draining = respond(&admin, &Method::GET, "/readyz");
        assert_eq!(draining.status(), 503);
        assert_eq!(body(draining)["reason"], "draining");
        assert_eq!(respond(&admin, &Method::GET, "/healthz").status(), 200);
    }
}
