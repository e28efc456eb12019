//! A real OTLP trace receiver for the tests: OTLP/gRPC (tonic, the generated `TraceService`)
//! or OTLP/HTTP (hyper, `POST /v1/traces` with a protobuf body), on `127.0.0.1:0`.
//!
//! It records every span it receives together with its resource attributes, counts export
//! requests and the raw TCP connections it accepted (so a test can assert that no attempt at
//! all was made), and has a "black hole" mode that accepts TCP connections and never reads or
//! answers (a collector that hangs).
//!
//! Every export request's headers (gRPC metadata) are recorded, gzip request bodies are
//! accepted on both protocols, and [`Mode::GrpcFailing`] / [`Mode::HttpFailing`] answer every
//! export with an error (gRPC `INTERNAL`, HTTP 400) after reading it.
//!
//! The receiver runs on its own small tokio runtime, so the blocking test helpers (`Service`,
//! `std::net` clients) can be used from plain `#[test]` functions. Dropping it stops it.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;

/// What the receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// OTLP/gRPC (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`).
    Http,
    /// Accept TCP connections, then never read, write or close them.
    BlackHole,
    /// OTLP/gRPC that fails every export with `INTERNAL` (not retried by the exporter).
    GrpcFailing,
    /// OTLP/HTTP that answers every export with 400 (not retried by the exporter).
    HttpFailing,
}

/// One received span with the resource and scope it was exported under.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Attributes of the span's resource (`service.name`, `OTEL_RESOURCE_ATTRIBUTES`, ...).
    pub resource: Vec<KeyValue>,
    /// Name of the instrumentation scope.
    pub scope: String,
    /// The span as sent.
    pub span: Span,
}

/// An HTTP request the receiver saw (only in [`Mode::Http`]), for diagnosing misrouted exports.
#[derive(Debug, Clone)]
pub struct HttpRequestSeen {
    /// Request method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// `content-type` header, if any.
    pub content_type: Option<String>,
    /// The status the receiver answered.
    pub status: u16,
}

#[derive(Default)]
struct Shared {
    /// Answer every export with an error.
    failing: bool,
    /// Headers (lower-case names) of every export request, in arrival order.
    headers: Mutex<Vec<Vec<(String, String)>>>,
    /// Export requests answered with an error.
    failed_requests: AtomicUsize,
    /// How many of the next export requests to answer with a transient error (gRPC
    /// `UNAVAILABLE`, HTTP 503), which the exporter should retry.
    transient_failures: AtomicUsize,
    spans: Mutex<Vec<ReceivedSpan>>,
    http_requests: Mutex<Vec<HttpRequestSeen>>,
    export_requests: AtomicUsize,
    connections: AtomicUsize,
}

impl Shared {
    /// Should this request fail transiently? Counts it as failed if so.
    fn take_transient_failure(&self) -> bool {
        let took = self
            .transient_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if took {
            self.failed_requests.fetch_add(1, Ordering::SeqCst);
        }
        took
    }

    fn record_headers(&self, headers: &hyper::HeaderMap) {
        let headers = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        self.headers.lock().unwrap().push(headers);
    }

