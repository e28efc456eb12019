//! The parser against every case of the specification, then as properties: arbitrary bytes
//! never panic nor ask to buffer past the cap, and a valid header split any way parses the same.

use std::net::SocketAddr;

use proptest::prelude::*;

use super::encode;
use super::parser::*;

const CAP: usize = 4096;

fn addrs(src: &str, dst: &str) -> Addresses {
    Addresses {
        source: src.parse().unwrap(),
        destination: dst.parse().unwrap(),
    }
}

fn complete(bytes: &[u8]) -> (Header, usize) {
    match parse(bytes, CAP) {
        Ok(Parsed::Complete { header, len }) => (header, len),
        other => panic!("expected a header from {bytes:?}, got {other:?}"),
    }
}

fn error(bytes: &[u8]) -> ParseError {
    match parse(bytes, CAP) {
        Err(err) => err,
        other => panic!("expected an error from {bytes:?}, got {other:?}"),
    }
}

#[test]
fn v1_tcp4_and_tcp6_with_payload_after() {
    let (h, len) = complete(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /");
    assert_eq!(len, 47);
    assert_eq!(h.version, Version::V1);
    assert_eq!(
        h.addresses,
        Some(addrs("192.168.0.1:56324", "192.168.0.11:443"))
    );
    let (h, _) = complete(b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n");
    assert_eq!(h.addresses, Some(addrs("[2001:db8::1]:65535", "[::1]:0")));
}

#[test]
fn v1_unknown_short_and_long_forms_use_the_real_endpoints() {
    for line in [
        &b"PROXY UNKNOWN\r\n"[..],
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
    ] {
        let (h, len) = complete(line);
        assert_eq!(len, line.len());
        assert!(line.len() <= V1_MAX_LEN);
        assert_eq!(h.addresses, None);
    }
}

#[test]
fn v1_longest_line_is_accepted_and_one_more_byte_is_not() {
    let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(longest.len(), 107);
    complete(longest);
    let mut too_long = longest.to_vec();
    too_long.insert(20, b'f');
    assert_eq!(error(&too_long), ParseError::V1TooLong);
    // 107 bytes without a CRLF: rejected without waiting for more.
    assert_eq!(
        error(&[b"PROXY ".as_slice(), &[b'a'; 101]].concat()),
        ParseError::V1TooLong
    );
    // 106 bytes ending in CR: the LF would be byte 108.
    let mut cr_last = vec![b'P', b'R', b'O', b'X', b'Y', b' '];
    cr_last.resize(106, b'x');
    cr_last.push(b'\r');
    assert_eq!(error(&cr_last), ParseError::V1TooLong);
}

#[test]
fn v1_without_crlf_is_incomplete_then_rejected_for_a_bare_cr_or_lf() {
    assert_eq!(
        parse(b"PROXY TCP4 1.2.3.4", CAP),
        Ok(Parsed::Incomplete { upto: V1_MAX_LEN })
    );
    assert_eq!(
        parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", CAP),
        Ok(Parsed::Incomplete { upto: V1_MAX_LEN })
    );
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
        ParseError::V1Malformed
    );
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"),
        ParseError::V1Malformed
    );
}

#[test]
fn v1_malformed_lines() {
    for (line, want) in [
        (
            &b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..],
            ParseError::V1Malformed,
        ),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", ParseError::V1Malformed),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            ParseError::V1Malformed,
        ),
        (
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            ParseError::V1Malformed,
        ),
        (b"PROXY \r\n", ParseError::V1Malformed),
        (
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            ParseError::V1BadAddress,
        ),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", ParseError::V1BadAddress),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", ParseError::V1BadAddress),
        (
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
            ParseError::V1BadAddress,
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            ParseError::V1BadPort,
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            ParseError::V1BadPort,
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
            ParseError::V1BadPort,
        ),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", ParseError::V1BadPort),
    ] {
        assert_eq!(error(line), want, "{}", String::from_utf8_lossy(line));
        assert_eq!(want.version(), Version::V1);
    }
}

#[test]
fn other_protocols_are_not_proxy_as_soon_as_a_byte_differs() {
    assert_eq!(parse(b"GET / HTTP/1.1\r\n", CAP), Ok(Parsed::NotProxy));
    assert_eq!(parse(b"PROXX", CAP), Ok(Parsed::NotProxy));
    assert_eq!(parse(b"PROXY\r\n", CAP), Ok(Parsed::NotProxy));
    assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX", CAP), Ok(Parsed::NotProxy));
    assert_eq!(parse(b"x", CAP), Ok(Parsed::NotProxy));
    // Prefixes of either signature wait for more.
    assert!(matches!(parse(b"", CAP), Ok(Parsed::Incomplete { .. })));
    assert!(matches!(parse(b"PRO", CAP), Ok(Parsed::Incomplete { .. })));
    assert_eq!(
        parse(&V2_SIGNATURE[..7], CAP),
        Ok(Parsed::Incomplete { upto: V2_FIXED_LEN })
    );
}

