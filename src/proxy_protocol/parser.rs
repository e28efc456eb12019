//! The PROXY protocol header parser (HAProxy's `doc/proxy-protocol.txt`, versions 1 and 2).
//!
//! No I/O and no state: [`parse`] is handed every byte received so far and answers "need more
//! (and buffer no more than this)", "this is not a PROXY header", a complete [`Header`] and its
//! length, or a [`ParseError`]. The wrapping protocol in `layer.rs` owns the buffering; keeping
//! the parser pure is what lets it be tested byte by byte, with property tests and a fuzzer.
//!
//! Memory is bounded by construction: a v1 line is at most [`V1_MAX_LEN`] bytes, a v2 header
//! exactly `16 + len` bytes, and any header longer than the caller's `max_len` is an error as
//! soon as its length is known, so a caller that buffers no more than [`Parsed::Incomplete`]'s
//! `upto` never holds more than `max_len` bytes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::crc32c;

/// The longest v1 line, CRLF included (`PROXY UNKNOWN` with two full IPv6 addresses).
pub const V1_MAX_LEN: usize = 107;
/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version/command, family/protocol, length.
pub const V2_FIXED_LEN: usize = 16;
/// The longest v2 header the format can express.
pub const V2_MAX_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;
/// The start of every v1 line.
const V1_PREFIX: &[u8] = b"PROXY ";

/// Which version of the protocol a header (or a broken header) used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text line.
    V1,
    /// The binary header.
    V2,
}

impl Version {
    /// The metric label value (`v1`, `v2`).
    pub fn label(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// The original connection as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The original client.
    pub source: SocketAddr,
    /// The address the client connected to (the proxy's front end).
    pub destination: SocketAddr,
}

/// The SSL TLV (`PP2_TYPE_SSL`) and the sub-TLVs kept from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslInfo {
    /// `PP2_CLIENT_*` bits: 0x01 client used TLS, 0x02/0x04 certificate on connection/session.
    pub client: u8,
    /// Zero when the client presented a certificate that was verified.
    pub verify: u32,
    /// `PP2_SUBTYPE_SSL_VERSION`, e.g. `TLSv1.3`.
    pub version: Option<String>,
    /// `PP2_SUBTYPE_SSL_CN`: the client certificate's common name.
    pub cn: Option<String>,
    /// `PP2_SUBTYPE_SSL_CIPHER`.
    pub cipher: Option<String>,
    /// `PP2_SUBTYPE_SSL_SIG_ALG`.
    pub sig_alg: Option<String>,
    /// `PP2_SUBTYPE_SSL_KEY_ALG`.
    pub key_alg: Option<String>,
    /// `PP2_SUBTYPE_SSL_GROUP`.
    pub group: Option<String>,
    /// `PP2_SUBTYPE_SSL_SIG_SCHEME`.
    pub sig_scheme: Option<String>,
}

/// The v2 TLVs the service keeps; unknown types are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tlvs {
    /// `PP2_TYPE_ALPN` (0x01).
    pub alpn: Option<Vec<u8>>,
    /// `PP2_TYPE_AUTHORITY` (0x02): the host name the client asked for (SNI).
    pub authority: Option<String>,
    /// A `PP2_TYPE_CRC32C` (0x03) was present and matched.
    pub crc32c_checked: bool,
    /// `PP2_TYPE_UNIQUE_ID` (0x05), at most 128 bytes.
    pub unique_id: Option<Vec<u8>>,
    /// `PP2_TYPE_SSL` (0x20) and its sub-TLVs.
    pub ssl: Option<SslInfo>,
    /// `PP2_TYPE_NETNS` (0x30).
    pub netns: Option<String>,
    /// AWS `PP2_TYPE_AWS` (0xEA) subtype `PP2_SUBTYPE_AWS_VPCE_ID` (0x01): the VPC endpoint id.
    pub aws_vpce_id: Option<String>,
}

impl Tlvs {
    /// Nothing was kept.
    pub fn is_empty(&self) -> bool {
        *self == Tlvs::default()
    }
}

/// A complete, valid header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// v1 or v2.
    pub version: Version,
    /// The original connection, when the header carries one for a TCP connection. `None` for a
    /// v2 LOCAL command (health checks), a v1 `UNKNOWN` line, and v2 families the service does
    /// not use (AF_UNSPEC, AF_UNIX, DGRAM): the receiver then uses the real endpoints, as the
    /// specification asks.
    pub addresses: Option<Addresses>,
    /// The v2 TLVs kept (boxed: most headers carry none).
    pub tlvs: Option<Box<Tlvs>>,
}

