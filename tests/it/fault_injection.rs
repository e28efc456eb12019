//! Fault injection (issue 10) against the real binary, observed from standard-library clients:
//! each fault's effect on the wire (delays as lower bounds only; the measured upper bounds are
//! printed with `--nocapture` and reported, never asserted), its counter, its loss reason and
//! its span attribute; the seeded probability over 2,000 connections; the admin control
//! endpoints (runtime changes, validation, token, the `--admin-control` gate, readiness);
//! and HAProxy health-checking `/readyz` and draining a replica whose readiness was disabled.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::otlp_receiver::OtlpReceiver;
use crate::policies::{connect_from, lost};
use crate::proxy_interop::{free_port, require_tool_or_apt, temp_dir, Proxy};
use crate::support::{connect, echo_round_trip, parse_response, payload, HttpResponse, Service};
use crate::tracing::{span_for_port, stop, str_attr};

/// `echo_faults_injected_total{fault="..."}`.
fn injected(fault: &str) -> String {
    format!("echo_faults_injected_total{{fault=\"{fault}\"}}")
}

/// `echo_faults_enabled{fault="..."}`.
fn enabled(fault: &str) -> String {
    format!("echo_faults_enabled{{fault=\"{fault}\"}}")
}

/// One admin request with optional headers and body; reads the response to EOF.
fn admin(
    service: &Service,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut stream = connect(service.admin);
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += "\r\n";
    request += body;
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

/// Write `data`, then time how long until all of it came back.
fn timed_round_trip(stream: &mut TcpStream, data: &[u8]) -> Duration {
    let start = Instant::now();
    stream.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    stream.read_exact(&mut back).expect("echo");
    assert!(back == data, "echo differs");
    start.elapsed()
}

/// Read until EOF or an error; returns the bytes and how the read ended.
fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Print a measured figure for the closing report (`cargo nextest run --no-capture`).
fn report(what: &str, value: Duration) {
    eprintln!("MEASURED {what}: {:.1} ms", value.as_secs_f64() * 1000.0);
}

#[test]
fn accept_delay_holds_the_first_echo_at_least_the_delay() {
    let service = Service::start(&["--fault", "accept-delay,delay=400ms"]);
    let mut stream = service.connect();
    let first = timed_round_trip(&mut stream, b"hello");
    report("accept-delay 400ms, first echo", first);
    assert!(
        first >= Duration::from_millis(400),
        "first echo after {first:?}"
    );
    let second = timed_round_trip(&mut stream, b"again");
    report("accept-delay, second echo", second);
    service.wait_metrics("accept_delay counted", |m| {
        m.get(&injected("accept_delay")) == 1.0 && m.get(&enabled("accept_delay")) == 1.0
    });
}

/// A client that sends, half-closes and waits for its echo still gets it after the delay: the
/// delay pauses reading, and a paused connection keeps the peer's FIN for when it reads again.
#[test]
fn accept_delay_still_echoes_a_half_closed_client() {
    let service = Service::start(&["--fault", "accept-delay,delay=300ms"]);
    let mut stream = service.connect();
    stream.write_all(b"sent before the FIN").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"sent before the FIN");
    service.wait_metrics("peer_closed after the echo", |m| {
        m.get(&lost("peer_closed")) == 1.0
    });
}

#[test]
fn latency_delays_each_chunk_and_keeps_a_10_mib_stream_whole_and_in_order() {
    let service = Service::start(&["--fault", "latency,delay=200ms,jitter=50ms"]);
    let mut stream = service.connect();
    for _ in 0..3 {
        let took = timed_round_trip(&mut stream, b"ping");
        report("latency 200ms +- 50ms, round trip", took);
        assert!(took >= Duration::from_millis(150), "echo after {took:?}");
    }
    drop(stream);

    // A short delay with a wide jitter: chunks would overtake each other if the queue did
    // not keep their order. 10 MiB in odd-sized writes must come back byte for byte.
    let service = Service::start(&["--fault", "latency,delay=3ms,jitter=3ms"]);
    let data = payload(10 << 20, 10);
    let start = Instant::now();
    let back = echo_round_trip(service.connect(), &data, 7919);
    report("latency 3ms +- 3ms, 10 MiB stream", start.elapsed());
    assert_eq!(back.len(), data.len(), "bytes lost or added");
    assert!(back == data, "stream reordered or corrupted");
    service.wait_metrics("one latency injection, closed by the peer", |m| {
        m.get(&injected("latency")) == 1.0 && m.get(&lost("peer_closed")) == 1.0
    });
}