#[test]
fn v2_proxy_ipv4_ipv6_and_payload_after() {
    let a4 = addrs("10.1.2.3:4567", "10.9.9.9:8000");
    let mut bytes = encode::v2(Some(a4), &[], false);
    assert_eq!(bytes.len(), 28);
    bytes.extend_from_slice(b"hello");
    let (h, len) = complete(&bytes);
    assert_eq!(
        (h.version, h.addresses, h.tlvs, len),
        (Version::V2, Some(a4), None, 28)
    );

    let a6 = addrs("[2001:db8::7]:1", "[2001:db8::8]:65535");
    let (h, len) = complete(&encode::v2(Some(a6), &[], false));
    assert_eq!((h.addresses, len), (Some(a6), 52));
}

#[test]
fn v2_local_and_unusable_families_keep_the_real_endpoints() {
    let (h, len) = complete(&encode::v2(None, &[], false));
    assert_eq!((h.addresses, len), (None, 16));
    // LOCAL with an address block present: skipped by its length, not assumed empty.
    let mut local = encode::v2(Some(addrs("1.2.3.4:1", "5.6.7.8:2")), &[], false);
    local[12] = 0x20;
    assert_eq!(complete(&local).0.addresses, None);
    // PROXY over AF_UNSPEC, UDP, AF_UNIX: accepted, addresses ignored.
    for fam in [0x00u8, 0x12, 0x31] {
        let mut h = V2_SIGNATURE.to_vec();
        let len: u16 = if fam == 0x31 {
            216
        } else if fam == 0x12 {
            12
        } else {
            0
        };
        h.extend_from_slice(&[0x21, fam]);
        h.extend_from_slice(&len.to_be_bytes());
        h.resize(16 + usize::from(len), 0);
        assert_eq!(complete(&h).0.addresses, None, "family {fam:#x}");
    }
}

#[test]
fn v2_bad_version_command_family_length() {
    let good = encode::v2(Some(addrs("1.2.3.4:1", "5.6.7.8:2")), &[], false);
    let with = |at: usize, byte: u8| {
        let mut h = good.clone();
        h[at] = byte;
        h
    };
    assert_eq!(error(&with(12, 0x11)), ParseError::V2BadVersion);
    assert_eq!(error(&with(12, 0x31)), ParseError::V2BadVersion);
    assert_eq!(error(&with(12, 0x22)), ParseError::V2BadCommand);
    assert_eq!(error(&with(13, 0x41)), ParseError::V2BadFamily);
    assert_eq!(error(&with(13, 0x13)), ParseError::V2BadFamily);
    // An IPv4 block needs 12 bytes; 11 declared is a truncated address block.
    let mut short = with(15, 11);
    short.truncate(27);
    assert_eq!(error(&short), ParseError::V2TruncatedAddress);
    let mut short6 = good[..16].to_vec();
    short6[13] = 0x21;
    short6[15] = 12;
    short6.resize(28, 0);
    assert_eq!(error(&short6), ParseError::V2TruncatedAddress);
}

