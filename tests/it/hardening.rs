//! Never wedge: the ways a production pod used to die or lie, each tried for real.
//!
//! - stdout that nobody reads (a stalled log pipe) must not stop echo, the admin port or
//!   SIGTERM; lines are dropped and counted instead;
//! - SIGHUP and SIGUSR1 must not kill the process;
//! - an admin-port flood must not grow memory or lock out health checks;
//! - echo connections at the file descriptor limit must not starve the admin port;
//! - the admin port answers HTTP/2 with prior knowledge, and 414 for an overlong target.
//!
//! Bounds on time are generous (a loaded 2-core machine must not flake them); the figures
//! measured are printed for the record.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command};
use std::time::{Duration, Instant};

use crate::support::{
    connect, http_request, payload, require_tool, service_command, HttpResponse, Metrics, Service,
};

/// A service whose stdout pipe the test stops reading once the service said it is serving.
struct StalledStdout {
    child: Child,
    /// Held open and never read again: the pipe fills and stays full.
    _stdout: BufReader<ChildStdout>,
    echo: SocketAddr,
    admin: SocketAddr,
}

impl StalledStdout {
    fn start(args: &[&str]) -> StalledStdout {
        let mut child = service_command(&[], args, &[]).spawn().expect("start");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !line.contains("echo-service serving") {
            line.clear();
            assert!(Instant::now() < deadline, "no serving line");
            assert!(stdout.read_line(&mut line).unwrap() > 0, "stdout closed");
        }
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = |name: &str| json["fields"][name].as_str().unwrap().parse().unwrap();
        StalledStdout {
            echo: addr("listen"),
            admin: addr("admin"),
            child,
            _stdout: stdout,
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for StalledStdout {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One short echo exchange; fails (not hangs) if the service does not answer in 10 s.
fn echo_once(addr: SocketAddr, seed: u64) {
    let mut stream = connect(addr);
    let data = payload(64, seed);
    stream.write_all(&data).unwrap();
    let mut back = vec![0; data.len()];
    stream
        .read_exact(&mut back)
        .unwrap_or_else(|e| panic!("echo did not answer: {e}"));
    assert_eq!(back, data);
}

#[test]
fn a_stdout_nobody_reads_blocks_neither_echo_nor_health_nor_sigterm() {
    // Debug logging writes lines per connection; a 4 KiB queue and a 64 KiB pipe fill at once.
    let mut service = StalledStdout::start(&[
        "--log-level",
        "echo_service=debug",
        "--log-buffer-size",
        "4KiB",
    ]);
    let started = Instant::now();
    for i in 0..3_000u64 {
        echo_once(service.echo, i);
        if i % 500 == 0 {
            assert_eq!(http_request(service.admin, "GET", "/healthz").status, 200);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "3,000 echoes took over 2 minutes"
        );
    }
    let metrics = Metrics::parse(&http_request(service.admin, "GET", "/metrics").body);
    let dropped = metrics.get("echo_log_lines_dropped_total");
    eprintln!(
        "3,000 connections with stdout stalled in {:?}; {dropped} log lines dropped",
        started.elapsed()
    );
    assert!(dropped > 1_000.0, "lines dropped: {dropped}");

    let signalled = Instant::now();
    service.signal("TERM");
    let status = service
        .wait_exit(Duration::from_secs(20))
        .expect("SIGTERM did not end the process while stdout was stalled");
    eprintln!("exit {status:?} {:?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_second_signal_exits_at_once_even_with_stdout_stalled() {
    let mut service = StalledStdout::start(&[
        "--log-level",
        "echo_service=debug",
        "--log-buffer-size",
        "4KiB",
        "--drain-delay",
        "60s",
    ]);
    for i in 0..500 {
        echo_once(service.echo, i);
    }
    service.signal("TERM");
    // Draining: still serving, not ready, for 60 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_request(service.admin, "GET", "/readyz").status != 503 {
        assert!(Instant::now() < deadline, "readiness did not fail");
        std::thread::sleep(Duration::from_millis(20));
    }
    let signalled = Instant::now();
    service.signal("TERM");
    let status = service
        .wait_exit(Duration::from_secs(10))
        .expect("the second SIGTERM did not exit");
    eprintln!(
        "second SIGTERM: exit {status:?} after {:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(1));
}

#[test]
fn sighup_and_sigusr1_are_logged_and_ignored() {
    let service = Service::start(&[]);
    for signal in ["HUP", "USR1", "USR2"] {
        service.signal(signal);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = service.logs.lock().unwrap().join("\n");
        if ["SIGHUP", "SIGUSR1", "SIGUSR2"]
            .iter()
            .all(|name| logs.contains(&format!("\"signal\":\"{name}\"")))
        {
            assert!(logs.contains("signal ignored"), "{logs}");
            break;
        }
        assert!(Instant::now() < deadline, "signals not logged: {logs}");
        std::thread::sleep(Duration::from_millis(20));
    }
    echo_once(service.echo, 1);
    assert_eq!(service.admin_get("/healthz").status, 200);
}

/// Make sure this test process may open `needed` descriptors (raising its soft limit with
/// `prlimit --pid`, no unsafe code), or fail saying what to do.
fn ensure_nofile(needed: u64) {
    require_tool("prlimit");
    let pid = std::process::id().to_string();
    let out = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile", "--raw", "--noheadings"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let limits: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (soft, hard) = (limits[0], limits[1]);
    if soft < needed && hard >= needed {
        let status = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={needed}:{hard}")])
            .status()
            .unwrap();
        assert!(status.success());
    } else {
        assert!(
            soft >= needed,
            "needs {needed} open files; the limit is {soft}: run with `ulimit -n {needed}`"
        );
    }
}

/// Connect from a given loopback source address (so the flood is a different peer).
fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(socket.into())
}

#[test]
fn an_admin_flood_neither_grows_memory_nor_locks_out_health_checks() {
    ensure_nofile(4_096);
    let service = Service::start(&[]);
    let admin = service.admin;
    let rss_before = service.rss_bytes();

    // The flood: 10,000 connects from 127.0.0.2, holding up to 2,000 at a time, each sending
    // half a request head so hyper has buffered something for it.
    let flood = std::thread::spawn(move || {
        let mut held = std::collections::VecDeque::new();
        let mut connected = 0;
        for _ in 0..10_000 {
            if let Ok(mut stream) = connect_from("127.0.0.2", admin) {
                let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nX-Pad: ");
                let _ = stream.write_all(&[b'a'; 8 * 1024]);
                connected += 1;
                held.push_back(stream);
                if held.len() > 2_000 {
                    held.pop_front();
                }
            }
        }
        (connected, held)
    });

    // Meanwhile the kubelet (127.0.0.1) probes and must always be answered.
    let mut probes = 0;
    let mut slowest = Duration::ZERO;
    let mut rss_peak = 0;
    while !flood.is_finished() {
        let asked = Instant::now();
        let response = http_request(admin, "GET", "/healthz");
        assert_eq!(response.status, 200);
        slowest = slowest.max(asked.elapsed());
        probes += 1;
        rss_peak = rss_peak.max(service.rss_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (connected, held) = flood.join().unwrap();
    let rss_during = service.rss_bytes();
    let metrics = service.metrics();
    drop(held);
    let after = service.wait_metrics("the flood's connections to close", |m| {
        m.get("echo_admin_connections_active") <= 2.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = service.rss_bytes();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "admin flood: {connected} connects, {probes} probes all 200 (slowest {slowest:?}); \
         RSS before {:.1} MiB, peak {:.1} MiB, at the end {:.1} MiB, after {:.1} MiB; \
         refused {}, evicted {}",
        mib(rss_before),
        mib(rss_peak),
        mib(rss_during),
        mib(rss_after),
        metrics.get("echo_admin_connections_rejected_total{reason=\"limit\"}"),
        metrics.get("echo_admin_connections_rejected_total{reason=\"evicted\"}"),
    );
    assert!(probes >= 1);
    assert!(
        metrics.get("echo_admin_connections_rejected_total{reason=\"limit\"}") > 1_000.0,
        "the flood was not refused: {metrics:?}"
    );
    assert!(metrics.get("echo_admin_connections_active") <= 64.0);
    // The chart's memory limit is 128 MiB: stay far below it.
    assert!(
        mib(rss_peak) < 48.0,
        "RSS peaked at {:.1} MiB",
        mib(rss_peak)
    );
    assert!(after.get("echo_admin_connections_active") <= 2.0);
}

#[test]
fn echo_connections_at_the_descriptor_limit_leave_room_for_health_checks() {
    require_tool("prlimit");
    let service = Service::spawn(service_command(
        &["prlimit", "--nofile=200:200", "--"],
        &[],
        &[],
    ));
    // 200 descriptors minus the reserve (32 + 64 admin connections) = 104 echo connections.
    let mut held = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect_timeout(&service.echo, Duration::from_secs(2)) {
            Ok(stream) => held.push(stream),
            Err(err) => panic!("connect failed: {err}"),
        }
    }
    let metrics = service.wait_metrics("refusals at the derived limit", |m| {
        m.get("echo_connections_rejected_total{reason=\"limit\"}") >= 296.0
    });
    assert_eq!(metrics.get("echo_connections_active"), 104.0);
    assert_eq!(service.admin_get("/healthz").status, 200);
    let ready = service.admin_get("/readyz");
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("at_capacity"), "{}", ready.body);
    let logs = service.logs.lock().unwrap().join("\n");
    assert!(logs.contains("derived from RLIMIT_NOFILE"), "{logs}");
    drop(held);
    service.wait_metrics("the connections to close", |m| {
        m.get("echo_connections_active") == 0.0
    });
    assert_eq!(service.admin_get("/readyz").status, 200);
}

/// An HTTP/2 frame header: length, type, flags, stream id.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[test]
fn the_admin_port_answers_http2_with_prior_knowledge() {
    let service = Service::start(&[]);
    let mut stream = connect(service.admin);
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                           // HEADERS, END_STREAM | END_HEADERS, stream 1; HPACK from the static table only:
                                           // :method GET, :scheme http, :path "/healthz" (literal), :authority "x" (literal).
    let mut block = vec![0x82, 0x86, 0x04, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x01, 1, b'x']);
    request.extend(frame(0x1, 0x5, 1, &block));
    stream.write_all(&request).unwrap();

    // Read frames until the response HEADERS on stream 1: `:status 200` is static index 8.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no HTTP/2 response");
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).expect("an HTTP/2 frame");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut body = vec![0; len];
        stream.read_exact(&mut body).unwrap();
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if head[3] == 0x1 && stream_id == 1 {
            assert_eq!(body.first(), Some(&0x88), "status is not 200: {body:?}");
            break;
        }
    }
}

#[test]
fn an_overlong_request_target_gets_414_and_oversized_headers_431() {
    let service = Service::start(&[]);
    let ask = |request: String| -> HttpResponse {
        let mut stream = connect(service.admin);
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        assert!(!raw.is_empty(), "closed without an answer");
        crate::support::parse_response(&raw)
    };
    let long_uri = format!(
        "GET /healthz?{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    assert_eq!(ask(long_uri).status, 414);
    let big_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    assert_eq!(ask(big_headers).status, 431);
    assert_eq!(http_request(service.admin, "GET", "/healthz").status, 200);
}
