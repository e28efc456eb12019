//! The two things the service reads from a certificate: its validity period (for the expiry
//! gauge and the startup warning) and its subject (for `tls.client.subject`).
//!
//! rustls verifies certificates but does not expose their fields, and a full X.509 crate would
//! add a parser stack for two fields; this reads just enough DER to reach them and returns
//! `None` for anything it does not understand.

/// A certificate's validity period, as Unix timestamps (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// `notBefore`.
    pub not_before: i64,
    /// `notAfter`.
    pub not_after: i64,
}

/// One DER element: its tag and its contents; the rest of the input after it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;

/// The fields of `TBSCertificate` up to and including the subject:
/// (issuer, validity, subject) contents.
fn tbs_fields(cert_der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (tag, cert, _) = element(cert_der)?;
    (tag == SEQUENCE).then_some(())?;
    let (tag, tbs, _) = element(cert)?;
    (tag == SEQUENCE).then_some(())?;
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == 0xa0 {
        rest = after; // [0] EXPLICIT version
    }
    let (_, _, rest) = element(rest)?; // serialNumber
    let (_, _, rest) = element(rest)?; // signature algorithm
    let (_, _, rest) = element(rest)?; // issuer
    let (tag, validity, rest) = element(rest)?;
    (tag == SEQUENCE).then_some(())?;
    let (tag, subject, _) = element(rest)?;
    (tag == SEQUENCE).then_some(())?;
    Some((validity, subject))
}

/// The validity period of a DER certificate.
pub fn validity(cert_der: &[u8]) -> Option<Validity> {
    let (validity, _) = tbs_fields(cert_der)?;
    let (tag, not_before, rest) = element(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = element(rest)?;
    let not_after = time(tag, not_after)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as a Unix timestamp.
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The subject of a DER certificate as an RFC 4514 string (`CN=client,O=Example`), most
/// specific attribute first.
pub fn subject(cert_der: &[u8]) -> Option<String> {
    let (_, mut name) = tbs_fields(cert_der)?;
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (tag, set, rest) = element(name)?;
        (tag == SET).then_some(())?;
        name = rest;
        let mut set = set;
        while !set.is_empty() {
            let (tag, attribute, rest) = element(set)?;
            (tag == SEQUENCE).then_some(())?;
            set = rest;
            let (tag, oid, rest) = element(attribute)?;
            (tag == 0x06).then_some(())?;
            let (_, value, _) = element(rest)?;
            let key = match oid {
                [0x55, 0x04, 0x03] => "CN".to_owned(),
                [0x55, 0x04, 0x06] => "C".to_owned(),
                [0x55, 0x04, 0x07] => "L".to_owned(),
                [0x55, 0x04, 0x08] => "ST".to_owned(),
                [0x55, 0x04, 0x0a] => "O".to_owned(),
                [0x55, 0x04, 0x0b] => "OU".to_owned(),
                other => other.iter().map(|b| format!("{b:02x}")).collect(),
            };
            parts.push(format!("{key}={}", String::from_utf8_lossy(value)));
        }
    }
    parts.reverse();
    Some(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_to_unix_time() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(time(0x17, b"000101000000Z"), Some(946_684_800));
        assert_eq!(time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(time(0x17, b"991231235959Z"), Some(946_684_799));
        assert_eq!(time(0x17, b"991331235959Z"), None);
        assert_eq!(time(0x18, b"2038011903140Z"), None);
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x02, 0x30, 0x05],
        ] {
            assert_eq!(validity(input), None);
            assert_eq!(subject(input), None);
        }
    }
}