#[test]
fn latency_backpressure_holds_at_the_write_buffer_limit() {
    // With a long delay, a client that writes and never reads can only park the write buffer
    // limit in the delay queue (plus kernel buffers); then its writes block.
    let service = Service::start(&[
        "--fault",
        "latency,delay=30s",
        "--write-buffer-limit",
        "64KiB",
        "--send-queue-limit",
        "16KiB",
    ]);
    let mut stream = service.connect();
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    let mut written = 0usize;
    while written < 64 << 20 {
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write failed: {e}"),
        }
    }
    eprintln!("MEASURED latency backpressure: client wrote {written} bytes before blocking");
    assert!(
        written < 16 << 20,
        "the client wrote {written} bytes without blocking"
    );
    let rss = service.rss_bytes();
    assert!(rss < 64 << 20, "RSS {rss} bytes");
}

#[test]
fn bandwidth_caps_the_echo_rate() {
    let service = Service::start(&["--fault", "bandwidth,bytes-per-second=32KiB"]);
    let data = payload(128 * 1024, 3);
    let start = Instant::now();
    let back = echo_round_trip(service.connect(), &data, 4096);
    let took = start.elapsed();
    report("bandwidth 32KiB/s, 128 KiB", took);
    assert!(back == data, "echo differs");
    // One second of burst, then 32 KiB/s: 96 KiB take 3 s; a read may overdraw 16 KiB.
    assert!(
        took >= Duration::from_millis(2500),
        "128 KiB echoed in {took:?}"
    );
    service.wait_metrics("bandwidth counted", |m| {
        m.get(&injected("bandwidth")) == 1.0
    });
}

#[test]
fn close_after_bytes_closes_after_exactly_n_bytes_with_a_fin() {
    let service = Service::start(&["--fault", "close,after-bytes=100"]);
    let mut stream = service.connect();
    stream.write_all(&payload(300, 1)).unwrap();
    let (got, end) = read_until_end(&mut stream);
    assert!(end.is_ok(), "not a clean FIN: {end:?}");
    assert_eq!(got, payload(300, 1)[..100], "exactly the first 100 bytes");
    service.wait_metrics("fault_close counted", |m| {
        m.get(&lost("fault_close")) == 1.0 && m.get(&injected("close")) == 1.0
    });
}

#[test]
fn close_after_a_duration_sends_fin_no_earlier() {
    let service = Service::start(&["--fault", "close,after=300ms"]);
    let start = Instant::now();
    let mut stream = service.connect();
    timed_round_trip(&mut stream, b"still open");
    let (_, end) = read_until_end(&mut stream);
    let closed = start.elapsed();
    report("close after 300ms", closed);
    assert!(end.is_ok(), "not a clean FIN: {end:?}");
    assert!(
        closed >= Duration::from_millis(300),
        "closed after {closed:?}"
    );
    service.wait_metrics("fault_close counted", |m| {
        m.get(&lost("fault_close")) == 1.0
    });
}

#[test]
fn reset_gives_econnreset_at_accept_after_bytes_and_after_a_duration() {
    for (spec, send) in [
        ("reset", 1),
        ("reset,after-bytes=1024", 4096),
        ("reset,after=300ms", 1),
    ] {
        let service = Service::start(&["--fault", spec]);
        let start = Instant::now();
        // A reset at accept can arrive before connect() returns: that is the reset too.
        let (got, end) = match TcpStream::connect(service.echo) {
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                // The write may be the call that reports the reset (reads then see EOF).
                match stream.write_all(&payload(send, 2)) {
                    Err(err) => (Vec::new(), Err(err)),
                    Ok(()) => read_until_end(&mut stream),
                }
            }
            Err(err) => (Vec::new(), Err(err)),
        };
        let took = start.elapsed();
        report(&format!("{spec}: reset seen"), took);
        let err = end.expect_err("a reset, not a clean close");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{spec}: {err}");
        assert!(got.len() <= 1024, "{spec}: {} bytes echoed", got.len());
        if spec.contains("after=") {
            assert!(
                took >= Duration::from_millis(300),
                "{spec}: reset after {took:?}"
            );
        }
        service.wait_metrics("fault_reset counted", |m| {
            m.get(&lost("fault_reset")) == 1.0 && m.get(&injected("reset")) == 1.0
        });
    }
}

