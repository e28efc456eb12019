//! TLS and mTLS echo, checked with clients nobody here wrote: Python's `ssl` module (OpenSSL)
//! and `openssl s_client`. Certificates are made by `openssl` for each test: a CA, a server
//! certificate (RSA, ECDSA or Ed25519), a client certificate, and a second CA nobody trusts.
//!
//! Covered: byte-exact echo of random payloads over TLS 1.2 and 1.3 with a half-close through
//! TLS (close_notify, then FIN); SNI, ALPN and the client subject in the span; mTLS with a good
//! certificate, a wrong CA and none; rotation by swapping a Kubernetes-style `..data` symlink
//! while a connection stays open, and a bad new file that keeps the old certificate; garbage
//! instead of a ClientHello; the expiry gauge.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::otlp_receiver::OtlpReceiver;
use crate::support::{connect, require_tool, Service};

/// A temporary directory, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "echo-tls-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn openssl(args: &[&str]) {
    let out = Command::new(require_tool("openssl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl` key generation arguments for a key kind.
fn key_args(kind: &str) -> Vec<&'static str> {
    match kind {
        "rsa" => vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "ecdsa" => vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        _ => vec!["-algorithm", "ED25519"],
    }
}

/// Make `{name}.key` and `{name}.pem` in `dir`, signed by `ca` (self-signed when `None`).
fn make_cert(dir: &TempDir, name: &str, subject: &str, kind: &str, ca: Option<&str>, days: &str) {
    let key = dir.path(&format!("{name}.key"));
    let pem = dir.path(&format!("{name}.pem"));
    let mut args = vec!["genpkey", "-out", &key];
    args.extend(key_args(kind));
    openssl(&args);
    let ext = dir.path(&format!("{name}.ext"));
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    match ca {
        None => openssl(&[
            "req", "-x509", "-new", "-key", &key, "-out", &pem, "-days", days, "-subj", subject,
        ]),
        Some(ca) => {
            let csr = dir.path(&format!("{name}.csr"));
            openssl(&["req", "-new", "-key", &key, "-out", &csr, "-subj", subject]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &dir.path(&format!("{ca}.pem")),
                "-CAkey",
                &dir.path(&format!("{ca}.key")),
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                days,
                "-extfile",
                &ext,
            ]);
        }
    }
}

/// A CA, a server certificate of `kind` signed by it, a client certificate, and a rogue CA
/// with its own client certificate.
pub(crate) fn pki(kind: &str) -> TempDir {
    let dir = TempDir::new(kind);
    make_cert(&dir, "ca", "/CN=Echo Test CA", "ecdsa", None, "30");
    make_cert(&dir, "server", "/CN=localhost", kind, Some("ca"), "30");
    make_cert(
        &dir,
        "client",
        "/O=Echo Test/CN=client",
        "ecdsa",
        Some("ca"),
        "30",
    );
    make_cert(&dir, "rogue-ca", "/CN=Rogue CA", "ecdsa", None, "30");
    make_cert(&dir, "rogue", "/CN=rogue", "ecdsa", Some("rogue-ca"), "30");
    dir
}