    fn record(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                let scope = scope_spans.scope.map(|s| s.name).unwrap_or_default();
                for span in scope_spans.spans {
                    spans.push(ReceivedSpan {
                        resource: resource.clone(),
                        scope: scope.clone(),
                        span,
                    });
                }
            }
        }
        // Counted after the spans are stored: a reader that sees the count sees the spans.
        self.export_requests.fetch_add(1, Ordering::SeqCst);
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    /// Where it listens (always loopback).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OtlpReceiver {
    /// An OTLP/gRPC receiver.
    pub fn grpc() -> OtlpReceiver {
        Self::start(Mode::Grpc)
    }

    /// An OTLP/HTTP (protobuf) receiver.
    pub fn http() -> OtlpReceiver {
        Self::start(Mode::Http)
    }

    /// A collector that accepts connections and never answers.
    pub fn black_hole() -> OtlpReceiver {
        Self::start(Mode::BlackHole)
    }

    /// Start a receiver of the given kind on `127.0.0.1:0`.
    pub fn start(mode: Mode) -> OtlpReceiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .expect("start the receiver's runtime");
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener).unwrap()
        };
        let shared = Arc::new(Shared {
            failing: matches!(mode, Mode::GrpcFailing | Mode::HttpFailing),
            ..Shared::default()
        });
        match mode {
            Mode::Grpc | Mode::GrpcFailing => runtime.spawn(serve_grpc(listener, shared.clone())),
            Mode::Http | Mode::HttpFailing => runtime.spawn(serve_http(listener, shared.clone())),
            Mode::BlackHole => runtime.spawn(serve_black_hole(listener, shared.clone())),
        };
        OtlpReceiver {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    /// The base URL to put in `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.spans.lock().unwrap().clone()
    }

    /// The headers (lower-case names; gRPC metadata included) of every export request so far.
    pub fn request_headers(&self) -> Vec<Vec<(String, String)>> {
        self.shared.headers.lock().unwrap().clone()
    }

    /// Answer the next `n` export requests with a transient error (gRPC `UNAVAILABLE`, HTTP
    /// 503) after reading them; they count as failed requests.
    pub fn fail_next_transiently(&self, n: usize) {
        self.shared.transient_failures.store(n, Ordering::SeqCst);
    }

    /// Export requests answered with an error so far (failing modes).
    pub fn failed_requests(&self) -> usize {
        self.shared.failed_requests.load(Ordering::SeqCst)
    }

    /// Export requests decoded and answered so far.
    pub fn export_requests(&self) -> usize {
        self.shared.export_requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far (any mode).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// HTTP requests seen so far, including rejected ones (HTTP mode only).
    pub fn http_requests(&self) -> Vec<HttpRequestSeen> {
        self.shared.http_requests.lock().unwrap().clone()
    }

    /// Poll until at least `count` TCP connections were accepted or `limit` passed.
    pub fn wait_connections(&self, count: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.connections();
            if seen >= count || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Accept connections, count them, hand them to `handle`. Transient accept errors (e.g. EMFILE)
/// are retried after a pause instead of ending the receiver.
async fn accept_loop<F>(listener: TcpListener, shared: Arc<Shared>, mut handle: F)
where
    F: FnMut(TcpStream) -> bool,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                if !handle(stream) {
                    return;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

struct Collector {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.shared
            .record_headers(&request.metadata().clone().into_headers());
        if self.shared.failing {
            self.shared.failed_requests.fetch_add(1, Ordering::SeqCst);
            return Err(tonic::Status::internal("this receiver fails every export"));
        }
        if self.shared.take_transient_failure() {
            return Err(tonic::Status::unavailable("try again"));
        }
        self.shared.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn serve_grpc(listener: TcpListener, shared: Arc<Shared>) {
    // Our own accept loop feeds tonic, so every TCP connection is counted.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<io::Result<TcpStream>>();
    tokio::spawn(accept_loop(listener, shared.clone(), move |stream| {
        tx.send(Ok(stream)).is_ok()
    }));
    let result = tonic::transport::Server::builder()
        .add_service(
            TraceServiceServer::new(Collector { shared })
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
        .serve_with_incoming(UnboundedReceiverStream::new(rx))
        .await;
    if let Err(err) = result {
        eprintln!("OTLP gRPC receiver stopped: {err}");
    }
}

async fn serve_http(listener: TcpListener, shared: Arc<Shared>) {
    let per_connection = shared.clone();
    accept_loop(listener, shared, move |stream| {
        let shared = per_connection.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle_http(request, &shared).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        true
    })
    .await;
}

async fn handle_http(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    shared.record_headers(request.headers());
    let gzip = request
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let (status, body) = if path != "/v1/traces" {
        (StatusCode::NOT_FOUND, Bytes::new())
    } else if method != Method::POST {
        (StatusCode::METHOD_NOT_ALLOWED, Bytes::new())
    } else if content_type.as_deref() != Some("application/x-protobuf") {
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, Bytes::new())
    } else {
        match request.into_body().collect().await {
            Err(_) => (StatusCode::BAD_REQUEST, Bytes::new()),
            Ok(collected) => match decode_body(collected.to_bytes(), gzip) {
                None => (StatusCode::BAD_REQUEST, Bytes::new()),
                Some(_) if shared.failing => {
                    shared.failed_requests.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::BAD_REQUEST, Bytes::new())
                }
                Some(_) if shared.take_transient_failure() => {
                    (StatusCode::SERVICE_UNAVAILABLE, Bytes::new())
                }
                Some(export) => {
                    shared.record(export);
                    (
                        StatusCode::OK,
                        Bytes::from(ExportTraceServiceResponse::default().encode_to_vec()),
                    )
                }
            },
        }
    };
    shared.http_requests.lock().unwrap().push(HttpRequestSeen {
        method: method.to_string(),
        path,
        content_type,
        status: status.as_u16(),
    });
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(body))
        .unwrap()
}

/// Decode an export request body, gunzipping it first when it says it is gzip.
fn decode_body(body: Bytes, gzip: bool) -> Option<ExportTraceServiceRequest> {
    if gzip {
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut plain)
            .ok()?;
        ExportTraceServiceRequest::decode(&plain[..]).ok()
    } else {
        ExportTraceServiceRequest::decode(body).ok()
    }
}

async fn serve_black_hole(listener: TcpListener, shared: Arc<Shared>) {
    // Keep every connection open, unread and unanswered, until the receiver is dropped.
    let mut held = Vec::new();
    accept_loop(listener, shared, move |stream| {
        held.push(stream);
        true
    })
    .await;
}
