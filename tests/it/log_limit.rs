//! The export-failure log limiter: one line per second per distinct error, the next line
//! carrying how many were left out, and bounded memory whatever the errors say.

use std::time::{Duration, Instant};

use echo_service::telemetry::{LogLimiter, LOG_INTERVAL};

#[test]
fn one_line_per_second_per_error_with_the_suppressed_count() {
    let limiter = LogLimiter::default();
    let t0 = Instant::now();
    assert_eq!(limiter.admit("refused", t0), Some(0));
    // 50 more within the second: all suppressed, another error is independent.
    for i in 1..=50 {
        let t = t0 + Duration::from_millis(i * 10);
        assert_eq!(limiter.admit("refused", t), None);
    }
    assert_eq!(
        limiter.admit("timeout", t0 + Duration::from_millis(100)),
        Some(0)
    );
    // After the interval: admitted, reporting the 50 suppressed; then the count restarts.
    let t1 = t0 + LOG_INTERVAL;
    assert_eq!(limiter.admit("refused", t1), Some(50));
    assert_eq!(
        limiter.admit("refused", t1 + Duration::from_millis(1)),
        None
    );
    assert_eq!(limiter.admit("refused", t1 + LOG_INTERVAL), Some(1));
}

#[test]
fn many_distinct_errors_share_one_overflow_entry() {
    let limiter = LogLimiter::default();
    let t0 = Instant::now();
    let admitted = (0..10_000)
        .filter(|i| limiter.admit(&format!("error number {i}"), t0).is_some())
        .count();
    // 64 distinct keys are remembered; the rest share one key, admitted once per second.
    assert_eq!(admitted, 65);
}