/// What [`parse`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far are the start of a header. It is at most `upto` bytes long: a caller
    /// should buffer no more than that before asking again.
    Incomplete {
        /// An upper bound on the header's length, known so far.
        upto: usize,
    },
    /// The bytes do not start with either signature: not a PROXY header.
    NotProxy,
    /// A header of `len` bytes; whatever follows it is the client's data.
    Complete {
        /// The header.
        header: Header,
        /// Its length on the wire.
        len: usize,
    },
}

/// Why a header was rejected. Each kind is a log reason; all are counted as `invalid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// v1: no CRLF in the first 107 bytes.
    V1TooLong,
    /// v1: a bare CR or LF, or a line that does not match `PROXY TCP4|TCP6|UNKNOWN ...`.
    V1Malformed,
    /// v1: an address that is not the canonical form of the announced family.
    V1BadAddress,
    /// v1: a port that is not a decimal in 0..=65535 without leading zeroes.
    V1BadPort,
    /// v2: the version nibble is not 2.
    V2BadVersion,
    /// v2: a command other than LOCAL (0) or PROXY (1).
    V2BadCommand,
    /// v2: an address family above AF_UNIX or a protocol above DGRAM.
    V2BadFamily,
    /// v2: the declared length is past the configured cap.
    V2TooLong,
    /// v2: the declared length is shorter than the family's address block.
    V2TruncatedAddress,
    /// v2: a TLV runs past the header, or a known TLV has an impossible length.
    V2BadTlv,
    /// v2: the CRC32C TLV does not match the header.
    V2BadCrc,
}

impl ParseError {
    /// The version the broken header claimed.
    pub fn version(self) -> Version {
        match self {
            ParseError::V1TooLong
            | ParseError::V1Malformed
            | ParseError::V1BadAddress
            | ParseError::V1BadPort => Version::V1,
            _ => Version::V2,
        }
    }

    /// A short fixed name for logs.
    pub fn reason(self) -> &'static str {
        match self {
            ParseError::V1TooLong => "v1 line longer than 107 bytes or without CRLF",
            ParseError::V1Malformed => "v1 line malformed",
            ParseError::V1BadAddress => "v1 address invalid",
            ParseError::V1BadPort => "v1 port invalid",
            ParseError::V2BadVersion => "v2 version not 2",
            ParseError::V2BadCommand => "v2 command unknown",
            ParseError::V2BadFamily => "v2 family or protocol unknown",
            ParseError::V2TooLong => "v2 length past --proxy-header-max-bytes",
            ParseError::V2TruncatedAddress => "v2 address block truncated",
            ParseError::V2BadTlv => "v2 TLV malformed",
            ParseError::V2BadCrc => "v2 CRC32C mismatch",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ParseError {}

/// Parse the start of a connection. `buf` is every byte received so far; `max_len` caps the
/// header length (v2 headers declaring more are rejected without waiting for them).
pub fn parse(buf: &[u8], max_len: usize) -> Result<Parsed, ParseError> {
    if starts_like(buf, &V2_SIGNATURE) {
        if buf.len() < V2_FIXED_LEN {
            return Ok(Parsed::Incomplete { upto: V2_FIXED_LEN });
        }
        return parse_v2(buf, max_len);
    }
    if starts_like(buf, V1_PREFIX) {
        return parse_v1(buf);
    }
    Ok(Parsed::NotProxy)
}

/// Do `buf`'s bytes agree with `signature` as far as both go?
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    // The first CR or LF must be the CRLF that ends the line.
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ParseError::V1TooLong);
        }
        return Ok(Parsed::Incomplete { upto: V1_MAX_LEN });
    };
    if window[end] != b'\r' {
        return Err(ParseError::V1Malformed);
    }
    match window.get(end + 1) {
        Some(b'\n') => {}
        Some(_) => return Err(ParseError::V1Malformed),
        None if end + 1 >= V1_MAX_LEN => return Err(ParseError::V1TooLong),
        None => return Ok(Parsed::Incomplete { upto: V1_MAX_LEN }),
    }
    let line = &window[V1_PREFIX.len()..end];
    let mut fields = line.split(|&b| b == b' ');
    let addresses = match fields.next() {
        // Anything may follow UNKNOWN before the CRLF; the receiver ignores it.
        Some(b"UNKNOWN") => None,
        Some(b"TCP4") => Some(v1_addresses(&mut fields, false)?),
        Some(b"TCP6") => Some(v1_addresses(&mut fields, true)?),
        _ => return Err(ParseError::V1Malformed),
    };
    Ok(Parsed::Complete {
        header: Header {
            version: Version::V1,
            addresses,
            tlvs: None,
        },
        len: end + 2,
    })
}

