//! Connection spans over OTLP, checked with a real receiver (`otlp_receiver`): one span per
//! connection with the semantic-convention attributes over gRPC and HTTP/protobuf, the standard
//! `OTEL_*` variables honoured (service name, resource attributes, sampler, SDK disabled, no
//! endpoint), and a collector that is down or hangs neither slowing echo nor holding shutdown
//! beyond the export timeout.
//!
//! Spans are flushed when the service shuts down, so each test stops the service with SIGTERM
//! and reads what the receiver got once the process has exited.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use crate::otlp_receiver::{Mode, OtlpReceiver, ReceivedSpan};
use crate::support::{echo_round_trip, payload, Service};

/// `--export-timeout` of the collector-down tests.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(1);
/// `--drain-delay` of the collector-down tests.
const DRAIN_DELAY: Duration = Duration::ZERO;
/// Slack on top of drain delay + export timeout for the process to finish exiting.
const EXIT_SLACK: Duration = Duration::from_secs(2);

/// The `OTEL_EXPORTER_OTLP_PROTOCOL` value for a receiver mode.
fn protocol(mode: Mode) -> &'static str {
    match mode {
        Mode::Grpc | Mode::GrpcFailing => "grpc",
        Mode::Http | Mode::HttpFailing | Mode::BlackHole => "http/protobuf",
    }
}

/// One finished, verified echo connection.
#[derive(Debug, Clone, Copy)]
struct Echoed {
    /// The client's local port (the service's `network.peer.port`).
    client_port: u16,
    /// Bytes sent, and verified to come back.
    bytes: usize,
}

/// One connection per size, each sending that many bytes and verifying the echo; the client
/// closes cleanly (FIN) after the last byte came back.
fn echo_connections(service: &Service, sizes: &[usize]) -> Vec<Echoed> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &bytes)| {
            let stream = service.connect();
            let client_port = stream.local_addr().unwrap().port();
            let data = payload(bytes, 100 + i as u64);
            let back = echo_round_trip(stream, &data, 1000);
            assert!(
                back == data,
                "connection {i}: echo of {bytes} bytes differs"
            );
            Echoed { client_port, bytes }
        })
        .collect()
}

/// Wait until the service counted `count` connections lost for `reason` (so their spans are
/// closed before the test stops the service).
fn wait_lost(service: &Service, reason: &str, count: usize) {
    let key = format!("echo_connections_lost_total{{reason=\"{reason}\"}}");
    service.wait_metrics(&format!("{count} connections lost ({reason})"), |m| {
        m.get(&key) == count as f64
    });
}

/// SIGTERM, wait for a successful exit, return how long the exit took after the signal.
pub(crate) fn stop(service: &mut Service) -> Duration {
    let (status, took) = service.terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "echo-service exited with {status} after SIGTERM; logs:\n{}",
        logs(service)
    );
    took
}

/// A copy of the log lines so far (the lock is not held while a test asserts).
fn log_lines(service: &Service) -> Vec<String> {
    service.logs.lock().unwrap().clone()
}

fn logs(service: &Service) -> String {
    log_lines(service).join("\n")
}

/// The `otlp` field of the "echo-service serving" log line. `Service::start*` returns as soon
/// as its reader thread saw that line, possibly just before the line is stored: poll briefly.
fn serving_otlp_flag(service: &Service) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(line) = log_lines(service)
            .into_iter()
            .find(|l| l.contains("echo-service serving"))
        {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no \"echo-service serving\" log line stored"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    json["fields"]["otlp"]
        .as_bool()
        .unwrap_or_else(|| panic!("no boolean fields.otlp in {line}"))
}

/// Did the service log that it exports spans? (Logged before the serving line.)
fn logged_export_on(service: &Service) -> bool {
    log_lines(service)
        .iter()
        .any(|l| l.contains("exporting connection spans over OTLP"))
}

pub(crate) fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

