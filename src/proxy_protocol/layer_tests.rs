//! The wrapping layer over an in-memory transport: what the inner protocol sees, what is
//! echoed, what is closed, and what is counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::encode;
use super::layer::*;
use super::parser::{Addresses, Version};
use super::trust::TrustedNetworks;
use crate::echo::EchoFactory;
use crate::factory::{ConnectionInfo, Factory};
use crate::protocol::{LossReason, Protocol};
use crate::telemetry::ProxyMetrics;
use crate::transport::{MemoryTransport, Transport};

const PROXY: &str = "10.0.0.1:40000";
const LOCAL: &str = "10.0.0.2:8000";
const CLIENT: &str = "203.0.113.7:51000";

/// Records what the inner protocol was told: the peer at `connection_made`, then echoes.
#[derive(Default)]
struct Recorder {
    peer: Option<SocketAddr>,
    peers_seen_in_data: Vec<SocketAddr>,
    lost: Option<LossReason>,
}

struct RecorderFactory(Arc<std::sync::Mutex<Recorder>>);

struct RecorderProtocol(Arc<std::sync::Mutex<Recorder>>);

impl Factory for RecorderFactory {
    type Protocol = RecorderProtocol;
    fn build_protocol(&self, _: &ConnectionInfo) -> Result<RecorderProtocol, crate::Refusal> {
        Ok(RecorderProtocol(self.0.clone()))
    }
}

impl Protocol for RecorderProtocol {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        self.0.lock().unwrap().peer = Some(transport.peer_addr());
    }
    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.0
            .lock()
            .unwrap()
            .peers_seen_in_data
            .push(transport.peer_addr());
        transport.write(data);
    }
    fn connection_lost(&mut self, reason: LossReason) {
        self.0.lock().unwrap().lost = Some(reason);
    }
}

struct Setup {
    factory: ProxyProtocolFactory<RecorderFactory>,
    record: Arc<std::sync::Mutex<Recorder>>,
    metrics: Arc<ProxyMetrics>,
}

fn setup(mode: ProxyMode, trusted: &str) -> Setup {
    let metrics = Arc::new(ProxyMetrics::register(&prometheus::Registry::new()).unwrap());
    let record = Arc::new(std::sync::Mutex::new(Recorder::default()));
    let factory = ProxyProtocolFactory::new(
        RecorderFactory(record.clone()),
        ProxySettings {
            mode,
            trusted: trusted.parse::<TrustedNetworks>().unwrap(),
            max_header_bytes: 4096,
            header_timeout: Duration::from_secs(5),
        },
        metrics.clone(),
    );
    Setup {
        factory,
        record,
        metrics,
    }
}

fn connect(setup: &Setup) -> (ProxyProtocol<RecorderProtocol>, MemoryTransport) {
    let info = ConnectionInfo {
        id: 1,
        peer: PROXY.parse().unwrap(),
        local: LOCAL.parse().unwrap(),
    };
    let mut protocol = setup.factory.build_protocol(&info).unwrap();
    let mut transport = MemoryTransport::with_addrs(info.peer, info.local);
    protocol.connection_made(&mut transport);
    (protocol, transport)
}

fn client_header(v2: bool) -> Vec<u8> {
    let a = Addresses {
        source: CLIENT.parse().unwrap(),
        destination: LOCAL.parse().unwrap(),
    };
    if v2 {
        encode::v2(Some(a), &[(0x05, b"id-1")], true)
    } else {
        encode::v1(Some(a))
    }
}

#[test]
fn header_and_payload_fed_one_byte_at_a_time_echo_exactly_the_payload() {
    for v2 in [false, true] {
        let s = setup(ProxyMode::Required, "");
        let (mut p, mut t) = connect(&s);
        assert!(p.deadline().is_some(), "header phase has a deadline");
        assert_eq!(
            s.record.lock().unwrap().peer,
            None,
            "inner waits for the header"
        );
        let payload: Vec<u8> = (0..=255u8).collect();
        for byte in [client_header(v2), payload.clone()].concat() {
            p.data_received(&[byte], &mut t);
        }
        assert_eq!(t.written(), payload.as_slice());
        assert!(
            p.deadline().is_none(),
            "no deadline once the header is read"
        );
        let r = s.record.lock().unwrap();
        assert_eq!(r.peer, Some(CLIENT.parse().unwrap()));
        assert!(r
            .peers_seen_in_data
            .iter()
            .all(|p| *p == CLIENT.parse().unwrap()));
        let version = if v2 { Version::V2 } else { Version::V1 };
        assert_eq!(s.metrics.get(Some(version), ProxyResult::Ok), 1);
    }
}

#[test]
fn header_and_payload_in_one_read_and_split_at_every_point() {
    let stream = [client_header(true), b"payload after the header".to_vec()].concat();
    for cut in 0..=stream.len() {
        let s = setup(ProxyMode::Required, "");
        let (mut p, mut t) = connect(&s);
        for piece in [&stream[..cut], &stream[cut..]] {
            if !piece.is_empty() {
                p.data_received(piece, &mut t);
            }
        }
        assert_eq!(t.written(), b"payload after the header", "cut at {cut}");
        assert!(!t.is_aborted());
    }
}

