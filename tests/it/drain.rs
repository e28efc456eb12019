//! Graceful drain against the real binary and real signals: not ready at once, still accepting
//! during the drain delay, refusing after it, in-flight data fully echoed, stragglers closed at
//! the shutdown timeout, exit 0.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::support::{echo_round_trip, payload, Service};

fn round_trip_on_open(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    stream.read_exact(&mut back).unwrap();
    assert!(back == data, "echo differs");
}

#[test]
fn sigterm_drains_then_stops_accepting_then_closes_stragglers_and_exits_zero() {
    let mut service = Service::start(&["--drain-delay", "1s", "--shutdown-timeout", "2s"]);
    let mut in_flight = service.connect();
    round_trip_on_open(&mut in_flight, &payload(1000, 1));
    let mut straggler = service.connect();
    round_trip_on_open(&mut straggler, b"still here");

    service.signal("TERM");
    let signalled = Instant::now();

    // Not ready at once, but alive.
    let deadline = Instant::now() + Duration::from_millis(800);
    loop {
        let ready = service.admin_get("/readyz");
        if ready.status == 503 {
            assert!(ready.body.contains("draining"), "{}", ready.body);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {} after SIGTERM",
            ready.status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let health = service.admin_get("/healthz");
    assert_eq!(health.status, 200);
    assert!(health.body.contains("\"draining\""), "{}", health.body);

    // During the drain delay new connections are still accepted and served.
    assert!(
        signalled.elapsed() < Duration::from_millis(900),
        "test too slow to check the delay"
    );
    let data = payload(20_000, 2);
    assert!(echo_round_trip(service.connect(), &data, 999) == data);

    // After it, the listener is gone: connections are refused.
    let refused_by = signalled + Duration::from_secs(3);
    loop {
        match TcpStream::connect_timeout(&service.echo, Duration::from_secs(1)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            Ok(_) | Err(_) => {}
        }
        assert!(
            Instant::now() < refused_by,
            "still accepting after the drain delay"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        signalled.elapsed() >= Duration::from_millis(950),
        "stopped accepting before the drain delay ended"
    );

    // An open connection keeps being echoed while stopping, and closes cleanly.
    let data = payload(200_000, 3);
    round_trip_on_open(&mut in_flight, &data);
    in_flight.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    in_flight.read_to_end(&mut rest).expect("clean close");
    assert!(rest.is_empty());

    // The straggler is still open and echoed just before drain delay + shutdown timeout (3 s):
    // nothing cut it at SIGTERM or when the listener closed.
    let just_before = signalled + Duration::from_millis(2600);
    let now = Instant::now();
    assert!(now < just_before, "test too slow to check the straggler");
    std::thread::sleep(just_before - now);
    round_trip_on_open(&mut straggler, b"still open");
    assert!(
        signalled.elapsed() < Duration::from_millis(2950),
        "the straggler's round trip ran into the shutdown timeout"
    );

    // The straggler is closed at the shutdown timeout, and the process exits 0 in time.
    let status = service
        .wait_exit(Duration::from_secs(6))
        .expect("exit within drain delay + shutdown timeout + slack");
    assert!(status.success(), "exit status {status:?}");
    let elapsed = signalled.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2900),
        "exited after {elapsed:?}, before the shutdown timeout"
    );
    let mut buf = [0u8; 16];
    match straggler.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("straggler got {n} unexpected bytes"),
    }
}

#[test]
fn ctrl_c_with_no_connections_stops_promptly_with_defaults() {
    let mut service = Service::start(&[]);
    let start = Instant::now();
    service.signal("INT");
    let status = service
        .wait_exit(Duration::from_secs(5))
        .expect("exit after SIGINT");
    assert!(status.success());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?} to stop an idle server",
        start.elapsed()
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut service = Service::start(&["--drain-delay", "60s"]);
    let _open = service.connect();
    service.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        service.wait_exit(Duration::ZERO).is_none(),
        "exited before the drain delay"
    );
    service.signal("TERM");
    let status = service
        .wait_exit(Duration::from_secs(5))
        .expect("a second signal must exit at once");
    assert!(!status.success());
}

#[test]
fn restart_after_kill_9_with_live_connections_binds_at_once() {
    let mut first = Service::start(&["--listen", "127.0.0.1:0"]);
    let port = first.echo.port();
    let mut held: Vec<TcpStream> = (0..20).map(|_| first.connect()).collect();
    for stream in &mut held {
        round_trip_on_open(stream, b"ping");
    }
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let listen = format!("127.0.0.1:{port}");
    let second = Service::start(&["--listen", &listen]);
    let data = payload(1000, 8);
    assert!(echo_round_trip(second.connect(), &data, 100) == data);
}