pub(crate) fn describe(attrs: &[KeyValue]) -> String {
    attrs
        .iter()
        .map(|kv| {
            format!(
                "{}={:?}",
                kv.key,
                kv.value.as_ref().and_then(|v| v.value.as_ref())
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn str_attr(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!(
            "attribute {key}: expected a string, got {other:?}; all: {}",
            describe(attrs)
        ),
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!(
            "attribute {key}: expected an int, got {other:?}; all: {}",
            describe(attrs)
        ),
    }
}

fn double_attr(attrs: &[KeyValue], key: &str) -> f64 {
    match attr(attrs, key) {
        Some(Value::DoubleValue(d)) => *d,
        other => panic!(
            "attribute {key}: expected a double, got {other:?}; all: {}",
            describe(attrs)
        ),
    }
}

/// The span whose `network.peer.port` is `port`, matched leniently (int or string) so that a
/// wrongly typed port is reported by the type assertion rather than as "no span".
pub(crate) fn span_for_port(spans: &[ReceivedSpan], port: u16) -> &ReceivedSpan {
    let matches: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| match attr(&s.span.attributes, "network.peer.port") {
            Some(Value::IntValue(i)) => *i == i64::from(port),
            Some(Value::StringValue(v)) => v == &port.to_string(),
            _ => false,
        })
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "expected exactly one span with network.peer.port={port}; spans: {:#?}",
        spans
            .iter()
            .map(|s| describe(&s.span.attributes))
            .collect::<Vec<_>>()
    );
    matches[0]
}

fn event_names(span: &ReceivedSpan) -> Vec<String> {
    let mut events = span.span.events.clone();
    events.sort_by_key(|e| e.time_unix_nano);
    events.into_iter().map(|e| e.name).collect()
}

fn status_code(span: &ReceivedSpan) -> StatusCode {
    span.span
        .status
        .as_ref()
        .map(|s| StatusCode::try_from(s.code).expect("a known status code"))
        .unwrap_or(StatusCode::Unset)
}

/// The service exports one span per connection to `mode`'s receiver, with every attribute,
/// event, resource attribute and status the issue specifies.
fn one_span_per_connection(mode: Mode) {
    let receiver = OtlpReceiver::start(mode);
    let service_name = format!("echo-it-{}", protocol(mode).replace('/', "-"));
    let mut service = Service::start_with_env(
        &["--export-timeout", "3s"],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol(mode)),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
            ("OTEL_SERVICE_NAME", &service_name),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=it,test.case=one-span-per-connection",
            ),
        ],
    );
    assert!(serving_otlp_flag(&service), "otlp should be on");
    let started = Instant::now();
    // Different sizes so each span's byte counts identify it; the largest spans many reads.
    let sizes = [1, 3000, 70_001];
    let echoed = echo_connections(&service, &sizes);
    wait_lost(&service, "peer_closed", sizes.len());
    stop(&mut service);
    let wall = started.elapsed().as_secs_f64();

    let spans = receiver.spans();
    assert_eq!(
        spans.len(),
        sizes.len(),
        "expected one span per connection; got {:#?}",
        spans
            .iter()
            .map(|s| (&s.span.name, describe(&s.span.attributes)))
            .collect::<Vec<_>>()
    );
    assert!(receiver.connections() >= 1);
    assert!(receiver.export_requests() >= 1);
    if mode == Mode::Http {
        for request in receiver.http_requests() {
            assert_eq!(
                (
                    request.method.as_str(),
                    request.path.as_str(),
                    request.content_type.as_deref(),
                    request.status
                ),
                ("POST", "/v1/traces", Some("application/x-protobuf"), 200),
                "unexpected OTLP/HTTP request {request:?}"
            );
        }
    }

    let mut ids = Vec::new();
    for e in &echoed {
        let span = span_for_port(&spans, e.client_port);
        let a = &span.span.attributes;
        assert_eq!(span.span.name, "echo.connection");
        assert_eq!(span.scope, "echo-service", "instrumentation scope");
        assert_eq!(
            SpanKind::try_from(span.span.kind),
            Ok(SpanKind::Server),
            "span kind"
        );
        assert_eq!(str_attr(a, "network.transport"), "tcp");
        assert_eq!(str_attr(a, "network.type"), "ipv4");
        assert_eq!(str_attr(a, "network.peer.address"), "127.0.0.1");
        assert_eq!(
            int_attr(a, "network.peer.port"),
            i64::from(e.client_port),
            "network.peer.port"
        );
        assert_eq!(str_attr(a, "server.address"), "127.0.0.1");
        assert_eq!(
            int_attr(a, "server.port"),
            i64::from(service.echo.port()),
            "server.port"
        );
        ids.push(int_attr(a, "connection.id"));
        assert_eq!(int_attr(a, "echo.received_bytes"), e.bytes as i64);
        assert_eq!(int_attr(a, "echo.sent_bytes"), e.bytes as i64);
        assert_eq!(str_attr(a, "echo.loss_reason"), "peer_closed");
        let duration = double_attr(a, "echo.duration_seconds");
        assert!(
            (0.0..=wall).contains(&duration),
            "echo.duration_seconds {duration} outside 0..={wall}"
        );
        assert_ne!(
            status_code(span),
            StatusCode::Error,
            "clean close is no error"
        );
        // Made and lost, and no event per chunk read (the big payload took many reads).
        assert_eq!(
            event_names(span),
            ["connection made", "connection lost"],
            "span events"
        );
        assert!(span.span.start_time_unix_nano > 0);
        assert!(span.span.end_time_unix_nano >= span.span.start_time_unix_nano);
        assert_eq!(span.span.trace_id.len(), 16);
        assert_eq!(span.span.span_id.len(), 8);

        let r = &span.resource;
        assert_eq!(str_attr(r, "service.name"), service_name);
        assert_eq!(str_attr(r, "deployment.environment.name"), "it");
        assert_eq!(str_attr(r, "test.case"), "one-span-per-connection");
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        sizes.len(),
        "connection.id must differ per connection"
    );
}

