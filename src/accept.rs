//! Accept-error handling shared by the echo and admin listeners.
//!
//! An accept loop must never die: per-connection errors (ECONNABORTED, ...) are retried at
//! once; running out of file descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) would make
//! an immediate retry spin at 100% CPU (the pending connection keeps the listener readable), so
//! it backs off on a fixed schedule. Logging is rate-limited to one line per second with a count
//! of what was suppressed, so a descriptor storm cannot flood the logs.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// The accept back-off schedule when the process or system is out of file descriptors or
/// memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): wait 5 ms, then double up to 1 s, and stay at 1 s
/// while the errors last. The first successful accept resets it to 5 ms.
pub const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
/// The longest wait between two accept attempts while resources are exhausted.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval about accept errors; the rest are counted.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// The accept-error log of the whole process: the echo and admin listeners run out of
/// descriptors together, and together they still log at most one line per interval.
static ACCEPT_ERROR_LOG: std::sync::Mutex<RateLimitedLog> = std::sync::Mutex::new(RateLimitedLog {
    last: None,
    suppressed: 0,
});

/// Back-off for one accept loop.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    next_delay: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            next_delay: ACCEPT_BACKOFF_FIRST,
        }
    }
}

impl AcceptBackoff {
    /// An accept succeeded: the schedule starts over.
    pub fn succeeded(&mut self) {
        self.next_delay = ACCEPT_BACKOFF_FIRST;
    }

    /// An accept on the `listener` (a name for the log) failed with `err`: log (rate-limited)
    /// and, when resources are exhausted, wait the next delay of the schedule.
    pub async fn failed(&mut self, err: &io::Error, listener: &'static str) {
        let exhausted = is_resource_exhaustion(err);
        let allowed = ACCEPT_ERROR_LOG
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .should_log();
        if let Some(suppressed) = allowed {
            tracing::warn!(
                listener,
                error = %err,
                suppressed,
                backoff = ?exhausted.then_some(self.next_delay),
                "accept failed"
            );
        }
        if exhausted {
            tokio::time::sleep(self.next_delay).await;
            self.next_delay = (self.next_delay * 2).min(ACCEPT_BACKOFF_MAX);
        }
    }
}

/// Errors that mean "out of descriptors or memory": retrying at once would spin.
fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Lets one log line through per [`ACCEPT_ERROR_LOG_INTERVAL`] and counts the rest.
#[derive(Debug, Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// `Some(number suppressed since the last line)` if a line may be logged now.
    fn should_log(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < ACCEPT_ERROR_LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_errors_back_off_others_do_not() {
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }

    #[tokio::test(start_paused = true)]
    async fn accept_error_log_is_rate_limited() {
        // Paused time: the limiter is checked against virtual time, not the machine's clock.
        let mut log = RateLimitedLog::default();
        assert_eq!(log.should_log(), Some(0));
        assert_eq!(log.should_log(), None);
        assert_eq!(log.should_log(), None);
        tokio::time::advance(ACCEPT_ERROR_LOG_INTERVAL).await;
        assert_eq!(log.should_log(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_the_cap_and_resets_on_success() {
        let mut backoff = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let start = Instant::now();
        for _ in 0..10 {
            backoff.failed(&emfile, "test").await;
        }
        // 5+10+20+40+80+160+320+640+1000+1000 ms
        assert_eq!(start.elapsed(), Duration::from_millis(3275));
        backoff.succeeded();
        let again = Instant::now();
        backoff.failed(&emfile, "test").await;
        assert_eq!(again.elapsed(), ACCEPT_BACKOFF_FIRST);
        let other = Instant::now();
        backoff
            .failed(&io::Error::from_raw_os_error(libc::ECONNABORTED), "test")
            .await;
        assert_eq!(
            other.elapsed(),
            Duration::ZERO,
            "per-connection errors retry at once"
        );
    }
}
