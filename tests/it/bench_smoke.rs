//! Smoke test of the load generator `echo-bench`: each mode runs for about a second against the
//! real `echo-service` and its JSON report must show real, verified, error-free work. Also: bad
//! input is refused with a clear message, and a server that corrupts one byte is caught.
//!
//! `make bench` is too slow and noisy for `make test`; this is what keeps the load generator
//! (and so the benchmark numbers) honest between bench runs. Each mode is its own test so they
//! run in parallel, each against its own server; the whole module takes a few seconds.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::support::Service;

/// The `echo-bench` binary. It is its own workspace crate (so its dependencies stay out of the
/// service), and cargo only tells a test about its own package's binaries: it sits next to
/// `echo-service` in the same target directory once `cargo build --workspace` (or `make test`)
/// has built it.
fn bench_bin() -> PathBuf {
    let service = Path::new(crate::support::SERVICE_BIN);
    let bin = service.with_file_name("echo-bench");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace --locked`, which `make test` does)",
        bin.display()
    );
    bin
}

/// Runs echo-bench with `args` and returns its output.
fn bench(args: &[&str]) -> Output {
    Command::new(bench_bin())
        .args(args)
        .env_remove("ECHO_BENCH_TARGET")
        .output()
        .expect("run echo-bench")
}

/// Runs one mode against a fresh server with `--json --server-pid` and returns the report,
/// failing if echo-bench did not exit 0.
fn run_mode(mode: &str, extra: &[&str]) -> Value {
    let service = Service::start(&[]);
    let target = service.echo.to_string();
    let pid = service.pid().to_string();
    let mut args = vec![
        mode,
        "--target",
        &target,
        "--server-pid",
        &pid,
        "--json",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let out = bench(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "echo-bench {args:?} exited {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    assert_eq!(report["mode"], mode, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert!(report["bytes_verified"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["server"]["rss_kib"].as_u64().unwrap() > 0,
        "{report}"
    );
    report
}

#[test]
fn ping_pong_verifies_every_message_and_reports_latency_and_server_cpu() {
    let r = run_mode(
        "ping-pong",
        &["-c", "4", "-s", "1000", "-d", "1s", "-w", "200ms"],
    );
    let messages = r["messages"].as_u64().unwrap();
    assert!(messages > 100, "{r}");
    // Every counted message was verified (warm-up messages are verified too, so >=).
    assert!(
        r["bytes_verified"].as_u64().unwrap() >= messages * 1000,
        "{r}"
    );
    let lat = &r["latency_us"];
    assert_eq!(lat["samples"].as_u64().unwrap(), messages, "{r}");
    assert!(lat["p50"].as_f64().unwrap() > 0.0, "{r}");
    assert!(lat["p50"].as_f64() <= lat["p99"].as_f64(), "{r}");
    assert!(lat["p99"].as_f64() <= lat["max"].as_f64(), "{r}");
    assert!(r["server"]["cpu_us_per_msg"].as_f64().is_some(), "{r}");
}

#[test]
fn bulk_streams_verified_bytes() {
    let r = run_mode("bulk", &["-d", "500ms", "-w", "100ms"]);
    assert!(r["bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    assert!(r["mb_per_s"].as_f64().unwrap() > 1.0, "{r}");
}

#[test]
fn churn_opens_and_closes_connections() {
    let r = run_mode("churn", &["-c", "4", "-d", "500ms", "-w", "100ms"]);
    assert!(r["messages"].as_u64().unwrap() > 50, "{r}");
    assert!(r["conns_per_s"].as_f64().unwrap() > 100.0, "{r}");
}

#[test]
fn idle_holds_every_connection_and_reports_rss_per_connection() {
    let r = run_mode("idle", &["-c", "300", "-d", "300ms", "-w", "200ms"]);
    assert_eq!(r["opened"], 300, "{r}");
    assert_eq!(r["held"], 300, "{r}");
    assert!(r["server"]["rss_per_conn_kib"].as_f64().is_some(), "{r}");
}

#[test]
fn bad_input_is_refused_with_a_message_not_a_panic() {
    for (args, needle) in [
        (
            &["ping-pong", "--target", "192.0.2.1:7"][..],
            "not loopback",
        ),
        (&["ping-pong", "--size", "0"][..], "at least 1 byte"),
        (&["bulk", "--duration", "5 parsecs"][..], "unit"),
        (&["idle", "--connections", "0"][..], "--connections"),
        (&["churn", "--server-pid", "4294967295"][..], "--server-pid"),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_server_that_corrupts_one_byte_is_caught() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    // Echoes faithfully except that the 100th byte of each connection comes back flipped.
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = 0usize;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    if (seen..seen + n).contains(&99) {
                        buf[99 - seen] ^= 0x01;
                    }
                    seen += n;
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let out = bench(&[
        "ping-pong",
        "--target",
        &target,
        "-s",
        "64",
        "-d",
        "300ms",
        "-w",
        "0s",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.trim()).expect("JSON report even on failure");
    assert_eq!(out.status.code(), Some(3), "{r}");
    assert_eq!(r["mismatches"], 1, "{r}");
}

#[test]
fn udp_mode_verifies_every_datagram_against_the_udp_port() {
    let service = Service::start(&["--udp-listen", "127.0.0.1:0"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let udp = loop {
        let line = service
            .logs
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("UDP echo serving"))
            .cloned();
        if let Some(line) = line {
            let json: Value = serde_json::from_str(&line).unwrap();
            break json["fields"]["udp"].as_str().unwrap().to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no UDP listener logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let pid = service.pid().to_string();
    let out = bench(&[
        "udp",
        "--target",
        &udp,
        "--server-pid",
        &pid,
        "--json",
        "--quiet",
        "-c",
        "4",
        "-s",
        "512",
        "-d",
        "1s",
        "-w",
        "200ms",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["mode"], "udp", "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let messages = r["messages"].as_u64().unwrap();
    assert!(messages > 100, "{r}");
    assert!(
        r["bytes_verified"].as_u64().unwrap() >= messages * 512,
        "{r}"
    );
    assert!(r["server"]["cpu_us_per_msg"].as_f64().is_some(), "{r}");
}