#[test]
fn blackhole_blocks_the_clients_writes_and_echoes_nothing_until_the_idle_timeout() {
    let service = Service::start(&["--fault", "blackhole", "--idle-timeout", "3s"]);
    let start = Instant::now();
    let mut stream = service.connect();
    stream
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    let mut written = 0usize;
    while written < 64 << 20 {
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write failed: {e}"),
        }
    }
    eprintln!("MEASURED blackhole: client wrote {written} bytes before blocking");
    assert!(
        written < 16 << 20,
        "wrote {written} bytes: the server is reading"
    );
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let err = stream
        .read(&mut [0u8; 16])
        .expect_err("nothing may come back");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    let metrics = service.metrics();
    assert_eq!(
        metrics.get("echo_received_bytes_total"),
        0.0,
        "the server read"
    );
    assert_eq!(metrics.get("echo_connections_active"), 1.0);
    service.wait_metrics("idle timeout ends it", |m| {
        m.get(&lost("idle_timeout")) == 1.0
    });
    assert!(start.elapsed() >= Duration::from_secs(3));
    assert_eq!(service.metrics().get(&injected("blackhole")), 1.0);
}

/// A black hole never reads, yet its connection ends when the peer leaves, long before the
/// idle timeout: a close (FIN, even with unread data queued at the server) and a reset.
#[test]
fn blackhole_ends_when_the_peer_closes_or_resets() {
    let service = Service::start(&["--fault", "blackhole", "--idle-timeout", "1h"]);
    let start = Instant::now();
    let mut closer = service.connect();
    closer.write_all(&[b'x'; 4096]).unwrap();
    service.wait_metrics("the blackhole holds it", |m| {
        m.get("echo_connections_active") == 1.0
    });
    drop(closer);
    service.wait_metrics("the peer's close ends it", |m| {
        m.get(&lost("peer_closed")) == 1.0 && m.get("echo_connections_active") == 0.0
    });
    eprintln!(
        "MEASURED blackhole: ended {:?} after the client's close",
        start.elapsed()
    );

    let resetter = service.connect();
    socket2::SockRef::from(&resetter)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    service.wait_metrics("the blackhole holds it", |m| {
        m.get("echo_connections_active") == 1.0
    });
    drop(resetter); // RST
    service.wait_metrics("the peer's reset ends it", |m| {
        m.get(&lost("reset")) == 1.0 && m.get("echo_connections_active") == 0.0
    });
    let metrics = service.metrics();
    assert_eq!(
        metrics.get("echo_received_bytes_total"),
        0.0,
        "the server read"
    );
    assert_eq!(metrics.get(&injected("blackhole")), 2.0);
}

#[test]
fn refuse_closes_at_once() {
    let service = Service::start(&["--fault", "refuse"]);
    let start = Instant::now();
    let mut stream = service.connect();
    let (got, end) = read_until_end(&mut stream);
    let took = start.elapsed();
    report("refuse: EOF seen", took);
    assert!(
        end.is_ok() && got.is_empty(),
        "{end:?}, {} bytes",
        got.len()
    );
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    service.wait_metrics("refuse counted", |m| {
        m.get(&injected("refuse")) == 1.0 && m.get(&lost("fault_close")) == 1.0
    });
}

