//! One way to write a fault, everywhere: `KIND[,key=value...]` on the command line and in
//! `ECHO_FAULTS` (keys in kebab-case), the same fields as JSON on the admin port (snake_case),
//! with the service's usual units (`50ms`, `10KiB`). Parsing and validation live here so the
//! flag, the variable and `PUT /faults` accept exactly the same faults and name the same
//! fault and key when they refuse one.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::{parse_duration, parse_size};
use crate::proxy_protocol::Cidr;

/// What a fault does to a connection it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Hold the connection `delay` before the first read.
    AcceptDelay,
    /// Echo every chunk `delay` +- `jitter` late, in order.
    Latency,
    /// Echo at most `bytes_per_second`.
    Bandwidth,
    /// Close cleanly (FIN) after `after_bytes` echoed or `after` a duration.
    Close,
    /// Reset (RST) at accept, or after `after_bytes` echoed or `after` a duration.
    Reset,
    /// Never read, never write.
    Blackhole,
    /// Close at once.
    Refuse,
}

impl FaultKind {
    /// Every kind, in [`FaultKind::index`] order.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::AcceptDelay,
        FaultKind::Latency,
        FaultKind::Bandwidth,
        FaultKind::Close,
        FaultKind::Reset,
        FaultKind::Blackhole,
        FaultKind::Refuse,
    ];

    /// The `fault` label values (metrics, `echo.fault`, JSON `kind`), in index order.
    pub const LABELS: [&'static str; 7] = [
        "accept_delay",
        "latency",
        "bandwidth",
        "close",
        "reset",
        "blackhole",
        "refuse",
    ];

    /// Position in [`FaultKind::ALL`] and [`FaultKind::LABELS`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The snake_case label (`accept_delay`).
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// The kebab-case name used in `--fault` (`accept-delay`).
    pub fn spec_name(self) -> &'static str {
        match self {
            FaultKind::AcceptDelay => "accept-delay",
            other => other.label(),
        }
    }

    fn from_name(name: &str) -> Option<FaultKind> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.label() == name || kind.spec_name() == name)
    }

    /// The keys this kind takes besides `probability` and `peers` (snake_case).
    fn keys(self) -> &'static [&'static str] {
        match self {
            FaultKind::AcceptDelay => &["delay"],
            FaultKind::Latency => &["delay", "jitter"],
            FaultKind::Bandwidth => &["bytes_per_second"],
            FaultKind::Close | FaultKind::Reset => &["after_bytes", "after"],
            FaultKind::Blackhole | FaultKind::Refuse => &[],
        }
    }
}

/// One configured fault.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// What it does.
    pub kind: FaultKind,
    /// Chance, in [0, 1], that a new connection gets it (default 1).
    pub probability: f64,
    /// Only clients in these networks get it (empty: every client).
    pub peers: Vec<Cidr>,
    /// `accept_delay` and `latency`: how long.
    pub delay: Duration,
    /// `latency`: each chunk's delay varies by up to this much either way.
    pub jitter: Duration,
    /// `close` / `reset`: after this many bytes echoed.
    pub after_bytes: Option<u64>,
    /// `close` / `reset`: after this long.
    pub after: Option<Duration>,
    /// `bandwidth`: the echo rate cap.
    pub bytes_per_second: u64,
}

/// A refused fault: which fault (its kind, or its position when the kind is unknown), which
/// key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultError {
    /// The fault's kind as written, or `#N` (1-based) when it has none.
    pub fault: String,
    /// The key at fault (`None`: the fault as a whole).
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "fault '{}', key '{}': {}", self.fault, key, self.message),
            None => write!(f, "fault '{}': {}", self.fault, self.message),
        }
    }
}

impl std::error::Error for FaultError {}

/// A value as written: text from a spec, or JSON.
enum Raw<'a> {
    Text(&'a str),
    Json(&'a serde_json::Value),
}

impl Raw<'_> {
    /// The value as text for the shared parsers (JSON numbers are written out; a JSON list of
    /// networks is joined with `|`).
    fn text(&self) -> Result<String, String> {
        match self {
            Raw::Text(text) => Ok((*text).to_owned()),
            Raw::Json(serde_json::Value::String(text)) => Ok(text.clone()),
            Raw::Json(serde_json::Value::Number(n)) => Ok(n.to_string()),
            Raw::Json(serde_json::Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| "expected a list of strings".to_owned())
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|items| items.join("|")),
            Raw::Json(_) => Err("expected a string or a number".to_owned()),
        }
    }
}

