//! The identity port and the echo greeting against the real binary: one JSON line naming the
//! replica (downward-API variables included) and the original client behind a PROXY header,
//! connection metrics told apart by their `listener` label, and echo unchanged after a greeting.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use echo_service::proxy_protocol::{encode, Addresses};

use crate::support::{payload, Service};

/// The identity port's address, from the "serving" log line.
pub fn identity_addr(service: &Service) -> SocketAddr {
    let logs = service.logs.lock().unwrap();
    let line = logs
        .iter()
        .find(|l| l.contains("echo-service serving"))
        .expect("serving line");
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    json["fields"]["identity"]
        .as_str()
        .unwrap_or_else(|| panic!("no identity address in {line}"))
        .parse()
        .unwrap()
}

/// Connect to `addr`, send `first` (e.g. a PROXY header), read the whole answer.
fn read_identity(addr: SocketAddr, first: &[u8]) -> serde_json::Value {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(first).unwrap();
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("identity line, then EOF");
    assert_eq!(answer.matches('\n').count(), 1, "one line: {answer:?}");
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn identity_port_answers_one_json_line_with_the_replica_and_closes() {
    let service = Service::start_with_env(
        &["--identity-listen", "127.0.0.1:0"],
        &[
            ("POD_NAME", "echo-7f9c-abcde"),
            ("POD_NAMESPACE", "lb-test"),
            ("NODE_NAME", "node-3"),
            ("POD_IP", "10.244.3.17"),
        ],
    );
    let addr = identity_addr(&service);
    let id = read_identity(addr, b"");
    assert_eq!(id["service"], "echo-service");
    assert_eq!(id["pod_name"], "echo-7f9c-abcde");
    assert_eq!(id["pod_namespace"], "lb-test");
    assert_eq!(id["node_name"], "node-3");
    assert_eq!(id["pod_ip"], "10.244.3.17");
    assert!(id["hostname"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(id["listener"], "identity");
    assert_eq!(id["listener_address"], addr.to_string());
    assert_eq!(id["peer"]["address"], "127.0.0.1");
    assert_eq!(id["client"], id["peer"]);
    assert_eq!(id["proxy"], serde_json::Value::Null);
    assert!(id["connection_id"].as_u64().is_some());

    // The echo port is untouched and the metrics tell the two listeners apart.
    let data = payload(1000, 1);
    assert!(crate::support::echo_round_trip(service.connect(), &data, 100) == data);
    let m = service.wait_metrics("one connection per listener, both lost", |m| {
        m.get("echo_connections_lost_total{listener=\"identity\",reason=\"closed\"}") == 1.0
            && m.get("echo_connections_lost_total{listener=\"tcp\",reason=\"peer_closed\"}") == 1.0
    });
    assert_eq!(
        m.get("echo_connections_made_total{listener=\"identity\"}"),
        1.0
    );
    assert_eq!(m.get("echo_connections_made_total{listener=\"tcp\"}"), 1.0);
}

#[test]
fn identity_behind_a_proxy_header_shows_the_original_client_and_the_tlvs() {
    let service = Service::start(&[
        "--identity-listen",
        "127.0.0.1:0",
        "--proxy-protocol",
        "required",
    ]);
    let header = encode::v2(
        Some(Addresses {
            source: "198.51.100.23:61000".parse().unwrap(),
            destination: "192.0.2.1:8001".parse().unwrap(),
        }),
        &[
            (0x02, b"echo.example.com"),
            (0x05, b"conn-77"),
            (0xEA, b"\x01vpce-0abc"),
        ],
        true,
    );
    let id = read_identity(identity_addr(&service), &header);
    assert_eq!(id["client"]["address"], "198.51.100.23");
    assert_eq!(id["client"]["port"], 61000);
    assert_eq!(id["peer"]["address"], "127.0.0.1");
    assert_eq!(id["proxy"]["version"], "v2");
    assert_eq!(id["proxy"]["tlvs"]["authority"], "echo.example.com");
    assert_eq!(id["proxy"]["tlvs"]["unique_id"], "conn-77");
    assert_eq!(id["proxy"]["tlvs"]["aws_vpce_id"], "vpce-0abc");
    assert_eq!(id["proxy"]["tlvs"]["crc32c_checked"], true);
}

#[test]
fn identity_greeting_comes_first_then_the_echo_is_byte_exact() {
    let service = Service::start(&["--greeting"]);
    let stream = service.connect();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let id: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(id["listener"], "tcp");
    let data = payload(20_000, 5);
    let mut writer = stream;
    writer.write_all(&data).unwrap();
    writer.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    reader.read_to_end(&mut back).unwrap();
    assert!(back == data, "echo after the greeting differs");
}

#[test]
fn identity_greeting_waits_for_the_proxy_header_under_required() {
    let service = Service::start(&["--greeting", "--proxy-protocol", "required"]);
    let mut stream = service.connect();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(stream.read(&mut buf).is_err(), "nothing before the header");
    let header = encode::v1(Some(Addresses {
        source: "198.51.100.9:1234".parse().unwrap(),
        destination: "192.0.2.1:8000".parse().unwrap(),
    }));
    stream.write_all(&header).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let id: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(id["client"]["address"], "198.51.100.9");
    assert_eq!(id["proxy"]["version"], "v1");
}