/// The Python client: connects, optionally sends `size` random bytes in 16 KiB ping-pongs,
/// half-closes through TLS (close_notify, then FIN) and checks it gets the server's
/// close_notify and then EOF. Prints one JSON line.
const CLIENT: &str = r#"
import hashlib, json, os, socket, ssl, sys
args = json.loads(sys.argv[1])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(args["ca"])
v = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[args.get("version", "1.3")]
ctx.minimum_version = ctx.maximum_version = v
if args.get("alpn"): ctx.set_alpn_protocols(args["alpn"])
if args.get("cert"): ctx.load_cert_chain(args["cert"], args["key"])
raw = socket.create_connection((args["host"], args["port"]), timeout=10)
if args.get("proxy_v1"): raw.sendall(args["proxy_v1"].encode())
out = {}
try:
    s = ctx.wrap_socket(raw, server_hostname=args.get("sni", "localhost"))
    data = os.urandom(args.get("size", 0))
    for i in range(0, len(data), 16384):
        chunk = data[i:i + 16384]
        s.sendall(chunk)
        got = b""
        while len(got) < len(chunk):
            more = s.recv(len(chunk) - len(got))
            if not more: raise RuntimeError("EOF before the echo")
            got += more
        if got != chunk: raise RuntimeError("echo differs at %d" % i)
    out.update(ok=True, version=s.version(), alpn=s.selected_alpn_protocol(),
               cert=hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest())
    if args.get("hold"):
        sys.stdout.write(json.dumps(out) + "\n"); sys.stdout.flush()
        line = sys.stdin.readline()  # wait, then echo once more
        s.sendall(b"still here"); got = b""
        while len(got) < 10: got += s.recv(10 - len(got))
        out["after"] = got.decode()
    plain = s.unwrap()              # our close_notify; returns after the server's
    plain.shutdown(socket.SHUT_WR)  # then FIN
    out["eof"] = plain.recv(1) == b""
except (ssl.SSLError, OSError, RuntimeError) as e:
    out.update(ok=False, error=str(e))
print(json.dumps(out))
"#;