impl FaultSpec {
    fn new(kind: FaultKind) -> Self {
        FaultSpec {
            kind,
            probability: 1.0,
            peers: Vec::new(),
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            after_bytes: None,
            after: None,
            bytes_per_second: 0,
        }
    }

    /// Parse `KIND[,key=value...]` (`latency,delay=50ms,jitter=10ms`).
    pub fn parse(text: &str) -> Result<FaultSpec, FaultError> {
        let mut parts = text.split(',').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let mut spec = Self::named(name, text)?;
        let mut given = Vec::new();
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(|| FaultError {
                fault: name.to_owned(),
                key: Some(part.to_owned()),
                message: "expected key=value".to_owned(),
            })?;
            let key = key.trim();
            if key.contains('_') {
                return Err(spec.error(key, "keys are kebab-case on the command line"));
            }
            let snake = key.replace('-', "_");
            spec.set(&snake, key, Raw::Text(value.trim()), &mut given)?;
        }
        spec.validate(&given, false)
    }

    /// The same fault from a JSON object (`{"kind": "latency", "delay": "50ms"}`).
    pub fn from_json(value: &serde_json::Value, position: usize) -> Result<Self, FaultError> {
        let at = || format!("#{}", position + 1);
        let object = value.as_object().ok_or_else(|| FaultError {
            fault: at(),
            key: None,
            message: "expected an object".to_owned(),
        })?;
        let name = object
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| FaultError {
                fault: at(),
                key: Some("kind".to_owned()),
                message: format!("missing or not a string; one of {}", kinds()),
            })?;
        let mut spec = Self::named(name, name)?;
        let mut given = Vec::new();
        for (key, value) in object {
            if key != "kind" {
                spec.set(key, key, Raw::Json(value), &mut given)?;
            }
        }
        spec.validate(&given, true)
    }

    fn named(name: &str, text: &str) -> Result<FaultSpec, FaultError> {
        FaultKind::from_name(name)
            .map(FaultSpec::new)
            .ok_or_else(|| FaultError {
                fault: if name.is_empty() {
                    text.to_owned()
                } else {
                    name.to_owned()
                },
                key: None,
                message: format!("unknown fault kind; one of {}", kinds()),
            })
    }

    fn error(&self, key: &str, message: impl Into<String>) -> FaultError {
        FaultError {
            fault: self.kind.spec_name().to_owned(),
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }

    /// Set `key` (snake_case) from `raw`; `shown` is the key as the user wrote it.
    fn set(
        &mut self,
        key: &str,
        shown: &str,
        raw: Raw<'_>,
        given: &mut Vec<&'static str>,
    ) -> Result<(), FaultError> {
        let known = ["probability", "peers"]
            .iter()
            .chain(self.kind.keys())
            .find(|k| **k == key)
            .copied()
            .ok_or_else(|| {
                let mut keys = vec!["probability", "peers"];
                keys.extend(self.kind.keys());
                self.error(
                    shown,
                    format!("unknown key for this fault; it takes {}", keys.join(", ")),
                )
            })?;
        if given.contains(&known) {
            return Err(self.error(shown, "given twice"));
        }
        given.push(known);
        let text = raw.text().map_err(|e| self.error(shown, e))?;
        let fault = self.kind.spec_name();
        let fail = |e: String| FaultError {
            fault: fault.to_owned(),
            key: Some(shown.to_owned()),
            message: e,
        };
        match known {
            "probability" => {
                let p: f64 = text
                    .parse()
                    .map_err(|_| fail(format!("'{text}' is not a number")))?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(fail(format!("{p} is outside [0, 1]")));
                }
                self.probability = p;
            }
            "peers" => {
                self.peers = text
                    .split('|')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse::<Cidr>())
                    .collect::<Result<_, _>>()
                    .map_err(fail)?;
                if self.peers.is_empty() {
                    return Err(fail("no network given".to_owned()));
                }
            }
            "delay" | "jitter" | "after" => {
                let d = parse_duration(&text).map_err(fail)?;
                match known {
                    "delay" => self.delay = d,
                    "jitter" => self.jitter = d,
                    _ if d.is_zero() => {
                        return Err(fail("must be greater than zero".to_owned()));
                    }
                    _ => self.after = Some(d),
                }
            }
            "after_bytes" => {
                let n: u64 = text
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| fail(format!("'{text}' is not a whole number above 0")))?;
                self.after_bytes = Some(n);
            }
            "bytes_per_second" => {
                self.bytes_per_second = parse_size(&text).map_err(fail)? as u64;
            }
            _ => unreachable!("every known key is handled"),
        }
        Ok(())
    }

    /// Check what the kind requires once every key is set.
    fn validate(self, given: &[&str], json: bool) -> Result<FaultSpec, FaultError> {
        let name = |snake: &'static str| {
            if json {
                snake.to_owned()
            } else {
                snake.replace('_', "-")
            }
        };
        let required: &[&'static str] = match self.kind {
            FaultKind::AcceptDelay | FaultKind::Latency => &["delay"],
            FaultKind::Bandwidth => &["bytes_per_second"],
            _ => &[],
        };
        for key in required {
            if !given.contains(key) {
                return Err(self.error(&name(key), "required"));
            }
        }
        if matches!(self.kind, FaultKind::Close | FaultKind::Reset)
            && self.after.is_some()
            && self.after_bytes.is_some()
        {
            return Err(self.error(
                &name("after"),
                format!(
                    "give either {} or {}, not both",
                    name("after"),
                    name("after_bytes")
                ),
            ));
        }
        if self.kind == FaultKind::Close && self.after.is_none() && self.after_bytes.is_none() {
            return Err(self.error(
                &name("after_bytes"),
                format!(
                    "close needs {} or {} (use refuse to close at accept)",
                    name("after_bytes"),
                    name("after")
                ),
            ));
        }
        Ok(self)
    }

    /// Does this fault consider `client` at all (its `peers` list)?
    pub fn covers(&self, client: IpAddr) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|net| net.contains(client))
    }

    /// The JSON form `GET /faults` returns (and `PUT /faults` accepts).
    pub fn to_json(&self) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        object.insert("kind".into(), self.kind.label().into());
        object.insert("probability".into(), self.probability.into());
        if !self.peers.is_empty() {
            let peers: Vec<serde_json::Value> =
                self.peers.iter().map(|p| p.to_string().into()).collect();
            object.insert("peers".into(), peers.into());
        }
        match self.kind {
            FaultKind::AcceptDelay => {
                object.insert("delay".into(), duration_text(self.delay).into());
            }
            FaultKind::Latency => {
                object.insert("delay".into(), duration_text(self.delay).into());
                object.insert("jitter".into(), duration_text(self.jitter).into());
            }
            FaultKind::Bandwidth => {
                object.insert("bytes_per_second".into(), self.bytes_per_second.into());
            }
            FaultKind::Close | FaultKind::Reset => {
                if let Some(n) = self.after_bytes {
                    object.insert("after_bytes".into(), n.into());
                }
                if let Some(d) = self.after {
                    object.insert("after".into(), duration_text(d).into());
                }
            }
            FaultKind::Blackhole | FaultKind::Refuse => {}
        }
        object.into()
    }
}

