//! TLS as a wrapping protocol, the way Twisted adds TLS (`TLSMemoryBIOProtocol`): the driver
//! moves ciphertext, this layer runs rustls's sans-I/O `ServerConnection` over it, and the
//! wrapped protocol sees plaintext through a [`Transport`] of its own, unaware of TLS.
//!
//! - The wrapped protocol's `connection_made` runs once the handshake is complete; its
//!   transport reports the negotiated parameters ([`Transport::tls`]).
//! - Writes are encrypted at once; the records of one callback (a whole read's worth of echo)
//!   are handed to the driver together at its end, in one vectored write, so a 64 KiB read
//!   costs one `writev` and a few large packets rather than a `send` and a packet per 16 KiB
//!   record (on loopback the sender's CPU pays for the receiver's side too, so packets are
//!   most of the kernel's cost). rustls holds at most [`RECORD_BATCH_LIMIT`] of ciphertext
//!   within one callback and none after it, so the driver's write buffer limit (and its
//!   backpressure) applies to TLS connections exactly as to plain ones.
//! - A `close_notify` from the peer is answered with ours after everything before it was
//!   echoed; the peer's FIN then ends the connection as usual (half-close through TLS).
//! - A failed handshake sends rustls's alert, closes the connection and is counted by cause in
//!   `echo_tls_handshakes_total{result}`. One not complete by `--tls-handshake-timeout` is
//!   ended by the driver through [`Protocol::deadline`] (`lost{reason="handshake_timeout"}`).

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::{AlertDescription, CertificateError, Error as TlsError, ServerConnection};
use tokio::time::Instant;

use super::store::CertStore;
use super::x509;
use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::{LossReason, Protocol};
use crate::telemetry::TlsMetrics;
use crate::transport::{TlsInfo, Transport};

/// Wraps a factory: every protocol it builds runs inside TLS.
pub struct TlsFactory<F> {
    inner: F,
    store: Arc<CertStore>,
}

impl<F> TlsFactory<F> {
    /// Serve `inner`'s protocols over TLS with the configuration in `store`.
    pub fn new(inner: F, store: Arc<CertStore>) -> Self {
        TlsFactory { inner, store }
    }
}

impl<F: Factory> Factory for TlsFactory<F> {
    type Protocol = TlsProtocol<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        let inner = self.inner.build_protocol(conn)?;
        let session = ServerConnection::new(self.store.config()).map(|mut session| {
            session.set_buffer_limit(Some(RECORD_BATCH_LIMIT));
            session
        });
        Ok(TlsProtocol {
            inner,
            handshake_deadline: Instant::now() + self.store.settings().handshake_timeout,
            session: session.ok().map(Box::new),
            metrics: self.store.metrics().clone(),
            info: None,
            phase: Phase::Handshaking,
            plain_unsent: 0,
            cipher_unsent: 0,
        })
    }

    fn start_factory(&self) {
        self.inner.start_factory();
    }

    fn stop_factory(&self) {
        self.inner.stop_factory();
    }
}

/// Most ciphertext rustls may hold for one connection before it is handed to the driver
/// (rustls's `set_buffer_limit`). Records are batched within a callback up to this much: it
/// fits every record of a 64 KiB read (the default `--read-buffer-size`) with their overhead,
/// so an echoed read goes out as one vectored write; a callback that writes more is handed
/// over in batches of this size (give or take one record's header and tag: rustls checks the
/// plaintext it takes against the room left).
pub(crate) const RECORD_BATCH_LIMIT: usize = 128 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    Established,
    /// The handshake failed or the session ended: nothing more is decrypted.
    Done,
}

/// A protocol running inside TLS.
pub struct TlsProtocol<P> {
    inner: P,
    /// The rustls session (boxed: it is large); `None` only if rustls refused to start one.
    session: Option<Box<ServerConnection>>,
    metrics: TlsMetrics,
    /// What was negotiated, once the handshake is complete.
    info: Option<Box<TlsInfo>>,
    phase: Phase,
    /// When the handshake must be complete (`--tls-handshake-timeout`).
    handshake_deadline: Instant,
    /// Plaintext bytes the wrapped protocol wrote whose ciphertext the kernel has not taken yet.
    plain_unsent: u64,
    /// Ciphertext bytes handed to the driver and not yet reported sent.
    cipher_unsent: u64,
}

/// `io::Write` into the driver's transport: never blocks, the driver buffers what the socket
/// does not take (and stops reading while its buffer is full).
struct ToTransport<'a> {
    transport: &'a mut dyn Transport,
    written: u64,
}

impl Write for ToTransport<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.transport.write(buf);
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    /// rustls hands every pending record at once: one vectored write to the driver.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.transport.write_vectored(bufs);
        let n = bufs.iter().map(|buf| buf.len()).sum::<usize>();
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hand every pending TLS record to the driver; returns the ciphertext bytes written.
fn flush(session: &mut ServerConnection, transport: &mut dyn Transport) -> u64 {
    let mut out = ToTransport {
        transport,
        written: 0,
    };
    while session.wants_write() {
        if session.write_tls(&mut out).is_err() {
            break;
        }
    }
    out.written
}

