//! Builds the OTLP span exporter from checked [`ExportSettings`]: gRPC through tonic, or
//! HTTP/protobuf through an async hyper client, both over rustls (ring) for `https://`
//! endpoints, with gzip and headers when asked.
//!
//! Everything the environment specified is passed programmatically, so the exporter does what
//! [`super::otel_env`] checked. Certificate and key files are read and parsed here, at
//! startup: a file that cannot be used is an error naming its variable, never a failure at the
//! first export.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

use opentelemetry_otlp::{Compression, WithExportConfig, WithHttpConfig, WithTonicConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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

/// Build the exporter. `timeout` bounds each export request (retries included).
pub fn build_exporter(
    settings: &ExportSettings,
    timeout: Duration,
) -> Result<opentelemetry_otlp::SpanExporter, TracingSetupError> {
    let tls = TlsMaterial::load(&settings.tls)?;
    // Built for both protocols: it checks the files whatever the endpoint's scheme.
    let rustls_config = tls.rustls_config(&settings.tls)?;
    let headers = settings.headers.iter().cloned().collect();
    let built = match settings.protocol {
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
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(timeout)
                .with_metadata(metadata);
            if settings.gzip {
                builder = builder.with_compression(Compression::Gzip);
            }
            if settings.https {
                builder = builder.with_tls_config(tls.tonic_config());
            }
            builder.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(rustls_config)
                .https_or_http()
                .enable_http1()
                .build();
            let client = ReportingClient {
                inner: opentelemetry_http::hyper::HyperClient::new(connector, timeout, None),
                log: LogLimiter::default(),
            };
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(timeout)
                .with_headers(headers);
            if settings.gzip {
                builder = builder.with_compression(Compression::Gzip);
            }
            builder.build()
        }
    };
    built.map_err(|err| {
        TracingSetupError::new(format!(
            "invalid OTLP exporter settings (OTEL_EXPORTER_OTLP_*): {err}"
        ))
    })
}
