//! The admin port's control endpoints (issue 10): change the service's behaviour at runtime.
//!
//! | endpoint               | meaning |
//! |------------------------|---------|
//! | `GET /faults`          | the faults in force, as JSON (always available) |
//! | `PUT /faults`          | replace them (a JSON list; validated whole: a bad one is 400 naming the fault and key, and nothing changes) |
//! | `DELETE /faults`       | clear them |
//! | `POST /readyz/disable` | `/readyz` answers 503 with reason `disabled`; echo keeps serving |
//! | `POST /readyz/enable`  | undo it |
//!
//! The mutating ones exist only with `--admin-control` (404 otherwise); with
//! `ECHO_ADMIN_TOKEN` set they need `Authorization: Bearer <token>` (compared in constant
//! time; 401 otherwise). Bodies larger than [`MAX_BODY_BYTES`] get 413. Every change is logged
//! at info with what changed. Changes apply to new connections; open ones keep their fault.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};

use crate::faults::{parse_json, FaultControl, FaultSpec};
use crate::state::ServiceState;

/// The largest `PUT /faults` body read; larger ones get 413 and are not read further.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The paths this module answers.
pub fn is_control_path(path: &str) -> bool {
    matches!(path, "/faults" | "/readyz/disable" | "/readyz/enable")
}

/// What the control endpoints act on, and who may.
pub struct Control {
    /// The faults in force.
    pub faults: Arc<FaultControl>,
    /// `--admin-control`: the mutating endpoints exist.
    pub enabled: bool,
    /// `ECHO_ADMIN_TOKEN`, when set.
    pub token: Option<String>,
}

/// The faults as `GET /faults` and `/healthz` show them.
pub fn faults_json(faults: &[FaultSpec]) -> serde_json::Value {
    faults.iter().map(FaultSpec::to_json).collect()
}

/// Answer a request on one of [`is_control_path`]'s paths.
pub async fn handle<B>(
    control: &Control,
    state: &ServiceState,
    req: Request<B>,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path();
    let method = req.method().clone();
    if path == "/faults" && (method == Method::GET || method == Method::HEAD) {
        return json(StatusCode::OK, faults_json(&control.faults.current()));
    }
    if !control.enabled {
        return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    let allowed = if path == "/faults" {
        "GET, HEAD, PUT, DELETE"
    } else {
        "POST"
    };
    let method_ok = match path {
        "/faults" => method == Method::PUT || method == Method::DELETE,
        _ => method == Method::POST,
    };
    if !method_ok {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed));
        return response;
    }
    if let Some(token) = &control.token {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given, token.as_bytes()) {
            tracing::warn!(path, "admin control request without a valid bearer token");
            let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n".into());
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    match (path, &method) {
        ("/readyz/disable", _) | ("/readyz/enable", _) => {
            let disable = path == "/readyz/disable";
            let was = state.set_ready_disabled(disable);
            tracing::info!(
                from = if was { "disabled" } else { "enabled" },
                to = if disable { "disabled" } else { "enabled" },
                "readiness changed by the admin API"
            );
            json(
                StatusCode::OK,
                serde_json::json!({ "ready_disabled": disable }),
            )
        }
        (_, &Method::DELETE) => {
            let before = control.faults.replace(Vec::new());
            tracing::info!(
                from = %faults_json(&before),
                to = "[]",
                "faults cleared by the admin API"
            );
            json(StatusCode::OK, serde_json::json!([]))
        }
        _ => {
            let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(err) => {
                    let too_large = err
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    return if too_large {
                        text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("body larger than {MAX_BODY_BYTES} bytes\n"),
                        )
                    } else {
                        text(
                            StatusCode::BAD_REQUEST,
                            format!("cannot read the body: {err}\n"),
                        )
                    };
                }
            };
            match parse_json(&body) {
                Ok(faults) => {
                    let now = faults_json(&faults);
                    let before = control.faults.replace(faults);
                    tracing::info!(
                        from = %faults_json(&before),
                        to = %now,
                        "faults replaced by the admin API"
                    );
                    json(StatusCode::OK, now)
                }
                Err(err) => json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({
                        "error": err.to_string(),
                        "fault": err.fault,
                        "key": err.key,
                    }),
                ),
            }
        }
    }
}

/// Compare without an early exit, so the time taken does not tell how much of a guess was
/// right (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    super::with_type(status, "text/plain; charset=utf-8", body.into_bytes())
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    super::json(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