#[test]
fn v2_length_past_the_cap_is_rejected_before_its_bytes_arrive() {
    let mut h = encode::v2(Some(addrs("1.2.3.4:1", "5.6.7.8:2")), &[], false)[..16].to_vec();
    h[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(parse(&h, 200), Err(ParseError::V2TooLong));
    assert_eq!(
        parse(&h, V2_MAX_LEN),
        Ok(Parsed::Incomplete { upto: V2_MAX_LEN })
    );
    // Exactly at the cap is fine.
    let full = encode::v2(
        Some(addrs("1.2.3.4:1", "5.6.7.8:2")),
        &[(0xE0, &[7; 100])],
        false,
    );
    assert!(matches!(
        parse(&full, full.len()),
        Ok(Parsed::Complete { .. })
    ));
    assert_eq!(parse(&full, full.len() - 1), Err(ParseError::V2TooLong));
}

fn ssl_value() -> Vec<u8> {
    let mut v = vec![0x07, 0, 0, 0, 0];
    for (kind, text) in [
        (0x21u8, "TLSv1.3"),
        (0x22, "client.example"),
        (0x23, "TLS_AES_128_GCM_SHA256"),
        (0x24, "RSA-SHA256"),
        (0x25, "RSA2048"),
        (0x26, "x25519"),
        (0x27, "rsa_pss_rsae_sha256"),
        (0x28, "DER"),
        (0x2f, "unknown"),
    ] {
        v.push(kind);
        v.extend_from_slice(&(text.len() as u16).to_be_bytes());
        v.extend_from_slice(text.as_bytes());
    }
    v
}

#[test]
fn v2_tlvs_are_kept_unknown_ones_skipped_and_crc_checked() {
    let ssl = ssl_value();
    let bytes = encode::v2(
        Some(addrs("1.2.3.4:1", "5.6.7.8:2")),
        &[
            (0x01, b"h2"),
            (0x02, b"echo.example"),
            (0x04, b"\0\0\0"),
            (0x05, b"unique-1"),
            (0x20, &ssl),
            (0x30, b"blue"),
            (0xEA, b"\x01vpce-0123456789abcdef"),
            (0xEA, b"\x02other-subtype"),
            (0xE5, b"custom"),
            (0xF8, b""),
        ],
        true,
    );
    let (h, len) = complete(&bytes);
    assert_eq!(len, bytes.len());
    let tlvs = h.tlvs.expect("tlvs kept");
    assert_eq!(tlvs.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(tlvs.authority.as_deref(), Some("echo.example"));
    assert_eq!(tlvs.unique_id.as_deref(), Some(&b"unique-1"[..]));
    assert_eq!(tlvs.netns.as_deref(), Some("blue"));
    assert_eq!(tlvs.aws_vpce_id.as_deref(), Some("vpce-0123456789abcdef"));
    assert!(tlvs.crc32c_checked);
    let ssl = tlvs.ssl.expect("ssl kept");
    assert_eq!((ssl.client, ssl.verify), (7, 0));
    assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
    assert_eq!(ssl.cn.as_deref(), Some("client.example"));
    assert_eq!(ssl.cipher.as_deref(), Some("TLS_AES_128_GCM_SHA256"));
    assert_eq!(ssl.sig_alg.as_deref(), Some("RSA-SHA256"));
    assert_eq!(ssl.key_alg.as_deref(), Some("RSA2048"));
    assert_eq!(ssl.group.as_deref(), Some("x25519"));
    assert_eq!(ssl.sig_scheme.as_deref(), Some("rsa_pss_rsae_sha256"));

    // Flip any single byte after the fixed part (the address ports are not checked by
    // anything else) and the CRC catches it.
    let mut corrupt = bytes.clone();
    corrupt[26] ^= 0x01;
    assert_eq!(error(&corrupt), ParseError::V2BadCrc);
    let last = bytes.len() - 1;
    let mut bad_sum = bytes.clone();
    bad_sum[last] ^= 0x80;
    assert_eq!(error(&bad_sum), ParseError::V2BadCrc);
}

#[test]
fn crc32c_matches_the_rfc_3720_check_value() {
    assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(super::crc32c(&[0; 32]), 0x8A91_36AA);
    // The eight-byte steps agree with a bit-at-a-time reference at every length and offset.
    let data: Vec<u8> = (0..300u32).map(|i| (i * 131 % 251) as u8).collect();
    for start in 0..9 {
        for end in start..data.len() {
            let slice = &data[start..end];
            let mut crc = !0u32;
            for &b in slice {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0x82F6_3B78
                    } else {
                        crc >> 1
                    };
                }
            }
            assert_eq!(super::crc32c(slice), !crc, "{start}..{end}");
        }
    }
}

#[test]
fn v2_malformed_tlvs() {
    let a = Some(addrs("1.2.3.4:1", "5.6.7.8:2"));
    // A TLV whose length runs past the header.
    let mut past = encode::v2(a, &[(0x02, b"abc")], false);
    let n = past.len();
    past[n - 4..n - 3].copy_from_slice(&[0x00]);
    past[n - 3] = 9;
    assert_eq!(error(&past), ParseError::V2BadTlv);
    // Two stray bytes after the last TLV.
    let mut stray = encode::v2(a, &[(0x02, b"abc")], false);
    stray.extend_from_slice(&[0x02, 0x00]);
    let len = (stray.len() - 16) as u16;
    stray[14..16].copy_from_slice(&len.to_be_bytes());
    assert_eq!(error(&stray), ParseError::V2BadTlv);
    for tlvs in [
        vec![(0x03u8, &b"abc"[..])],
        vec![(0x05, &[1u8; 129][..])],
        vec![(0x20, &[1u8, 0, 0][..])],
        vec![(0x20, &[1u8, 0, 0, 0, 0, 0x21, 0, 5, b'x'][..])],
    ] {
        assert_eq!(
            error(&encode::v2(a, &tlvs, false)),
            ParseError::V2BadTlv,
            "{tlvs:?}"
        );
    }
    // Two CRC TLVs are one too many.
    let twice = encode::v2(a, &[(0x03, &[0; 4])], true);
    assert_eq!(error(&twice), ParseError::V2BadTlv);
}

