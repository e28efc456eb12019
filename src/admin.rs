//! The admin HTTP server, on its own port (default `[::]:9000`), separate from the echo port.
//!
//! | endpoint   | meaning |
//! |------------|---------|
//! | `/metrics` | Prometheus text exposition (format 0.0.4) of every metric |
//! | `/healthz` | liveness: 200 and the shared connection state as JSON; depends on nothing external |
//! | `/readyz`  | readiness: 200 while serving; 503 while draining, stopping or at the connection limit, with the reason as JSON |
//!
//! `GET` and `HEAD` work on all three; other methods get 405 with `Allow`; other paths 404.
//! Headers must arrive within `--admin-header-timeout` (slow clients are disconnected) and fit
//! in `--admin-max-header-bytes` (larger ones get 431); malformed requests get 400. It keeps
//! serving through the whole drain, so probes and scrapes see it happen. Routing is a plain
//! `match`, and [`respond`] is tested without a socket.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::accept::AcceptBackoff;
use crate::proxy_protocol::ProxyMode;
use crate::state::ServiceState;
use crate::telemetry::{Metrics, TEXT_CONTENT_TYPE};

/// Admin server limits.
#[derive(Debug, Clone, Copy)]
pub struct AdminSettings {
    /// Close a connection whose request headers are not complete after this long.
    pub header_read_timeout: Duration,
    /// Largest request head accepted (hyper's read buffer; at least 8192).
    pub max_header_bytes: usize,
}

/// What the handlers read.
pub struct Admin {
    state: Arc<ServiceState>,
    metrics: Metrics,
    /// `--proxy-protocol`, shown in `/healthz`.
    proxy_protocol: ProxyMode,
}

impl Admin {
    /// Serve the shared `state` and the `metrics` registry.
    pub fn new(state: Arc<ServiceState>, metrics: Metrics) -> Self {
        Admin {
            state,
            metrics,
            proxy_protocol: ProxyMode::Off,
        }
    }

    /// Show `mode` as `proxy_protocol` in `/healthz`.
    pub fn with_proxy_mode(mut self, mode: ProxyMode) -> Self {
        self.proxy_protocol = mode;
        self
    }
}

/// Serve admin requests on `listener` until the process exits. Accept errors back off and are
/// logged at most once a second, like the echo port's (the admin port must outlive them).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, settings: AdminSettings) {
    let mut backoff = AcceptBackoff::default();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .keep_alive(true);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(err) => {
                backoff.failed(&err, "admin").await;
                continue;
            }
        };
        let admin = admin.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(&admin, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            }),
        );
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
        });
    }
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
    serde_json::json!({
        "status": state.phase().as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": (state.uptime_seconds() * 1000.0).round() / 1000.0,
        "connections_active": state.stats.active.get(),
        "connections_made_total": state.stats.made.get(),
        "connections_lost_total": state.stats.lost_total(),
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
        admin.state.stats.active.set(2);
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
        admin.state.stats.active.set(1);
        let full = respond(&admin, &Method::GET, "/readyz");
        assert_eq!(full.status(), 503);
        assert_eq!(body(full)["reason"], "at_capacity");
        admin.state.stats.active.set(0);
        admin.state.advance(Phase::Draining);
        let draining = respond(&admin, &Method::GET, "/readyz");
        assert_eq!(draining.status(), 503);
        assert_eq!(body(draining)["reason"], "draining");
        assert_eq!(respond(&admin, &Method::GET, "/healthz").status(), 200);
    }
}
