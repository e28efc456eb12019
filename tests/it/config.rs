//! Bad configuration: every invalid setting exits non-zero with one line that names it, never a
//! panic or a backtrace.

use std::process::Command;

use crate::support::SERVICE_BIN;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(SERVICE_BIN);
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("OTEL_") || key.starts_with("ECHO_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let output = command.output().expect("run echo-service");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Arguments, environment, and the setting the error must name.
type BadSetting<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn each_invalid_setting_is_named_in_a_one_line_error() {
    let cases: &[BadSetting] = &[
        (&["--listen", "nowhere"], &[], "--listen"),
        (&["--admin-listen", "1.2.3.4"], &[], "--admin-listen"),
        (&["--drain-delay", "5 parsecs"], &[], "--drain-delay"),
        (&["--shutdown-timeout", "10"], &[], "--shutdown-timeout"),
        (&["--read-buffer-size", "0"], &[], "--read-buffer-size"),
        (&["--write-buffer-limit", "0"], &[], "--write-buffer-limit"),
        (&["--max-connections", "0"], &[], "--max-connections"),
        (
            &["--max-connections-per-peer", "-1"],
            &[],
            "--max-connections-per-peer",
        ),
        (&["--idle-timeout", "0s"], &[], "--idle-timeout"),
        (
            &["--max-connection-age", "3000000000000000h"],
            &[],
            "--max-connection-age",
        ),
        (
            &["--write-stall-timeout", "soon"],
            &[],
            "--write-stall-timeout",
        ),
        (
            &[
                "--max-connection-age",
                "1s",
                "--max-connection-age-jitter",
                "5s",
            ],
            &[],
            "--max-connection-age-jitter",
        ),
        (
            &["--max-connection-age-grace", "forever"],
            &[],
            "--max-connection-age-grace",
        ),
        (
            &["--throttle-bytes-per-second", "0"],
            &[],
            "--throttle-bytes-per-second",
        ),
        (&["--log-format", "xml"], &[], "--log-format"),
        (&["--log-level", "echo_service=loud"], &[], "--log-level"),
        (
            &["--admin-max-header-bytes", "100"],
            &[],
            "--admin-max-header-bytes",
        ),
        (
            &[],
            &[("ECHO_WRITE_BUFFER_LIMIT", "0")],
            "--write-buffer-limit",
        ),
        (&[], &[("ECHO_LISTEN", "not-an-address")], "--listen"),
        (
            &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
            ],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ];
    for case in cases {
        let (code, stderr) = one_line_naming(case);
        assert_ne!(code, 0, "{case:?} should fail");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}

/// Run a bad setting; its error must be one line that names the setting. Returns the exit
/// code and that line.
fn one_line_naming((args, env, named): &BadSetting) -> (i32, String) {
    let (code, stderr) = run(args, env);
    let stderr = stderr.trim().to_owned();
    assert!(
        stderr.contains(named),
        "{args:?} {env:?}: error does not name {named}: {stderr:?}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: not one line: {stderr:?}"
    );
    (code, stderr)
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run(&["--listen", &addr, "--admin-listen", "127.0.0.1:0"], &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--listen") && stderr.contains("in use"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--listen", "127.0.0.1:0", "--admin-listen", &addr], &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--admin-listen") && stderr.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn help_lists_every_setting_with_its_environment_variable() {
    let output = Command::new(SERVICE_BIN).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for (flag, env) in [
        ("--listen", "ECHO_LISTEN"),
        ("--admin-listen", "ECHO_ADMIN_LISTEN"),
        ("--drain-delay", "ECHO_DRAIN_DELAY"),
        ("--shutdown-timeout", "ECHO_SHUTDOWN_TIMEOUT"),
        ("--write-buffer-limit", "ECHO_WRITE_BUFFER_LIMIT"),
        (
            "--max-connections-per-peer",
            "ECHO_MAX_CONNECTIONS_PER_PEER",
        ),
        ("--log-format", "ECHO_LOG_FORMAT"),
    ] {
        assert!(
            help.contains(flag) && help.contains(env),
            "--help lacks {flag} / {env}"
        );
    }
    assert!(help.contains("[default: [::]:8000]"), "{help}");
}

/// The settings that used to start anyway, or exit 1, or fail without naming themselves: each
/// now exits 2 with one line naming the setting.
#[test]
fn strict_settings_exit_2_naming_the_setting() {
    let cases: &[BadSetting] = &[
        (&["--tcp-keepalive", "10h"], &[], "--tcp-keepalive"),
        (&["--tcp-keepalive", "1ms"], &[], "--tcp-keepalive"),
        (&["--log-level", "foo=bar=baz"], &[], "--log-level"),
        (&["--log-level", "info,[{"], &[], "--log-level"),
        (&["--log-level", "warning"], &[], "--log-level"),
        (&["--log-level", "verbose"], &[], "--log-level"),
        (&["--log-level", ","], &[], "--log-level"),
        (&["--shutdown-timeout", "-1s"], &[], "--shutdown-timeout"),
        (&["--read-buffer-size", "-5"], &[], "--read-buffer-size"),
        (
            &["--max-connections", "9223372036854775808"],
            &[],
            "--max-connections",
        ),
        (
            &["--admin-max-connections", "0"],
            &[],
            "--admin-max-connections",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:18000",
                "--admin-listen",
                "[::]:18000",
            ],
            &[],
            "--admin-listen",
        ),
        (
            &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
            ],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ];
    for case in cases {
        let (code, stderr) = one_line_naming(case);
        assert_eq!(code, 2, "{case:?}: exit {code}: {stderr}");
    }
}

/// Values that used to be refused although they are fine, and an empty variable that used to
/// turn logging off: all start.
#[test]
fn units_everywhere_and_empty_variables_are_unset() {
    let service = crate::support::Service::start_with_env(
        &["--throttle-bytes-per-second", "100KiB"],
        &[("ECHO_LOG_LEVEL", ""), ("ECHO_IDLE_TIMEOUT", "")],
    );
    // The serving line was logged, so the empty ECHO_LOG_LEVEL fell back to `info`.
    assert_eq!(service.admin_get("/healthz").status, 200);
}
