//! Connection policies against the real binary: the total and per-peer limits (refused at once,
//! counted, `/readyz` at capacity), the idle and write-stall timeouts (close the right
//! connection, and only that one), max connection age with jitter (a graceful close: every
//! byte the server took is echoed before its FIN) and the read throttle (bytes/s respected,
//! nothing lost).
//!
//! Every timing bound is stated next to its assertion with the slack it allows; the timeouts
//! used are ~1 s so the whole module runs in about 15 s.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::support::{echo_round_trip, payload, Service};

/// `echo_connections_lost_total{reason="..."}`.
pub fn lost(reason: &str) -> String {
    format!("echo_connections_lost_total{{reason=\"{reason}\"}}")
}

/// `echo_connections_rejected_total{reason="..."}`.
fn rejected(reason: &str) -> String {
    format!("echo_connections_rejected_total{{reason=\"{reason}\"}}")
}

/// Write `data`, read exactly as much back, compare.
fn round_trip(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    stream.read_exact(&mut back).expect("echo");
    assert!(back == data, "echo differs");
}

/// A connection to `addr` from the loopback source address `source` (any of 127.0.0.0/8 works
/// on Linux without configuration), so one test can be several peers.
pub fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .unwrap_or_else(|e| panic!("bind {source}:0: {e}"));
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {source} -> {addr}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Block until the server closes `stream` (EOF or reset), at most `limit`; returns how long it
/// took. Fails if data arrives instead or the connection is still open after `limit`.
fn wait_closed(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected a close, got {n} bytes"),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("still open after {limit:?}")
        }
        Err(e) => panic!("unexpected error waiting for the close: {e}"),
    }
    start.elapsed()
}

/// Poll `/readyz` until it answers `status`, at most 5 s; returns the body.
fn wait_ready_status(service: &Service, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = service.admin_get("/readyz");
        if response.status == status {
            return response.body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {} ({}), expected {status}",
            response.status,
            response.body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn over_the_limit_connections_are_closed_at_once_and_counted_while_the_served_ones_echo() {
    const LIMIT: usize = 100;
    const EXTRA: usize = 300;
    let service = Service::start(&["--max-connections", "100"]);
    assert_eq!(service.admin_get("/readyz").status, 200);

    // Fill the service to its limit; each connection proves it is served.
    let mut served: Vec<TcpStream> = (0..LIMIT)
        .map(|i| {
            let mut stream = service.connect();
            round_trip(&mut stream, &payload(100, i as u64));
            stream
        })
        .collect();
    service.wait_metrics("100 active", |m| {
        m.get("echo_connections_active") == LIMIT as f64
    });
    let body = wait_ready_status(&service, 503);
    assert!(body.contains("at_capacity"), "/readyz body: {body}");

    // 300 more: the kernel completes each handshake, the server accepts and closes at once.
    let started = Instant::now();
    let mut extra: Vec<TcpStream> = (0..EXTRA).map(|_| service.connect()).collect();
    let mut slowest = Duration::ZERO;
    for stream in &mut extra {
        slowest = slowest.max(wait_closed(stream, Duration::from_secs(2)));
    }
    let all_closed = started.elapsed();
    eprintln!("{EXTRA} refused connections all closed {all_closed:?} after the first connect");
    assert!(
        all_closed < Duration::from_secs(3),
        "closing {EXTRA} refused connections took {all_closed:?}: they wait instead of being \
         refused at once"
    );
    let metrics = service.wait_metrics("300 rejected{limit}", |m| {
        m.get(&rejected("limit")) == EXTRA as f64
    });
    assert_eq!(metrics.get("echo_connections_made_total"), LIMIT as f64);
    assert_eq!(metrics.get("echo_connections_active"), LIMIT as f64);
    assert_eq!(metrics.get(&rejected("peer_limit")), 0.0);

    // The served ones are unaffected.
    for (i, stream) in served.iter_mut().enumerate() {
        round_trip(stream, &payload(5000, 1000 + i as u64));
    }
    assert_eq!(service.admin_get("/readyz").status, 503);

    // Below the limit again: ready, and new connections are served.
    for stream in served.drain(..10) {
        stream.shutdown(Shutdown::Both).unwrap();
    }
    let body = wait_ready_status(&service, 200);
    assert!(!body.contains("at_capacity"), "/readyz body: {body}");
    let data = payload(10_000, 7);
    assert!(echo_round_trip(service.connect(), &data, 333) == data);
}

#[test]
fn per_peer_limit_refuses_only_the_peer_over_it() {
    let service = Service::start(&["--max-connections-per-peer", "3"]);
    let greedy = Ipv4Addr::new(127, 0, 0, 2);
    let others = [Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 4)];

    let mut greedy_served: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut stream = connect_from(greedy, service.echo);
            round_trip(&mut stream, &payload(100, i));
            stream
        })
        .collect();
    for _ in 0..4 {
        let mut refused = connect_from(greedy, service.echo);
        let took = wait_closed(&mut refused, Duration::from_secs(2));
        assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    }
    // Other peers get their own 3 each, unaffected by the greedy one.
    let mut other_served = Vec::new();
    for (n, ip) in others.iter().enumerate() {
        for i in 0..3 {
            let mut stream = connect_from(*ip, service.echo);
            round_trip(&mut stream, &payload(2000, 10 * n as u64 + i));
            other_served.push(stream);
        }
    }
    let metrics = service.wait_metrics("4 rejected{peer_limit}", |m| {
        m.get(&rejected("peer_limit")) == 4.0
    });
    assert_eq!(metrics.get("echo_connections_active"), 9.0);
    assert_eq!(metrics.get(&rejected("limit")), 0.0);
    // A per-peer limit is not a service-wide capacity problem.
    assert_eq!(service.admin_get("/readyz").status, 200);

    // A slot frees when one of the greedy peer's connections closes.
    let mut gone = greedy_served.pop().unwrap();
    gone.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    gone.read_to_end(&mut rest).unwrap();
    service.wait_metrics("one greedy connection lost", |m| {
        m.get(&lost("peer_closed")) == 1.0
    });
    let mut again = connect_from(greedy, service.echo);
    round_trip(&mut again, b"a slot is free again");
    for stream in greedy_served.iter_mut().chain(&mut other_served) {
        round_trip(stream, b"still served");
    }
    assert_eq!(service.metrics().get(&rejected("peer_limit")), 4.0);
}

