//! The OTLP client, built from checked [`ExportSettings`]: it sends an encoded
//! `ExportTraceServiceRequest` (module `otlp_proto`) over gRPC through tonic, or over
//! HTTP/protobuf through an async hyper client, both over rustls (ring) for `https://`
//! endpoints, with gzip and headers when asked, and classifies failures by kind (the `kind`
//! label of `echo_otlp_export_errors_total`).
//!
//! The body arrives as protobuf bytes: on gRPC a pass-through codec frames it as the
//! `TraceService/Export` call's message, so both protocols share one encoder and neither goes
//! through the generated proto structs.
//!
//! Everything the environment specified is passed programmatically, so the exporter does what
//! [`super::otel_env`] checked. Certificate and key files are read and parsed here, at
//! startup: a file that cannot be used is an error naming its variable, never a failure at the
//! first export.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use super::log_limit::LogLimiter;
use super::otel_env::{ExportSettings, NamedFile, OtlpProtocol, TlsFiles};
use super::tracing_setup::TracingSetupError;

/// A client identity: certificate PEM and key PEM as read (tonic wants PEM), and parsed.
type Identity = (
    Vec<u8>,
    Vec<u8>,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
);

/// PEM material read from the files the variables name.
struct TlsMaterial {
    /// CA PEM as read (tonic wants PEM) and parsed.
    ca: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    /// Client certificate chain and key, PEM as read and parsed.
    identity: Option<Identity>,
}

fn read(file: &NamedFile) -> Result<Vec<u8>, TracingSetupError> {
    std::fs::read(&file.path).map_err(|err| {
        TracingSetupError::new(format!(
            "invalid value '{}' for '{}': cannot read it: {err}",
            file.path.display(),
            file.variable
        ))
    })
}

fn unusable(file: &NamedFile, why: impl std::fmt::Display) -> TracingSetupError {
    TracingSetupError::new(format!(
        "invalid value '{}' for '{}': {why}",
        file.path.display(),
        file.variable
    ))
}

fn certificates(
    file: &NamedFile,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TracingSetupError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| unusable(file, format_args!("not a PEM certificate file ({err})")))?;
    if certs.is_empty() {
        return Err(unusable(file, "no PEM certificate in it"));
    }
    Ok(certs)
}

impl TlsMaterial {
    fn load(files: &TlsFiles) -> Result<TlsMaterial, TracingSetupError> {
        let ca = match &files.ca {
            None => None,
            Some(file) => {
                let pem = read(file)?;
                let certs = certificates(file, &pem)?;
                Some((pem, certs))
            }
        };
        let identity = match (&files.client_certificate, &files.client_key) {
            (Some(cert_file), Some(key_file)) => {
                let cert_pem = read(cert_file)?;
                let chain = certificates(cert_file, &cert_pem)?;
                let key_pem = read(key_file)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| {
                    unusable(key_file, format_args!("no PEM private key ({err})"))
                })?;
                Some((cert_pem, key_pem, chain, key))
            }
            _ => None,
        };
        Ok(TlsMaterial { ca, identity })
    }

    /// The rustls client configuration (ring provider): the CA file's certificates or the
    /// system's roots, and the client identity if given. Also checks that the key fits.
    fn rustls_config(&self, files: &TlsFiles) -> Result<rustls::ClientConfig, TracingSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        match (&self.ca, &files.ca) {
            (Some((_, certs)), Some(file)) => {
                for cert in certs {
                    roots
                        .add(cert.clone())
                        .map_err(|err| unusable(file, format_args!("not a usable CA ({err})")))?;
                }
            }
            _ => {
                // Unreadable system certificates are skipped; an empty store fails every
                // handshake with a clear "unknown issuer" in the export error.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| TracingSetupError::new(format!("TLS setup: {err}")))?
            .with_root_certificates(roots);
        match (&self.identity, &files.client_certificate) {
            (Some((_, _, chain, key)), Some(file)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|err| {
                    unusable(
                        file,
                        format_args!("client certificate and key do not work together ({err})"),
                    )
                }),
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    /// tonic's TLS settings. HTTP/2 is assumed when the server negotiates no ALPN protocol:
    /// TLS terminators in front of collectors often do not (an NLB TLS listener's default
    /// ALPN policy is "None", `socat` has none), and the exporter only speaks HTTP/2 anyway.
    fn tonic_config(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new().assume_http2(true);
        config = match &self.ca {
            Some((pem, _)) => config.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key, _, _)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        config
    }
}

/// The HTTP client, logging why a request failed. The OTLP HTTP exporter reduces every
/// transport failure to "network error"; an untrusted collector certificate or a refused
/// connection should say so. At most one line per second per distinct error.
#[derive(Debug)]
struct ReportingClient<C> {
    inner: C,
    log: LogLimiter,
}

#[async_trait::async_trait]
impl<C: HttpClient> HttpClient for ReportingClient<C> {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let result = self.inner.send_bytes(request).await;
        if let Err(err) = &result {
            let mut chain = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                chain.push_str(": ");
                chain.push_str(&cause.to_string());
                source = cause.source();
            }
            if let Some(suppressed) = self.log.admit(&chain, Instant::now()) {
                tracing::warn!(error = %chain, suppressed, "OTLP/HTTP request failed");
            }
        }
        result
    }
}