/// The transport the wrapped protocol sees: plaintext in, records out. Records stay with
/// rustls until the callback ends (or [`RECORD_BATCH_LIMIT`] is reached), then go to the
/// driver together.
struct PlainTransport<'a> {
    session: &'a mut ServerConnection,
    outer: &'a mut dyn Transport,
    info: Option<&'a TlsInfo>,
    plain_written: u64,
    cipher_written: u64,
}

impl Transport for PlainTransport<'_> {
    fn write(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let Ok(n) = self.session.writer().write(rest) else {
                return; // the session has failed: nothing more goes out
            };
            self.plain_written += n as u64;
            rest = &rest[n..];
            if !rest.is_empty() {
                // rustls holds RECORD_BATCH_LIMIT of ciphertext: hand it over, go on.
                let flushed = flush(self.session, self.outer);
                self.cipher_written += flushed;
                if n == 0 && flushed == 0 {
                    return; // rustls takes nothing more (closed): dropped like a late write
                }
            }
        }
    }

    fn lose_connection(&mut self) {
        self.session.send_close_notify();
        self.cipher_written += flush(self.session, self.outer);
        self.outer.lose_connection();
    }

    fn abort_connection(&mut self) {
        self.outer.abort_connection();
    }

    fn close_for(&mut self, reason: LossReason) {
        self.session.send_close_notify();
        self.cipher_written += flush(self.session, self.outer);
        self.outer.close_for(reason);
    }

    fn pause_reading(&mut self) {
        self.outer.pause_reading();
    }

    fn resume_reading(&mut self) {
        self.outer.resume_reading();
    }

    fn stop_reading(&mut self) {
        self.outer.stop_reading();
    }

    fn abort_for(&mut self, reason: LossReason) {
        self.outer.abort_for(reason);
    }

    fn fault(&self) -> Option<&'static str> {
        self.outer.fault()
    }

    fn peer_addr(&self) -> SocketAddr {
        self.outer.peer_addr()
    }

    fn local_addr(&self) -> SocketAddr {
        self.outer.local_addr()
    }

    fn tls(&self) -> Option<&TlsInfo> {
        self.info
    }

    fn proxy_header(&self) -> Option<&crate::proxy_protocol::Header> {
        self.outer.proxy_header()
    }
}

impl<P: Protocol> TlsProtocol<P> {
    /// Run `f` on the wrapped protocol with its plaintext transport.
    fn with_inner(
        &mut self,
        outer: &mut dyn Transport,
        f: impl FnOnce(&mut P, &mut dyn Transport),
    ) {
        let Some(session) = self.session.as_deref_mut() else {
            return;
        };
        let mut plain = PlainTransport {
            session,
            outer,
            info: self.info.as_deref(),
            plain_written: 0,
            cipher_written: 0,
        };
        f(&mut self.inner, &mut plain);
        self.plain_unsent += plain.plain_written;
        self.cipher_unsent += plain.cipher_written;
    }

    /// Hand every record rustls holds to the driver, in one vectored write.
    fn flush_records(&mut self, transport: &mut dyn Transport) {
        if let Some(session) = self.session.as_deref_mut() {
            self.cipher_unsent += flush(session, transport);
        }
    }

    fn handshake_failed(&mut self, result: &'static str, transport: &mut dyn Transport) {
        self.metrics.handshake(result).inc();
        self.phase = Phase::Done;
        self.flush_records(transport);
        transport.lose_connection();
    }

    fn handshake_done(&mut self, transport: &mut dyn Transport) {
        let Some(session) = self.session.as_deref() else {
            return;
        };
        self.metrics.handshake("ok").inc();
        self.info = Some(Box::new(TlsInfo {
            protocol_version: session
                .protocol_version()
                .map_or_else(String::new, |v| version_name(v).to_owned()),
            cipher: session
                .negotiated_cipher_suite()
                .map_or_else(String::new, |s| format!("{:?}", s.suite())),
            server_name: session.server_name().map(str::to_owned),
            alpn: session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            client_subject: session
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| x509::subject(leaf)),
        }));
        self.phase = Phase::Established;
        self.with_inner(transport, |inner, plain| inner.connection_made(plain));
    }
}

