//! Micro-benchmark of the PROXY header parser (`cargo bench --bench proxy_parser`, or
//! `make bench-parser`): nanoseconds per parsed header for the shapes load balancers send.
//! A plain timing loop (no criterion: one dependency less); each figure is the median of
//! several rounds, and `black_box` keeps the compiler from skipping the work.

use std::hint::black_box;
use std::time::Instant;

use echo_service::proxy_protocol::{encode, parse, Addresses, Parsed};

const ROUNDS: usize = 7;
const ITERATIONS: u32 = 500_000;
const CAP: usize = 4096;

fn ns_per_header(header: &[u8]) -> f64 {
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ITERATIONS {
                match parse(black_box(header), CAP) {
                    Ok(Parsed::Complete { header, len }) => {
                        black_box((header, len));
                    }
                    other => panic!("benchmark header did not parse: {other:?}"),
                }
            }
            start.elapsed().as_nanos() as f64 / f64::from(ITERATIONS)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` and nextest run or list bench binaries too: list no tests,
    // and without `--bench` (what `cargo bench` passes) only check that every case parses.
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let timed = args.iter().any(|a| a == "--bench");
    let v4 = Addresses {
        source: "203.0.113.195:56324".parse().unwrap(),
        destination: "10.0.12.7:8000".parse().unwrap(),
    };
    let v6 = Addresses {
        source: "[2001:db8:85a3::8a2e:370:7334]:56324".parse().unwrap(),
        destination: "[2001:db8::7]:8000".parse().unwrap(),
    };
    let cases: [(&str, Vec<u8>); 6] = [
        ("v1 TCP4", encode::v1(Some(v4))),
        ("v1 TCP6", encode::v1(Some(v6))),
        (
            "v2 IPv4, no TLV (HAProxy send-proxy-v2)",
            encode::v2(Some(v4), &[], false),
        ),
        (
            "v2 IPv4 + AWS VPC endpoint TLV (AWS NLB)",
            encode::v2(Some(v4), &[(0xEA, b"\x01vpce-08d2bf15fac5001c9")], false),
        ),
        (
            "v2 IPv6 + ALPN, authority, unique id",
            encode::v2(
                Some(v6),
                &[
                    (0x01, b"h2"),
                    (0x02, b"echo.example.com"),
                    (0x05, b"0123456789abcdef"),
                ],
                false,
            ),
        ),
        (
            "v2 IPv6 + ALPN, authority, unique id, CRC32C",
            encode::v2(
                Some(v6),
                &[
                    (0x01, b"h2"),
                    (0x02, b"echo.example.com"),
                    (0x05, b"0123456789abcdef"),
                ],
                true,
            ),
        ),
    ];
    if !timed {
        for (name, header) in &cases {
            assert!(
                matches!(parse(header, CAP), Ok(Parsed::Complete { .. })),
                "{name} does not parse"
            );
        }
        return;
    }
    println!("| header | bytes | ns per header (median of {ROUNDS} x {ITERATIONS}) |");
    println!("|---|---|---|");
    for (name, header) in &cases {
        println!(
            "| {name} | {} | {:.1} |",
            header.len(),
            ns_per_header(header)
        );
    }
}
