//! Time policies of one connection (Twisted's `TimeoutMixin`, plus a max age): when to close
//! an idle connection (`--idle-timeout`), a connection whose peer stopped reading
//! (`--write-stall-timeout`), and an old one (`--max-connection-age` +- jitter); and when a
//! throttled connection may read again. One timer per connection serves them all, and it
//! exists only for connections that have a time policy.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::throttle::Throttle;
use crate::connection::ConnectionSettings;
use crate::protocol::LossReason;

/// What a fired timer asks the connection to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// Close now for this reason.
    Close(LossReason),
    /// Start a graceful close (flush, FIN) for this reason.
    CloseGracefully(LossReason),
}

/// The per-connection policy clock; boxed, so a connection without policies pays 8 bytes.
pub(crate) struct PolicyClock {
    /// The one timer, set to the earliest deadline of the policies below.
    pub timer: Pin<Box<Sleep>>,
    /// Last time bytes moved either way (idle timeout).
    pub last_activity: Instant,
    /// Since when the peer has been holding up our writes (write-stall timeout).
    pub stalled_since: Option<Instant>,
    /// When to close for max age, until that close has started.
    pub max_age_at: Option<Instant>,
    /// The read throttle, if configured.
    pub throttle: Option<Throttle>,
}

impl PolicyClock {
    /// A clock for a connection opened now, or `None` when no time policy is configured.
    pub fn for_connection(settings: &ConnectionSettings, conn_id: u64) -> Option<Box<Self>> {
        if settings.idle_timeout.is_none()
            && settings.write_stall_timeout.is_none()
            && settings.max_age.is_none()
            && settings.throttle_bytes_per_second.is_none()
        {
            return None;
        }
        let now = Instant::now();
        let max_age_at = settings
            .max_age
            .map(|age| after(now, jittered(age, settings.max_age_jitter, conn_id)));
        Some(Box::new(PolicyClock {
            timer: Box::pin(tokio::time::sleep_until(after(now, FAR_FUTURE))),
            last_activity: now,
            stalled_since: None,
            max_age_at,
            throttle: settings
                .throttle_bytes_per_second
                .map(|rate| Throttle::new(rate, now)),
        }))
    }

    /// A clock with no policy of its own, for a protocol's deadline
    /// ([`Protocol::deadline`](crate::Protocol::deadline)) on a connection without time policies.
    pub fn bare() -> Box<Self> {
        let now = Instant::now();
        Box::new(PolicyClock {
            timer: Box::pin(tokio::time::sleep_until(after(now, FAR_FUTURE))),
            last_activity: now,
            stalled_since: None,
            max_age_at: None,
            throttle: None,
        })
    }

    /// Bytes moved at `now`; `pending` says whether data still waits for the peer.
    pub fn record_write_progress(&mut self, now: Instant, pending: bool) {
        self.last_activity = now;
        self.stalled_since = pending.then_some(now);
    }

    /// `n` bytes were read at `now`; `pending` says whether data now waits for the peer.
    pub fn record_read(&mut self, now: Instant, n: usize, pending: bool) {
        self.last_activity = now;
        if pending && self.stalled_since.is_none() {
            self.stalled_since = Some(now);
        }
        if let Some(throttle) = self.throttle.as_mut() {
            throttle.consume(now, n);
        }
    }

    /// Is reading paused by the throttle?
    pub fn read_paused(&self) -> bool {
        self.throttle.as_ref().is_some_and(Throttle::in_debt)
    }

    /// Most bytes the throttle lets the next read take (`usize::MAX` without a throttle), so a
    /// read never overdraws the bucket by more than a byte.
    pub fn read_allowance(&self) -> usize {
        self.throttle
            .as_ref()
            .map_or(usize::MAX, Throttle::allowance)
    }

    /// The earliest moment a policy needs to look at this connection again; `closing` drops
    /// the max-age deadline once a close has started.
    pub fn next_deadline(&self, settings: &ConnectionSettings, closing: bool) -> Option<Instant> {
        let idle = settings.idle_timeout.map(|t| after(self.last_activity, t));
        let stall = settings
            .write_stall_timeout
            .zip(self.stalled_since)
            .map(|(t, since)| after(since, t));
        let resume = self.throttle.as_ref().and_then(Throttle::resume_at);
        let age = if closing { None } else { self.max_age_at };
        [idle, stall, resume, age].into_iter().flatten().min()
    }

    /// Apply the policies at `now`, after the timer fired.
    pub fn expire(&mut self, settings: &ConnectionSettings, now: Instant) -> Option<Expiry> {
        if let Some(idle) = settings.idle_timeout {
            // A connection held back by the throttle is not idle: its peer's bytes wait for us.
            if now >= after(self.last_activity, idle) && !self.read_paused() {
                return Some(Expiry::Close(LossReason::IdleTimeout));
            }
        }
        if let (Some(stall), Some(since)) = (settings.write_stall_timeout, self.stalled_since) {
            if now >= after(since, stall) {
                return Some(Expiry::Close(LossReason::WriteStall));
            }
        }
        if let Some(throttle) = self.throttle.as_mut() {
            throttle.refill(now);
        }
        if self.max_age_at.is_some_and(|at| now >= at) {
            self.max_age_at = None;
            return Some(Expiry::CloseGracefully(LossReason::MaxAge));
        }
        None
    }
}