/// Read and parse the certificate and key files, as at startup; the error names the variable.
pub fn check_tls(files: &TlsFiles) -> Result<(), TracingSetupError> {
    TlsMaterial::load(files)?.rustls_config(files).map(drop)
}

/// Why an export failed: the `kind` label and a message for the (rate-limited) log line.
#[derive(Debug)]
pub struct ExportFailure {
    /// One of `EXPORT_ERROR_KINDS`.
    pub kind: &'static str,
    /// What happened, without anything the collector sent (it may echo credentials).
    pub message: String,
    /// Transient, per the OTLP specification: the same request may succeed later (no
    /// connection or no answer; HTTP 429, 502, 503, 504, `Retry-After` not honoured; gRPC
    /// UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, CANCELLED, OUT_OF_RANGE,
    /// DATA_LOSS).
    pub retryable: bool,
}

impl ExportFailure {
    /// A permanent failure of `kind`.
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        ExportFailure {
            kind,
            message: message.into(),
            retryable: false,
        }
    }

    fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }
}

/// Sends encoded `ExportTraceServiceRequest`s to the collector.
#[derive(Debug)]
pub enum OtlpClient {
    /// OTLP/HTTP with a protobuf body.
    Http(HttpExport),
    /// OTLP/gRPC (boxed: the tonic client is large, and there is one per process).
    Grpc(Box<GrpcExport>),
}

impl OtlpClient {
    /// Send one request body (an encoded `ExportTraceServiceRequest`) once.
    pub async fn export(&self, body: Bytes) -> Result<(), ExportFailure> {
        match self {
            OtlpClient::Http(http) => http.export(body).await,
            OtlpClient::Grpc(grpc) => grpc.export(body).await,
        }
    }
}

/// OTLP/HTTP: `POST` the body to the traces URL.
#[derive(Debug)]
pub struct HttpExport {
    client: Box<dyn HttpClient>,
    endpoint: String,
    headers: Vec<(String, String)>,
    gzip: bool,
}

/// Identifies the exporter to the collector, as the OTLP specification asks.
const USER_AGENT: &str = concat!("echo-service/", env!("CARGO_PKG_VERSION"));

fn gzip(body: &[u8]) -> Result<Vec<u8>, ExportFailure> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::default(),
    );
    encoder
        .write_all(body)
        .and_then(|()| encoder.finish())
        .map_err(|err| ExportFailure::new("other", format!("gzip failed: {err}")))
}

impl HttpExport {
    async fn export(&self, body: Bytes) -> Result<(), ExportFailure> {
        let mut request = Request::post(self.endpoint.as_str())
            .header("content-type", "application/x-protobuf")
            .header("user-agent", USER_AGENT);
        let body = if self.gzip {
            request = request.header("content-encoding", "gzip");
            Bytes::from(gzip(&body)?)
        } else {
            body
        };
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(body)
            .map_err(|err| ExportFailure::new("other", format!("HTTP request: {err}")))?;
        // ReportingClient logs why a request failed; the message here stays one per kind.
        match self.client.send_bytes(request).await {
            Err(err) if is_timeout(err.as_ref()) => Err(ExportFailure::new(
                "timeout",
                "HTTP export failed: request timed out",
            )),
            Err(_) => Err(
                ExportFailure::new("network", "HTTP export failed: network error").retryable(true),
            ),
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => {
                let status = response.status().as_u16();
                Err(ExportFailure::new(
                    "http_status",
                    format!("HTTP export failed with status code: {status}"),
                )
                .retryable(matches!(status, 429 | 502 | 503 | 504)))
            }
        }
    }
}

/// Does this error (or one of its causes) say "timed out"?
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
            || err.to_string().contains("timed out")
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// OTLP/gRPC: the `TraceService/Export` unary call, its message passed through as bytes.
#[derive(Debug)]
pub struct GrpcExport {
    client: tonic::client::Grpc<Channel>,
    metadata: tonic::metadata::MetadataMap,
    /// Bounds one attempt, connection included. Ours rather than the endpoint's: tonic ends
    /// a timed-out call as `Cancelled`, which would read as a retryable gRPC status.
    timeout: Duration,
}

