//! The standard `OTEL_*` environment variables, read once at startup and checked the way the
//! OpenTelemetry environment-variable specification asks.
//!
//! The Rust SDK reads some of these itself and silently ignores what it cannot parse (a sampler
//! of `bogus`, a timeout of `abc`, headers of `garbage`), and does not read others at all
//! (`OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`, the certificate variables). So every variable
//! the service honours is read here, into [`OtelSettings`], and the SDK is then configured
//! programmatically with the result. Two kinds of bad value:
//!
//! - **Invalid but harmless** (a timeout of `abc`, an unknown sampler, a ratio of `5`, an
//!   unknown compression): ignored, with one warning naming the variable, the bad value and the
//!   value used instead ([`Warning`]); the warnings are logged once the logger is up.
//! - **Export impossible** (an endpoint that is not `http://` or `https://`, a queue size of 0,
//!   an unsupported protocol or exporter, headers that cannot be sent, a certificate that cannot
//!   be read): a [`TracingSetupError`] naming the variable; the service exits with status 2.
//!
//! An empty value counts as unset, as the specification says. The signal-specific
//! `OTEL_EXPORTER_OTLP_TRACES_*` variable wins over the general `OTEL_EXPORTER_OTLP_*` one.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

use super::tracing_setup::TracingSetupError;

/// The OTLP wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (the specification's default).
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The value as written in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// An invalid value that was ignored: which variable, what it held, what is used instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The variable's name.
    pub variable: &'static str,
    /// The value found.
    pub value: String,
    /// The value used instead, as text.
    pub used: String,
    /// Why the value was refused.
    pub reason: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value '{}' for {} ({}); using {}",
            self.value, self.variable, self.reason, self.used
        )
    }
}

/// A file named by a variable (certificates and keys), with the variable for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    /// The variable that named the file.
    pub variable: &'static str,
    /// The path it holds.
    pub path: PathBuf,
}

/// TLS material for an `https://` endpoint (all PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trusted CA certificates (`OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE`); without it the
    /// system's roots are trusted.
    pub ca: Option<NamedFile>,
    /// Client certificate chain for mTLS (`..._CLIENT_CERTIFICATE`).
    pub client_certificate: Option<NamedFile>,
    /// Client private key for mTLS (`..._CLIENT_KEY`).
    pub client_key: Option<NamedFile>,
}

/// Batch span processor settings (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most finished spans waiting for export; more are dropped and counted.
    pub max_queue_size: usize,
    /// Most spans in one export request.
    pub max_export_batch_size: usize,
    /// Longest a finished span waits before an export starts.
    pub schedule_delay: Duration,
    /// Upper bound of one export, retries included.
    pub export_timeout: Duration,
}

/// Where and how to export spans.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// gRPC or HTTP/protobuf.
    pub protocol: OtlpProtocol,
    /// The URL requests go to: for HTTP the full `.../v1/traces` URL, for gRPC the base URL.
    pub endpoint: String,
    /// Is the endpoint `https://`?
    pub https: bool,
    /// Extra request headers (gRPC metadata), already URL-decoded.
    pub headers: Vec<(String, String)>,
    /// Compress request bodies with gzip.
    pub gzip: bool,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`, when set and valid.
    pub timeout: Option<Duration>,
    /// Certificates and keys for `https://` endpoints.
    pub tls: TlsFiles,
    /// The sampler from `OTEL_TRACES_SAMPLER[_ARG]`.
    pub sampler: Sampler,
    /// The sampler as text, for the startup log line.
    pub sampler_name: String,
    /// `OTEL_BSP_*`.
    pub batch: BatchSettings,
}

/// Everything read from `OTEL_*`.
#[derive(Debug, Clone)]
pub struct OtelSettings {
    /// `None` when export is off: no endpoint, `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none`.
    pub export: Option<ExportSettings>,
    /// Invalid values that were ignored, to be logged as warnings.
    pub warnings: Vec<Warning>,
}