#[test]
fn spans_carry_the_fault_and_its_loss_reason_and_peers_limit_it() {
    let receiver = OtlpReceiver::grpc();
    let mut service = Service::start_with_env(
        &["--fault", "reset,after-bytes=10,peers=127.0.0.2/32"],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
        ],
    );
    // 127.0.0.2 is in `peers`: reset after 10 bytes.
    let mut faulted = connect_from(Ipv4Addr::new(127, 0, 0, 2), service.echo);
    let faulted_port = faulted.local_addr().unwrap().port();
    faulted.write_all(&payload(100, 4)).unwrap();
    let (_, end) = read_until_end(&mut faulted);
    assert_eq!(end.unwrap_err().kind(), ErrorKind::ConnectionReset);
    // 127.0.0.3 is not: a plain echo.
    let clean = connect_from(Ipv4Addr::new(127, 0, 0, 3), service.echo);
    let clean_port = clean.local_addr().unwrap().port();
    let data = payload(100, 5);
    assert!(
        echo_round_trip(clean, &data, 33) == data,
        "clean echo differs"
    );
    service.wait_metrics("one reset, one clean close", |m| {
        m.get(&lost("fault_reset")) == 1.0 && m.get(&lost("peer_closed")) == 1.0
    });
    stop(&mut service);
    let spans = receiver.spans();
    let faulted = &span_for_port(&spans, faulted_port).span.attributes;
    assert_eq!(str_attr(faulted, "echo.fault"), "reset");
    assert_eq!(str_attr(faulted, "echo.loss_reason"), "fault_reset");
    let clean = &span_for_port(&spans, clean_port).span.attributes;
    assert!(
        clean.iter().all(|kv| kv.key != "echo.fault"),
        "clean span has echo.fault"
    );
    assert_eq!(str_attr(clean, "echo.loss_reason"), "peer_closed");
}

/// Which of `n` sequential connections were refused (`refuse` closes before echoing).
fn refused_connections(service: &Service, n: usize) -> Vec<bool> {
    (0..n)
        .map(|_| {
            let mut stream = service.connect();
            let _ = stream.write_all(b"x");
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(1) => false,
                Ok(_) => true,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
                Err(e) => panic!("read: {e}"),
            }
        })
        .collect()
}

#[test]
fn probability_half_over_2000_connections_repeats_exactly_with_the_same_seed() {
    const N: usize = 2000;
    let args = [
        "--fault",
        "refuse,probability=0.5",
        "--fault-seed",
        "20261130",
    ];
    let first = {
        let service = Service::start(&args);
        let refused = refused_connections(&service, N);
        let count = refused.iter().filter(|r| **r).count();
        service.wait_metrics("injections counted", |m| {
            m.get(&injected("refuse")) == count as f64
        });
        refused
    };
    let second = refused_connections(&Service::start(&args), N);
    let count = first.iter().filter(|r| **r).count();
    eprintln!("MEASURED probability 0.5 over {N}: {count} refused");
    assert_eq!(
        first, second,
        "a second run with the same seed faulted other connections"
    );
    // Binomial(2000, 0.5): mean 1000, sd 22.4; 5 sd either way (a false alarm once in ~2e6).
    assert!((888..=1112).contains(&count), "{count} of {N} refused");
    let other_seed = {
        let service = Service::start(&["--fault", "refuse,probability=0.5", "--fault-seed", "7"]);
        refused_connections(&service, 200)
    };
    assert_ne!(
        other_seed,
        first[..200],
        "another seed chose the same 200 connections"
    );
}

