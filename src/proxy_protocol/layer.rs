//! The PROXY protocol as a wrapping layer, after Twisted's `twisted.protocols.haproxy`: a
//! factory whose protocol reads the header, then hands the connection to the protocol it
//! wraps as if the original client had connected. The wrapped protocol never knows.
//!
//! Per connection:
//!
//! 1. At `connection_made`, a peer outside `--proxy-protocol-trusted` is closed (`required`)
//!    or passed through untouched (`optional`); either way counted as `untrusted`.
//! 2. Header bytes are buffered, never more than the header's own length and never more than
//!    `--proxy-header-max-bytes` (a header that declares more is rejected when its length is
//!    read). A header that arrives whole in one read is parsed in place, with no copy.
//! 3. With the header complete, the inner protocol gets `connection_made` with a transport
//!    whose `peer_addr()` is the original client, then `data_received` with whatever followed
//!    the header in the same read: no byte lost, none duplicated.
//! 4. Bytes that are not a header are the client's own data under `optional` (echoed from the
//!    first byte), and an invalid header under `required`. Invalid headers close the
//!    connection at once (reset).
//! 5. Until the header is complete the connection has a deadline, `--proxy-header-timeout`;
//!    the driver ends it with `lost{reason="proxy_timeout"}` (see [`Protocol::deadline`]).
//!
//! Every outcome is counted once in `echo_proxy_headers_total{version, result}`. The inner
//! protocol's `connection_lost` is called even when the header never completed, so the
//! layers inside (instrumentation, per-peer slots) settle their accounting.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::parser::{self, Header, ParseError, Parsed};
use super::trust::TrustedNetworks;
use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::{LossReason, Protocol};
use crate::telemetry::ProxyMetrics;
use crate::transport::Transport;

/// `--proxy-protocol`: whether a PROXY header is expected on the echo port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProxyMode {
    /// No header is read; the peer is whoever connected (the default).
    #[default]
    Off,
    /// A header from a trusted peer is used when present; other bytes are ordinary data.
    Optional,
    /// Every connection from a trusted peer must start with a header; untrusted peers are
    /// closed.
    Required,
}

impl ProxyMode {
    /// The name shown in `/healthz` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Off => "off",
            ProxyMode::Optional => "optional",
            ProxyMode::Required => "required",
        }
    }
}

/// The settings of the layer (from `--proxy-protocol*` flags).
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `optional` or `required` (`off` means the layer is not installed at all).
    pub mode: ProxyMode,
    /// Whose headers are believed (`--proxy-protocol-trusted`; empty: everyone's).
    pub trusted: TrustedNetworks,
    /// Most header bytes buffered per connection (`--proxy-header-max-bytes`).
    pub max_header_bytes: usize,
    /// How long a trusted peer has to complete its header (`--proxy-header-timeout`).
    pub header_timeout: Duration,
}

/// What every protocol of the layer shares.
struct Shared {
    settings: ProxySettings,
    metrics: Arc<ProxyMetrics>,
}

/// Wraps a factory: its protocols read the PROXY header first.
pub struct ProxyProtocolFactory<F> {
    inner: F,
    shared: Arc<Shared>,
}

impl<F> ProxyProtocolFactory<F> {
    /// Read PROXY headers per `settings` before `inner`'s protocols see the connection.
    pub fn new(inner: F, settings: ProxySettings, metrics: Arc<ProxyMetrics>) -> Self {
        ProxyProtocolFactory {
            inner,
            shared: Arc::new(Shared { settings, metrics }),
        }
    }
}

impl<F: Factory> Factory for ProxyProtocolFactory<F> {
    type Protocol = ProxyProtocol<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        Ok(ProxyProtocol {
            inner: self.inner.build_protocol(conn)?,
            phase: Phase::Start(self.shared.clone()),
        })
    }

    fn start_factory(&self) {
        self.inner.start_factory();
    }

    fn stop_factory(&self) {
        self.inner.stop_factory();
    }
}

/// Where a connection is.
enum Phase {
    /// Built, `connection_made` not yet called.
    Start(Arc<Shared>),
    /// Reading the header.
    Header(Box<Pending>),
    /// The inner protocol runs with the real endpoints (no header, LOCAL, untrusted).
    Direct,
    /// The inner protocol runs with the original client from the header.
    Proxied(Box<Proxied>),
    /// Closed by this layer; the inner protocol never started.
    Closed,
}

/// A header being read.
struct Pending {
    shared: Arc<Shared>,
    /// The header bytes so far (empty while every read so far was parsed in place).
    buffer: Vec<u8>,
    deadline: Instant,
}

/// What the header said, kept for the transport the inner protocol sees.
pub struct Proxied {
    /// The original client.
    pub client: SocketAddr,
    /// The whole header (addresses and TLVs).
    pub header: Header,
}

