//! `OTEL_*` per the OpenTelemetry environment-variable specification, one test per row of the
//! issue: an invalid value is ignored with exactly one warning line naming the variable, the
//! bad value and the value used (and export goes on); a value that makes export impossible
//! exits 2 with one line naming the variable; gzip and headers reach a real receiver over both
//! protocols; the sampler argument is honoured.
//!
//! The settings table itself is also checked directly through `OtelSettings::from_lookup`,
//! which needs no process.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use echo_service::telemetry::{OtelSettings, OtlpProtocol};

use crate::otlp_receiver::{Mode, OtlpReceiver};
use crate::support::{echo_round_trip, payload, Service, SERVICE_BIN};

fn settings(vars: &[(&str, &str)]) -> Result<OtelSettings, String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    OtelSettings::from_lookup(|name| map.get(name).cloned()).map_err(|e| e.to_string())
}

const ENDPOINT: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");

#[test]
fn the_settings_table_resolves_like_the_specification() {
    // No endpoint: off. Endpoint only: HTTP/protobuf to .../v1/traces, spec defaults.
    assert!(settings(&[]).unwrap().export.is_none());
    let s = settings(&[ENDPOINT]).unwrap();
    let export = s.export.expect("export on");
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(export.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(export.endpoint, "http://127.0.0.1:4318/v1/traces");
    assert_eq!(export.batch.max_queue_size, 2048);
    assert_eq!(export.batch.max_export_batch_size, 512);
    assert_eq!(export.batch.schedule_delay, Duration::from_millis(5000));
    assert_eq!(export.batch.export_timeout, Duration::from_millis(30_000));
    assert!(!export.gzip);
    assert_eq!(export.timeout, None);
    assert_eq!(export.sampler_name, "parentbased_always_on");

    // The traces variables win and are used verbatim; empty values count as unset.
    let export = settings(&[
        ENDPOINT,
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://c.example:443/x",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", ""),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "X-Tenant=a%20b, k=v=w"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
    ])
    .unwrap()
    .export
    .unwrap();
    assert_eq!(export.protocol, OtlpProtocol::Grpc);
    assert_eq!(export.endpoint, "https://c.example:443/x");
    assert!(export.https && export.gzip);
    assert_eq!(export.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(
        export.headers,
        [
            ("x-tenant".to_owned(), "a b".to_owned()),
            ("k".to_owned(), "v=w".to_owned())
        ]
    );
    assert_eq!(export.batch.max_queue_size, 100);
    assert_eq!(
        export.batch.max_export_batch_size, 100,
        "the batch never exceeds the queue"
    );
    assert_eq!(export.sampler_name, "traceidratio(0.25)");

    // Off switches.
    for off in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_SDK_DISABLED", "TRUE"),
        ("OTEL_TRACES_EXPORTER", "none"),
    ] {
        assert!(
            settings(&[ENDPOINT, off]).unwrap().export.is_none(),
            "{off:?}"
        );
    }
}

/// (variable, bad value, text of the value used instead)
const IGNORED: &[(&str, &str, &str)] = &[
    ("OTEL_TRACES_SAMPLER", "bogus", "parentbased_always_on"),
    ("OTEL_TRACES_SAMPLER_ARG", "abc", "1.0"),
    ("OTEL_TRACES_SAMPLER_ARG", "5", "1.0"),
    ("OTEL_SDK_DISABLED", "yes", "false"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc", "3000"),
    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-5", "3000"),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli", "none"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "lots", "2048"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0", "512"),
    ("OTEL_BSP_SCHEDULE_DELAY", "soon", "5000"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "1.5", "30000"),
];

/// The extra variable a row needs to be meaningful (a sampler argument needs a ratio sampler).
fn companion(variable: &str) -> Option<(&'static str, &'static str)> {
    (variable == "OTEL_TRACES_SAMPLER_ARG").then_some(("OTEL_TRACES_SAMPLER", "traceidratio"))
}

#[test]
fn each_invalid_value_is_one_warning_in_the_table() {
    for &(variable, value, used) in IGNORED {
        let mut vars = vec![ENDPOINT, (variable, value)];
        vars.extend(companion(variable));
        let s = settings(&vars).unwrap_or_else(|e| panic!("{variable}={value}: {e}"));
        assert!(
            s.export.is_some(),
            "{variable}={value}: export must stay on"
        );
        assert_eq!(s.warnings.len(), 1, "{variable}={value}: {:?}", s.warnings);
        let w = &s.warnings[0];
        assert_eq!((w.variable, w.value.as_str()), (variable, value));
        assert!(
            w.used.starts_with(used),
            "{variable}={value}: used {:?}",
            w.used
        );
    }
}

/// (environment, the variable the error must name)
const IMPOSSIBLE: &[(&[(&str, &str)], &str)] = &[
    (
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://127.0.0.1:21")],
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ),
    (
        &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "127.0.0.1:4317")],
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ),
    (
        &[ENDPOINT, ("OTEL_BSP_MAX_QUEUE_SIZE", "0")],
        "OTEL_BSP_MAX_QUEUE_SIZE",
    ),
    (
        &[ENDPOINT, ("OTEL_EXPORTER_OTLP_HEADERS", "garbage")],
        "OTEL_EXPORTER_OTLP_HEADERS",
    ),
    (
        &[ENDPOINT, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "bad key=1")],
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ),
    (
        &[ENDPOINT, ("OTEL_EXPORTER_OTLP_HEADERS", "k=%zz")],
        "OTEL_EXPORTER_OTLP_HEADERS",
    ),
    (
        &[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ),
    (
        &[ENDPOINT, ("OTEL_TRACES_EXPORTER", "zipkin")],
        "OTEL_TRACES_EXPORTER",
    ),
    (
        &[
            ENDPOINT,
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
        ],
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ),
    (
        &[
            ENDPOINT,
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/etc/hostname"),
        ],
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    ),
    (
        &[
            ENDPOINT,
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/etc/hostname"),
        ],
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    ),
];

