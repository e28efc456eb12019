//! The TLS layer against an in-memory rustls client: the echo comes back exact, and the
//! records one read produces reach the driver as one vectored write (a `writev`), in batches
//! of at most [`RECORD_BATCH_LIMIT`] of ciphertext.

use std::io::{IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use super::protocol::RECORD_BATCH_LIMIT;
use super::*;
use crate::echo::EchoFactory;
use crate::factory::{ConnectionInfo, Factory};
use crate::protocol::Protocol;
use crate::state::ServiceState;
use crate::telemetry::Metrics;
use crate::transport::{MemoryTransport, Transport};

/// A [`MemoryTransport`] that also counts how the TLS layer called it.
#[derive(Default)]
struct Counting {
    memory: MemoryTransport,
    writes: usize,
    /// Bytes of each `write_vectored` call, in order.
    vectored: Vec<usize>,
}

impl Transport for Counting {
    fn write(&mut self, data: &[u8]) {
        self.writes += 1;
        self.memory.write(data);
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) {
        self.vectored.push(bufs.iter().map(|buf| buf.len()).sum());
        self.memory.write_vectored(bufs);
    }

    fn lose_connection(&mut self) {
        self.memory.lose_connection();
    }

    fn abort_connection(&mut self) {
        self.memory.abort_connection();
    }

    fn peer_addr(&self) -> SocketAddr {
        self.memory.peer_addr()
    }

    fn local_addr(&self) -> SocketAddr {
        self.memory.local_addr()
    }
}

/// A self-signed P-256 certificate for `localhost`, written into `dir` by `openssl`.
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed for the TLS tests: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// Everything the client has to send.
fn client_output(client: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut out).unwrap();
    }
    out
}

/// Give the client what the server wrote (rustls reads a few KiB per `read_tls`); returns
/// the plaintext it decrypted.
fn feed_client(client: &mut ClientConnection, bytes: &[u8]) -> Vec<u8> {
    let mut plaintext = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        client.read_tls(&mut rest).unwrap();
        client.process_new_packets().unwrap();
        match client.reader().read_to_end(&mut plaintext) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the session ended: {other:?}"),
        }
    }
    plaintext
}

/// An echo over TLS whose handshake is done, with its transport and the client.
fn established() -> (TlsProtocol<crate::echo::Echo>, Counting, ClientConnection) {
    let dir = std::env::temp_dir().join(format!("echo-tls-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed(&dir);
    let settings = TlsSettings {
        cert: cert.clone(),
        key,
        client_ca: None,
        client_auth: ClientAuth::Optional,
        alpn: Vec::new(),
        handshake_timeout: Duration::from_secs(10),
        reload_interval: Duration::from_secs(10),
    };
    let metrics = Metrics::register(&ServiceState::new(None)).unwrap();
    let store = CertStore::load(settings, metrics.tls.listener("tls")).unwrap();
    let factory = TlsFactory::new(EchoFactory, store);
    let conn = ConnectionInfo {
        id: 1,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        local: SocketAddr::from(([127, 0, 0, 1], 8443)),
    };
    let mut server = factory.build_protocol(&conn).ok().unwrap();

    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(der.unwrap()).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
    client.set_buffer_limit(None);

    let mut transport = Counting::default();
    server.connection_made(&mut transport);
    for _ in 0..10 {
        let hello = client_output(&mut client);
        if !hello.is_empty() {
            server.data_received(&hello, &mut transport);
        }
        feed_client(&mut client, &transport.memory.take_written());
        if !client.is_handshaking() && !client.wants_write() {
            break;
        }
    }
    assert!(!client.is_handshaking(), "the handshake did not finish");
    transport.writes = 0;
    transport.vectored.clear();
    (server, transport, client)
}

/// Bytes that show reordering or loss.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn the_records_of_one_read_reach_the_driver_as_one_vectored_write() {
    let (mut server, mut transport, mut client) = established();
    let sent = payload(64 * 1024);
    client.writer().write_all(&sent).unwrap();
    let ciphertext = client_output(&mut client);
    server.data_received(&ciphertext, &mut transport);

    // Four records in, four records out in one call; a write per record would be a `send`
    // and a packet per 16 KiB.
    assert_eq!(transport.writes, 0, "records went out one write each");
    assert_eq!(transport.vectored.len(), 1, "{:?}", transport.vectored);
    let back = feed_client(&mut client, &transport.memory.take_written());
    assert!(back == sent, "the echo came back altered");
}

#[test]
fn a_larger_read_goes_out_in_batches_of_at_most_the_limit() {
    let (mut server, mut transport, mut client) = established();
    let sent = payload(400 * 1024);
    client.writer().write_all(&sent).unwrap();
    let ciphertext = client_output(&mut client);
    server.data_received(&ciphertext, &mut transport);

    // rustls holds at most RECORD_BATCH_LIMIT of ciphertext (it checks the plaintext it takes
    // against the room left, so a batch passes the limit by at most one record's header and
    // tag, 40 bytes): 400 KiB go out in four batches.
    let batches = &transport.vectored;
    assert!(batches.len() >= 4, "{batches:?}");
    assert!(
        batches.iter().all(|&n| n <= RECORD_BATCH_LIMIT + 40),
        "{batches:?}"
    );
    assert_eq!(transport.writes, 0);
    let back = feed_client(&mut client, &transport.memory.take_written());
    assert!(back == sent, "the echo came back altered");
}
