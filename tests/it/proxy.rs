//! The PROXY protocol on the echo port, against the real binary: headers split byte by byte or
//! sent with the first payload, LOCAL, untrusted peers, the header timeout, every malformed
//! kind closed and counted, the per-peer limit and the span counting the original client.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use echo_service::proxy_protocol::{encode, Addresses};

use crate::support::{payload, Service};

fn headers(version: &str, result: &str) -> String {
    format!("echo_proxy_headers_total{{result=\"{result}\",version=\"{version}\"}}")
}

fn client(addr: &str) -> Addresses {
    Addresses {
        source: addr.parse().unwrap(),
        destination: "192.0.2.10:8000".parse().unwrap(),
    }
}

/// Send `header` then `data` (each in `piece`-sized writes), half-close, read everything back.
fn proxied_round_trip(service: &Service, header: &[u8], data: &[u8], piece: usize) -> Vec<u8> {
    let stream = service.connect();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let all = [header, data].concat();
    let handle = std::thread::spawn(move || {
        for chunk in all.chunks(piece) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    let mut reader = stream;
    reader.read_to_end(&mut back).expect("read echo");
    handle.join().unwrap();
    back
}

/// Block until the server closes `stream`; fails if data arrives or it stays open `limit`.
fn wait_closed(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected a close, got {n} bytes: {:?}", &buf[..n]),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        Err(e) => panic!("still open after {limit:?}: {e}"),
    }
    start.elapsed()
}

#[test]
fn proxy_headers_split_byte_by_byte_or_sent_with_the_payload_echo_exactly_the_payload() {
    let service = Service::start(&["--proxy-protocol", "required"]);
    let a = client("203.0.113.5:40001");
    let cases: [(&str, Vec<u8>); 3] = [
        ("v1", encode::v1(Some(a))),
        ("v2", encode::v2(Some(a), &[(0x02, b"echo.example")], true)),
        (
            "v2",
            encode::v2(Some(client("[2001:db8::5]:40001")), &[], false),
        ),
    ];
    for (i, (_, header)) in cases.iter().enumerate() {
        let data = payload(3000, i as u64);
        // One byte per write: the header arrives in as many reads as the kernel makes of it.
        assert!(proxied_round_trip(&service, header, &data[..200], 1) == data[..200]);
        // Header and payload in one write, as an AWS NLB sends them.
        assert!(proxied_round_trip(&service, header, &data, usize::MAX) == data);
    }
    let m = service.wait_metrics("6 ok headers", |m| {
        m.get(&headers("v1", "ok")) == 2.0 && m.get(&headers("v2", "ok")) == 4.0
    });
    assert_eq!(m.get(&headers("none", "invalid")), 0.0);
    assert_eq!(
        m.get("echo_connections_lost_total{reason=\"peer_closed\"}"),
        6.0
    );
    let health: serde_json::Value =
        serde_json::from_str(&service.admin_get("/healthz").body).unwrap();
    assert_eq!(health["proxy_protocol"], "required");
}

#[test]
fn proxy_local_command_and_unknown_line_are_served_with_the_real_peer() {
    let service = Service::start(&["--proxy-protocol", "required"]);
    let data = payload(500, 9);
    assert!(proxied_round_trip(&service, &encode::v2(None, &[], false), &data, 7) == data);
    assert!(proxied_round_trip(&service, &encode::v1(None), &data, 7) == data);
    service.wait_metrics("v1 and v2 local", |m| {
        m.get(&headers("v2", "local")) == 1.0 && m.get(&headers("v1", "local")) == 1.0
    });
}

#[test]
fn proxy_untrusted_peer_is_closed_under_required_and_echoed_verbatim_under_optional() {
    let header = encode::v1(Some(client("203.0.113.9:1234")));
    let required = Service::start(&[
        "--proxy-protocol",
        "required",
        "--proxy-protocol-trusted",
        "10.0.0.0/8,fd00::/8",
    ]);
    // Reset at once: even the write may fail.
    let mut stream = TcpStream::connect(required.echo).unwrap();
    if stream.write_all(&header).is_ok() {
        wait_closed(&mut stream, Duration::from_secs(5));
    }
    required.wait_metrics("untrusted", |m| m.get(&headers("none", "untrusted")) == 1.0);

    let optional = Service::start(&[
        "--proxy-protocol",
        "optional",
        "--proxy-protocol-trusted",
        "10.0.0.0/8",
    ]);
    let data = [header.clone(), b"and data".to_vec()].concat();
    assert!(proxied_round_trip(&optional, &[], &data, 5) == data);
    optional.wait_metrics("untrusted", |m| m.get(&headers("none", "untrusted")) == 1.0);

    // Optional from a trusted peer without a header: plain echo, counted as none/ok.
    let trusting = Service::start(&["--proxy-protocol", "optional"]);
    let plain = payload(10_000, 3);
    assert!(proxied_round_trip(&trusting, &[], &plain, 1000) == plain);
    trusting.wait_metrics("none/ok", |m| m.get(&headers("none", "ok")) == 1.0);
}

#[test]
fn proxy_header_timeout_closes_a_slow_or_silent_peer() {
    let service = Service::start(&[
        "--proxy-protocol",
        "required",
        "--proxy-header-timeout",
        "500ms",
    ]);
    let header = encode::v2(Some(client("203.0.113.1:1")), &[], false);
    let mut partial = service.connect();
    partial.write_all(&header[..10]).unwrap();
    let mut silent = service.connect();
    let took = wait_closed(&mut partial, Duration::from_secs(10));
    assert!(
        took >= Duration::from_millis(400),
        "closed after {took:?}, before the timeout"
    );
    wait_closed(&mut silent, Duration::from_secs(10));
    let m = service.wait_metrics("2 proxy timeouts", |m| {
        m.get("echo_connections_lost_total{reason=\"proxy_timeout\"}") == 2.0
    });
    assert_eq!(m.get(&headers("v2", "timeout")), 1.0);
    assert_eq!(m.get(&headers("none", "timeout")), 1.0);
    // A connection that completed its header in time is not affected by the timeout.
    let mut ok = service.connect();
    ok.write_all(&header).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    ok.write_all(b"late but fine").unwrap();
    let mut back = [0u8; 13];
    ok.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"late but fine");
}