#[test]
fn idle_timeout_closes_the_silent_connection_and_spares_the_active_one() {
    const IDLE: Duration = Duration::from_secs(1);
    let service = Service::start(&["--idle-timeout", "1s"]);

    // The active connection sends a byte every 200 ms for 2.5 s (2.5 idle timeouts).
    let mut active = service.connect();
    let chatter = std::thread::spawn(move || {
        let start = Instant::now();
        let mut i = 0u8;
        while start.elapsed() < Duration::from_millis(2500) {
            round_trip(&mut active, &[i]);
            i = i.wrapping_add(1);
            std::thread::sleep(Duration::from_millis(200));
        }
        active.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        active.read_to_end(&mut rest).expect("clean close");
        assert!(rest.is_empty());
    });

    let mut silent = service.connect();
    round_trip(&mut silent, b"then silence");
    let took = wait_closed(&mut silent, Duration::from_secs(5));
    // Slack: timer granularity and scheduling, generous for a loaded 2-core CI machine.
    assert!(
        took >= IDLE - Duration::from_millis(50) && took < IDLE + Duration::from_millis(1000),
        "closed after {took:?}, idle timeout {IDLE:?}"
    );
    service.wait_metrics("lost{idle_timeout} = 1", |m| {
        m.get(&lost("idle_timeout")) == 1.0
    });
    chatter.join().expect("the active connection was disturbed");
    let metrics = service.wait_metrics("active connection closed by its peer", |m| {
        m.get(&lost("peer_closed")) == 1.0
    });
    assert_eq!(metrics.get(&lost("idle_timeout")), 1.0);
    assert_eq!(metrics.get("echo_connections_active"), 0.0);
}