/// Our default export timeout, shorter than the specification's 10 s so that a collector that
/// hangs holds shutdown only briefly; `--export-timeout` overrides it.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Defaults from the specification.
const DEFAULT_SCHEDULE_DELAY_MS: u64 = 5_000;
const DEFAULT_BSP_EXPORT_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_MAX_QUEUE_SIZE: usize = 2_048;
const DEFAULT_MAX_EXPORT_BATCH_SIZE: usize = 512;

impl OtelSettings {
    /// Read the process environment.
    pub fn from_env() -> Result<OtelSettings, TracingSetupError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Read variables through `lookup` (tests pass a map).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<OtelSettings, TracingSetupError> {
        let mut reader = Reader {
            lookup: &lookup,
            warnings: Vec::new(),
        };
        let export = reader.export()?;
        Ok(OtelSettings {
            export,
            warnings: reader.warnings,
        })
    }
}

fn error(variable: &str, value: &str, why: impl fmt::Display) -> TracingSetupError {
    TracingSetupError::new(format!("invalid value '{value}' for '{variable}': {why}"))
}

struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    warnings: Vec<Warning>,
}

impl Reader<'_> {
    /// The trimmed value of `name`; empty counts as unset.
    fn get(&self, name: &'static str) -> Option<(&'static str, String)> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (name, v))
    }

    /// The traces-specific variable if set, else the general one.
    fn get_either(
        &self,
        traces: &'static str,
        general: &'static str,
    ) -> Option<(&'static str, String)> {
        self.get(traces).or_else(|| self.get(general))
    }

    fn warn(
        &mut self,
        variable: &'static str,
        value: &str,
        reason: impl Into<String>,
        used: impl fmt::Display,
    ) {
        self.warnings.push(Warning {
            variable,
            value: value.to_owned(),
            used: used.to_string(),
            reason: reason.into(),
        });
    }

    fn export(&mut self) -> Result<Option<ExportSettings>, TracingSetupError> {
        if let Some((name, value)) = self.get("OTEL_SDK_DISABLED") {
            if value.eq_ignore_ascii_case("true") {
                return Ok(None);
            }
            if !value.eq_ignore_ascii_case("false") {
                self.warn(name, &value, "a boolean is 'true' or 'false'", "false");
            }
        }
        if let Some((name, value)) = self.get("OTEL_TRACES_EXPORTER") {
            match value.as_str() {
                "otlp" => {}
                "none" => return Ok(None),
                _ => return Err(error(name, &value, "supported are 'otlp' and 'none'")),
            }
        }
        let protocol = match self.get_either(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ) {
            None => OtlpProtocol::HttpProtobuf,
            Some((_, value)) if value == "grpc" => OtlpProtocol::Grpc,
            Some((_, value)) if value == "http/protobuf" => OtlpProtocol::HttpProtobuf,
            Some((name, value)) => {
                return Err(error(
                    name,
                    &value,
                    "supported are 'grpc' and 'http/protobuf'",
                ))
            }
        };
        let Some((_, endpoint)) = self.endpoint(protocol)? else {
            return Ok(None);
        };
        let https = endpoint.starts_with("https://");
        let headers = self.headers()?;
        let gzip = self.compression();
        let timeout = self.timeout();
        let tls = self.tls_files()?;
        super::exporter::check_tls(&tls)?;
        let (sampler, sampler_name) = self.sampler();
        let batch = self.batch()?;
        Ok(Some(ExportSettings {
            protocol,
            endpoint,
            https,
            headers,
            gzip,
            timeout,
            tls,
            sampler,
            sampler_name,
            batch,
        }))
    }

    /// The endpoint URL: the traces variable verbatim, or the general one with `/v1/traces`
    /// appended for HTTP. `None` when neither is set (export stays off).
    fn endpoint(
        &self,
        protocol: OtlpProtocol,
    ) -> Result<Option<(&'static str, String)>, TracingSetupError> {
        let (name, value, verbatim) = match self.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some((name, value)) => (name, value, true),
            None => match self.get("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some((name, value)) => (name, value, false),
                None => return Ok(None),
            },
        };
        let uri: hyper::Uri = value
            .parse()
            .map_err(|err| error(name, &value, format_args!("not a URL ({err})")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            Some(other) => {
                return Err(error(
                    name,
                    &value,
                    format_args!("unsupported scheme '{other}'; use http:// or https://"),
                ))
            }
            None => {
                return Err(error(
                    name,
                    &value,
                    "no scheme; write http://HOST:PORT or https://HOST:PORT",
                ))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(error(name, &value, "no host"));
        }
        let url = match (protocol, verbatim) {
            (OtlpProtocol::HttpProtobuf, false) => {
                format!("{}/v1/traces", value.trim_end_matches('/'))
            }
            _ => value,
        };
        Ok(Some((name, url)))
    }

    /// `key=value` pairs, comma separated, values URL-encoded. Headers the exporter cannot
    /// send would be dropped silently by the SDK (often an auth token): refuse them instead.
    fn headers(&self) -> Result<Vec<(String, String)>, TracingSetupError> {
        let Some((name, value)) = self.get_either(
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ) else {
            return Ok(Vec::new());
        };
        let mut headers = Vec::new();
        for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, raw)) = pair.split_once('=') else {
                return Err(error(
                    name,
                    &value,
                    format_args!("'{pair}' is not key=value"),
                ));
            };
            let key = key.trim();
            let decoded = percent_decode(raw.trim()).ok_or_else(|| {
                error(
                    name,
                    &value,
                    format_args!("the value of '{key}' is not valid URL encoding"),
                )
            })?;
            if hyper::header::HeaderName::from_bytes(key.as_bytes()).is_err()
                || tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(
                    key.to_ascii_lowercase().as_bytes(),
                )
                .is_err()
            {
                return Err(error(
                    name,
                    &value,
                    format_args!("'{key}' is not a valid header name"),
                ));
            }
            if hyper::header::HeaderValue::from_str(&decoded).is_err() {
                return Err(error(
                    name,
                    &value,
                    format_args!("the value of '{key}' is not a valid header value"),
                ));
            }
            headers.push((key.to_ascii_lowercase(), decoded));
        }
        Ok(headers)
    }

    fn compression(&mut self) -> bool {
        match self.get_either(
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ) {
            None => false,
            Some((_, value)) if value == "gzip" => true,
            Some((_, value)) if value == "none" => false,
            Some((name, value)) => {
                self.warn(name, &value, "supported are 'gzip' and 'none'", "none");
                false
            }
        }
    }

    fn timeout(&mut self) -> Option<Duration> {
        let (name, value) = self.get_either(
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        )?;
        match value.parse::<u64>() {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => {
                self.warn(
                    name,
                    &value,
                    "not a positive number of milliseconds",
                    format_args!(
                        "{} (the default of --export-timeout)",
                        DEFAULT_EXPORT_TIMEOUT.as_millis()
                    ),
                );
                None
            }
        }
    }

    fn tls_files(&self) -> Result<TlsFiles, TracingSetupError> {
        let file = |traces, general| {
            self.get_either(traces, general)
                .map(|(variable, value)| NamedFile {
                    variable,
                    path: PathBuf::from(value),
                })
        };
        let files = TlsFiles {
            ca: file(
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ),
            client_certificate: file(
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ),
            client_key: file(
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ),
        };
        match (&files.client_certificate, &files.client_key) {
            (Some(cert), None) => Err(TracingSetupError::new(format!(
                "'{}' is set but 'OTEL_EXPORTER_OTLP_CLIENT_KEY' is not: a client certificate needs its key",
                cert.variable
            ))),
            (None, Some(key)) => Err(TracingSetupError::new(format!(
                "'{}' is set but 'OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE' is not: a client key needs its certificate",
                key.variable
            ))),
            _ => Ok(files),
        }
    }

    /// `OTEL_TRACES_SAMPLER` and its argument; the default is `parentbased_always_on`.
    fn sampler(&mut self) -> (Sampler, String) {
        const DEFAULT: &str = "parentbased_always_on";
        let name = match self.get("OTEL_TRACES_SAMPLER") {
            None => DEFAULT.to_owned(),
            Some((_, value))
                if [
                    "always_on",
                    "always_off",
                    "traceidratio",
                    "parentbased_always_on",
                    "parentbased_always_off",
                    "parentbased_traceidratio",
                ]
                .contains(&value.as_str()) =>
            {
                value
            }
            Some((var, value)) => {
                self.warn(var, &value, "unknown or unsupported sampler", DEFAULT);
                DEFAULT.to_owned()
            }
        };
        let ratio = || {
            let Some((var, value)) = self.get("OTEL_TRACES_SAMPLER_ARG") else {
                return (1.0, None);
            };
            match value.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => (r, None),
                _ => (1.0, Some((var, value))),
            }
        };
        let (sampler, used) = match name.as_str() {
            "always_on" => (Sampler::AlwaysOn, name.clone()),
            "always_off" => (Sampler::AlwaysOff, name.clone()),
            "parentbased_always_off" => (
                Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
                name.clone(),
            ),
            "traceidratio" | "parentbased_traceidratio" => {
                let (r, bad) = ratio();
                if let Some((var, value)) = bad {
                    self.warn(var, &value, "the ratio is a number from 0 to 1", "1.0");
                }
                let base = Sampler::TraceIdRatioBased(r);
                let sampler = if name == "traceidratio" {
                    base
                } else {
                    Sampler::ParentBased(Box::new(base))
                };
                (sampler, format!("{name}({r})"))
            }
            _ => (
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
                name.clone(),
            ),
        };
        (sampler, used)
    }

    fn batch(&mut self) -> Result<BatchSettings, TracingSetupError> {
        let max_queue_size = match self.get("OTEL_BSP_MAX_QUEUE_SIZE") {
            None => DEFAULT_MAX_QUEUE_SIZE,
            Some((name, value)) => match value.parse::<usize>() {
                Ok(0) => {
                    return Err(error(
                        name,
                        &value,
                        "a queue of 0 spans drops every span; use at least 1",
                    ))
                }
                Ok(n) => n,
                Err(_) => {
                    self.warn(name, &value, "not a whole number", DEFAULT_MAX_QUEUE_SIZE);
                    DEFAULT_MAX_QUEUE_SIZE
                }
            },
        };
        let batch_default = DEFAULT_MAX_EXPORT_BATCH_SIZE.min(max_queue_size);
        let max_export_batch_size = match self.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            None => batch_default,
            Some((name, value)) => match value.parse::<usize>() {
                Ok(n) if n > 0 && n <= max_queue_size => n,
                Ok(n) if n > max_queue_size => {
                    self.warn(
                        name,
                        &value,
                        "larger than OTEL_BSP_MAX_QUEUE_SIZE",
                        max_queue_size,
                    );
                    max_queue_size
                }
                _ => {
                    self.warn(name, &value, "not a positive whole number", batch_default);
                    batch_default
                }
            },
        };
        let schedule_delay = self.millis("OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS);
        let export_timeout = self.millis("OTEL_BSP_EXPORT_TIMEOUT", DEFAULT_BSP_EXPORT_TIMEOUT_MS);
        Ok(BatchSettings {
            max_queue_size,
            max_export_batch_size,
            schedule_delay,
            export_timeout,
        })
    }

    /// A positive number of milliseconds, or the default with a warning.
    fn millis(&mut self, name: &'static str, default: u64) -> Duration {
        match self.get(name) {
            None => Duration::from_millis(default),
            Some((name, value)) => match value.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    self.warn(
                        name,
                        &value,
                        "not a positive number of milliseconds",
                        default,
                    );
                    Duration::from_millis(default)
                }
            },
        }
    }
}

/// Decode `%XX` escapes (the W3C Baggage encoding the specification uses for headers).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
