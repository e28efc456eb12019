//! The span pipeline reports its own health in metrics: exported spans, dropped spans by reason,
//! failed exports by kind, export durations and the queue, checked against a real receiver
//! that accepts, fails every export, or never answers. Log lines about failed exports stay at
//! about one per second per distinct error, with a suppressed count, however many exports fail.

use std::time::{Duration, Instant};

use crate::otlp_receiver::{Mode, OtlpReceiver};
use crate::support::{echo_round_trip, payload, Metrics, Service};

fn start(receiver: &OtlpReceiver, mode: Mode, extra: &[(&str, &str)]) -> Service {
    start_with_timeout(receiver, mode, extra, "1s")
}

fn start_with_timeout(
    receiver: &OtlpReceiver,
    mode: Mode,
    extra: &[(&str, &str)],
    export_timeout: &str,
) -> Service {
    let endpoint = receiver.endpoint();
    let protocol = match mode {
        Mode::Grpc | Mode::GrpcFailing => "grpc",
        _ => "http/protobuf",
    };
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    env.extend_from_slice(extra);
    Service::start_with_env(&["--export-timeout", export_timeout], &env)
}

fn connection(service: &Service, i: usize) {
    let data = payload(64, i as u64);
    assert!(echo_round_trip(service.connect(), &data, 64) == data);
}

fn dropped(m: &Metrics, reason: &str) -> f64 {
    m.get(&format!(
        "echo_otlp_spans_dropped_total{{reason=\"{reason}\"}}"
    ))
}

fn errors(m: &Metrics, kind: &str) -> f64 {
    m.get(&format!("echo_otlp_export_errors_total{{kind=\"{kind}\"}}"))
}

#[test]
fn every_exported_span_is_counted_and_nothing_is_dropped() {
    let receiver = OtlpReceiver::grpc();
    let mut service = start(&receiver, Mode::Grpc, &[]);
    let before = service.metrics();
    assert_eq!(before.get("echo_otlp_spans_exported_total"), 0.0);
    for i in 0..25 {
        connection(&service, i);
    }
    let m = service.wait_metrics("25 spans exported", |m| {
        m.get("echo_otlp_spans_exported_total") == 25.0
    });
    assert_eq!(receiver.spans().len(), 25);
    for reason in ["queue_full", "export_failed", "shutdown"] {
        assert_eq!(dropped(&m, reason), 0.0, "{reason}");
    }
    assert_eq!(m.get("echo_otlp_queue_spans"), 0.0);
    let exports = m.get("echo_otlp_export_duration_seconds_count");
    assert!(
        exports >= 1.0 && exports <= receiver.export_requests() as f64,
        "{exports} exports observed, receiver saw {}",
        receiver.export_requests()
    );
    service.terminate(Duration::from_secs(20));
}

/// Against a collector that fails every export: every span is counted as dropped
/// (`export_failed`), every failed request by kind, and the log holds at most about one line
/// per second for it, the later ones saying how many were suppressed.
fn failing_collector(mode: Mode, kind: &str) {
    let receiver = OtlpReceiver::start(mode);
    let mut service = start(&receiver, mode, &[]);
    let began = Instant::now();
    let mut count = 0;
    while began.elapsed() < Duration::from_millis(2500) {
        connection(&service, count);
        count += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = service.wait_metrics("every span counted as export_failed", |m| {
        dropped(m, "export_failed") == count as f64
    });
    let elapsed = began.elapsed().as_secs_f64();
    assert_eq!(m.get("echo_otlp_spans_exported_total"), 0.0);
    let failed = errors(&m, kind);
    assert!(
        failed >= 10.0 && failed <= receiver.failed_requests() as f64,
        "{mode:?}: {failed} {kind} errors counted, receiver failed {} requests",
        receiver.failed_requests()
    );
    service.terminate(Duration::from_secs(20));

    let lines = service.logs.lock().unwrap().clone();
    let failures: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "OTLP export failed; spans dropped")
        .collect();
    // One per second per distinct error, plus the first: generous, never per batch.
    let bound = (elapsed.ceil() as usize + 2) * 2;
    assert!(
        !failures.is_empty() && failures.len() <= bound,
        "{mode:?}: {} failure lines for {failed} failed exports in {elapsed:.1}s",
        failures.len()
    );
    let suppressed: u64 = failures
        .iter()
        .map(|l| {
            l["fields"]["suppressed"]
                .as_u64()
                .expect("suppressed count")
        })
        .sum();
    assert!(
        suppressed > 0,
        "{mode:?}: no suppressed count in {failures:?}"
    );
    assert_eq!(failures[0]["fields"]["kind"], kind);
    // The OpenTelemetry crates' own lines are rate-limited too.
    let sdk_lines = lines
        .iter()
        .filter(|l| l.contains("\"target\":\"opentelemetry"))
        .count();
    assert!(
        sdk_lines <= bound * 4,
        "{mode:?}: {sdk_lines} lines from the OpenTelemetry crates"
    );
}