/// Far enough to mean "never" for a connection.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365);

/// `at + d`, saturating at [`FAR_FUTURE`] from `at` instead of overflowing the clock.
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d.min(FAR_FUTURE * 10))
        .unwrap_or_else(|| at + FAR_FUTURE)
}

/// `age` moved by a pseudo-random amount in `[-jitter, +jitter]`, derived from the connection
/// id (spread is all that matters here, not unpredictability).
pub(crate) fn jittered(age: Duration, jitter: Duration, conn_id: u64) -> Duration {
    if jitter.is_zero() {
        return age;
    }
    // SplitMix64 finaliser: consecutive ids land far apart.
    let mut x = conn_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    let offset = jitter.as_secs_f64() * (2.0 * unit - 1.0);
    Duration::try_from_secs_f64((age.as_secs_f64() + offset).max(0.0)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ConnectionSettings {
        ConnectionSettings {
            idle_timeout: Some(Duration::from_secs(10)),
            write_stall_timeout: Some(Duration::from_secs(3)),
            max_age: Some(Duration::from_secs(60)),
            ..ConnectionSettings::default()
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let age = Duration::from_secs(60);
        let jitter = Duration::from_secs(10);
        let ages: Vec<Duration> = (1..200).map(|id| jittered(age, jitter, id)).collect();
        assert!(ages
            .iter()
            .all(|a| *a >= age - jitter && *a <= age + jitter));
        let spread = *ages.iter().max().unwrap() - *ages.iter().min().unwrap();
        assert!(
            spread > Duration::from_secs(10),
            "jitter should spread ages"
        );
        assert_eq!(jittered(age, Duration::ZERO, 7), age);
    }

    #[test]
    fn no_policies_no_clock() {
        assert!(PolicyClock::for_connection(&ConnectionSettings::default(), 1).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_then_stall_then_age_in_deadline_order() {
        // Paused time: deadlines are checked against virtual time.
        let settings = settings();
        let mut clock = PolicyClock::for_connection(&settings, 1).unwrap();
        let start = Instant::now();
        assert_eq!(
            clock.next_deadline(&settings, false),
            Some(start + Duration::from_secs(10))
        );
        clock.record_read(start, 100, true);
        assert_eq!(
            clock.next_deadline(&settings, false),
            Some(start + Duration::from_secs(3))
        );
        assert_eq!(
            clock.expire(&settings, start + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            clock.expire(&settings, start + Duration::from_secs(3)),
            Some(Expiry::Close(LossReason::WriteStall))
        );
        clock.record_write_progress(start + Duration::from_secs(3), false);
        assert_eq!(
            clock.expire(&settings, start + Duration::from_secs(13)),
            Some(Expiry::Close(LossReason::IdleTimeout))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn huge_settings_saturate_instead_of_overflowing() {
        let settings = ConnectionSettings {
            idle_timeout: Some(Duration::MAX),
            max_age: Some(Duration::MAX),
            max_age_jitter: Duration::MAX,
            ..ConnectionSettings::default()
        };
        let clock = PolicyClock::for_connection(&settings, 1).unwrap();
        assert!(clock.next_deadline(&settings, false).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_connection_is_not_idle_and_reads_within_its_allowance() {
        let settings = ConnectionSettings {
            idle_timeout: Some(Duration::from_secs(1)),
            throttle_bytes_per_second: Some(1000),
            ..ConnectionSettings::default()
        };
        let mut clock = PolicyClock::for_connection(&settings, 1).unwrap();
        let start = Instant::now();
        assert_eq!(clock.read_allowance(), 1000, "one second of burst");
        clock.record_read(start, 1000, false);
        assert!(clock.read_allowance() <= 1);
        clock.record_read(start, 1, false);
        assert!(clock.read_paused());
        // Paused by the throttle past the idle timeout: not idle.
        assert_eq!(
            clock.expire(&settings, start + Duration::from_millis(1000)),
            None
        );
        assert!(!clock.read_paused(), "refilled after a second");
        assert_eq!(
            clock.expire(&settings, start + Duration::from_secs(3)),
            Some(Expiry::Close(LossReason::IdleTimeout))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_age_closes_gracefully_once() {
        let settings = ConnectionSettings {
            max_age: Some(Duration::from_secs(5)),
            ..ConnectionSettings::default()
        };
        let mut clock = PolicyClock::for_connection(&settings, 1).unwrap();
        let at = Instant::now() + Duration::from_secs(5);
        assert_eq!(clock.next_deadline(&settings, false), Some(at));
        assert_eq!(clock.next_deadline(&settings, true), None);
        assert_eq!(
            clock.expire(&settings, at),
            Some(Expiry::CloseGracefully(LossReason::MaxAge))
        );
        assert_eq!(clock.expire(&settings, at), None);
    }
}
