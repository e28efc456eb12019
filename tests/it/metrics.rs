//! Metrics agree with the traffic that produced them, pass `promtool check metrics`, and are
//! scraped by a real Prometheus server.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{echo_round_trip, payload, require_tool, Service};

#[test]
fn counters_and_histogram_agree_with_the_traffic() {
    let service = Service::start(&[]);
    let (connections, size) = (25, 3_000);
    for i in 0..connections {
        let data = payload(size, i);
        assert!(echo_round_trip(service.connect(), &data, 512) == data);
    }
    let m = service.wait_metrics("every connection lost", |m| {
        m.get("echo_connections_lost_total{reason=\"peer_closed\"}") == connections as f64
    });
    assert_eq!(m.get("echo_connections_made_total"), connections as f64);
    assert_eq!(m.get("echo_connections_active"), 0.0);
    assert_eq!(
        m.get("echo_received_bytes_total"),
        (connections * size as u64) as f64
    );
    assert_eq!(
        m.get("echo_sent_bytes_total"),
        (connections * size as u64) as f64
    );
    assert_eq!(
        m.get("echo_connection_duration_seconds_count"),
        connections as f64
    );
    assert_eq!(
        m.get("echo_connection_duration_seconds_bucket{le=\"+Inf\"}"),
        connections as f64
    );
    assert_eq!(m.get("echo_connections_lost_total{reason=\"reset\"}"), 0.0);
    assert_eq!(m.get("echo_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(m.get("process_resident_memory_bytes") > 0.0);
    assert!(m.get("process_open_fds") > 0.0);
}

#[test]
fn healthz_reports_exactly_the_open_connections() {
    let service = Service::start(&[]);
    let health = |service: &Service| -> serde_json::Value {
        let response = service.admin_get("/healthz");
        assert_eq!(response.status, 200);
        assert_eq!(response.headers["content-type"], "application/json");
        serde_json::from_str(&response.body).unwrap()
    };
    let mut open: Vec<TcpStream> = Vec::new();
    for k in 1..=7u64 {
        let mut stream = service.connect();
        stream.write_all(b"x").unwrap();
        open.push(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while health(&service)["connections_active"] != k {
            assert!(Instant::now() < deadline, "healthz never showed {k} open");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let body = health(&service);
    assert_eq!(body["connections_made_total"], 7);
    assert_eq!(body["connections_lost_total"], 0);
    assert_eq!(body["status"], "serving");
    assert_eq!(body["version"], "0.1.0");
    assert!(body["uptime_seconds"].as_f64().unwrap() > 0.0);
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(5);
    while health(&service)["connections_active"] != 0 {
        assert!(Instant::now() < deadline, "healthz never went back to 0");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(health(&service)["connections_lost_total"], 7);
}

#[test]
fn exposition_passes_promtool_check_metrics() {
    let promtool = require_tool("promtool");
    let service = Service::start(&[]);
    let data = payload(100, 1);
    assert!(echo_round_trip(service.connect(), &data, 10) == data);
    let response = service.admin_get("/metrics");
    assert_eq!(
        response.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(response.body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool check metrics: {findings}"
    );
    assert!(findings.trim().is_empty(), "promtool findings: {findings}");
}

/// A Prometheus server run by the test on loopback, removed on drop.
struct Prometheus {
    child: std::process::Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn scraping(target: &str) -> Prometheus {
        let binary = require_tool("prometheus");
        let dir = std::env::temp_dir().join(format!(
            "echo-prom-{}-{}",
            std::process::id(),
            target.replace(':', "_")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: echo-service\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, addr, dir }
    }

    fn query(&self, expr: &str) -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let addr = self.addr.parse().unwrap();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        drop(stream);
        let response = crate::support::http_request(addr, "GET", &path);
        serde_json::from_str(&response.body).ok()
    }

    fn targets(&self) -> Option<serde_json::Value> {
        let addr = self.addr.parse().unwrap();
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        serde_json::from_str(&crate::support::http_request(addr, "GET", "/api/v1/targets").body)
            .ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_the_service() {
    let service = Service::start(&[]);
    let connections = 9;
    for i in 0..connections {
        let data = payload(200, i);
        assert!(echo_round_trip(service.connect(), &data, 64) == data);
    }
    let prometheus = Prometheus::scraping(&service.admin.to_string());
    let deadline = Instant::now() + Duration::from_secs(45);
    let value = loop {
        let sample = prometheus
            .query("echo_connections_made_total")
            .and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(str::to_owned)
            });
        if let Some(value) = sample {
            break value;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned echo_connections_made_total"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(value, connections.to_string());
    let targets = prometheus.targets().expect("targets API");
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
}