#[test]
fn put_applies_to_new_connections_only_and_a_bad_put_changes_nothing() {
    let service = Service::start(&["--admin-control"]);
    let mut old = service.connect();
    timed_round_trip(&mut old, b"before");

    let put = admin(
        &service,
        "PUT",
        "/faults",
        &[],
        r#"[{"kind": "close", "after_bytes": 5}]"#,
    );
    assert_eq!(put.status, 200, "{}", put.body);
    let listed: serde_json::Value =
        serde_json::from_str(&admin(&service, "GET", "/faults", &[], "").body).unwrap();
    assert_eq!(listed[0]["kind"], "close");
    assert_eq!(listed[0]["after_bytes"], 5);
    let health: serde_json::Value =
        serde_json::from_str(&service.admin_get("/healthz").body).unwrap();
    assert_eq!(health["faults"], listed, "/healthz shows the faults");
    assert_eq!(service.metrics().get(&enabled("close")), 1.0);

    // The open connection keeps what it had: no fault.
    let data = payload(1000, 6);
    timed_round_trip(&mut old, &data);
    // A new one gets the new fault.
    let mut new = service.connect();
    new.write_all(b"0123456789").unwrap();
    let (got, end) = read_until_end(&mut new);
    assert!(end.is_ok());
    assert_eq!(got, b"01234");

    // A bad PUT: 400 naming the fault and the key; nothing changes.
    let bad = admin(
        &service,
        "PUT",
        "/faults",
        &[],
        r#"[{"kind": "latency", "delay": "50ms"}, {"kind": "reset", "after_bytes": -3}]"#,
    );
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("reset") && bad.body.contains("after_bytes"),
        "{}",
        bad.body
    );
    let not_json = admin(&service, "PUT", "/faults", &[], "[{");
    assert_eq!(not_json.status, 400);
    let again: serde_json::Value =
        serde_json::from_str(&admin(&service, "GET", "/faults", &[], "").body).unwrap();
    assert_eq!(again, listed, "a bad PUT changed the faults");
    let huge = admin(&service, "PUT", "/faults", &[], &" ".repeat(100_000));
    assert_eq!(huge.status, 413, "an oversized body is refused");

    // DELETE clears them: new connections are clean again.
    assert_eq!(admin(&service, "DELETE", "/faults", &[], "").status, 200);
    assert_eq!(admin(&service, "GET", "/faults", &[], "").body.trim(), "[]");
    let mut clean = service.connect();
    timed_round_trip(&mut clean, b"0123456789");
    assert_eq!(service.metrics().get(&enabled("close")), 0.0);
    let logs = service.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("faults replaced by the admin API"),
        "change not logged"
    );
    assert!(
        logs.contains("faults cleared by the admin API"),
        "clear not logged"
    );
}

#[test]
fn a_token_is_required_when_set() {
    let service = Service::start_with_env(
        &["--admin-control"],
        &[("ECHO_ADMIN_TOKEN", "s3cret-token")],
    );
    let body = r#"[{"kind": "refuse"}]"#;
    assert_eq!(admin(&service, "PUT", "/faults", &[], body).status, 401);
    let wrong = [("Authorization", "Bearer s3cret-tokem")];
    assert_eq!(admin(&service, "PUT", "/faults", &wrong, body).status, 401);
    assert_eq!(
        admin(&service, "POST", "/readyz/disable", &wrong, "").status,
        401
    );
    assert_eq!(admin(&service, "GET", "/faults", &[], "").body.trim(), "[]");
    let right = [("Authorization", "Bearer s3cret-token")];
    assert_eq!(admin(&service, "PUT", "/faults", &right, body).status, 200);
    assert_eq!(
        admin(&service, "POST", "/readyz/disable", &right, "").status,
        200
    );
    assert_eq!(service.admin_get("/readyz").status, 503);
}

#[test]
fn without_admin_control_the_mutating_endpoints_do_not_exist() {
    let service = Service::start(&["--fault", "latency,delay=1ms"]);
    assert_eq!(admin(&service, "PUT", "/faults", &[], "[]").status, 404);
    assert_eq!(admin(&service, "DELETE", "/faults", &[], "").status, 404);
    assert_eq!(
        admin(&service, "POST", "/readyz/disable", &[], "").status,
        404
    );
    assert_eq!(
        admin(&service, "POST", "/readyz/enable", &[], "").status,
        404
    );
    let get = admin(&service, "GET", "/faults", &[], "");
    assert_eq!(get.status, 200, "reading the faults is always allowed");
    assert!(get.body.contains("latency"));
    assert_eq!(service.admin_get("/readyz").status, 200);
}

#[test]
fn readiness_disable_and_enable_flip_readyz_while_echo_keeps_working() {
    let service = Service::start(&["--admin-control"]);
    assert_eq!(
        admin(&service, "POST", "/readyz/disable", &[], "").status,
        200
    );
    let ready = service.admin_get("/readyz");
    assert_eq!(ready.status, 503);
    let body: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(body["reason"], "disabled");
    let mut stream = service.connect();
    timed_round_trip(&mut stream, b"still echoing");
    assert_eq!(service.admin_get("/healthz").status, 200);
    assert_eq!(
        admin(&service, "POST", "/readyz/enable", &[], "").status,
        200
    );
    assert_eq!(service.admin_get("/readyz").status, 200);
    timed_round_trip(&mut stream, b"and after");
}