#[test]
fn grpc_collector_failing_every_export_is_counted_and_logged_rarely() {
    failing_collector(Mode::GrpcFailing, "grpc_status");
}

#[test]
fn http_collector_failing_every_export_is_counted_and_logged_rarely() {
    failing_collector(Mode::HttpFailing, "http_status");
}

#[test]
fn a_full_queue_drops_and_counts_spans_and_the_gauge_shows_it() {
    // A collector that never answers holds one export for the export timeout; meanwhile the
    // two-span queue fills and every further span is dropped as queue_full.
    let receiver = OtlpReceiver::black_hole();
    let mut service = start_with_timeout(
        &receiver,
        Mode::BlackHole,
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "2"),
            ("OTEL_BSP_SCHEDULE_DELAY", "5000"),
        ],
        "5s",
    );
    for i in 0..2 {
        connection(&service, i);
    }
    // The first full batch (2 spans) goes to the hanging collector.
    receiver.wait_connections(1, Duration::from_secs(5));
    for i in 2..22 {
        connection(&service, i);
    }
    let m = service.wait_metrics("queue full and drops counted", |m| {
        m.get("echo_otlp_queue_spans") == 2.0 && dropped(m, "queue_full") == 18.0
    });
    assert_eq!(m.get("echo_otlp_spans_exported_total"), 0.0);
    service.terminate(Duration::from_secs(20));
}

/// A gRPC collector that accepts the connection and never answers: each export ends after the
/// export timeout as `timeout` (not a retryable gRPC status), like the HTTP client's, and its
/// spans are dropped as `export_failed`.
#[test]
fn grpc_collector_that_never_answers_is_a_timeout_not_a_retried_status() {
    let receiver = OtlpReceiver::black_hole();
    let endpoint = receiver.endpoint();
    let mut service = Service::start_with_env(
        &["--export-timeout", "1s"],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    connection(&service, 0);
    let m = service.wait_metrics("one export timed out", |m| {
        errors(m, "timeout") == 1.0 && dropped(m, "export_failed") == 1.0
    });
    assert_eq!(errors(&m, "grpc_status"), 0.0);
    assert_eq!(errors(&m, "network"), 0.0);
    service.terminate(Duration::from_secs(20));
}

/// A transient failure (gRPC `UNAVAILABLE`, HTTP 503) is retried, as the OTLP specification
/// asks: the spans arrive, nothing is dropped and no failed export is counted.
fn transient_failure_is_retried(mode: Mode) {
    let receiver = OtlpReceiver::start(mode);
    receiver.fail_next_transiently(2);
    let mut service = start(&receiver, mode, &[]);
    for i in 0..5 {
        connection(&service, i);
    }
    let m = service.wait_metrics("5 spans exported", |m| {
        m.get("echo_otlp_spans_exported_total") == 5.0
    });
    assert_eq!(receiver.spans().len(), 5, "{mode:?}");
    assert_eq!(
        receiver.failed_requests(),
        2,
        "{mode:?}: both failures were seen"
    );
    assert_eq!(dropped(&m, "export_failed"), 0.0, "{mode:?}");
    for kind in ["timeout", "network", "http_status", "grpc_status", "other"] {
        assert_eq!(errors(&m, kind), 0.0, "{mode:?}: {kind}");
    }
    service.terminate(Duration::from_secs(20));
}

#[test]
fn grpc_unavailable_is_retried_and_nothing_is_lost() {
    transient_failure_is_retried(Mode::Grpc);
}

#[test]
fn http_503_is_retried_and_nothing_is_lost() {
    transient_failure_is_retried(Mode::Http);
}