#[test]
fn write_stall_timeout_closes_a_peer_that_never_reads_but_not_a_slow_reader() {
    const STALL: Duration = Duration::from_secs(1);
    let service = Service::start(&["--write-stall-timeout", "1s"]);

    // A slow reader: 512 KiB echoed, read 64 KiB every 300 ms (slow, but always progressing).
    let slow = service.connect();
    let slow_reader = std::thread::spawn(move || {
        let data = payload(512 * 1024, 42);
        let mut writer = slow.try_clone().unwrap();
        let sent = data.clone();
        let writing = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut reader = slow;
        let mut back = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let n = reader.read(&mut chunk).expect("slow reader was cut off");
            if n == 0 {
                break;
            }
            back.extend_from_slice(&chunk[..n]);
        }
        writing.join().unwrap();
        assert!(back == data, "slow reader: echo differs");
    });

    // The staller writes until the server gives up on it, and never reads.
    let start = Instant::now();
    let mut staller = service.connect();
    staller
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = payload(64 * 1024, 9);
    let mut written = 0usize;
    let error = loop {
        match staller.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => break e,
        }
    };
    let took = start.elapsed();
    eprintln!("staller wrote {written} bytes, then {error} after {took:?}");
    assert!(
        matches!(
            error.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
        ),
        "the staller's writes ended with {error} after {took:?} instead of being cut off"
    );
    assert!(
        took >= STALL && took < STALL + Duration::from_secs(3),
        "cut off after {took:?}, write-stall timeout {STALL:?}"
    );
    service.wait_metrics("lost{write_stall} = 1", |m| {
        m.get(&lost("write_stall")) == 1.0
    });

    slow_reader.join().expect("slow reader");
    let metrics = service.wait_metrics("slow reader closed cleanly", |m| {
        m.get(&lost("peer_closed")) == 1.0
    });
    assert_eq!(metrics.get(&lost("write_stall")), 1.0);
    assert_eq!(metrics.get("echo_connections_active"), 0.0);
    // The staller's buffered echo was dropped when it was cut off: sent counts only what the
    // kernel took, so it must fall short of what was received.
    assert!(
        metrics.get("echo_sent_bytes_total") < metrics.get("echo_received_bytes_total"),
        "sent bytes include bytes that were never sent: {metrics:?}"
    );
}

/// Bytes of a stream that repeats `pattern`, from offset `at`.
fn pattern_at(pattern: &[u8], at: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| pattern[(at + i) % pattern.len()])
        .collect()
}

#[test]
fn max_age_closes_gracefully_echoing_everything_the_server_read() {
    const AGE: Duration = Duration::from_secs(1);
    let service = Service::start(&["--max-connection-age", "1s"]);
    let stream = service.connect();
    let opened = Instant::now();

    // Stream 8 KiB every 10 ms while reading the echo, until the server ends the connection.
    let pattern = payload(8192 * 7 + 13, 77);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = stream.try_clone().unwrap();
    let writing = {
        let stop = stop.clone();
        let pattern = pattern.clone();
        std::thread::spawn(move || {
            let mut offset = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let chunk = pattern_at(&pattern, offset, 8192);
                if writer.write_all(&chunk).is_err() {
                    break;
                }
                offset += chunk.len();
                std::thread::sleep(Duration::from_millis(10));
            }
            // Our FIN ends the server's linger.
            let _ = writer.shutdown(Shutdown::Write);
            offset
        })
    };
    let mut reader = stream;
    let mut back = Vec::new();
    let result = reader.read_to_end(&mut back);
    let took = opened.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sent = writing.join().unwrap();
    result.unwrap_or_else(|e| {
        panic!(
            "max age must close with a FIN, got {e} after {took:?} and {} bytes",
            back.len()
        )
    });
    eprintln!(
        "max age: closed after {took:?}; sent {sent}, echoed {}",
        back.len()
    );
    // tokio's timer has millisecond ticks: allow it to fire a tick early.
    assert!(
        took + Duration::from_millis(2) >= AGE && took < AGE + Duration::from_secs(1),
        "closed after {took:?}, max age {AGE:?}"
    );
    assert!(!back.is_empty(), "nothing was echoed before the close");
    assert!(
        back == pattern_at(&pattern, 0, back.len()),
        "the echo is not a prefix of what was sent"
    );

    // Every byte the server took in was echoed before its FIN.
    let metrics = service.wait_metrics("lost{max_age} = 1", |m| m.get(&lost("max_age")) == 1.0);
    assert_eq!(
        metrics.get("echo_received_bytes_total"),
        back.len() as f64,
        "the server read bytes it did not echo before closing"
    );
    assert_eq!(metrics.get("echo_sent_bytes_total"), back.len() as f64);
}