fn client(args: serde_json::Value) -> serde_json::Value {
    let out = Command::new(require_tool("python3"))
        .args(["-c", CLIENT, &args.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|_| {
        panic!(
            "client output {stdout:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The TLS address the service logged.
fn tls_addr(service: &Service) -> std::net::SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = service
            .logs
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("TLS echo serving"))
        {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            return json["fields"]["tls"].as_str().unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no TLS listener logged");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(dir: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> Service {
    let cert = dir.path("server.pem");
    let key = dir.path("server.key");
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    args.extend_from_slice(extra);
    Service::start_with_env(&args, env)
}

fn base(service: &Service, dir: &TempDir) -> serde_json::Value {
    let addr = tls_addr(service);
    serde_json::json!({"host": "127.0.0.1", "port": addr.port(), "ca": dir.path("ca.pem")})
}

#[test]
fn random_payloads_echo_exactly_over_tls_1_2_and_1_3_with_every_key_kind() {
    for kind in ["ecdsa", "rsa", "ed25519"] {
        let dir = pki(kind);
        let service = start(&dir, &[], &[]);
        for version in ["1.2", "1.3"] {
            let mut args = base(&service, &dir);
            args["version"] = version.into();
            args["size"] = (300_001).into();
            let result = client(args);
            assert_eq!(result["ok"], true, "{kind} TLS {version}: {result}");
            assert_eq!(result["version"], format!("TLSv{version}"), "{result}");
            assert_eq!(result["eof"], true, "no clean close_notify + FIN: {result}");
        }
        let metrics = service.wait_metrics("two clean closes", |m| {
            m.get("echo_connections_lost_total{reason=\"peer_closed\"}") == 2.0
        });
        assert_eq!(
            metrics.get("echo_tls_handshakes_total{listener=\"tls\",result=\"ok\"}"),
            2.0
        );
        // Byte counts are the plaintext echo.
        assert_eq!(metrics.get("echo_received_bytes_total"), 600_002.0);
        assert_eq!(metrics.get("echo_sent_bytes_total"), 600_002.0);
    }
}

#[test]
fn openssl_s_client_gets_its_line_back() {
    let dir = pki("ecdsa");
    let service = start(&dir, &[], &[]);
    let addr = tls_addr(&service).to_string();
    for version in ["-tls1_2", "-tls1_3"] {
        let mut child = Command::new(require_tool("openssl"))
            .args([
                "s_client",
                "-connect",
                &addr,
                "-servername",
                "localhost",
                "-CAfile",
                &dir.path("ca.pem"),
                "-verify_return_error",
                "-quiet",
                version,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello over s_client\n").unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut back = [0u8; 20];
        stdout.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello over s_client\n", "{version}");
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn mtls_accepts_a_good_client_and_counts_a_wrong_ca_and_a_missing_certificate() {
    let dir = pki("ecdsa");
    let receiver = OtlpReceiver::grpc();
    let ca = dir.path("ca.pem");
    let mut service = start(
        &dir,
        &["--tls-client-ca", &ca, "--tls-alpn", "echo/1,h2"],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
        ],
    );
    let mut good = base(&service, &dir);
    good["cert"] = dir.path("client.pem").into();
    good["key"] = dir.path("client.key").into();
    good["alpn"] = serde_json::json!(["echo/1"]);
    good["size"] = 1000.into();
    let result = client(good);
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["alpn"], "echo/1");

    let mut rogue = base(&service, &dir);
    rogue["cert"] = dir.path("rogue.pem").into();
    rogue["key"] = dir.path("rogue.key").into();
    rogue["size"] = 10.into();
    assert_eq!(client(rogue)["ok"], false);
    let mut anonymous = base(&service, &dir);
    anonymous["size"] = 10.into();
    assert_eq!(client(anonymous)["ok"], false);

    let metrics = service.wait_metrics("three handshakes", |m| {
        m.get("echo_connections_active") == 0.0 && m.get("echo_connections_made_total") == 3.0
    });
    let handshakes = |result: &str| {
        metrics.get(&format!(
            "echo_tls_handshakes_total{{listener=\"tls\",result=\"{result}\"}}"
        ))
    };
    assert_eq!(handshakes("ok"), 1.0, "{metrics:?}");
    assert_eq!(handshakes("unknown_ca"), 1.0, "{metrics:?}");
    assert_eq!(handshakes("bad_certificate"), 1.0, "{metrics:?}");

    service.terminate(Duration::from_secs(20));
    let spans = receiver.spans();
    let established: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.span
                .attributes
                .iter()
                .any(|kv| kv.key == "tls.established")
        })
        .collect();
    assert_eq!(established.len(), 1, "{spans:#?}");
    let attr = |key: &str| -> String {
        established[0]
            .span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| panic!("no {key} in {:#?}", established[0].span.attributes))
    };
    assert!(attr("tls.server_name").contains("\"localhost\""));
    assert!(attr("tls.next_protocol").contains("\"echo/1\""));
    assert!(attr("tls.protocol.version").contains("\"1.3\""));
    assert!(attr("tls.cipher").contains("TLS13"));
    assert!(
        attr("tls.client.subject").contains("CN=client,O=Echo Test"),
        "{}",
        attr("tls.client.subject")
    );
}

/// Point `link` at `target` atomically, as the kubelet swaps a Secret volume's `..data`.
fn swap_symlink(dir: &Path, link: &str, target: &str) {
    let tmp = dir.join(format!("{link}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(link)).unwrap();
}

#[test]
fn certificates_rotate_by_symlink_swap_while_connections_stay_open() {
    let pki = pki("ecdsa");
    // A Secret volume: cert.pem -> ..data/cert.pem, ..data -> a versioned directory.
    let volume = TempDir::new("volume");
    for version in ["v1", "v2", "v3"] {
        std::fs::create_dir_all(volume.0.join(version)).unwrap();
    }
    make_cert(&pki, "second", "/CN=localhost", "ecdsa", Some("ca"), "60");
    for (version, name) in [("v1", "server"), ("v2", "second")] {
        std::fs::copy(
            pki.path(&format!("{name}.pem")),
            volume.0.join(version).join("tls.crt"),
        )
        .unwrap();
        std::fs::copy(
            pki.path(&format!("{name}.key")),
            volume.0.join(version).join("tls.key"),
        )
        .unwrap();
    }
    // v3: a certificate with the wrong key.
    std::fs::copy(pki.path("server.pem"), volume.0.join("v3/tls.crt")).unwrap();
    std::fs::copy(pki.path("second.key"), volume.0.join("v3/tls.key")).unwrap();
    swap_symlink(&volume.0, "..data", "v1");
    std::os::unix::fs::symlink("..data/tls.crt", volume.0.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", volume.0.join("tls.key")).unwrap();

    let (cert, key) = (volume.path("tls.crt"), volume.path("tls.key"));
    let service = Service::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-reload-interval",
        "200ms",
    ]);
    let args = base(&service, &pki);
    let first = client(args.clone())["cert"].clone();

    // A connection that stays open across the rotation.
    let mut held_args = args.clone();
    held_args["hold"] = true.into();
    let mut held = Command::new("python3")
        .args(["-c", CLIENT, &held_args.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held_out = std::io::BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut held_out, &mut line).unwrap();
    assert!(line.contains("\"ok\": true"), "{line}");

    swap_symlink(&volume.0, "..data", "v2");
    service.wait_metrics("the reload", |m| {
        m.get("echo_tls_reloads_total{listener=\"tls\",result=\"ok\"}") == 1.0
    });
    let second = client(args.clone())["cert"].clone();
    assert_ne!(
        first, second,
        "new connections must get the new certificate"
    );

    // The connection opened before the rotation still echoes.
    held.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    held_out.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"after\": \"still here\""), "{rest}");
    held.wait().unwrap();

    // A bad new set of files keeps the current certificate and is counted.
    swap_symlink(&volume.0, "..data", "v3");
    service.wait_metrics("the failed reload", |m| {
        m.get("echo_tls_reloads_total{listener=\"tls\",result=\"error\"}") == 1.0
    });
    assert_eq!(client(args)["cert"], second);
}

#[test]
fn garbage_instead_of_a_client_hello_is_counted_and_closed() {
    let dir = pki("ecdsa");
    let service = start(&dir, &[], &[]);
    let mut stream = connect(tls_addr(&service));
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut back = Vec::new();
    let _ = stream.read_to_end(&mut back);
    assert!(!back.windows(3).any(|w| w == b"GET"), "garbage was echoed");
    service.wait_metrics("a protocol failure", |m| {
        m.get("echo_tls_handshakes_total{listener=\"tls\",result=\"protocol\"}") == 1.0
            && m.get("echo_connections_active") == 0.0
    });
}

#[test]
fn the_expiry_gauge_shows_the_certificates_not_after_even_when_expired() {
    let dir = pki("ecdsa");
    // An already expired certificate starts with a warning, not a refusal.
    let key = dir.path("expired.key");
    let pem = dir.path("expired.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &key,
    ]);
    // `openssl ca` is the one that takes explicit dates (openssl 3.0's `req` does not).
    let csr = dir.path("expired.csr");
    openssl(&[
        "req", "-new", "-key", &key, "-out", &csr, "-subj", "/CN=old",
    ]);
    std::fs::write(dir.path("index.txt"), "").unwrap();
    std::fs::write(dir.path("serial"), "01\n").unwrap();
    let config = format!(
        "[ca]\ndefault_ca = ca\n[ca]\ndatabase = {}\nnew_certs_dir = {}\nserial = {}\n\
         default_md = sha256\npolicy = any\nx509_extensions = v3\n[any]\ncommonName = supplied\n\
         [v3]\nbasicConstraints = CA:FALSE\n",
        dir.path("index.txt"),
        dir.0.display(),
        dir.path("serial")
    );
    let config_file = dir.path("ca.cnf");
    std::fs::write(&config_file, config).unwrap();
    openssl(&[
        "ca",
        "-batch",
        "-config",
        &config_file,
        "-selfsign",
        "-keyfile",
        &key,
        "-in",
        &csr,
        "-out",
        &pem,
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20210101000000Z",
    ]);
    let service = Service::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pem,
        "--tls-key",
        &key,
    ]);
    let metrics = service.metrics();
    assert_eq!(
        metrics.get("echo_tls_certificate_expiry_timestamp_seconds{listener=\"tls\"}"),
        1_609_459_200.0
    );
    let logs = service.logs.lock().unwrap().join("\n");
    assert!(logs.contains("has expired"), "{logs}");

    // And a valid one: the gauge equals what openssl says.
    let service = start(&dir, &[], &[]);
    let out = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-enddate",
            "-dateopt",
            "iso_8601",
            "-in",
            &dir.path("server.pem"),
        ])
        .output()
        .unwrap();
    let end = String::from_utf8_lossy(&out.stdout);
    let gauge = service
        .metrics()
        .get("echo_tls_certificate_expiry_timestamp_seconds{listener=\"tls\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // 30 days from now, to the second openssl printed.
    assert!(
        (gauge - now - 30.0 * 86_400.0).abs() < 120.0,
        "{gauge} vs {end}"
    );
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_closed_at_the_timeout() {
    let dir = pki("ecdsa");
    let service = start(&dir, &["--tls-handshake-timeout", "500ms"], &[]);
    let addr = tls_addr(&service);
    // One sends nothing; one sends the first bytes of a ClientHello and stops.
    let mut silent = connect(addr);
    let mut partial = connect(addr);
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let opened = Instant::now();
    for stream in [&mut silent, &mut partial] {
        let mut buf = [0u8; 64];
        // The server closes (EOF, or a reset after an alert): either way not before 500 ms.
        let _ = stream.read(&mut buf);
    }
    let waited = opened.elapsed();
    eprintln!("closed after {waited:?}");
    assert!(
        waited >= Duration::from_millis(450),
        "closed after {waited:?}"
    );
    // The handshake result is counted in connection_lost, the loss when the task is dropped
    // just after: wait for both.
    service.wait_metrics("two handshake timeouts, counted as lost", |m| {
        m.get("echo_tls_handshakes_total{listener=\"tls\",result=\"timeout\"}") == 2.0
            && m.get("echo_connections_lost_total{reason=\"handshake_timeout\"}") == 2.0
    });
}

#[test]
fn a_proxy_header_comes_before_the_handshake() {
    let dir = pki("ecdsa");
    let service = start(&dir, &["--proxy-protocol", "required"], &[]);
    let mut args = base(&service, &dir);
    args["proxy_v1"] = "PROXY TCP4 203.0.113.7 127.0.0.1 56324 8443\r\n".into();
    args["size"] = 5000.into();
    let result = client(args);
    assert_eq!(result["ok"], true, "{result}");
    let metrics = service.wait_metrics("the connection to end", |m| {
        m.get("echo_connections_lost_total{reason=\"peer_closed\"}") == 1.0
    });
    assert_eq!(
        metrics.get("echo_proxy_headers_total{result=\"ok\",version=\"v1\"}"),
        1.0,
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("echo_tls_handshakes_total{listener=\"tls\",result=\"ok\"}"),
        1.0
    );
}

#[test]
fn faults_apply_on_the_tls_port_too() {
    // Issue 10: the fault layer wraps every stream listener; on a TLS port it acts on the TCP
    // stream, before the handshake.
    let dir = pki("ecdsa");
    let service = start(&dir, &["--fault", "refuse"], &[]);
    for addr in [tls_addr(&service), service.echo] {
        let mut stream = connect(addr);
        let mut back = Vec::new();
        let read = stream.read_to_end(&mut back);
        assert!(read.is_ok() && back.is_empty(), "{addr}: {read:?} {back:?}");
    }
    service.wait_metrics("two refusals", |m| {
        m.get("echo_faults_injected_total{fault=\"refuse\"}") == 2.0
            && m.get("echo_connections_lost_total{reason=\"fault_close\"}") == 2.0
    });
}