#[test]
fn each_impossible_value_exits_2_with_one_line_naming_the_variable() {
    for (env, named) in IMPOSSIBLE {
        let mut command = Command::new(SERVICE_BIN);
        command.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
        for (key, _) in std::env::vars() {
            if key.starts_with("OTEL_") || key.starts_with("ECHO_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().copied());
        let output = command.output().expect("run echo-service");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        assert_eq!(output.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{env:?}: does not name {named}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{env:?}: not one line: {stderr}");
    }
}

/// Echo `count` connections and wait until each is counted as closed.
fn some_connections(service: &Service, count: usize) {
    for i in 0..count {
        let data = payload(100 + i, i as u64);
        assert!(echo_round_trip(service.connect(), &data, 37) == data);
    }
    let key = "echo_connections_lost_total{reason=\"peer_closed\"}";
    service.wait_metrics("connections closed", |m| m.get(key) == count as f64);
}

fn stop(service: &mut Service) {
    let (status, _) = service.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
}

fn json_lines(service: &Service) -> Vec<serde_json::Value> {
    service
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn each_invalid_value_logs_one_warning_and_every_span_is_still_exported() {
    for &(variable, value, used) in IGNORED {
        let receiver = OtlpReceiver::grpc();
        let endpoint = receiver.endpoint();
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            (variable, value),
        ];
        env.extend(companion(variable));
        let mut service = Service::start_with_env(&[], &env);
        some_connections(&service, 3);
        stop(&mut service);
        let warnings: Vec<_> = json_lines(&service)
            .into_iter()
            .filter(|l| l["level"] == "WARN" && l["fields"]["variable"] == variable)
            .collect();
        assert_eq!(warnings.len(), 1, "{variable}={value}: {warnings:?}");
        let fields = &warnings[0]["fields"];
        assert_eq!(fields["value"], value, "{variable}: {fields}");
        assert!(
            fields["used"].as_str().unwrap_or("").starts_with(used),
            "{variable}={value}: {fields}"
        );
        let message = fields["message"].as_str().unwrap_or("");
        assert!(
            message.contains(variable) && message.contains(value),
            "{message}"
        );
        assert_eq!(receiver.spans().len(), 3, "{variable}={value}: spans");
    }
}

#[test]
fn sampler_ratio_zero_exports_nothing_and_ratio_one_everything() {
    for (ratio, expected) in [("0", 0), ("1", 4)] {
        let receiver = OtlpReceiver::grpc();
        let endpoint = receiver.endpoint();
        let mut service = Service::start_with_env(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", ratio),
            ],
        );
        some_connections(&service, 4);
        stop(&mut service);
        assert_eq!(receiver.spans().len(), expected, "ratio {ratio}");
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn gzip_and_headers_reach_the_collector_over_both_protocols() {
    for mode in [Mode::Grpc, Mode::Http] {
        let receiver = OtlpReceiver::start(mode);
        let endpoint = receiver.endpoint();
        let protocol = if mode == Mode::Grpc {
            "grpc"
        } else {
            "http/protobuf"
        };
        let mut service = Service::start_with_env(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "x-tenant=team%20a,authorization=Bearer%20t0k",
                ),
            ],
        );
        some_connections(&service, 2);
        stop(&mut service);
        assert_eq!(receiver.spans().len(), 2, "{mode:?}: spans decoded");
        let requests = receiver.request_headers();
        assert!(!requests.is_empty());
        for headers in &requests {
            let encoding = if mode == Mode::Grpc {
                header(headers, "grpc-encoding")
            } else {
                header(headers, "content-encoding")
            };
            assert_eq!(encoding, Some("gzip"), "{mode:?}: {headers:?}");
            assert_eq!(header(headers, "x-tenant"), Some("team a"), "{mode:?}");
            assert_eq!(
                header(headers, "authorization"),
                Some("Bearer t0k"),
                "{mode:?}"
            );
        }
    }
}
