//! The PROXY protocol with real proxies in front of the real binary: HAProxy (`send-proxy`,
//! `send-proxy-v2` with CRC32C and unique-id TLVs, `send-proxy-v2-ssl-cn` with the cipher and
//! certificate sub-TLVs behind its own TLS termination) and nginx's stream module
//! (`proxy_protocol on`), each started by the test on loopback with its configuration in a
//! temporary directory. Clients connect from 127.0.0.2/127.0.0.3 so the original client differs
//! from the proxy's own address (127.0.0.1): payloads come back byte-exact, the spans show the
//! original client as `client.address` and the proxy as `network.peer.address`, and the
//! per-peer limit counts the original client.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::otlp_receiver::{Mode, OtlpReceiver};
use crate::policies::connect_from;
use crate::support::{payload, require_tool, Service};

/// A proxy process started by a test; stopped (TERM, then KILL) on drop.
pub(crate) struct Proxy {
    child: Child,
    dir: PathBuf,
}

impl Proxy {
    pub(crate) fn start(mut command: Command, dir: PathBuf, listen: SocketAddr) -> Proxy {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start proxy");
        let mut proxy = Proxy { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(listen).is_err() {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("proxy exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "proxy not listening on {listen} after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "echo-it-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// HAProxy with one frontend per `send-proxy` flavour: `(server options, an extra frontend
/// line)` each. Returns the proxy and the frontends.
fn haproxy(echo: SocketAddr, servers: &[(&str, &str)]) -> (Proxy, Vec<SocketAddr>) {
    let fronts: Vec<Front> = servers
        .iter()
        .map(|&(server, extra)| Front {
            server,
            bind: "",
            extra,
        })
        .collect();
    haproxy_fronts(echo, &fronts)
}

/// One HAProxy frontend and its backend's server line.
struct Front<'a> {
    /// The server line's options (`send-proxy-v2 ...`).
    server: &'a str,
    /// Options for the frontend's bind line (`ssl crt ...`).
    bind: &'a str,
    /// One more frontend line.
    extra: &'a str,
}

fn haproxy_fronts(echo: SocketAddr, servers: &[Front]) -> (Proxy, Vec<SocketAddr>) {
    let bin = require_tool_or_apt("haproxy", "haproxy");
    let dir = temp_dir("haproxy");
    let mut config = String::from(
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 20s\n  timeout server 20s\n",
    );
    let mut fronts = Vec::new();
    for (i, front) in servers.iter().enumerate() {
        let port = free_port();
        fronts.push(SocketAddr::from(([127, 0, 0, 1], port)));
        let Front {
            server,
            bind,
            extra,
        } = front;
        config += &format!(
            "frontend fe{i}\n  bind 127.0.0.1:{port} {bind}\n  {extra}\n  default_backend be{i}\nbackend be{i}\n  server echo {echo} {server}\n"
        );
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &config).unwrap();
    let mut command = Command::new(bin);
    command.arg("-db").arg("-f").arg(&path);
    let listen = fronts[0];
    (Proxy::start(command, dir, listen), fronts)
}

/// nginx's stream module with `proxy_protocol on` in front of `echo`.
fn nginx(echo: SocketAddr) -> (Proxy, SocketAddr) {
    let bin = require_tool_or_apt("nginx", "nginx-light libnginx-mod-stream");
    let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
    assert!(
        std::path::Path::new(module).exists(),
        "{module} missing: apt-get install -y --no-install-recommends libnginx-mod-stream"
    );
    let dir = temp_dir("nginx");
    let port = free_port();
    let config = format!(
        "load_module {module};\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 128; }}\n\
         stream {{\n  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass {echo};\n    proxy_protocol on;\n    proxy_half_close on;\n  }}\n}}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(bin);
    command
        .arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&path)
        .arg("-g")
        .arg("daemon off;");
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    (Proxy::start(command, dir, listen), listen)
}

/// Like `require_tool`, naming the apt packages to install.
pub(crate) fn require_tool_or_apt(name: &str, packages: &str) -> String {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| p.is_file());
    match found {
        Some(path) => path.to_string_lossy().into_owned(),
        None => {
            let _ = require_tool; // the same policy: never skip
            panic!(
                "`{name}` is required by this test: apt-get install -y --no-install-recommends {packages} \
                 (.ci/run installs it)"
            )
        }
    }
}

/// Echo `data` through `front` from `source`, in 1000-byte writes; return what came back.
fn echo_from(source: Ipv4Addr, front: SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = connect_from(source, front);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let owned = data.to_vec();
    let handle = std::thread::spawn(move || {
        for chunk in owned.chunks(1000) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    let mut reader = stream;
    reader
        .read_to_end(&mut back)
        .expect("echo through the proxy");
    handle.join().unwrap();
    back
}

/// Is `stream` closed by the far end within `limit` (EOF or reset) without sending data?
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        ),
        Ok(_) => false,
    }
}

fn string_attr(span: &crate::otlp_receiver::ReceivedSpan, key: &str) -> Option<String> {
    span.span
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(Value::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

/// One test per proxy kind, sharing this body: `fronts` lead to the service through a proxy
/// that sends a PROXY header; every front must deliver byte-exact echoes and the original
/// client, and the per-peer limit of 1 must count 127.0.0.2 and 127.0.0.3 separately.
fn through_proxies(
    service: &mut Service,
    receiver: &OtlpReceiver,
    fronts: &[SocketAddr],
    versions: &[(&str, f64)],
) {
    let a = Ipv4Addr::new(127, 0, 0, 2);
    let b = Ipv4Addr::new(127, 0, 0, 3);
    for (i, front) in fronts.iter().enumerate() {
        let data = payload(50_000, i as u64);
        assert!(
            echo_from(a, *front, &data) == data,
            "byte-exact through {front}"
        );
        // The per-peer limit (1) counts the original client: a second connection from a is
        // refused while the first is open, one from b is served. First let the server see
        // the echo connection's close, or `held` would be the second one.
        service.wait_metrics("the echo connection to close", |m| {
            m.get("echo_connections_active") == 0.0
        });
        let mut held = connect_from(a, *front);
        held.write_all(b"held").unwrap();
        let mut back = [0u8; 4];
        held.read_exact(&mut back).unwrap();
        let mut refused = connect_from(a, *front);
        let _ = refused.write_all(b"x");
        assert!(
            closed_within(&mut refused, Duration::from_secs(5)),
            "second connection from {a} refused"
        );
        assert!(echo_from(b, *front, b"other client") == b"other client");
        held.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = held.read_to_end(&mut rest);
    }
    // HAProxy retries a server connection that is reset at once (its `retries`), so a refused
    // client may be refused more than once: at least one refusal and 4 headers per front.
    let m = service.wait_metrics("refusals and headers counted", |m| {
        m.get("echo_connections_rejected_total{reason=\"peer_limit\"}") >= fronts.len() as f64
            && versions.iter().all(|(v, n)| {
                m.get(&format!(
                    "echo_proxy_headers_total{{result=\"ok\",version=\"{v}\"}}"
                )) >= *n
            })
            && m.get("echo_connections_active") == 0.0
    });
    assert_eq!(
        m.get("echo_proxy_headers_total{result=\"invalid\",version=\"none\"}"),
        0.0
    );
    service.terminate(Duration::from_secs(15));

    // Spans: client.address is the original client, network.peer.address the proxy.
    let spans = receiver.spans();
    let clients: Vec<(Option<String>, Option<String>)> = spans
        .iter()
        .map(|s| {
            (
                string_attr(s, "client.address"),
                string_attr(s, "network.peer.address"),
            )
        })
        .collect();
    let served_from = |ip: &str| {
        clients
            .iter()
            .filter(|(c, p)| c.as_deref() == Some(ip) && p.as_deref() == Some("127.0.0.1"))
            .count()
    };
    assert!(
        served_from("127.0.0.2") >= 3 * fronts.len(),
        "spans from 127.0.0.2: {clients:?}"
    );
    assert!(
        served_from("127.0.0.3") >= fronts.len(),
        "spans from 127.0.0.3: {clients:?}"
    );
}

fn proxied_service(receiver: &OtlpReceiver) -> Service {
    Service::start_with_env(
        &[
            "--proxy-protocol",
            "required",
            "--proxy-protocol-trusted",
            "127.0.0.1/32",
            "--max-connections-per-peer",
            "1",
            "--export-timeout",
            "3s",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
        ],
    )
}

#[test]
fn proxy_interop_haproxy_send_proxy_v1_and_v2_with_crc_and_unique_id() {
    let receiver = OtlpReceiver::start(Mode::Grpc);
    let mut service = proxied_service(&receiver);
    let (_haproxy, fronts) = haproxy(
        service.echo,
        &[
            ("send-proxy", ""),
            ("send-proxy-v2", ""),
            (
                "send-proxy-v2 proxy-v2-options crc32c,unique-id",
                "unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid",
            ),
        ],
    );
    through_proxies(
        &mut service,
        &receiver,
        &fronts,
        &[("v1", 4.0), ("v2", 8.0)],
    );
}

#[test]
fn proxy_interop_nginx_stream_proxy_protocol_on() {
    let receiver = OtlpReceiver::start(Mode::Grpc);
    let mut service = proxied_service(&receiver);
    let (_nginx, front) = nginx(service.echo);
    through_proxies(&mut service, &receiver, &[front], &[("v1", 4.0)]);
}

/// Run `echo-bench spread` with `args`; its JSON report.
fn spread(args: &[&str]) -> serde_json::Value {
    let bin = std::path::Path::new(crate::support::SERVICE_BIN).with_file_name("echo-bench");
    assert!(
        bin.is_file(),
        "{} missing: cargo build --workspace --locked",
        bin.display()
    );
    let output = Command::new(bin)
        .arg("spread")
        .args(args)
        .arg("--json")
        .env_remove("ECHO_BENCH_TARGET")
        .output()
        .expect("run echo-bench spread");
    assert!(
        output.status.success(),
        "echo-bench spread failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON report")
}

/// 3 replicas behind HAProxy round-robin (with send-proxy-v2): `echo-bench spread` sees about
/// a third each, on the identity port and on the echo port with `--greeting` (which also
/// verifies an echo on each connection).
#[test]
fn proxy_interop_spread_report_over_three_replicas_behind_haproxy_round_robin() {
    let replicas: Vec<Service> = (0..3)
        .map(|i| {
            Service::start_with_env(
                &[
                    "--identity-listen",
                    "127.0.0.1:0",
                    "--greeting",
                    "--proxy-protocol",
                    "required",
                ],
                &[("POD_NAME", &format!("echo-{i}"))],
            )
        })
        .collect();
    let dir = temp_dir("haproxy-rr");
    let (identity_port, echo_port) = (free_port(), free_port());
    let mut config = String::from(
        "global\n  maxconn 500\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 20s\n  timeout server 20s\n",
    );
    for (name, port, addr) in [
        (
            "identity",
            identity_port,
            &(|s: &Service| crate::identity::identity_addr(s)) as &dyn Fn(&Service) -> SocketAddr,
        ),
        (
            "echo",
            echo_port,
            &(|s: &Service| s.echo) as &dyn Fn(&Service) -> SocketAddr,
        ),
    ] {
        config += &format!("listen {name}\n  bind 127.0.0.1:{port}\n  balance roundrobin\n");
        for (i, replica) in replicas.iter().enumerate() {
            config += &format!("  server r{i} {} send-proxy-v2\n", addr(replica));
        }
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &config).unwrap();
    let mut command = Command::new(require_tool_or_apt("haproxy", "haproxy"));
    command.arg("-db").arg("-f").arg(&path);
    let _haproxy = Proxy::start(
        command,
        dir,
        SocketAddr::from(([127, 0, 0, 1], identity_port)),
    );

    // The identity line through HAProxy shows the original client (127.0.0.2) and HAProxy
    // (127.0.0.1) as the peer.
    let mut through = connect_from(
        Ipv4Addr::new(127, 0, 0, 2),
        SocketAddr::from(([127, 0, 0, 1], identity_port)),
    );
    let mut line = String::new();
    through
        .read_to_string(&mut line)
        .expect("identity line through HAProxy");
    let id: serde_json::Value = serde_json::from_str(&line).expect("identity JSON");
    assert_eq!(id["client"]["address"], "127.0.0.2", "{line}");
    assert_eq!(id["peer"]["address"], "127.0.0.1", "{line}");
    assert_eq!(id["proxy"]["version"], "v2", "{line}");

    for (port, extra) in [(identity_port, None), (echo_port, Some("--greeting"))] {
        let target = format!("127.0.0.1:{port}");
        let mut args = vec![
            "--target",
            target.as_str(),
            "--connections",
            "300",
            "--expected-replicas",
            "3",
        ];
        args.extend(extra);
        let report = spread(&args);
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["identified"], 300, "{report}");
        let per_replica: Vec<(String, u64)> = report["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["replica"].as_str().unwrap().to_string(),
                    r["connections"].as_u64().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = per_replica.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["echo-0", "echo-1", "echo-2"], "{report}");
        for (name, n) in &per_replica {
            assert!((80..=120).contains(n), "{name} got {n} of 300: {report}");
        }
        assert_eq!(report["chi_square"]["even"], true, "{report}");
    }
}

/// HAProxy terminates TLS (with a client certificate, `verify optional`) and passes what it
/// negotiated in the v2 header's SSL TLV (`send-proxy-v2-ssl-cn` and the `ssl-cipher`,
/// `cert-sig`, `cert-key` sub-TLVs): the identity port, where the service answers with the
/// header it read, shows the original client (127.0.0.2 and its port), the TLS version,
/// cipher, the client certificate's CN and algorithms, and the client bits as HAProxy saw
/// them; 200 kB through the same termination to the echo port come back byte-exact.
#[test]
fn proxy_interop_haproxy_send_proxy_v2_ssl_cn_after_its_own_tls_termination() {
    let pki = crate::tls::pki("ecdsa");
    // HAProxy's `crt` wants the certificate and its key in one file.
    let combined = pki.path("haproxy.pem");
    let mut pem = std::fs::read(pki.path("server.pem")).unwrap();
    pem.extend(std::fs::read(pki.path("server.key")).unwrap());
    std::fs::write(&combined, pem).unwrap();

    let service = Service::start(&[
        "--identity-listen",
        "127.0.0.1:0",
        "--proxy-protocol",
        "required",
        "--proxy-protocol-trusted",
        "127.0.0.1/32",
    ]);
    let identity = crate::identity::identity_addr(&service);
    let bind = format!(
        "ssl crt {combined} ca-file {} verify optional",
        pki.path("ca.pem")
    );
    let (_haproxy, fronts) = haproxy_fronts(
        identity,
        &[Front {
            server: "send-proxy-v2-ssl-cn proxy-v2-options ssl-cipher,cert-sig,cert-key",
            bind: &bind,
            extra: "",
        }],
    );
    let (_haproxy_echo, echo_fronts) = haproxy_fronts(
        service.echo,
        &[Front {
            server: "send-proxy-v2-ssl-cn",
            bind: &bind,
            extra: "",
        }],
    );
    let fronts = [fronts[0], echo_fronts[0]];

    // Python's ssl, from 127.0.0.2 so the original client differs from HAProxy (127.0.0.1):
    // sends `send` bytes and reads until EOF; prints the answer, then the local port.
    let ask = |front: SocketAddr, client_cert: bool, send: usize| -> (Vec<u8>, u16) {
        let cert = if client_cert {
            format!(
                "({:?}, {:?})",
                pki.path("client.pem"),
                pki.path("client.key")
            )
        } else {
            "None".into()
        };
        let script = format!(
            r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations({ca:?})
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
cert = {cert}
if cert: ctx.load_cert_chain(*cert)
raw = socket.create_connection(("127.0.0.1", {port}), timeout=10, source_address=("127.0.0.2", 0))
tls = ctx.wrap_socket(raw, server_hostname="localhost")
payload = bytes(i % 251 for i in range({send}))
tls.sendall(payload)
answer = b""
while len(answer) < {send} or {send} == 0:
    chunk = tls.recv(65536)
    if not chunk:
        break
    answer += chunk
sys.stdout.buffer.write(answer + b"\n" + str(tls.getsockname()[1]).encode())
"#,
            ca = pki.path("ca.pem"),
            port = front.port(),
        );
        let out = Command::new(require_tool("python3"))
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "TLS client through HAProxy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let split = out.stdout.iter().rposition(|&b| b == b'\n').unwrap();
        let port = String::from_utf8_lossy(&out.stdout[split + 1..])
            .parse()
            .unwrap();
        (out.stdout[..split].to_vec(), port)
    };
    let identity_of = |client_cert: bool| -> (serde_json::Value, u16) {
        let (answer, port) = ask(fronts[0], client_cert, 0);
        (serde_json::from_slice(&answer).unwrap(), port)
    };

    let (id, port) = identity_of(true);
    assert_eq!(id["proxy"]["version"], "v2", "{id}");
    assert_eq!(id["client"]["address"], "127.0.0.2", "{id}");
    assert_eq!(id["client"]["port"], port, "{id}");
    assert_eq!(id["peer"]["address"], "127.0.0.1", "{id}");
    let ssl = &id["proxy"]["tlvs"]["ssl"];
    assert_eq!(ssl["version"], "TLSv1.3", "{id}");
    assert!(
        ssl["cipher"]
            .as_str()
            .is_some_and(|c| c.starts_with("TLS_")),
        "{id}"
    );
    assert_eq!(ssl["cn"], "client", "{id}");
    // The client certificate: an ECDSA P-256 key, signed by the ECDSA test CA.
    assert_eq!(ssl["key_alg"], "EC256", "{id}");
    assert_eq!(ssl["sig_alg"], "ecdsa-with-SHA256", "{id}");
    // PP2_CLIENT_SSL (0x01) | PP2_CLIENT_CERT_CONN (0x02) | PP2_CLIENT_CERT_SESS (0x04);
    // verify 0: HAProxy verified the certificate.
    assert_eq!(ssl["client"], 0x07, "{id}");
    assert_eq!(ssl["verify"], 0, "{id}");

    let (id, _) = identity_of(false);
    let ssl = &id["proxy"]["tlvs"]["ssl"];
    assert_eq!(ssl["client"], 0x01, "TLS without a certificate: {id}");
    assert!(ssl["cn"].is_null(), "{id}");
    assert_eq!(ssl["version"], "TLSv1.3", "{id}");

    // The echo port through the same TLS termination: byte-exact.
    let expected: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (echoed, _) = ask(fronts[1], true, expected.len());
    assert!(echoed == expected, "{} bytes back", echoed.len());
    service.wait_metrics("three v2 headers read", |m| {
        m.get("echo_proxy_headers_total{result=\"ok\",version=\"v2\"}") == 3.0
    });
}