fn v1_addresses<'a>(
    fields: &mut impl Iterator<Item = &'a [u8]>,
    v6: bool,
) -> Result<Addresses, ParseError> {
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ParseError::V1Malformed);
    };
    let ip = |text: &[u8]| -> Result<IpAddr, ParseError> {
        if v6 {
            if let Some(addr) = hex_ipv6(text) {
                return Ok(IpAddr::V6(addr));
            }
        }
        let text = std::str::from_utf8(text).map_err(|_| ParseError::V1BadAddress)?;
        if v6 {
            text.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            // std rejects leading zeroes in IPv4 octets, as the specification asks.
            text.parse::<Ipv4Addr>().map(IpAddr::V4)
        }
        .map_err(|_| ParseError::V1BadAddress)
    };
    Ok(Addresses {
        source: SocketAddr::new(ip(src)?, v1_port(sport)?),
        destination: SocketAddr::new(ip(dst)?, v1_port(dport)?),
    })
}

/// The common IPv6 text forms, hex groups with at most one `::`, parsed in one pass (std's
/// general parser is most of a v1 TCP6 header's cost). `None` for anything else (an embedded
/// IPv4 part, a malformed address): the caller then asks std, which decides.
pub(crate) fn hex_ipv6(text: &[u8]) -> Option<Ipv6Addr> {
    let mut head = [0u16; 8];
    let mut tail = [0u16; 8];
    let (mut heads, mut tails, mut gap) = (0usize, 0usize, false);
    let mut rest = text;
    if let Some(after) = rest.strip_prefix(b"::") {
        gap = true;
        rest = after;
    }
    while !rest.is_empty() {
        let digits = rest
            .iter()
            .take(5)
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if digits == 0 || digits > 4 {
            return None;
        }
        let group = rest[..digits].iter().fold(0u16, |acc, &b| {
            acc << 4 | (b as char).to_digit(16).unwrap_or(0) as u16
        });
        if gap {
            *tail.get_mut(tails)? = group;
            tails += 1;
        } else {
            *head.get_mut(heads)? = group;
            heads += 1;
        }
        rest = &rest[digits..];
        match rest {
            [] => break,
            [b':', b':', after @ ..] if !gap => {
                gap = true;
                rest = after;
            }
            [b':', after @ ..] if !after.is_empty() => rest = after,
            _ => return None,
        }
    }
    match (gap, heads + tails) {
        (false, 8) => {}
        (true, n) if n <= 7 => {}
        _ => return None,
    }
    let mut groups = [0u16; 8];
    groups[..heads].copy_from_slice(&head[..heads]);
    groups[8 - tails..].copy_from_slice(&tail[..tails]);
    Some(Ipv6Addr::from(groups))
}

/// A decimal port without leading zeroes.
fn v1_port(text: &[u8]) -> Result<u16, ParseError> {
    if text.is_empty() || text.len() > 5 || (text.len() > 1 && text[0] == b'0') {
        return Err(ParseError::V1BadPort);
    }
    let mut port: u32 = 0;
    for &b in text {
        if !b.is_ascii_digit() {
            return Err(ParseError::V1BadPort);
        }
        port = port * 10 + u32::from(b - b'0');
    }
    u16::try_from(port).map_err(|_| ParseError::V1BadPort)
}

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 1;
const AF_INET6: u8 = 2;
const AF_UNIX: u8 = 3;
const STREAM: u8 = 1;
const DGRAM: u8 = 2;

fn parse_v2(buf: &[u8], max_len: usize) -> Result<Parsed, ParseError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::V2BadVersion);
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ParseError::V2BadCommand),
    };
    let family = buf[13] >> 4;
    let transport = buf[13] & 0x0f;
    if family > AF_UNIX || transport > DGRAM {
        return Err(ParseError::V2BadFamily);
    }
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > max_len {
        return Err(ParseError::V2TooLong);
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete { upto: len });
    }
    let header = &buf[..len];
    let body = &header[V2_FIXED_LEN..];
    // The address block's length follows from the family; UNSPEC (either nibble) carries none
    // that can be located, so everything after the fixed part is read as TLVs.
    let address_len = match (family, transport) {
        (AF_UNSPEC, _) | (_, 0) => 0,
        (AF_INET, _) => 12,
        (AF_INET6, _) => 36,
        _ => 216,
    };
    if body.len() < address_len {
        return Err(ParseError::V2TruncatedAddress);
    }
    let addresses = if local || transport != STREAM {
        None
    } else {
        match family {
            AF_INET => {
                let ip = |at: usize| {
                    Ipv4Addr::from(<[u8; 4]>::try_from(&body[at..at + 4]).unwrap_or_default())
                };
                Some(Addresses {
                    source: SocketAddr::new(ip(0).into(), be16(body, 8)),
                    destination: SocketAddr::new(ip(4).into(), be16(body, 10)),
                })
            }
            AF_INET6 => {
                let ip = |at: usize| {
                    Ipv6Addr::from(<[u8; 16]>::try_from(&body[at..at + 16]).unwrap_or_default())
                };
                Some(Addresses {
                    source: SocketAddr::new(ip(0).into(), be16(body, 32)),
                    destination: SocketAddr::new(ip(16).into(), be16(body, 34)),
                })
            }
            _ => None,
        }
    };
    let tlvs = parse_tlvs(header, V2_FIXED_LEN + address_len)?;
    Ok(Parsed::Complete {
        header: Header {
            version: Version::V2,
            addresses,
            tlvs,
        },
        len,
    })
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_CRC32C: u8 = 0x03;
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_TYPE_NETNS: u8 = 0x30;
const PP2_TYPE_AWS: u8 = 0xEA;
const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;
/// The longest `PP2_TYPE_UNIQUE_ID` the specification allows.
const UNIQUE_ID_MAX: usize = 128;