#[test]
fn v1_encoder_and_parser_agree() {
    for a in [
        addrs("1.2.3.4:5", "6.7.8.9:10"),
        addrs("[::1]:65535", "[fe80::1]:1"),
    ] {
        assert_eq!(complete(&encode::v1(Some(a))).0.addresses, Some(a));
    }
}

/// Feed `bytes` the way the wrapping layer does: buffer at most `upto`, one piece at a time.
fn feed_in_pieces(bytes: &[u8], cuts: &[usize], cap: usize) -> (Result<Parsed, ParseError>, usize) {
    let mut buf = Vec::new();
    let mut most = 0;
    let mut at = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    bounds.push(bytes.len());
    bounds.sort_unstable();
    for end in bounds {
        while at < end {
            let upto = match parse(&buf, cap) {
                Ok(Parsed::Incomplete { upto }) => upto,
                done => return (done, most),
            };
            let take = (end - at).min(upto.saturating_sub(buf.len())).max(1);
            buf.extend_from_slice(&bytes[at..at + take]);
            most = most.max(buf.len());
            at += take;
        }
    }
    (parse(&buf, cap), most)
}

fn any_addresses() -> impl Strategy<Value = Addresses> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
        any::<[u8; 16]>().prop_map(std::net::IpAddr::from),
    ];
    (
        ip,
        any::<u16>(),
        any::<[u8; 4]>(),
        any::<[u8; 16]>(),
        any::<u16>(),
    )
        .prop_map(|(source, sport, d4, d6, dport)| {
            // The destination has the source's family, as a real proxy sends.
            let destination: std::net::IpAddr = if source.is_ipv4() {
                d4.into()
            } else {
                d6.into()
            };
            Addresses {
                source: SocketAddr::new(source, sport),
                destination: SocketAddr::new(destination, dport),
            }
        })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// The one-pass IPv6 reader agrees with std wherever it answers, on every address's
    /// canonical text and on arbitrary strings of IPv6 characters.
    #[test]
    fn the_fast_ipv6_reader_agrees_with_std(bits in any::<u128>(), text in "[0-9a-fA-F:.]{0,45}") {
        let addr = std::net::Ipv6Addr::from(bits);
        let canonical = addr.to_string();
        if !canonical.contains('.') {
            prop_assert_eq!(hex_ipv6(canonical.as_bytes()), Some(addr));
        }
        let full = addr.segments().map(|g| format!("{g:x}")).join(":");
        prop_assert_eq!(hex_ipv6(full.as_bytes()), Some(addr));
        if let Some(fast) = hex_ipv6(text.as_bytes()) {
            prop_assert_eq!(Some(fast), text.parse::<std::net::Ipv6Addr>().ok(), "{}", text);
        }
    }

    /// Any bytes: no panic, and never a request to buffer more than the cap.
    #[test]
    fn arbitrary_bytes_never_panic_nor_exceed_the_cap(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        v2_prefix in any::<bool>(),
        cap in 16usize..1024,
    ) {
        let bytes = if v2_prefix { [&V2_SIGNATURE[..], &bytes].concat() } else { bytes };
        let (result, most) = feed_in_pieces(&bytes, &[], cap);
        prop_assert!(most <= cap.max(V1_MAX_LEN), "buffered {most} > cap {cap}");
        if let Ok(Parsed::Complete { len, .. }) = result {
            prop_assert!(len <= bytes.len() && len <= cap.max(V1_MAX_LEN));
        }
    }

    /// A valid header, split anywhere and followed by payload, parses the same as whole.
    #[test]
    fn valid_headers_split_anyhow_parse_the_same(
        a in any_addresses(),
        version in 0u8..4,
        alpn in proptest::collection::vec(any::<u8>(), 0..20),
        crc in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let header = match version {
            0 => encode::v1(Some(a)),
            1 => encode::v1(None),
            2 => encode::v2(Some(a), &[(0x01, &alpn), (0xE1, &alpn)], crc),
            _ => encode::v2(None, &[(0x05, &alpn)], crc),
        };
        let whole = parse(&header, CAP);
        let Ok(Parsed::Complete { len, .. }) = whole else {
            return Err(TestCaseError::fail(format!("{whole:?}")));
        };
        prop_assert_eq!(len, header.len());
        let stream = [&header[..], &payload].concat();
        let (pieces, _) = feed_in_pieces(&stream, &cuts, CAP);
        prop_assert_eq!(pieces, whole);
    }
}