#[test]
fn max_age_jitter_spreads_the_closes_within_age_plus_minus_jitter() {
    const CONNECTIONS: usize = 40;
    let age = Duration::from_secs(2);
    let jitter = Duration::from_secs(1);
    let service = Service::start(&[
        "--max-connection-age",
        "2s",
        "--max-connection-age-jitter",
        "1s",
    ]);
    let waiters: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let mut stream = service.connect();
            let opened = Instant::now();
            round_trip(&mut stream, &payload(64, i as u64));
            std::thread::spawn(move || -> Result<Duration, String> {
                let mut rest = Vec::new();
                stream
                    .set_read_timeout(Some(Duration::from_secs(6)))
                    .unwrap();
                match stream.read_to_end(&mut rest) {
                    Ok(_) if rest.is_empty() => Ok(opened.elapsed()),
                    Ok(_) => Err(format!("{} unexpected bytes", rest.len())),
                    Err(e) => Err(format!("no FIN after {:?}: {e}", opened.elapsed())),
                }
            })
        })
        .collect();
    let results: Vec<Result<Duration, String>> =
        waiters.into_iter().map(|w| w.join().unwrap()).collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections not closed gracefully within 6 s (max age {age:?} +- \
         {jitter:?}): {:?}",
        failures.len(),
        failures.first()
    );
    let mut ages: Vec<Duration> = results.into_iter().map(Result::unwrap).collect();
    ages.sort();
    let (min, max) = (ages[0], ages[CONNECTIONS - 1]);
    eprintln!("closed after {min:?} .. {max:?}");
    // Lower bound exact; upper bound with 400 ms scheduling slack.
    assert!(
        min >= age - jitter && max <= age + jitter + Duration::from_millis(400),
        "closes outside age +- jitter: {ages:?}"
    );
    assert!(
        max - min >= jitter,
        "closes not spread by the jitter: {ages:?}"
    );
    assert!(
        ages.iter().any(|a| *a < age) && ages.iter().any(|a| *a > age),
        "jitter should move closes both earlier and later: {ages:?}"
    );
    service.wait_metrics("40 lost{max_age}", |m| {
        m.get(&lost("max_age")) == CONNECTIONS as f64
    });
}

#[test]
fn throttle_limits_bytes_per_second_and_loses_nothing() {
    const RATE: usize = 100_000;
    const TOTAL: usize = 400_000;
    let service = Service::start(&["--throttle-bytes-per-second", "100000"]);
    let data = payload(TOTAL, 5);
    let stream = service.connect();
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let start = Instant::now();
    let writing = std::thread::spawn(move || {
        for chunk in sent.chunks(4096) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut back = Vec::with_capacity(TOTAL);
    let mut at_two_seconds = None;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut chunk).expect("read echo");
        if at_two_seconds.is_none() && start.elapsed() >= Duration::from_secs(2) {
            at_two_seconds = Some(back.len());
        }
        if n == 0 {
            break;
        }
        back.extend_from_slice(&chunk[..n]);
    }
    let took = start.elapsed();
    writing.join().unwrap();
    assert!(back == data, "throttled echo differs");
    let at_two_seconds = at_two_seconds.expect("the transfer ended before 2 s: not throttled");
    eprintln!(
        "throttle {RATE} B/s: {at_two_seconds} bytes echoed after 2 s, all {TOTAL} after {took:?}"
    );
    // The bucket starts with one second of burst: after t seconds about RATE * (1 + t), plus
    // up to one read (16 KiB) of overdraft and the bucket's head start (it starts at accept,
    // just before our clock): within -30% / +10%.
    let expected = RATE * 3;
    assert!(
        at_two_seconds >= expected * 7 / 10 && at_two_seconds <= expected * 11 / 10,
        "{at_two_seconds} bytes echoed in 2 s, expected about {expected} at {RATE} B/s"
    );
    // All of it: (TOTAL - burst) / RATE = 3 s, up to 4.5 s.
    assert!(
        took >= Duration::from_millis(2700) && took < Duration::from_millis(4500),
        "{TOTAL} bytes took {took:?} at {RATE} B/s (expected about 3 s)"
    );
}