/// One TLV: its type, value and the value's offset in the slice it was split from.
struct Tlv<'a> {
    kind: u8,
    value: &'a [u8],
    offset: usize,
}

/// Split `bytes` (from `start` on) into TLVs; an error if one runs past the end.
fn tlv_iter(bytes: &[u8], start: usize) -> impl Iterator<Item = Result<Tlv<'_>, ParseError>> {
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        if bytes.len() - at < 3 {
            at = bytes.len();
            return Some(Err(ParseError::V2BadTlv));
        }
        let len = usize::from(be16(bytes, at + 1));
        let offset = at + 3;
        if bytes.len() - offset < len {
            at = bytes.len();
            return Some(Err(ParseError::V2BadTlv));
        }
        let tlv = Tlv {
            kind: bytes[at],
            value: &bytes[offset..offset + len],
            offset,
        };
        at = offset + len;
        Some(Ok(tlv))
    })
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

/// Parse the TLVs of a complete v2 `header` starting at `start`, checking the CRC32C if present.
fn parse_tlvs(header: &[u8], start: usize) -> Result<Option<Box<Tlvs>>, ParseError> {
    if start >= header.len() {
        return Ok(None);
    }
    let mut tlvs = Tlvs::default();
    let mut crc_at = None;
    for tlv in tlv_iter(header, start) {
        let Tlv {
            kind,
            value,
            offset,
        } = tlv?;
        match kind {
            PP2_TYPE_ALPN => tlvs.alpn = Some(value.to_vec()),
            PP2_TYPE_AUTHORITY => tlvs.authority = Some(text(value)),
            PP2_TYPE_CRC32C => {
                if value.len() != 4 || crc_at.is_some() {
                    return Err(ParseError::V2BadTlv);
                }
                crc_at = Some(offset);
            }
            PP2_TYPE_UNIQUE_ID => {
                if value.len() > UNIQUE_ID_MAX {
                    return Err(ParseError::V2BadTlv);
                }
                tlvs.unique_id = Some(value.to_vec());
            }
            PP2_TYPE_SSL => tlvs.ssl = Some(parse_ssl(value)?),
            PP2_TYPE_NETNS => tlvs.netns = Some(text(value)),
            PP2_TYPE_AWS if value.first() == Some(&PP2_SUBTYPE_AWS_VPCE_ID) => {
                tlvs.aws_vpce_id = Some(text(&value[1..]));
            }
            // NOOP, custom, experimental and future types are skipped.
            _ => {}
        }
    }
    if let Some(at) = crc_at {
        let expected =
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let mut crc = crc32c::update(crc32c::start(), &header[..at]);
        crc = crc32c::update(crc, &[0; 4]);
        crc = crc32c::update(crc, &header[at + 4..]);
        if crc32c::finish(crc) != expected {
            return Err(ParseError::V2BadCrc);
        }
        tlvs.crc32c_checked = true;
    }
    Ok((!tlvs.is_empty()).then(|| Box::new(tlvs)))
}

/// The value of a `PP2_TYPE_SSL` TLV: client bits, verify result, sub-TLVs.
fn parse_ssl(value: &[u8]) -> Result<SslInfo, ParseError> {
    if value.len() < 5 {
        return Err(ParseError::V2BadTlv);
    }
    let mut ssl = SslInfo {
        client: value[0],
        verify: u32::from_be_bytes([value[1], value[2], value[3], value[4]]),
        ..SslInfo::default()
    };
    for tlv in tlv_iter(value, 5) {
        let tlv = tlv?;
        let slot = match tlv.kind {
            0x21 => &mut ssl.version,
            0x22 => &mut ssl.cn,
            0x23 => &mut ssl.cipher,
            0x24 => &mut ssl.sig_alg,
            0x25 => &mut ssl.key_alg,
            0x26 => &mut ssl.group,
            0x27 => &mut ssl.sig_scheme,
            // The raw client certificate (0x28) and unknown sub-types are not kept.
            _ => continue,
        };
        *slot = Some(text(tlv.value));
    }
    Ok(ssl)
}
