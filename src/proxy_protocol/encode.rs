//! Building PROXY headers, the sender's side: used by the tests, the fuzzer's seed corpus and
//! the benchmarks, so they all speak exactly what the parser reads.

use std::net::SocketAddr;

use super::crc32c;
use super::parser::{Addresses, V2_SIGNATURE};

/// A v1 line for `addresses`, or `PROXY UNKNOWN\r\n` without them. Mixed families give
/// `UNKNOWN` too (v1 cannot express them).
pub fn v1(addresses: Option<Addresses>) -> Vec<u8> {
    match addresses.map(|a| (a.source, a.destination)) {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        _ => "PROXY UNKNOWN\r\n".to_string(),
    }
    .into_bytes()
}

/// A v2 header: the PROXY command over TCP for `addresses` (mixed families are sent as
/// IPv6 with IPv4-mapped addresses), or the LOCAL command with AF_UNSPEC without them; then
/// `tlvs` as (type, value); then, if `crc`, a CRC32C TLV computed over the whole header.
pub fn v2(addresses: Option<Addresses>, tlvs: &[(u8, &[u8])], crc: bool) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    match addresses {
        None => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
        Some(a) => match (a.source, a.destination) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                out.extend_from_slice(&[0x21, 0x11, 0, 0]);
                out.extend_from_slice(&s.ip().octets());
                out.extend_from_slice(&d.ip().octets());
                out.extend_from_slice(&s.port().to_be_bytes());
                out.extend_from_slice(&d.port().to_be_bytes());
            }
            (s, d) => {
                let v6 = |a: SocketAddr| match a {
                    SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
                    SocketAddr::V6(v6) => *v6.ip(),
                };
                out.extend_from_slice(&[0x21, 0x21, 0, 0]);
                out.extend_from_slice(&v6(s).octets());
                out.extend_from_slice(&v6(d).octets());
                out.extend_from_slice(&s.port().to_be_bytes());
                out.extend_from_slice(&d.port().to_be_bytes());
            }
        },
    }
    for (kind, value) in tlvs {
        tlv(&mut out, *kind, value);
    }
    let crc_at = crc.then(|| {
        tlv(&mut out, 0x03, &[0; 4]);
        out.len() - 4
    });
    let len = u16::try_from(out.len() - 16).unwrap_or(u16::MAX);
    out[14..16].copy_from_slice(&len.to_be_bytes());
    if let Some(at) = crc_at {
        let sum = crc32c::checksum(&out);
        out[at..at + 4].copy_from_slice(&sum.to_be_bytes());
    }
    out
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(value);
}