/// Write `chunk` until the server stops taking bytes for `quiet` (its buffers and ours are
/// full), without reading; returns how many bytes were written.
fn write_until_stalled(stream: &mut TcpStream, chunk: &[u8], quiet: Duration) -> usize {
    stream.set_write_timeout(Some(quiet)).unwrap();
    let mut written = 0usize;
    loop {
        match stream.write(chunk) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return written
            }
            Err(e) => panic!("write failed before the stall: {e}"),
        }
    }
}

#[test]
fn max_age_grace_resets_a_peer_that_never_reads_and_counts_it_apart() {
    // Issue 15, defect 3: the max-age close used to wait for the flush without bound.
    const AGE: Duration = Duration::from_secs(1);
    const GRACE: Duration = Duration::from_secs(1);
    let service = Service::start(&[
        "--max-connection-age",
        "1s",
        "--max-connection-age-grace",
        "1s",
    ]);
    let mut stream = service.connect();
    let opened = Instant::now();
    let written = write_until_stalled(
        &mut stream,
        &payload(64 * 1024, 3),
        Duration::from_millis(300),
    );
    assert!(written > 0);
    // Still not reading: the close starts at the age and is cut at age + grace.
    let mut sink = vec![0u8; 1 << 20];
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Waiting for the cut without reading: poll the metrics instead of the socket.
    let metrics = service.wait_metrics("lost{max_age_grace} = 1", |m| {
        m.get(&lost("max_age_grace")) == 1.0
    });
    let took = opened.elapsed();
    assert!(
        took >= AGE + GRACE && took < AGE + GRACE + Duration::from_secs(3),
        "cut after {took:?}, age {AGE:?} + grace {GRACE:?}"
    );
    assert_eq!(metrics.get(&lost("max_age")), 0.0);
    assert_eq!(metrics.get("echo_connections_active"), 0.0);
    // The peer sees a reset once it reads (what was echoed, then the RST).
    let end = loop {
        match stream.read(&mut sink) {
            Ok(0) => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected a reset after the grace, got {end:?}"
    );
}

#[test]
fn a_peer_that_resets_during_the_max_age_linger_is_counted_as_reset() {
    let service = Service::start(&["--max-connection-age", "500ms"]);
    let mut stream = service.connect();
    round_trip(&mut stream, b"hello");
    // Send more and do not read it: the server echoes, reaches its age, FINs and lingers.
    stream.write_all(&payload(4096, 5)).unwrap();
    std::thread::sleep(Duration::from_millis(900));
    // Closing with unread data in our receive buffer sends a reset: the echo was lost.
    drop(stream);
    let metrics = service.wait_metrics("one connection lost", |m| {
        m.get(&lost("reset")) + m.get(&lost("max_age")) == 1.0
    });
    assert_eq!(metrics.get(&lost("reset")), 1.0, "{metrics:?}");
    assert_eq!(metrics.get(&lost("max_age")), 0.0);
}

#[test]
fn a_peer_that_never_reads_is_a_write_stall_even_with_a_shorter_idle_timeout() {
    // Issue 12 §6: --idle-timeout <= --write-stall-timeout used to count such peers as idle.
    const STALL: Duration = Duration::from_secs(2);
    let service = Service::start(&["--idle-timeout", "500ms", "--write-stall-timeout", "2s"]);
    let mut staller = service.connect();
    let start = Instant::now();
    write_until_stalled(
        &mut staller,
        &payload(64 * 1024, 11),
        Duration::from_millis(200),
    );
    let metrics = service.wait_metrics("the staller is closed", |m| {
        m.get(&lost("write_stall")) + m.get(&lost("idle_timeout")) == 1.0
    });
    let took = start.elapsed();
    assert_eq!(metrics.get(&lost("write_stall")), 1.0, "{metrics:?}");
    assert_eq!(metrics.get(&lost("idle_timeout")), 0.0);
    assert!(
        took >= STALL && took < STALL + Duration::from_secs(3),
        "closed after {took:?}, write-stall timeout {STALL:?}"
    );
}
