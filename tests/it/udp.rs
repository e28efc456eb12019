//! UDP echo over real sockets: datagrams of every size come back exactly (to a Rust client,
//! Python's `socket` module and `socat`), several UDP listeners are told apart by the
//! `listener` label, and a flood the server cannot answer is dropped and counted while memory
//! stays flat (the server's replies go through a 1 Mbit/s `tbf` qdisc in a network namespace,
//! so its socket send buffer really fills).

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{payload, require_tool, service_command, Service};

fn echo_datagram(client: &UdpSocket, to: SocketAddr, data: &[u8]) {
    client.send_to(data, to).unwrap();
    let mut back = vec![0u8; 70_000];
    let (n, from) = client.recv_from(&mut back).expect("an echoed datagram");
    assert_eq!(from, to);
    assert_eq!(&back[..n], data, "{} bytes", data.len());
}

#[test]
fn datagrams_of_every_size_come_back_exactly_over_ipv4_and_ipv6() {
    let service = Service::start(&["--udp-listen", "127.0.0.1:0,[::1]:0"]);
    let addrs = logged(&service, "UDP", 2);
    let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    v4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (i, size) in [0usize, 1, 1_472, 8_192, 65_507].into_iter().enumerate() {
        echo_datagram(&v4, addrs[0], &payload(size, i as u64));
    }
    let v6 = UdpSocket::bind("[::1]:0").unwrap();
    v6.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (i, size) in [0usize, 1, 1_452, 65_527].into_iter().enumerate() {
        echo_datagram(&v6, addrs[1], &payload(size, 100 + i as u64));
    }
    // Two UDP listeners: each is labelled with its port, and they add up.
    let metrics = service.metrics();
    let label = |addr: SocketAddr| format!("{{listener=\"udp:{}\"}}", addr.port());
    assert_eq!(
        metrics.get(&format!("echo_datagrams_received_total{}", label(addrs[0]))),
        5.0
    );
    assert_eq!(
        metrics.get(&format!("echo_datagrams_sent_total{}", label(addrs[1]))),
        4.0
    );
    let bytes: usize = [0, 1, 1_472, 8_192, 65_507, 0, 1, 1_452, 65_527]
        .iter()
        .sum();
    assert_eq!(metrics.get("echo_received_bytes_total"), bytes as f64);
    assert_eq!(metrics.get("echo_sent_bytes_total"), bytes as f64);
}

#[test]
fn python_and_socat_get_their_datagrams_back() {
    let python = require_tool("python3");
    let socat = require_tool("socat");
    let service = Service::start(&["--udp-listen", "127.0.0.1:0"]);
    let addr = logged(&service, "UDP", 1)[0];
    let script = r#"
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for size in (0, 1, 1472, 8192, 65507):
    data = os.urandom(size)
    s.sendto(data, (host, port))
    back, peer = s.recvfrom(70000)
    assert back == data and peer == (host, port), (size, len(back), peer)
print("ok")
"#;
    let out = Command::new(python)
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = Command::new(socat)
        .args(["-t", "2", "-", &format!("UDP:{addr}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello over socat\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over socat\n");
}

#[test]
fn a_flood_the_server_cannot_answer_is_dropped_and_counted_with_flat_memory() {
    require_tool("tc");
    let netns = crate::faults::Netns::create();
    // Replies leave the namespace at 1 Mbit/s; the qdisc holds up to 50 MB, so the server's
    // socket send buffer (not the qdisc) is what fills.
    netns.shape_egress(&["tbf", "rate", "1mbit", "burst", "32kbit", "limit", "50mb"]);
    let listen = format!("{}:0", netns.ns_ip);
    let udp = format!("{}:7000", netns.ns_ip);
    let service = Service::spawn(service_command(
        &["ip", "netns", "exec", &netns.name],
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &listen,
            "--udp-listen",
            &udp,
        ],
        &[],
    ));
    let target: SocketAddr = udp.parse().unwrap();
    let rss_before = service.rss_bytes();
    let client = UdpSocket::bind("0.0.0.0:0").unwrap();
    let data = payload(1_400, 7);
    // 30,000 datagrams of 1,400 bytes (42 MB) into a 1 Mbit/s return path, bounded in time.
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < 30_000 && started.elapsed() < Duration::from_secs(30) {
        if client.send_to(&data, target).is_ok() {
            sent += 1;
        }
    }
    let metrics = service.wait_metrics("every datagram to be received or lost", |m| {
        m.get("echo_datagrams_received_total{listener=\"udp\"}") > 0.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let metrics = {
        let _ = metrics;
        service.metrics()
    };
    let received = metrics.get("echo_datagrams_received_total{listener=\"udp\"}");
    let replied = metrics.get("echo_datagrams_sent_total{listener=\"udp\"}");
    let dropped =
        metrics.get("echo_datagrams_dropped_total{listener=\"udp\",reason=\"would_block\"}");
    let rss_after = service.rss_bytes();
    eprintln!(
        "UDP flood: sent {sent}, received {received}, replied {replied}, dropped {dropped}; \
         RSS {:.1} -> {:.1} MiB",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    assert!(dropped > 1_000.0, "no drops counted: {metrics:?}");
    assert_eq!(
        replied + dropped,
        received,
        "every datagram is replied to or counted"
    );
    assert!(
        rss_after < rss_before + 16 * 1024 * 1024,
        "RSS grew from {rss_before} to {rss_after}"
    );
}

/// The address logged for each listener of `kind` (`TCP`, `TLS`, `UDP`), in order.
fn logged(service: &Service, kind: &str, expected: usize) -> Vec<SocketAddr> {
    let field = kind.to_ascii_lowercase();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let addrs: Vec<SocketAddr> = service
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(&format!("{kind} echo serving")))
            .map(|l| {
                let json: serde_json::Value = serde_json::from_str(l).unwrap();
                json["fields"][field.as_str()]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        if addrs.len() >= expected {
            return addrs;
        }
        assert!(Instant::now() < deadline, "{kind} listeners not logged");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_tcp_ports_and_a_udp_port_in_one_process_are_counted_per_listener_and_add_up() {
    use std::io::{Read, Write};
    let service = Service::start(&[
        "--listen",
        "127.0.0.1:0,127.0.0.1:0",
        "--udp-listen",
        "127.0.0.1:0",
    ]);
    let tcp = logged(&service, "TCP", 2);
    let udp = logged(&service, "UDP", 1);
    for (i, &addr) in tcp.iter().enumerate() {
        for _ in 0..=i {
            let mut stream = crate::support::connect(addr);
            stream.write_all(b"ping").unwrap();
            let mut back = [0u8; 4];
            stream.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"ping");
        }
    }
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    echo_datagram(&client, udp[0], b"pong");
    let metrics = service.wait_metrics("three closed connections", |m| {
        m.get("echo_connections_lost_total") == 3.0
    });
    let made = |addr: SocketAddr| {
        metrics.get(&format!(
            "echo_connections_made_total{{listener=\"tcp:{}\"}}",
            addr.port()
        ))
    };
    assert_eq!(made(tcp[0]), 1.0, "{metrics:?}");
    assert_eq!(made(tcp[1]), 2.0, "{metrics:?}");
    assert_eq!(
        metrics.get("echo_datagrams_received_total{listener=\"udp\"}"),
        1.0
    );
    // Totals add up over the listeners: 3 connections x 4 bytes + one 4-byte datagram.
    assert_eq!(metrics.get("echo_received_bytes_total"), 16.0);
    let health: serde_json::Value =
        serde_json::from_str(&service.admin_get("/healthz").body).unwrap();
    assert_eq!(health["connections_made_total"], 3);
}