/// The protocol of [`ProxyProtocolFactory`]: header first, then the wrapped protocol.
pub struct ProxyProtocol<P> {
    inner: P,
    phase: Phase,
}

impl<P: Protocol> ProxyProtocol<P> {
    fn start_inner(&mut self, transport: &mut dyn Transport, data: &[u8]) {
        match &self.phase {
            Phase::Proxied(proxied) => {
                let mut transport = ProxiedTransport {
                    inner: transport,
                    proxied,
                };
                self.inner.connection_made(&mut transport);
                if !data.is_empty() {
                    self.inner.data_received(data, &mut transport);
                }
            }
            _ => {
                self.inner.connection_made(transport);
                if !data.is_empty() {
                    self.inner.data_received(data, transport);
                }
            }
        }
    }

    /// Feed header bytes; start the inner protocol or close once the header is decided.
    fn read_header(&mut self, data: &[u8], transport: &mut dyn Transport) {
        let Phase::Header(pending) = &mut self.phase else {
            return;
        };
        let max = pending.shared.settings.max_header_bytes;
        let mut rest = data;
        let outcome = loop {
            // Parse in place while nothing is buffered (the usual case: the whole header in
            // the first read, no copy), else append no more than the header can still need.
            let in_place = pending.buffer.is_empty();
            let parsed = parser::parse(if in_place { rest } else { &pending.buffer }, max);
            match parsed {
                // `Incomplete` implies fewer than `upto` bytes were parsed.
                Ok(Parsed::Incomplete { .. }) if in_place => {
                    pending.buffer.extend_from_slice(rest);
                    return;
                }
                Ok(Parsed::Incomplete { upto }) => {
                    if rest.is_empty() {
                        return;
                    }
                    let take = rest.len().min(upto - pending.buffer.len());
                    pending.buffer.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                }
                Ok(Parsed::NotProxy) if in_place => break Outcome::NotProxy(Cow::Borrowed(rest)),
                Ok(Parsed::NotProxy) => {
                    let mut bytes = std::mem::take(&mut pending.buffer);
                    bytes.extend_from_slice(rest);
                    break Outcome::NotProxy(Cow::Owned(bytes));
                }
                Ok(Parsed::Complete { header, len }) if in_place => {
                    break Outcome::Header(header, Cow::Borrowed(&rest[len..]))
                }
                Ok(Parsed::Complete { header, len }) => {
                    let mut after = pending.buffer.split_off(len);
                    after.extend_from_slice(rest);
                    break Outcome::Header(header, Cow::Owned(after));
                }
                Err(err) => break Outcome::Invalid(err),
            }
        };
        let shared = pending.shared.clone();
        let metrics = &shared.metrics;
        let peer = transport.peer_addr();
        match outcome {
            Outcome::Header(header, after) => {
                match header.addresses {
                    Some(addresses) => {
                        metrics.count(Some(header.version), ProxyResult::Ok);
                        tracing::debug!(
                            peer = %peer,
                            client = %addresses.source,
                            version = header.version.label(),
                            "PROXY header"
                        );
                        self.phase = Phase::Proxied(Box::new(Proxied {
                            client: addresses.source,
                            header,
                        }));
                    }
                    None => {
                        metrics.count(Some(header.version), ProxyResult::Local);
                        self.phase = Phase::Direct;
                    }
                }
                self.start_inner(transport, &after);
            }
            Outcome::NotProxy(bytes) if shared.settings.mode == ProxyMode::Optional => {
                metrics.count(None, ProxyResult::Ok);
                self.phase = Phase::Direct;
                self.start_inner(transport, &bytes);
            }
            Outcome::NotProxy(_) => self.close_invalid(None, peer, transport),
            Outcome::Invalid(err) => self.close_invalid(Some(err), peer, transport),
        }
    }

    fn close_invalid(
        &mut self,
        err: Option<ParseError>,
        peer: SocketAddr,
        transport: &mut dyn Transport,
    ) {
        if let Phase::Header(pending) = &self.phase {
            pending
                .shared
                .metrics
                .count(err.map(ParseError::version), ProxyResult::Invalid);
            tracing::info!(
                peer = %peer,
                reason = err.map_or("no PROXY header", ParseError::reason),
                "invalid PROXY header: connection closed"
            );
        }
        self.phase = Phase::Closed;
        transport.abort_connection();
    }
}