#[test]
fn proxy_each_malformed_header_is_closed_at_once_and_counted() {
    let service = Service::start(&[
        "--proxy-protocol",
        "required",
        "--proxy-header-max-bytes",
        "512",
    ]);
    let good = encode::v2(Some(client("203.0.113.1:1")), &[], false);
    let with = |at: usize, byte: u8| {
        let mut h = good.clone();
        h[at] = byte;
        h
    };
    let mut too_long = good[..16].to_vec();
    too_long[14..16].copy_from_slice(&1000u16.to_be_bytes());
    let mut truncated = with(15, 4);
    truncated.truncate(20);
    let bad_crc = {
        let mut h = encode::v2(Some(client("203.0.113.1:1")), &[], true);
        let last = h.len() - 1;
        h[last] ^= 1;
        h
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("none", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("v2", with(12, 0x11)), // bad version
        ("v2", with(12, 0x2f)), // bad command
        ("v2", with(13, 0x51)), // bad family
        ("v2", truncated),      // address block shorter than AF_INET's
        ("v2", too_long),       // length past --proxy-header-max-bytes
        ("v2", bad_crc),
        (
            "v1",
            [
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".as_slice(),
                &[b' '; 80],
                b"\r\n",
            ]
            .concat(),
        ),
        ("v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec()), // LF without CR
        ("v1", b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n".to_vec()),
    ];
    for (i, (_, bytes)) in cases.iter().enumerate() {
        let mut stream = service.connect();
        stream.write_all(bytes).unwrap();
        let took = wait_closed(&mut stream, Duration::from_secs(3));
        assert!(
            took < Duration::from_secs(2),
            "case {i} closed after {took:?}"
        );
    }
    let m = service.wait_metrics("every malformed header counted", |m| {
        m.get(&headers("none", "invalid")) == 1.0
            && m.get(&headers("v2", "invalid")) == 6.0
            && m.get(&headers("v1", "invalid")) == 3.0
            && m.get("echo_connections_lost_total{reason=\"aborted\"}") == 10.0
    });
    assert_eq!(m.get("echo_connections_active"), 0.0);
}

#[test]
fn proxy_per_peer_limit_counts_the_original_client_not_the_proxy() {
    let service = Service::start(&[
        "--proxy-protocol",
        "required",
        "--max-connections-per-peer",
        "1",
    ]);
    let open = |source: &str| {
        let mut s = service.connect();
        s.write_all(&encode::v2(Some(client(source)), &[], false))
            .unwrap();
        s
    };
    let check_echo = |s: &mut TcpStream| {
        s.write_all(b"hi").unwrap();
        let mut back = [0u8; 2];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hi");
    };
    // Three clients through one proxy address (127.0.0.1): each has its own limit of 1.
    let mut a = open("203.0.113.1:1000");
    let mut b = open("203.0.113.2:1000");
    let mut c = open("[2001:db8::3]:1000");
    for s in [&mut a, &mut b, &mut c] {
        check_echo(s);
    }
    let mut again = open("203.0.113.1:1001");
    wait_closed(&mut again, Duration::from_secs(5));
    let m = service.wait_metrics("one peer_limit refusal", |m| {
        m.get("echo_connections_rejected_total{reason=\"peer_limit\"}") == 1.0
    });
    assert_eq!(m.get(&headers("v2", "ok")), 4.0);
    check_echo(&mut a);
}

#[test]
fn proxy_invalid_settings_exit_2_naming_the_setting() {
    for (args, named) in [
        (&["--proxy-protocol", "sometimes"][..], "--proxy-protocol"),
        (
            &["--proxy-protocol-trusted", "10.0.0.0/33"][..],
            "--proxy-protocol-trusted",
        ),
        (
            &["--proxy-header-timeout", "0s"][..],
            "--proxy-header-timeout",
        ),
        (
            &["--proxy-header-max-bytes", "100"][..],
            "--proxy-header-max-bytes",
        ),
    ] {
        let output = std::process::Command::new(crate::support::SERVICE_BIN)
            .args(args)
            .env_remove("ECHO_PROXY_PROTOCOL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(named), "{named} not named in {stderr}");
    }
}