#[test]
fn grpc_export_has_one_span_per_connection_with_attributes() {
    one_span_per_connection(Mode::Grpc);
}

#[test]
fn http_protobuf_export_has_one_span_per_connection_with_attributes() {
    one_span_per_connection(Mode::Http);
}

#[test]
fn reset_by_peer_gives_loss_reason_reset_and_error_status() {
    let receiver = OtlpReceiver::grpc();
    let mut service = Service::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
        ],
    );
    let mut stream = service.connect();
    let client_port = stream.local_addr().unwrap().port();
    let data = payload(2048, 7);
    stream.write_all(&data).unwrap();
    let mut back = vec![0; data.len()];
    stream.read_exact(&mut back).unwrap();
    assert!(back == data, "echo differs");
    // Linger 0: close sends RST instead of FIN.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    wait_lost(&service, "reset", 1);
    stop(&mut service);

    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "one span expected: {spans:#?}");
    let span = span_for_port(&spans, client_port);
    let a = &span.span.attributes;
    assert_eq!(str_attr(a, "echo.loss_reason"), "reset");
    assert_eq!(status_code(span), StatusCode::Error, "reset is an error");
    assert_eq!(int_attr(a, "echo.received_bytes"), 2048);
    assert_eq!(int_attr(a, "echo.sent_bytes"), 2048);
    assert_eq!(
        event_names(span),
        ["connection made", "connection lost"],
        "span events"
    );
    // service.name defaults to the service's own name when OTEL_SERVICE_NAME is unset.
    assert_eq!(str_attr(&span.resource, "service.name"), "echo-service");
}

#[test]
fn sampler_always_off_exports_no_spans() {
    let receiver = OtlpReceiver::grpc();
    let endpoint = receiver.endpoint();
    let env = |sampler| {
        [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", sampler),
        ]
    };

    let mut service = Service::start_with_env(&[], &env("always_off"));
    assert!(
        serving_otlp_flag(&service),
        "export is on, only sampled out"
    );
    assert!(logged_export_on(&service), "{}", logs(&service));
    echo_connections(&service, &[10, 20, 30]);
    wait_lost(&service, "peer_closed", 3);
    stop(&mut service);
    assert_eq!(receiver.spans().len(), 0, "always_off must export nothing");

    // Control: the same receiver and settings with always_on do receive the spans, so the
    // zero above is the sampler's doing.
    let mut control = Service::start_with_env(&[], &env("always_on"));
    echo_connections(&control, &[10, 20, 30]);
    wait_lost(&control, "peer_closed", 3);
    stop(&mut control);
    assert_eq!(receiver.spans().len(), 3, "control run with always_on");
}