impl<P: Protocol> Protocol for TlsProtocol<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        if self.session.is_none() {
            self.handshake_failed("other", transport);
        }
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.receive(data, transport);
        // Everything this read produced (handshake messages, echoed records, our
        // close_notify) goes out together.
        self.flush_records(transport);
    }

    fn bytes_sent(&mut self, n: usize) {
        // Report plaintext in proportion to the ciphertext the kernel took: exact once
        // everything is flushed, and never more than the wrapped protocol wrote.
        let n = (n as u64).min(self.cipher_unsent);
        if n == 0 || self.cipher_unsent == 0 {
            return;
        }
        let plain = if n == self.cipher_unsent {
            self.plain_unsent
        } else {
            (self.plain_unsent as u128 * n as u128 / self.cipher_unsent as u128) as u64
        };
        self.cipher_unsent -= n;
        self.plain_unsent -= plain;
        if plain > 0 && self.phase != Phase::Handshaking {
            self.inner.bytes_sent(plain as usize);
        }
    }

    fn connection_lost(&mut self, reason: LossReason) {
        if self.phase == Phase::Handshaking {
            // Too slow, or gone before finishing (a scanner, a client that gave up).
            let result = match reason {
                LossReason::HandshakeTimeout => "timeout",
                _ => "other",
            };
            self.metrics.handshake(result).inc();
        }
        self.inner.connection_lost(reason);
    }

    fn deadline(&self) -> Option<(Instant, LossReason)> {
        match self.phase {
            Phase::Handshaking => Some((self.handshake_deadline, LossReason::HandshakeTimeout)),
            _ => self.inner.deadline(),
        }
    }

    fn timer(&self) -> Option<Instant> {
        match self.phase {
            Phase::Established => self.inner.timer(),
            _ => None,
        }
    }

    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        if self.phase == Phase::Established {
            self.with_inner(transport, |inner, plain| inner.timer_fired(plain));
            self.flush_records(transport);
        }
    }

    fn write_pending(&self) -> bool {
        self.phase == Phase::Established && self.inner.write_pending()
    }
}

impl<P: Protocol> TlsProtocol<P> {
    /// Feed `data` to rustls and run what it yields: the handshake, then the wrapped protocol
    /// on the plaintext. The records this produces stay with rustls (the caller flushes).
    fn receive(&mut self, data: &[u8], transport: &mut dyn Transport) {
        // Zeroed once per read, not once per record (a 64 KiB read holds four).
        let mut plaintext = [0u8; 16 * 1024];
        let mut rest = data;
        while !rest.is_empty() && self.phase != Phase::Done {
            let Some(session) = self.session.as_deref_mut() else {
                return;
            };
            if session.read_tls(&mut rest).is_err() {
                self.handshake_failed_or_closed(transport, "protocol");
                return;
            }
            let state = match session.process_new_packets() {
                Ok(state) => state,
                Err(err) => {
                    let result = classify(&err);
                    if self.phase == Phase::Handshaking {
                        self.handshake_failed(result, transport);
                    } else {
                        self.phase = Phase::Done;
                        self.flush_records(transport);
                        transport.lose_connection();
                    }
                    return;
                }
            };
            if self.phase == Phase::Handshaking && !session.is_handshaking() {
                self.handshake_done(transport);
            }
            // rustls reads at most 4 KiB per `read_tls`: most rounds complete no record.
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                self.deliver_plaintext(&mut plaintext, transport);
            }
        }
    }

    /// Pass every decrypted byte to the wrapped protocol; answer a `close_notify` with ours.
    fn deliver_plaintext(&mut self, buffer: &mut [u8], transport: &mut dyn Transport) {
        if self.phase != Phase::Established {
            return;
        }
        loop {
            let Some(session) = self.session.as_deref_mut() else {
                return;
            };
            match session.reader().read(buffer) {
                Ok(0) => {
                    // close_notify: everything before it was delivered (and echoed); answer
                    // with ours. The peer's FIN ends the connection.
                    session.send_close_notify();
                    self.phase = Phase::Done;
                    return;
                }
                Ok(n) => {
                    let data = &buffer[..n];
                    self.with_inner(transport, |inner, plain| inner.data_received(data, plain));
                }
                Err(_) => return, // WouldBlock: no more plaintext for now
            }
        }
    }

    fn handshake_failed_or_closed(&mut self, transport: &mut dyn Transport, result: &'static str) {
        if self.phase == Phase::Handshaking {
            self.handshake_failed(result, transport);
        } else {
            self.phase = Phase::Done;
            self.flush_records(transport); // what was echoed before the bad bytes
            transport.lose_connection();
        }
    }
}

/// `TLSv1_3` -> `1.3`, as the semantic conventions write `tls.protocol.version`.
fn version_name(version: rustls::ProtocolVersion) -> &'static str {
    match version {
        rustls::ProtocolVersion::TLSv1_2 => "1.2",
        rustls::ProtocolVersion::TLSv1_3 => "1.3",
        _ => "other",
    }
}

/// The `result` label of a failed handshake.
pub(crate) fn classify(err: &TlsError) -> &'static str {
    match err {
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        | TlsError::AlertReceived(AlertDescription::UnknownCA) => "unknown_ca",
        TlsError::InvalidCertificate(_)
        | TlsError::NoCertificatesPresented
        | TlsError::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired,
        ) => "bad_certificate",
        TlsError::InvalidMessage(_)
        | TlsError::InappropriateMessage { .. }
        | TlsError::InappropriateHandshakeMessage { .. }
        | TlsError::PeerIncompatible(_)
        | TlsError::PeerMisbehaved(_)
        | TlsError::AlertReceived(_)
        | TlsError::DecryptError => "protocol",
        _ => "other",
    }
}