/// `--fault` values and `ECHO_FAULTS` (specs separated by `;`).
pub fn parse_specs(text: &str) -> Result<Vec<FaultSpec>, FaultError> {
    text.split(';')
        .filter(|s| !s.trim().is_empty())
        .map(FaultSpec::parse)
        .collect()
}

/// A `PUT /faults` body: a JSON list of faults. Every fault is checked before any is used.
pub fn parse_json(body: &[u8]) -> Result<Vec<FaultSpec>, FaultError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|err| FaultError {
        fault: "body".to_owned(),
        key: None,
        message: format!("not JSON: {err}"),
    })?;
    let list = value.as_array().ok_or_else(|| FaultError {
        fault: "body".to_owned(),
        key: None,
        message: "expected a JSON list of faults".to_owned(),
    })?;
    list.iter()
        .enumerate()
        .map(|(i, item)| FaultSpec::from_json(item, i))
        .collect()
}

/// Every kind name, for error messages.
fn kinds() -> String {
    FaultKind::ALL.map(FaultKind::spec_name).join(", ")
}

/// A duration the way the service writes them (`50ms`, `2s`, `1.5ms`).
pub fn duration_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ms", d.as_secs_f64() * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn every_example_of_the_issue_parses() {
        let latency = FaultSpec::parse("latency,delay=50ms,jitter=10ms").unwrap();
        assert_eq!((latency.delay, latency.jitter), (ms(50), ms(10)));
        let delay = FaultSpec::parse("accept-delay,delay=2s,probability=0.1").unwrap();
        assert_eq!((delay.delay, delay.probability), (ms(2000), 0.1));
        assert_eq!(
            FaultSpec::parse("close,after-bytes=100")
                .unwrap()
                .after_bytes,
            Some(100)
        );
        assert_eq!(
            FaultSpec::parse("close,after=5s").unwrap().after,
            Some(ms(5000))
        );
        let reset = FaultSpec::parse("reset").unwrap();
        assert_eq!((reset.after, reset.after_bytes), (None, None));
        assert_eq!(
            FaultSpec::parse("reset,after-bytes=1024,probability=0.5").unwrap(),
            FaultSpec {
                after_bytes: Some(1024),
                probability: 0.5,
                ..FaultSpec::new(FaultKind::Reset)
            }
        );
        assert_eq!(
            FaultSpec::parse("blackhole,probability=0.05")
                .unwrap()
                .probability,
            0.05
        );
        assert_eq!(FaultSpec::parse("refuse").unwrap().kind, FaultKind::Refuse);
        assert_eq!(
            FaultSpec::parse("bandwidth,bytes-per-second=10KiB")
                .unwrap()
                .bytes_per_second,
            10240
        );
        let peers = FaultSpec::parse("refuse,peers=10.0.0.0/8|2001:db8::/32").unwrap();
        assert!(peers.covers("10.1.2.3".parse().unwrap()));
        assert!(peers.covers("2001:db8::1".parse().unwrap()));
        assert!(!peers.covers("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_specs("refuse; latency,delay=1ms;").unwrap().len(), 2);
    }

    #[test]
    fn errors_name_the_fault_and_the_key() {
        let cases = [
            ("latency", "fault 'latency', key 'delay': required"),
            ("latency,delay=fast", "fault 'latency', key 'delay'"),
            ("reset,probability=1.5", "fault 'reset', key 'probability'"),
            (
                "refuse,delay=1s",
                "fault 'refuse', key 'delay': unknown key",
            ),
            ("close", "fault 'close', key 'after-bytes'"),
            ("close,after=1s,after-bytes=3", "fault 'close', key 'after'"),
            (
                "bandwidth,bytes-per-second=0",
                "fault 'bandwidth', key 'bytes-per-second'",
            ),
            ("refuse,peers=10.0.0.0/99", "fault 'refuse', key 'peers'"),
            ("teleport", "fault 'teleport': unknown fault kind"),
            ("reset,after_bytes=3", "fault 'reset', key 'after_bytes'"),
        ];
        for (spec, expected) in cases {
            let err = FaultSpec::parse(spec).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{spec}: {err}");
        }
    }

    #[test]
    fn json_round_trips_and_names_snake_case_keys() {
        let body = br#"[{"kind": "reset", "after_bytes": 1024, "probability": 0.5},
                        {"kind": "latency", "delay": "50ms"},
                        {"kind": "accept_delay", "delay": "1.5s", "peers": ["10.0.0.0/8"]},
                        {"kind": "bandwidth", "bytes_per_second": "10KiB"}]"#;
        let specs = parse_json(body).unwrap();
        assert_eq!(specs[0].after_bytes, Some(1024));
        assert_eq!(specs[1].delay, ms(50));
        assert_eq!(specs[2].delay, ms(1500));
        assert_eq!(specs[3].bytes_per_second, 10240);
        let back: Vec<_> = specs.iter().map(FaultSpec::to_json).collect();
        let again = parse_json(serde_json::Value::from(back).to_string().as_bytes()).unwrap();
        assert_eq!(again, specs);
        assert_eq!(specs[2].to_json()["delay"], "1500ms");

        let err = parse_json(br#"[{"kind": "latency", "delay": "-1s"}]"#).unwrap_err();
        assert_eq!(
            (err.fault.as_str(), err.key.as_deref()),
            ("latency", Some("delay"))
        );
        let err = parse_json(br#"[{"kind": "close", "after-bytes": 3}]"#).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("after-bytes"));
        let err = parse_json(br#"[{"delay": "1s"}]"#).unwrap_err();
        assert_eq!(
            (err.fault.as_str(), err.key.as_deref()),
            ("#1", Some("kind"))
        );
        assert!(parse_json(b"{")
            .unwrap_err()
            .to_string()
            .contains("not JSON"));
    }

    #[test]
    fn durations_are_written_with_units_that_parse_back() {
        for d in [
            ms(0),
            ms(50),
            ms(1500),
            ms(2000),
            Duration::from_micros(1500),
        ] {
            assert_eq!(parse_duration(&duration_text(d)).unwrap(), d);
        }
    }
}
