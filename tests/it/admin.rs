//! The admin port over real sockets: methods and paths, HEAD, header limits, slowloris
//! clients; and the two ports never speak each other's protocol.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::{echo_round_trip, http_request, parse_response, Service};

#[test]
fn methods_paths_and_head() {
    let service = Service::start(&[]);
    for path in ["/metrics", "/healthz", "/readyz"] {
        let get = http_request(service.admin, "GET", path);
        assert_eq!(get.status, 200, "GET {path}");
        assert!(!get.body.is_empty());
        let head = http_request(service.admin, "HEAD", path);
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has a body");
        let post = http_request(service.admin, "POST", path);
        assert_eq!(post.status, 405, "POST {path}");
        assert_eq!(post.headers["allow"], "GET, HEAD");
    }
    assert_eq!(http_request(service.admin, "GET", "/").status, 404);
    assert_eq!(
        http_request(service.admin, "GET", "/metrics/extra").status,
        404
    );
    let ready = http_request(service.admin, "GET", "/readyz");
    assert_eq!(ready.body.trim(), r#"{"ready":true,"reason":"accepting"}"#);
}

#[test]
fn garbage_and_huge_headers_get_an_error_not_a_crash() {
    let service = Service::start(&[]);
    let mut garbage = crate::support::connect(service.admin);
    garbage
        .write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .unwrap();
    let raw = read_response_then_close(&mut garbage);
    assert_eq!(parse_response(&raw).status, 400, "{raw:?}");

    let mut huge = crate::support::connect(service.admin);
    let header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = huge.write_all(header.as_bytes());
    let raw = read_response_then_close(&mut huge);
    assert_eq!(
        parse_response(&raw).status,
        431,
        "{}",
        String::from_utf8_lossy(&raw)
    );

    assert_eq!(
        service.admin_get("/healthz").status,
        200,
        "admin server still up"
    );
}

#[test]
fn slow_header_clients_are_cut_off_while_healthz_stays_fast() {
    let service = Service::start(&["--admin-header-timeout", "1s"]);
    let mut slow: Vec<_> = (0..20)
        .map(|_| crate::support::connect(service.admin))
        .collect();
    let request = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let start = Instant::now();
    let mut closed_at = vec![None; slow.len()];
    'bytes: for byte in request {
        for (i, stream) in slow.iter_mut().enumerate() {
            if closed_at[i].is_none() && stream.write_all(std::slice::from_ref(byte)).is_err() {
                closed_at[i] = Some(start.elapsed());
            }
        }
        // Meanwhile a normal probe is answered promptly.
        let probe = Instant::now();
        assert_eq!(service.admin_get("/healthz").status, 200);
        assert!(
            probe.elapsed() < Duration::from_secs(1),
            "healthz slow under slowloris"
        );
        if closed_at.iter().all(Option::is_some) || start.elapsed() > Duration::from_secs(6) {
            break 'bytes;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every slow client must have been disconnected (a write fails, or a read sees the close).
    for (i, stream) in slow.iter_mut().enumerate() {
        if closed_at[i].is_none() {
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut buf = [0u8; 256];
            match stream.read(&mut buf) {
                Ok(0) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("slow client {i} is still connected after the header timeout")
                }
                Err(_) => {} // reset: disconnected
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    assert!(
                        text.starts_with("HTTP/1.1 408"),
                        "slow client {i} was answered: {text}"
                    );
                }
            }
        }
    }
    assert!(start.elapsed() < Duration::from_secs(9));
}

#[test]
fn the_echo_port_never_speaks_http_and_the_admin_port_never_echoes() {
    let service = Service::start(&[]);
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(echo_round_trip(service.connect(), &request, 7), request);
    let mut admin = crate::support::connect(service.admin);
    admin.write_all(b"hello echo\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = admin.read_to_end(&mut raw);
    assert!(!raw.starts_with(b"hello echo"), "admin port echoed");
    assert_eq!(
        parse_response(&raw).status,
        400,
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

/// Read what the server sends until it closes. The server answers before closing, so there
/// must be a response; a reset is tolerated only after it (the server closing with our unread
/// request bytes still queued makes the kernel send one).
fn read_response_then_close(stream: &mut std::net::TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("no response before {e} ({} bytes)", raw.len()),
        }
    }
    assert!(!raw.is_empty(), "closed without a response");
    raw
}
