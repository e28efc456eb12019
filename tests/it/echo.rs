//! Echo semantics: every byte comes back unchanged and in order, whatever the chunking; EOF
//! is answered with everything pending and then a FIN; a peer that never reads is held by
//! backpressure; resets are survived.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use crate::support::{echo_round_trip, payload, Service};

#[test]
fn payloads_written_in_odd_pieces_come_back_identical() {
    let service = Service::start(&[]);
    // (payload size, write size): one byte at a time, 7 bytes, 64 KiB and 1 MiB pieces.
    let cases = [
        (10_000, 1),
        (100_003, 7),
        (3 * 1024 * 1024 + 11, 64 * 1024),
        (5 * 1024 * 1024 + 5, 1024 * 1024),
        (1, 1),
    ];
    for (i, (size, piece)) in cases.into_iter().enumerate() {
        let data = payload(size, i as u64 + 1);
        if size > 1000 {
            assert!(data.contains(&0), "payload should contain NUL bytes");
            assert!(
                std::str::from_utf8(&data).is_err(),
                "payload should be invalid UTF-8"
            );
        }
        let back = echo_round_trip(service.connect(), &data, piece);
        assert_eq!(back.len(), data.len(), "size {size} in {piece}-byte pieces");
        assert!(
            back == data,
            "bytes differ for size {size} in {piece}-byte pieces"
        );
    }
}

#[test]
fn half_close_under_backpressure_gets_everything_back_then_a_clean_eof() {
    // Write without reading until the server stops taking bytes (its write buffer and the
    // kernel's are full: backpressure holds), then half-close with data still pending on both
    // sides. A blocking write_all here would hang instead of failing once buffers fill.
    let service = Service::start(&[]);
    let total = 64 * 1024 * 1024;
    let data = payload(total, 42);
    let mut stream = service.connect();
    socket2::SockRef::from(&stream)
        .set_recv_buffer_size(32 * 1024)
        .unwrap();
    stream.set_nonblocking(true).unwrap();
    let mut written = 0;
    let mut last_progress = Instant::now();
    while written < total && last_progress.elapsed() < Duration::from_millis(500) {
        match stream.write(&data[written..(written + 64 * 1024).min(total)]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    assert!(
        written < total,
        "the server never applied backpressure ({written} bytes taken)"
    );
    assert!(written >= 1024 * 1024, "only {written} bytes taken");
    stream.set_nonblocking(false).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    // read_to_end only returns Ok on a clean FIN; a reset would be an error here.
    stream
        .read_to_end(&mut back)
        .expect("clean EOF after the echo");
    assert!(
        back == data[..written],
        "got {} of {written} bytes back",
        back.len()
    );
    service.wait_metrics("a peer_closed loss", |m| {
        m.get("echo_connections_lost_total{reason=\"peer_closed\"}") == 1.0
    });
}

#[test]
fn a_thousand_concurrent_connections_each_get_their_own_bytes() {
    let service = Service::start(&[]);
    let addr = service.echo;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let verified = runtime.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tasks = tokio::task::JoinSet::new();
        // Open all connections first so they are truly concurrent, then exchange.
        let mut streams = Vec::new();
        for _ in 0..1000 {
            streams.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        for (i, stream) in streams.into_iter().enumerate() {
            tasks.spawn(async move {
                let data = payload(1000 + i * 13, i as u64 + 7);
                let (mut rd, mut wr) = stream.into_split();
                let expected = data.clone();
                let writer = tokio::spawn(async move {
                    wr.write_all(&data).await.unwrap();
                    wr.shutdown().await.unwrap();
                });
                let mut back = Vec::new();
                rd.read_to_end(&mut back).await.unwrap();
                writer.await.unwrap();
                back == expected
            });
        }
        let mut ok = 0;
        while let Some(result) = tasks.join_next().await {
            ok += usize::from(result.unwrap());
        }
        ok
    });
    assert_eq!(verified, 1000);
    service.wait_metrics("all connections closed", |m| {
        m.get("echo_connections_active") == 0.0 && m.get("echo_connections_made_total") == 1000.0
    });
}

#[test]
fn a_peer_that_never_reads_is_held_by_backpressure_and_loses_nothing() {
    let service = Service::start(&["--write-buffer-limit", "64KiB"]);
    let rss_before = service.rss_bytes();
    let total = 64 * 1024 * 1024;
    let data = payload(total, 9);
    let mut stream = service.connect();
    stream.set_nonblocking(true).unwrap();

    // Write without reading until the server stops taking bytes for a full second.
    let mut written = 0;
    let mut last_progress = Instant::now();
    while written < total && last_progress.elapsed() < Duration::from_secs(1) {
        match stream.write(&data[written..(written + 256 * 1024).min(total)]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    assert!(
        written < total / 2,
        "the server kept reading from a peer that does not read ({written} bytes taken)"
    );
    let growth = service.rss_bytes().saturating_sub(rss_before);
    assert!(
        growth < 16 * 1024 * 1024,
        "server memory grew by {growth} bytes for one non-reading peer"
    );

    // Now read: every byte must arrive, in order, while we finish writing.
    stream.set_nonblocking(false).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let rest = data[written..].to_vec();
    let writer = std::thread::spawn(move || {
        stream.write_all(&rest).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(total);
    reader.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), total);
    assert!(back == data, "bytes differ after backpressure");
}

#[test]
fn a_reset_mid_stream_is_survived_and_counted() {
    let service = Service::start(&[]);
    for _ in 0..20 {
        let mut stream = service.connect();
        stream.write_all(&payload(100_000, 3)).unwrap();
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream); // RST
    }
    // Others are still served.
    let data = payload(50_000, 4);
    assert!(echo_round_trip(service.connect(), &data, 4096) == data);
    let metrics = service.wait_metrics("all resets counted", |m| {
        m.get("echo_connections_active") == 0.0 && m.get("echo_connections_made_total") == 21.0
    });
    assert_eq!(
        metrics.get("echo_connections_lost_total{reason=\"reset\"}"),
        20.0,
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("echo_connections_lost_total{reason=\"panic\"}"),
        0.0
    );
    assert_eq!(
        metrics.get("echo_connections_lost_total{reason=\"error\"}"),
        0.0
    );
}

#[test]
fn ipv6_and_ipv4_both_work_on_a_dual_stack_listener() {
    // [::]:0 accepts both families; peers are reported as plain IPv4.
    let service = Service::start(&["--listen", "[::]:0"]);
    let port = service.echo.port();
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let stream = crate::support::connect(addr.parse().unwrap());
        let data = payload(1000, 5);
        assert!(
            echo_round_trip(stream, &data, 100) == data,
            "echo over {addr}"
        );
    }
}
