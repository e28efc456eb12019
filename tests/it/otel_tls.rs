//! OTLP over TLS: the real receiver behind a TLS terminator nobody here wrote (`socat
//! OPENSSL-LISTEN`), certificates made by `openssl`. Over gRPC and HTTP: with the test CA in
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` the spans arrive; with mTLS required by the terminator, the
//! client certificate and key variables make them arrive; without the CA (system roots only)
//! every export fails, is counted as a `network` error and its spans as `export_failed`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::otlp_receiver::{Mode, OtlpReceiver};
use crate::support::{echo_round_trip, payload, Service};

/// The tool's path; fails saying how to install it (`.ci/run` installs both).
fn require(tool: &str) -> String {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    assert!(
        on_path,
        "`{tool}` is required by this test; install it with \
         `apt-get install -y --no-install-recommends {tool}` (make test does)"
    );
    tool.to_owned()
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new(require("openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn make() -> Certificates {
        let dir = std::env::temp_dir().join(format!(
            "echo-otlp-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=echo test CA",
        ]);
        openssl(&dir, &ca);
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for name in ["server", "client"] {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            let ext = format!("{name}.ext");
            let subject = format!("/CN=echo test {name}");
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&dir, &req);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        Certificates { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `socat` terminating TLS on a loopback port and forwarding to the receiver.
struct Terminator {
    child: Child,
    port: u16,
}

impl Terminator {
    fn start(certs: &Certificates, backend: std::net::SocketAddr, require_client: bool) -> Self {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let verify = if require_client {
            format!("verify=1,cafile={}", certs.path("ca.pem"))
        } else {
            "verify=0".to_owned()
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},{verify}",
            certs.path("server.pem"),
            certs.path("server.key")
        );
        let child = Command::new(require("socat"))
            .args([listen, format!("TCP:{backend}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Terminator { child, port }
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the service against `https://127.0.0.1:PORT` with `tls_env`, make 3 connections, stop
/// it; returns (spans received, spans counted as export_failed, the metrics and the log for
/// messages).
fn export_over_tls(
    mode: Mode,
    require_client: bool,
    tls_env: &[(&str, String)],
) -> (usize, f64, String) {
    let certs = Certificates::make();
    let receiver = OtlpReceiver::start(mode);
    let terminator = Terminator::start(&certs, receiver.addr, require_client);
    let endpoint = format!("https://127.0.0.1:{}", terminator.port);
    let protocol = if mode == Mode::Grpc {
        "grpc"
    } else {
        "http/protobuf"
    };
    let tls_env: Vec<(String, String)> = tls_env
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace("{dir}", &certs.dir.to_string_lossy()),
            )
        })
        .collect();
    let mut env: Vec<(&str, &str)> = vec![
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    env.extend(tls_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut service = Service::start_with_env(&["--export-timeout", "2s"], &env);
    for i in 0..3 {
        let data = payload(32, i);
        assert!(echo_round_trip(service.connect(), &data, 32) == data);
    }
    let metrics = service.wait_metrics("3 spans exported or dropped", |m| {
        m.get("echo_otlp_spans_exported_total")
            + m.get("echo_otlp_spans_dropped_total{reason=\"export_failed\"}")
            == 3.0
    });
    let failed = metrics.get("echo_otlp_spans_dropped_total{reason=\"export_failed\"}");
    let (status, _) = service.terminate(Duration::from_secs(20));
    let text = format!("{metrics:?}\n{}", service.logs.lock().unwrap().join("\n"));
    assert!(status.success());
    (receiver.spans().len(), failed, text)
}

fn ca_env() -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_CERTIFICATE", "{dir}/ca.pem".to_owned())]
}

#[test]
fn grpc_and_http_export_over_tls_with_the_ca_from_the_variable() {
    for mode in [Mode::Grpc, Mode::Http] {
        let (spans, _, metrics) = export_over_tls(mode, false, &ca_env());
        assert_eq!(spans, 3, "{mode:?}: {metrics}");
    }
}

#[test]
fn grpc_and_http_export_over_mtls_with_the_traces_client_certificate() {
    for mode in [Mode::Grpc, Mode::Http] {
        let mut env = ca_env();
        env.push((
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "{dir}/client.pem".to_owned(),
        ));
        env.push((
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
            "{dir}/client.key".to_owned(),
        ));
        let (spans, _, metrics) = export_over_tls(mode, true, &env);
        assert_eq!(spans, 3, "{mode:?}: {metrics}");
        // Control: the same terminator refuses an exporter without a client certificate.
        let (spans, failed, metrics) = export_over_tls(mode, true, &ca_env());
        assert_eq!(
            (spans, failed),
            (0, 3.0),
            "{mode:?}: without a client certificate: {metrics}"
        );
    }
}

#[test]
fn an_untrusted_collector_certificate_fails_every_export_and_is_counted() {
    for mode in [Mode::Grpc, Mode::Http] {
        let (spans, failed, metrics) = export_over_tls(mode, false, &[]);
        assert_eq!(
            (spans, failed),
            (0, 3.0),
            "{mode:?}: an untrusted collector: {metrics}"
        );
        // The log says why: the certificate, not just "network error".
        assert!(
            metrics.contains("UnknownIssuer") || metrics.contains("unknown issuer"),
            "{mode:?}: no certificate error in the log: {metrics}"
        );
    }
}