/// How the header phase ended.
enum Outcome<'a> {
    /// A valid header, and the bytes that followed it.
    Header(Header, Cow<'a, [u8]>),
    /// No header: these bytes are the client's data.
    NotProxy(Cow<'a, [u8]>),
    /// A broken header.
    Invalid(ParseError),
}

impl<P: Protocol> Protocol for ProxyProtocol<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        let Phase::Start(shared) = std::mem::replace(&mut self.phase, Phase::Direct) else {
            return;
        };
        let peer = transport.peer_addr();
        if !shared.settings.trusted.trusts(peer.ip()) {
            shared.metrics.count(None, ProxyResult::Untrusted);
            if shared.settings.mode == ProxyMode::Required {
                tracing::info!(peer = %peer, "PROXY header required from an untrusted peer: connection closed");
                self.phase = Phase::Closed;
                transport.abort_connection();
            } else {
                self.inner.connection_made(transport);
            }
            return;
        }
        let deadline = Instant::now() + shared.settings.header_timeout;
        self.phase = Phase::Header(Box::new(Pending {
            shared,
            buffer: Vec::new(),
            deadline,
        }));
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        match &self.phase {
            Phase::Direct => self.inner.data_received(data, transport),
            Phase::Proxied(proxied) => {
                self.inner.data_received(
                    data,
                    &mut ProxiedTransport {
                        inner: transport,
                        proxied,
                    },
                );
            }
            Phase::Header(_) => self.read_header(data, transport),
            Phase::Start(_) | Phase::Closed => {}
        }
    }

    fn bytes_sent(&mut self, n: usize) {
        self.inner.bytes_sent(n);
    }

    fn deadline(&self) -> Option<(Instant, LossReason)> {
        match &self.phase {
            Phase::Header(pending) => Some((pending.deadline, LossReason::ProxyTimeout)),
            _ => self.inner.deadline(),
        }
    }

    fn timer(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Direct | Phase::Proxied(_) => self.inner.timer(),
            _ => None,
        }
    }

    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        match &self.phase {
            Phase::Direct => self.inner.timer_fired(transport),
            Phase::Proxied(proxied) => {
                self.inner.timer_fired(&mut ProxiedTransport {
                    inner: transport,
                    proxied,
                });
            }
            _ => {}
        }
    }

    fn write_pending(&self) -> bool {
        self.inner.write_pending()
    }

    fn connection_lost(&mut self, reason: LossReason) {
        // A connection that closes before sending a byte (a TCP health check) attempted no
        // header: not counted, unless it was closed by the header timeout.
        if let Phase::Header(pending) = &self.phase {
            if pending.buffer.is_empty() && reason != LossReason::ProxyTimeout {
                self.inner.connection_lost(reason);
                return;
            }
            let version = if pending.buffer.starts_with(&parser::V2_SIGNATURE[..1]) {
                Some(parser::Version::V2)
            } else if pending.buffer.is_empty() {
                None
            } else {
                Some(parser::Version::V1)
            };
            let result = if reason == LossReason::ProxyTimeout {
                ProxyResult::Timeout
            } else {
                ProxyResult::Invalid
            };
            pending.shared.metrics.count(version, result);
        }
        self.inner.connection_lost(reason);
    }
}

/// The transport the inner protocol sees after a PROXY header: the original client as peer,
/// and the header itself.
struct ProxiedTransport<'a> {
    inner: &'a mut dyn Transport,
    proxied: &'a Proxied,
}

impl Transport for ProxiedTransport<'_> {
    fn write(&mut self, data: &[u8]) {
        self.inner.write(data);
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) {
        self.inner.write_vectored(bufs);
    }

    fn lose_connection(&mut self) {
        self.inner.lose_connection();
    }

    fn abort_connection(&mut self) {
        self.inner.abort_connection();
    }

    fn close_for(&mut self, reason: LossReason) {
        self.inner.close_for(reason);
    }

    fn pause_reading(&mut self) {
        self.inner.pause_reading();
    }

    fn resume_reading(&mut self) {
        self.inner.resume_reading();
    }

    fn stop_reading(&mut self) {
        self.inner.stop_reading();
    }

    fn abort_for(&mut self, reason: LossReason) {
        self.inner.abort_for(reason);
    }

    fn fault(&self) -> Option<&'static str> {
        self.inner.fault()
    }

    fn peer_addr(&self) -> SocketAddr {
        self.proxied.client
    }

    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    fn proxy_header(&self) -> Option<&Header> {
        Some(&self.proxied.header)
    }
}

/// The `result` label of `echo_proxy_headers_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyResult {
    /// A header with the original client was used, or (version `none`, `optional` mode) the
    /// connection carried no header and was served as is.
    Ok,
    /// A valid header without usable addresses (LOCAL, UNKNOWN, AF_UNSPEC/AF_UNIX/UDP): the
    /// real endpoints are used.
    Local,
    /// The header was malformed, or missing under `required`: closed.
    Invalid,
    /// The peer is outside `--proxy-protocol-trusted`.
    Untrusted,
    /// The header did not complete within `--proxy-header-timeout`: closed.
    Timeout,
}

impl ProxyResult {
    /// Every label value, in index order.
    pub const LABELS: [&'static str; 5] = ["ok", "local", "invalid", "untrusted", "timeout"];

    /// Position in [`ProxyResult::LABELS`].
    pub fn index(self) -> usize {
        self as usize
    }
}