/// The `TraceService/Export` method.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl GrpcExport {
    async fn export(&self, body: Bytes) -> Result<(), ExportFailure> {
        match tokio::time::timeout(self.timeout, self.attempt(body)).await {
            Ok(result) => result,
            // Like the HTTP client's timeout: counted as `timeout`, not retried (a collector
            // that does not answer within the timeout will not answer the retry either).
            Err(_) => Err(ExportFailure::new(
                "timeout",
                format!("gRPC export failed: no answer within {:?}", self.timeout),
            )),
        }
    }

    async fn attempt(&self, body: Bytes) -> Result<(), ExportFailure> {
        let mut client = self.client.clone();
        client.ready().await.map_err(|err| {
            ExportFailure::new(
                "network",
                format!("gRPC export failed: network error: {err}"),
            )
            .retryable(true)
        })?;
        let mut request = tonic::Request::new(body);
        *request.metadata_mut() = self.metadata.clone();
        let status = match client
            .unary::<Bytes, (), _>(request, PathAndQuery::from_static(EXPORT_PATH), PassThrough)
            .await
        {
            Ok(_) => return Ok(()),
            Err(status) => status,
        };
        let code = status.code();
        let kind = match code {
            tonic::Code::DeadlineExceeded => "timeout",
            tonic::Code::Unavailable => "network",
            _ => "grpc_status",
        };
        // The collector's message may echo credentials: only the code, unless the error is
        // our own transport's (then it says why the connection failed).
        let mut message = format!("gRPC export failed: gRPC code {code:?}");
        let mut source = std::error::Error::source(&status);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        let retryable = matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
                | tonic::Code::OutOfRange
                | tonic::Code::DataLoss
        );
        Err(ExportFailure::new(kind, message).retryable(retryable))
    }
}

/// A gRPC codec that sends already-encoded protobuf bytes and ignores the response message
/// (an `ExportTraceServiceResponse`, whose partial-success counts the service does not use).
#[derive(Debug, Clone, Copy)]
struct PassThrough;

impl Codec for PassThrough {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> Self::Encoder {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        let len = bytes::Buf::remaining(src);
        bytes::Buf::advance(src, len);
        Ok(Some(()))
    }
}

/// Build the client. `timeout` bounds each export request.
pub fn build_client(
    settings: &ExportSettings,
    timeout: Duration,
) -> Result<OtlpClient, TracingSetupError> {
    let tls = TlsMaterial::load(&settings.tls)?;
    // Built for both protocols: it checks the files whatever the endpoint's scheme.
    let rustls_config = tls.rustls_config(&settings.tls)?;
    let invalid = |err: &dyn std::fmt::Display| {
        TracingSetupError::new(format!(
            "invalid OTLP exporter settings (OTEL_EXPORTER_OTLP_*): {err}"
        ))
    };
    match settings.protocol {
        OtlpProtocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (key, value) in &settings.headers {
                // Both were checked as metadata in otel_env.
                if let (Ok(key), Ok(value)) = (
                    key.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                    value.parse(),
                ) {
                    metadata.insert(key, value);
                }
            }
            let mut endpoint = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                .map_err(|err| invalid(&err))?
                .user_agent(USER_AGENT)
                .map_err(|err| invalid(&err))?;
            if settings.https {
                endpoint = endpoint
                    .tls_config(tls.tonic_config())
                    .map_err(|err| invalid(&err))?;
            }
            let mut client = tonic::client::Grpc::new(endpoint.connect_lazy());
            if settings.gzip {
                client = client.send_compressed(CompressionEncoding::Gzip);
            }
            Ok(OtlpClient::Grpc(Box::new(GrpcExport {
                client,
                metadata,
                timeout,
            })))
        }
        OtlpProtocol::HttpProtobuf => {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(rustls_config)
                .https_or_http()
                .enable_http1()
                .build();
            let client = ReportingClient {
                inner: HyperClient::new(connector, timeout, None),
                log: LogLimiter::default(),
            };
            settings
                .endpoint
                .parse::<tonic::codegen::http::Uri>()
                .map_err(|err| invalid(&err))?;
            Ok(OtlpClient::Http(HttpExport {
                client: Box::new(client),
                endpoint: settings.endpoint.clone(),
                headers: settings.headers.clone(),
                gzip: settings.gzip,
            }))
        }
    }
}
