//! Shared helpers for the black-box tests: start the real binary on free loopback ports, talk
//! to its echo and admin ports, read its metrics.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the service binary cargo built for these tests.
pub const SERVICE_BIN: &str = env!("CARGO_BIN_EXE_echo-service");

/// The service's command line as the tests run it: JSON logs, loopback port 0 for both ports
/// unless `args` sets them, no inherited `OTEL_*`/`ECHO_*` variables, only `env`; behind
/// `wrapper` (e.g. `["prlimit", "--nofile=64:64"]`) when it is not empty.
pub fn service_command(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = match wrapper.split_first() {
        Some((program, wrapper_args)) => {
            let mut command = Command::new(program);
            command.args(wrapper_args).arg(SERVICE_BIN);
            command
        }
        None => Command::new(SERVICE_BIN),
    };
    for (flag, default) in [
        ("--listen", "127.0.0.1:0"),
        ("--admin-listen", "127.0.0.1:0"),
        ("--log-format", "json"),
    ] {
        if !args.contains(&flag) {
            command.args([flag, default]);
        }
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (key, _) in std::env::vars() {
        if key.starts_with("OTEL_") || key.starts_with("ECHO_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command
}

/// A running `echo-service` process, killed on drop if still running.
pub struct Service {
    child: Child,
    /// The echo port's actual address.
    pub echo: SocketAddr,
    /// The admin port's actual address.
    pub admin: SocketAddr,
    /// Every stdout line so far (JSON log lines).
    #[allow(dead_code)]
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Start with defaults plus `args`, both ports on `127.0.0.1:0`, JSON logs.
    pub fn start(args: &[&str]) -> Service {
        Self::start_with_env(args, &[])
    }

    /// Start with extra environment variables. `OTEL_*` variables of the test's own environment
    /// are removed so only what the test sets applies.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Service {
        Self::spawn(service_command(&[], args, env))
    }

    /// Start a prepared command (used to wrap the binary, e.g. with `prlimit`).
    pub fn spawn(mut command: Command) -> Service {
        let mut child = command.spawn().expect("start echo-service");
        let stdout = child.stdout.take().expect("piped stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let serving = line.contains("echo-service serving").then(|| line.clone());
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                if let Some(line) = serving {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("echo-service did not report that it is serving within 20 s");
        let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        let field = |name: &str| -> SocketAddr {
            json["fields"][name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {line}"))
                .parse()
                .unwrap()
        };
        Service {
            echo: field("listen"),
            admin: field("admin"),
            child,
            logs,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal (by name, e.g. "TERM") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Wait up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait up to `limit` for the exit; returns the status and how long the exit
    /// took after the signal. Panics if the process is still running after `limit`.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let signalled = Instant::now();
        self.signal("TERM");
        let status = self
            .wait_exit(limit)
            .unwrap_or_else(|| panic!("echo-service did not exit within {limit:?} of SIGTERM"));
        (status, signalled.elapsed())
    }

    /// Resident set size of the process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status");
        kib * 1024
    }

    /// A connection to the echo port.
    pub fn connect(&self) -> TcpStream {
        connect(self.echo)
    }

    /// GET `path` on the admin port: (status, headers, body).
    pub fn admin_get(&self, path: &str) -> HttpResponse {
        http_request(self.admin, "GET", path)
    }

    /// The current metric samples, keyed by `name{labels}` as printed.
    pub fn metrics(&self) -> Metrics {
        let response = self.admin_get("/metrics");
        assert_eq!(response.status, 200);
        Metrics::parse(&response.body)
    }

    /// Poll the metrics until `check` passes or 10 s pass (connection ends are counted
    /// asynchronously by the server).
    pub fn wait_metrics(&self, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = self.metrics();
            if check(&metrics) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {metrics:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connect with a timeout, Nagle off.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    /// Body as text.
    pub body: String,
}

/// One request with `Connection: close`; reads the response to EOF.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let mut stream = connect(addr);
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

/// Parse a raw HTTP/1.1 response (no chunked bodies: the admin server sends lengths).
pub fn parse_response(raw: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Metric samples from a text exposition.
#[derive(Debug, Default)]
pub struct Metrics(pub HashMap<String, f64>);

impl Metrics {
    /// Parse the text format: `name{labels} value` lines.
    pub fn parse(text: &str) -> Metrics {
        Metrics(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(|l| {
                    let (key, value) = l.rsplit_once(' ')?;
                    Some((key.to_owned(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The sample `key` (e.g. `echo_connections_lost_total{reason="reset"}`), 0 if absent.
    /// A key that names fewer labels than the samples carry sums every sample whose labels
    /// include the named ones: `echo_connections_active` is the total over every `listener`.
    pub fn get(&self, key: &str) -> f64 {
        if let Some(value) = self.0.get(key) {
            return *value;
        }
        let (name, wanted) = split_labels(key);
        self.0
            .iter()
            .filter(|(k, _)| {
                let (n, labels) = split_labels(k);
                n == name && wanted.iter().all(|w| labels.contains(w))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// `name{a="1",b="2"}` -> (`name`, [`a="1"`, `b="2"`]).
fn split_labels(key: &str) -> (&str, Vec<&str>) {
    match key.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (key, Vec::new()),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Write `data` in `piece`-sized writes on a thread while reading the echo back on this one;
/// returns what came back before EOF (the writer shuts down its side when done).
pub fn echo_round_trip(stream: TcpStream, data: &[u8], piece: usize) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let owned = data.to_vec();
    let handle = std::thread::spawn(move || {
        for chunk in owned.chunks(piece.max(1)) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    let mut reader = stream;
    reader.read_to_end(&mut back).expect("read echo");
    handle.join().unwrap();
    back
}

/// Fail with install instructions when a required tool is missing (tests never skip).
pub fn require_tool(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    match found {
        Some(path) => path.to_string_lossy().into_owned(),
        None => panic!(
            "`{name}` is required by this test and is not on PATH. Install it with \
             `apt-get install -y --no-install-recommends prometheus` (or run `make test`, whose \
             .ci/run installs it)"
        ),
    }
}