/// With export switched off by `var=value` while an endpoint is set, the collector sees no TCP
/// connection at all; a control run without the switch does connect.
fn export_switched_off_makes_no_attempt(var: &str, value: &str) {
    let receiver = OtlpReceiver::grpc();
    let endpoint = receiver.endpoint();
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
    ];
    let control_env = env.clone();
    env.push((var, value));

    let mut service = Service::start_with_env(&[], &env);
    assert!(
        !serving_otlp_flag(&service),
        "{var}={value}: otlp must be off"
    );
    assert!(!logged_export_on(&service), "{}", logs(&service));
    echo_connections(&service, &[10, 20, 30]);
    wait_lost(&service, "peer_closed", 3);
    stop(&mut service);
    assert_eq!(
        receiver.connections(),
        0,
        "{var}={value}: the service connected to the collector"
    );

    let mut control = Service::start_with_env(&[], &control_env);
    echo_connections(&control, &[10]);
    wait_lost(&control, "peer_closed", 1);
    stop(&mut control);
    assert!(receiver.connections() >= 1, "control run did not connect");
    assert_eq!(receiver.spans().len(), 1, "control run's span");
}

#[test]
fn sdk_disabled_makes_no_connection_to_the_collector() {
    export_switched_off_makes_no_attempt("OTEL_SDK_DISABLED", "true");
}

#[test]
fn traces_exporter_none_makes_no_connection_to_the_collector() {
    export_switched_off_makes_no_attempt("OTEL_TRACES_EXPORTER", "none");
}

/// SYNs the service sent to the default OTLP ports (4317 gRPC, 4318 HTTP) on any address,
/// counted by nftables inside the service's own network namespace (so nothing else on the host
/// can connect there, or be mistaken for the service).
fn otlp_default_port_attempts(netns: &crate::faults::Netns) -> u64 {
    let chain = netns.nft(&["list", "chain", "inet", "echo_otlp_watch", "output"]);
    chain
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet counter in {chain}"))
}

/// Run the service in `netns` with `env`, echo a few connections, stop it.
fn run_in_netns(netns: &crate::faults::Netns, env: &[(&str, &str)]) -> Service {
    let listen = format!("{}:0", netns.ns_ip);
    let mut service = Service::spawn(crate::support::service_command(
        &["ip", "netns", "exec", &netns.name],
        &["--listen", &listen, "--admin-listen", &listen],
        env,
    ));
    echo_connections(&service, &[5, 6, 7]);
    wait_lost(&service, "peer_closed", 3);
    stop(&mut service);
    service
}

#[test]
fn no_endpoint_means_export_off() {
    // Everything but an endpoint: export must stay off, and the SDK's default endpoint
    // (localhost:4317 / :4318) must see no connection attempt at all.
    let netns = crate::faults::Netns::create();
    let ruleset = "table inet echo_otlp_watch {\n  chain output {\n    type filter hook output \
                   priority 0; policy accept;\n    tcp dport { 4317, 4318 } tcp flags syn counter\n  }\n}\n";
    let rules_file = std::env::temp_dir().join(format!("{}-otlp.nft", netns.name));
    std::fs::write(&rules_file, ruleset).unwrap();
    netns.nft(&["-f", rules_file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&rules_file);
    let env = [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_SERVICE_NAME", "echo-no-endpoint"),
        ("OTEL_TRACES_SAMPLER", "always_on"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let service = run_in_netns(&netns, &env);
    assert!(
        !serving_otlp_flag(&service),
        "no endpoint: otlp must be off"
    );
    assert!(!logged_export_on(&service), "{}", logs(&service));
    assert_eq!(
        otlp_default_port_attempts(&netns),
        0,
        "no endpoint, yet the service tried a default OTLP port"
    );

    // Control: the same run pointed at the default endpoint does try it, so the counter
    // would have seen an attempt.
    let mut control_env = env.to_vec();
    control_env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317"));
    run_in_netns(&netns, &control_env);
    assert!(
        otlp_default_port_attempts(&netns) > 0,
        "control run: no attempt counted, the watch does not work"
    );
}

#[test]
fn traces_endpoint_variable_is_used_verbatim_for_http() {
    let receiver = OtlpReceiver::http();
    let mut service = Service::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                &format!("{}/v1/traces", receiver.endpoint()),
            ),
        ],
    );
    assert!(serving_otlp_flag(&service));
    echo_connections(&service, &[5, 6]);
    wait_lost(&service, "peer_closed", 2);
    stop(&mut service);
    assert_eq!(
        receiver.spans().len(),
        2,
        "requests seen: {:?}",
        receiver.http_requests()
    );
}

/// How the collector is down.
#[derive(Debug, Clone, Copy)]
enum Down {
    /// Nothing listens on the endpoint's port.
    ClosedPort,
    /// Something accepts TCP and never answers.
    BlackHole,
}