#[test]
fn a_bad_fault_spec_exits_2_naming_the_fault_and_the_key() {
    for (args, env, needles) in [
        (vec!["--fault", "latency"], vec![], ["latency", "delay"]),
        (
            vec!["--fault", "reset,probability=2"],
            vec![],
            ["reset", "probability"],
        ),
        (
            vec![],
            vec![("ECHO_FAULTS", "refuse;close,after-byte=3")],
            ["close", "after-byte"],
        ),
    ] {
        let output = crate::support::service_command(&[], &args, &env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{args:?} {env:?}: {stderr}");
        }
    }
}

/// Connections the service has accepted so far.
fn made(service: &Service) -> f64 {
    service.metrics().get("echo_connections_made_total")
}

#[test]
fn haproxy_stops_sending_new_connections_to_a_replica_whose_readiness_is_disabled() {
    let bin = require_tool_or_apt("haproxy", "haproxy");
    let a = Service::start(&["--admin-control"]);
    let b = Service::start(&["--admin-control"]);
    let dir = temp_dir("haproxy-readyz");
    let port = free_port();
    let config = format!(
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 20s\n  timeout server 20s\n  timeout check 1s\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
         backend be\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n\
         \x20 server a {} check port {} inter 100ms fall 1 rise 1\n\
         \x20 server b {} check port {} inter 100ms fall 1 rise 1\n",
        a.echo,
        a.admin.port(),
        b.echo,
        b.admin.port()
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &config).unwrap();
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let mut command = Command::new(bin);
    command.arg("-db").arg("-f").arg(&path);
    let _proxy = Proxy::start(command, dir, front);
    let through = || {
        let mut stream = connect(front);
        timed_round_trip(&mut stream, b"via haproxy");
    };

    // Both replicas take connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    while made(&a) == 0.0 || made(&b) == 0.0 {
        assert!(Instant::now() < deadline, "both replicas never served");
        through();
    }

    assert_eq!(admin(&a, "POST", "/readyz/disable", &[], "").status, 200);
    // Wait until HAProxy has noticed: ten connections in a row all go to b.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut in_a_row = 0;
    while in_a_row < 10 {
        assert!(
            Instant::now() < deadline,
            "HAProxy kept sending to the disabled replica"
        );
        let before = made(&a);
        through();
        in_a_row = if made(&a) == before { in_a_row + 1 } else { 0 };
    }
    let (a_before, b_before) = (made(&a), made(&b));
    for _ in 0..20 {
        through();
    }
    assert_eq!(
        made(&a),
        a_before,
        "the disabled replica got new connections"
    );
    assert_eq!(made(&b), b_before + 20.0);
    // The disabled replica still serves whoever connects to it directly.
    let mut direct = a.connect();
    timed_round_trip(&mut direct, b"direct");

    // Enabled again, it gets connections again.
    assert_eq!(admin(&a, "POST", "/readyz/enable", &[], "").status, 200);
    let a_now = made(&a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while made(&a) == a_now {
        assert!(
            Instant::now() < deadline,
            "HAProxy never returned to the re-enabled replica"
        );
        through();
    }
}

#[test]
fn behind_a_proxy_header_peers_match_the_original_client() {
    let service = Service::start(&[
        "--proxy-protocol",
        "required",
        "--fault",
        "refuse,peers=10.0.0.0/8",
    ]);
    let through = |client: &str| {
        let mut stream = service.connect();
        let header = format!("PROXY TCP4 {client} 127.0.0.1 40001 8000\r\n");
        stream.write_all(header.as_bytes()).unwrap();
        stream.write_all(b"x").unwrap();
        let (got, end) = read_until_end_or_echo(&mut stream);
        (got, end)
    };
    // Every connection comes from 127.0.0.1; only the header says who the client is.
    let (got, _) = through("10.1.2.3");
    assert!(got.is_empty(), "a client in 10.0.0.0/8 was served");
    let (got, _) = through("192.0.2.7");
    assert_eq!(got, b"x", "a client outside 10.0.0.0/8 was refused");
    service.wait_metrics("one refusal", |m| {
        m.get(&injected("refuse")) == 1.0 && m.get(&lost("fault_close")) == 1.0
    });
}

/// Read one byte of echo, or until the server closes.
fn read_until_end_or_echo(stream: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => (Vec::new(), Ok(())),
        Ok(_) => (byte.to_vec(), Ok(())),
        Err(e) => (Vec::new(), Err(e)),
    }
}