#[test]
fn optional_mode_echoes_a_connection_without_header_from_the_first_byte() {
    let s = setup(ProxyMode::Optional, "");
    let (mut p, mut t) = connect(&s);
    // "PRO" could still be a header: held back, then released when it is not.
    p.data_received(b"PRO", &mut t);
    assert!(t.written().is_empty());
    p.data_received(b"TOCOL? no, just data", &mut t);
    assert_eq!(t.written(), b"PROTOCOL? no, just data");
    assert_eq!(s.record.lock().unwrap().peer, Some(PROXY.parse().unwrap()));
    assert_eq!(s.metrics.get(None, ProxyResult::Ok), 1);
}

#[test]
fn required_mode_closes_a_connection_without_header() {
    let s = setup(ProxyMode::Required, "");
    let (mut p, mut t) = connect(&s);
    p.data_received(b"hello", &mut t);
    assert!(t.is_aborted());
    assert!(t.written().is_empty());
    assert_eq!(s.metrics.get(None, ProxyResult::Invalid), 1);
    p.connection_lost(LossReason::Aborted);
    assert_eq!(s.record.lock().unwrap().lost, Some(LossReason::Aborted));
    assert_eq!(s.metrics.get(None, ProxyResult::Invalid), 1, "counted once");
}

#[test]
fn untrusted_peers_are_closed_under_required_and_served_as_is_under_optional() {
    let s = setup(ProxyMode::Required, "192.168.0.0/16");
    let (mut p, mut t) = connect(&s);
    assert!(t.is_aborted());
    p.data_received(&client_header(false), &mut t);
    assert!(t.written().is_empty());
    assert_eq!(s.metrics.get(None, ProxyResult::Untrusted), 1);

    let s = setup(ProxyMode::Optional, "192.168.0.0/16,::1");
    let (mut p, mut t) = connect(&s);
    let header = client_header(false);
    p.data_received(&header, &mut t);
    assert_eq!(
        t.written(),
        header.as_slice(),
        "an untrusted header is just data"
    );
    assert_eq!(s.record.lock().unwrap().peer, Some(PROXY.parse().unwrap()));
    assert_eq!(s.metrics.get(None, ProxyResult::Untrusted), 1);
}

#[test]
fn local_command_keeps_the_real_peer() {
    let s = setup(ProxyMode::Required, "10.0.0.0/8");
    let (mut p, mut t) = connect(&s);
    p.data_received(
        &[encode::v2(None, &[], false), b"ping".to_vec()].concat(),
        &mut t,
    );
    assert_eq!(t.written(), b"ping");
    assert_eq!(s.record.lock().unwrap().peer, Some(PROXY.parse().unwrap()));
    assert_eq!(s.metrics.get(Some(Version::V2), ProxyResult::Local), 1);
}

#[test]
fn a_header_lost_midway_counts_as_timeout_or_invalid_by_version() {
    let s = setup(ProxyMode::Required, "");
    let (mut p, mut t) = connect(&s);
    p.data_received(&client_header(true)[..20], &mut t);
    p.connection_lost(LossReason::ProxyTimeout);
    assert_eq!(s.metrics.get(Some(Version::V2), ProxyResult::Timeout), 1);
    assert_eq!(
        s.record.lock().unwrap().lost,
        Some(LossReason::ProxyTimeout)
    );

    let (mut p, _t) = connect(&s);
    p.connection_lost(LossReason::ProxyTimeout);
    assert_eq!(s.metrics.get(None, ProxyResult::Timeout), 1);

    let (mut p, mut t) = connect(&s);
    p.data_received(b"PROXY TCP4 1.2", &mut t);
    p.connection_lost(LossReason::PeerClosed);
    assert_eq!(s.metrics.get(Some(Version::V1), ProxyResult::Invalid), 1);

    // Connect and close without a byte (a TCP health check): no header attempted, not counted.
    let (mut p, _t) = connect(&s);
    p.connection_lost(LossReason::PeerClosed);
    assert_eq!(s.metrics.get(None, ProxyResult::Invalid), 0);
    assert_eq!(s.record.lock().unwrap().lost, Some(LossReason::PeerClosed));
}

#[test]
fn a_v2_length_past_the_cap_closes_without_buffering_it() {
    let s = setup(ProxyMode::Required, "");
    let (mut p, mut t) = connect(&s);
    let mut fixed = client_header(true)[..16].to_vec();
    fixed[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    p.data_received(&fixed, &mut t);
    assert!(t.is_aborted());
    assert_eq!(s.metrics.get(Some(Version::V2), ProxyResult::Invalid), 1);
}

#[test]
fn echo_behind_the_layer_is_byte_exact() {
    let metrics = Arc::new(ProxyMetrics::register(&prometheus::Registry::new()).unwrap());
    let factory = ProxyProtocolFactory::new(
        EchoFactory,
        ProxySettings {
            mode: ProxyMode::Optional,
            trusted: TrustedNetworks::default(),
            max_header_bytes: 4096,
            header_timeout: Duration::from_secs(5),
        },
        metrics,
    );
    let info = ConnectionInfo {
        id: 1,
        peer: PROXY.parse().unwrap(),
        local: LOCAL.parse().unwrap(),
    };
    let mut p = factory.build_protocol(&info).unwrap();
    let mut t = MemoryTransport::with_addrs(info.peer, info.local);
    p.connection_made(&mut t);
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let stream = [client_header(false), payload.clone()].concat();
    for chunk in stream.chunks(7) {
        p.data_received(chunk, &mut t);
    }
    assert_eq!(t.written(), payload.as_slice());
}