/// Echo keeps working while exports fail or hang, and SIGTERM still exits 0 within drain delay
/// + export timeout + slack.
fn collector_down(down: Down, proto: &str) {
    // Kept alive until the service has exited.
    let black_hole = matches!(down, Down::BlackHole).then(OtlpReceiver::black_hole);
    let endpoint = match &black_hole {
        Some(receiver) => receiver.endpoint(),
        None => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            format!("http://{addr}")
        }
    };
    let timeout_arg = format!("{}ms", EXPORT_TIMEOUT.as_millis());
    let drain_arg = format!("{}ms", DRAIN_DELAY.as_millis());
    let mut service = Service::start_with_env(
        &[
            "--export-timeout",
            &timeout_arg,
            "--drain-delay",
            &drain_arg,
        ],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", proto),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Export every 100 ms, so exports fail or hang while the traffic below runs.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    assert!(serving_otlp_flag(&service));

    // Traffic for ~1.5 s (longer than one export timeout), every round trip verified and
    // timed: a connection that waited on an export would take about the export timeout.
    let traffic_start = Instant::now();
    let mut count = 0;
    let mut slowest = Duration::ZERO;
    while count < 10 || traffic_start.elapsed() < Duration::from_millis(1500) {
        let began = Instant::now();
        echo_connections(&service, &[512]);
        slowest = slowest.max(began.elapsed());
        count += 1;
        // Paced: enough to keep exports busy without piling up TIME_WAIT sockets.
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        slowest < EXPORT_TIMEOUT * 3 / 4,
        "{down:?}/{proto}: slowest echo round trip took {slowest:?} (export timeout {EXPORT_TIMEOUT:?})"
    );
    wait_lost(&service, "peer_closed", count);
    if let Some(black_hole) = &black_hole {
        // The test is only meaningful if the exporter really reached the hanging collector.
        assert!(
            black_hole.wait_connections(1, Duration::from_secs(3)) >= 1,
            "{proto}: the exporter never connected to the black hole"
        );
    }

    let took = stop(&mut service);
    eprintln!("{down:?}/{proto}: {count} round trips, slowest {slowest:?}; exit took {took:?}");
    let bound = DRAIN_DELAY + EXPORT_TIMEOUT + EXIT_SLACK;
    assert!(
        took <= bound,
        "{down:?}/{proto}: exit took {took:?} after SIGTERM, bound {bound:?} (drain delay \
         {DRAIN_DELAY:?} + export timeout {EXPORT_TIMEOUT:?} + {EXIT_SLACK:?}); logs:\n{}",
        logs(&service)
    );
}

#[test]
fn collector_closed_port_grpc_does_not_slow_echo_or_block_shutdown() {
    collector_down(Down::ClosedPort, "grpc");
}

#[test]
fn collector_closed_port_http_does_not_slow_echo_or_block_shutdown() {
    collector_down(Down::ClosedPort, "http/protobuf");
}

#[test]
fn collector_black_hole_grpc_does_not_slow_echo_or_block_shutdown() {
    collector_down(Down::BlackHole, "grpc");
}

#[test]
fn collector_black_hole_http_does_not_slow_echo_or_block_shutdown() {
    collector_down(Down::BlackHole, "http/protobuf");
}

/// With export on and debug logging, both connection log lines carry the trace id the
/// exported span has, so a log line leads to its span (and back).
#[test]
fn debug_log_lines_carry_the_exported_span_trace_id() {
    let receiver = OtlpReceiver::grpc();
    let mut service = Service::start_with_env(
        &["--log-level", "info,echo_service=debug"],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
        ],
    );
    let echoed = echo_connections(&service, &[10, 20]);
    wait_lost(&service, "peer_closed", 2);
    stop(&mut service);
    let spans = receiver.spans();
    let lines: Vec<serde_json::Value> = log_lines(&service)
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for e in &echoed {
        let span = span_for_port(&spans, e.client_port);
        let trace_id: String = span
            .span
            .trace_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let id = int_attr(&span.span.attributes, "connection.id");
        for message in ["connection made", "connection lost"] {
            let line = lines
                .iter()
                .find(|l| l["fields"]["message"] == message && l["fields"]["connection_id"] == id)
                .unwrap_or_else(|| panic!("no '{message}' line for connection {id}"));
            assert_eq!(
                line["fields"]["trace_id"], trace_id,
                "{message} line of connection {id}: {line}"
            );
        }
    }
}
