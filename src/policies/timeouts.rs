//! Time policies of one connection (Twisted's `TimeoutMixin`, plus a max age): when to close
//! an idle connection (`--idle-timeout`), a connection whose peer stopped reading
//! (`--write-stall-timeout`), and an old one (`--max-connection-age` +- jitter, then at most
//! `--max-connection-age-grace` to flush); and when a throttled connection may read again. One
//! timer per connection serves them all, and it exists only for connections that have a time
//! policy.
//!
//! The clock knows nothing of sockets: the driver tells it what happened (`record_*`) and asks
//! it two questions that must agree, [`PolicyClock::expire`] ("what is due at `t`?") and
//! [`PolicyClock::next_deadline`] ("when is something next due?"). The rule tying them, checked
//! by a property test: whenever `expire(t)` returns nothing, `next_deadline()` is after `t` or
//! none, so a driver that sleeps until the next deadline never spins.

use std::time::Duration;

use tokio::time::Instant;

use super::throttle::Throttle;
use crate::protocol::LossReason;

/// The time policies a connection runs under (the time-related part of the connection
/// settings; kept here so this module depends on nothing of the driver that uses it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimePolicies {
    /// Close after this long with no bytes either way, while nothing waits for the peer.
    pub idle_timeout: Option<Duration>,
    /// Close when the peer has read nothing for this long while we have data for it.
    pub write_stall_timeout: Option<Duration>,
    /// Close gracefully after this age, +- `max_age_jitter`.
    pub max_age: Option<Duration>,
    /// Random spread applied to `max_age` so connections don't all close at once.
    pub max_age_jitter: Duration,
    /// After the max-age close starts, abort if the flush has not finished within this long.
    pub max_age_grace: Duration,
    /// Read at most this many bytes per second.
    pub throttle_bytes_per_second: Option<u64>,
}

impl TimePolicies {
    /// Is any time policy configured? (The grace alone is not one: it only follows a max age.)
    pub fn any(&self) -> bool {
        self.idle_timeout.is_some()
            || self.write_stall_timeout.is_some()
            || self.max_age.is_some()
            || self.throttle_bytes_per_second.is_some()
    }

    /// How long a peer that holds up our writes may stall before the connection is closed as
    /// `write_stall`. Data waiting for the peer means the connection is not idle, so without a
    /// write-stall timeout the idle timeout bounds the stall instead (still counted as a stall).
    fn stall_bound(&self) -> Option<Duration> {
        self.write_stall_timeout.or(self.idle_timeout)
    }
}

/// What a fired timer asks the connection to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// Close now for this reason.
    Close(LossReason),
    /// Start a graceful close (flush, FIN) for this reason.
    CloseGracefully(LossReason),
}

/// The per-connection policy state; the driver boxes it with its timer, so a connection
/// without policies pays 8 bytes.
#[derive(Debug)]
pub(crate) struct PolicyClock {
    /// Last time bytes moved either way, or the throttle let reading resume (idle timeout).
    last_activity: Instant,
    /// Since when the peer has been holding up our writes (write-stall timeout); `Some` also
    /// means "not idle".
    stalled_since: Option<Instant>,
    /// When to close for max age, until that close has started.
    max_age_at: Option<Instant>,
    /// When the max-age close started and its flush has not finished: abort at this moment.
    grace_until: Option<Instant>,
    /// The read throttle, if configured.
    throttle: Option<Throttle>,
}

impl PolicyClock {
    /// A clock for connection `conn_id` opened at `now`, or `None` when no time policy is set.
    pub fn for_connection(policies: &TimePolicies, conn_id: u64, now: Instant) -> Option<Self> {
        if !policies.any() {
            return None;
        }
        let max_age_at = policies
            .max_age
            .map(|age| after(now, jittered(age, policies.max_age_jitter, conn_id)));
        Some(PolicyClock {
            last_activity: now,
            stalled_since: None,
            max_age_at,
            grace_until: None,
            throttle: policies
                .throttle_bytes_per_second
                .map(|rate| Throttle::new(rate, now)),
        })
    }

    /// A clock with no policy of its own, for a protocol's deadline
    /// ([`Protocol::deadline`](crate::Protocol::deadline)) on a connection without time policies.
    pub fn bare(now: Instant) -> Self {
        PolicyClock {
            last_activity: now,
            stalled_since: None,
            max_age_at: None,
            grace_until: None,
            throttle: None,
        }
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

    /// The graceful close finished flushing (FIN sent): the grace no longer applies.
    pub fn flushed(&mut self) {
        self.grace_until = None;
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

    /// When the connection counts as idle, if it can: not while the throttle holds the peer's
    /// bytes back, nor while data waits for the peer (that is a stall, see below).
    fn idle_at(&self, policies: &TimePolicies) -> Option<Instant> {
        if self.read_paused() || self.stalled_since.is_some() {
            return None;
        }
        policies.idle_timeout.map(|t| after(self.last_activity, t))
    }

    /// When the peer has held up our writes for too long, if it is holding them up.
    fn stall_at(&self, policies: &TimePolicies) -> Option<Instant> {
        policies
            .stall_bound()
            .zip(self.stalled_since)
            .map(|(t, since)| after(since, t))
    }

    /// The earliest moment a policy needs to look at this connection again; `closing` drops
    /// the max-age deadline once a close has started.
    pub fn next_deadline(&self, policies: &TimePolicies, closing: bool) -> Option<Instant> {
        let resume = self.throttle.as_ref().and_then(Throttle::resume_at);
        let age = if closing { None } else { self.max_age_at };
        [
            self.idle_at(policies),
            self.stall_at(policies),
            resume,
            age,
            self.grace_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Apply the policies at `now`, after the timer fired.
    pub fn expire(&mut self, policies: &TimePolicies, now: Instant) -> Option<Expiry> {
        if let Some(throttle) = self.throttle.as_mut() {
            let was_paused = throttle.in_debt();
            throttle.refill(now);
            if was_paused && !throttle.in_debt() {
                // Reading resumes now: the pause was the throttle's doing, not the peer's.
                self.last_activity = self.last_activity.max(now);
            }
        }
        if self.grace_until.is_some_and(|at| now >= at) {
            self.grace_until = None;
            return Some(Expiry::Close(LossReason::MaxAgeGrace));
        }
        if self.idle_at(policies).is_some_and(|at| now >= at) {
            return Some(Expiry::Close(LossReason::IdleTimeout));
        }
        if self.stall_at(policies).is_some_and(|at| now >= at) {
            return Some(Expiry::Close(LossReason::WriteStall));
        }
        if self.max_age_at.is_some_and(|at| now >= at) {
            self.max_age_at = None;
            self.grace_until = Some(after(now, policies.max_age_grace));
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
    // Consecutive ids land far apart.
    let unit = crate::mix::unit(crate::mix::splitmix64(conn_id));
    let offset = jitter.as_secs_f64() * (2.0 * unit - 1.0);
    Duration::try_from_secs_f64((age.as_secs_f64() + offset).max(0.0)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policies() -> TimePolicies {
        TimePolicies {
            idle_timeout: Some(Duration::from_secs(10)),
            write_stall_timeout: Some(Duration::from_secs(3)),
            max_age: Some(Duration::from_secs(60)),
            ..TimePolicies::default()
        }
    }

    fn new_clock(policies: &TimePolicies, now: Instant) -> PolicyClock {
        PolicyClock::for_connection(policies, 1, now).expect("a policy is set")
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
        let grace_only = TimePolicies {
            max_age_grace: Duration::from_secs(5),
            ..TimePolicies::default()
        };
        assert!(PolicyClock::for_connection(&grace_only, 1, Instant::now()).is_none());
    }

    #[test]
    fn idle_then_stall_then_age_in_deadline_order() {
        let policies = policies();
        let start = Instant::now();
        let mut clock = new_clock(&policies, start);
        assert_eq!(
            clock.next_deadline(&policies, false),
            Some(start + Duration::from_secs(10))
        );
        clock.record_read(start, 100, true);
        assert_eq!(
            clock.next_deadline(&policies, false),
            Some(start + Duration::from_secs(3))
        );
        assert_eq!(
            clock.expire(&policies, start + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            clock.expire(&policies, start + Duration::from_secs(3)),
            Some(Expiry::Close(LossReason::WriteStall))
        );
        clock.record_write_progress(start + Duration::from_secs(3), false);
        assert_eq!(
            clock.expire(&policies, start + Duration::from_secs(13)),
            Some(Expiry::Close(LossReason::IdleTimeout))
        );
    }

    #[test]
    fn data_waiting_for_the_peer_is_a_stall_not_idleness() {
        // Idle timeout shorter than the stall timeout: a peer that does not read is still
        // closed as a write stall, at the stall timeout.
        let policies = TimePolicies {
            idle_timeout: Some(Duration::from_secs(1)),
            write_stall_timeout: Some(Duration::from_secs(5)),
            ..TimePolicies::default()
        };
        let start = Instant::now();
        let mut clock = new_clock(&policies, start);
        clock.record_read(start, 100, true);
        assert_eq!(
            clock.expire(&policies, start + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            clock.expire(&policies, start + Duration::from_secs(5)),
            Some(Expiry::Close(LossReason::WriteStall))
        );
        // Without a stall timeout the idle timeout bounds the stall, counted as a stall.
        let idle_only = TimePolicies {
            idle_timeout: Some(Duration::from_secs(1)),
            ..TimePolicies::default()
        };
        let mut clock = new_clock(&idle_only, start);
        clock.record_read(start, 100, true);
        assert_eq!(
            clock.expire(&idle_only, start + Duration::from_secs(1)),
            Some(Expiry::Close(LossReason::WriteStall))
        );
    }

    #[test]
    fn huge_settings_saturate_instead_of_overflowing() {
        let policies = TimePolicies {
            idle_timeout: Some(Duration::MAX),
            max_age: Some(Duration::MAX),
            max_age_jitter: Duration::MAX,
            max_age_grace: Duration::MAX,
            ..TimePolicies::default()
        };
        let mut clock = new_clock(&policies, Instant::now());
        assert!(clock.next_deadline(&policies, false).is_some());
        assert_eq!(clock.expire(&policies, Instant::now()), None);
    }

    #[test]
    fn a_throttled_connection_is_not_idle_and_reads_within_its_allowance() {
        let policies = TimePolicies {
            idle_timeout: Some(Duration::from_secs(1)),
            throttle_bytes_per_second: Some(1000),
            ..TimePolicies::default()
        };
        let start = Instant::now();
        let mut clock = new_clock(&policies, start);
        assert_eq!(clock.read_allowance(), 1000, "one second of burst");
        clock.record_read(start, 1000, false);
        assert!(clock.read_allowance() <= 1);
        clock.record_read(start, 1, false);
        assert!(clock.read_paused());
        // Paused by the throttle: the next deadline is the resume, not a past idle deadline.
        let resume = start + Duration::from_millis(1);
        assert_eq!(clock.next_deadline(&policies, false), Some(resume));
        assert_eq!(
            clock.expire(&policies, start + Duration::from_secs(3)),
            None
        );
        assert!(!clock.read_paused(), "refilled");
        // Idle counts from the moment reading resumed.
        assert_eq!(
            clock.next_deadline(&policies, false),
            Some(start + Duration::from_secs(4))
        );
        assert_eq!(
            clock.expire(&policies, start + Duration::from_secs(4)),
            Some(Expiry::Close(LossReason::IdleTimeout))
        );
    }

    #[test]
    fn max_age_closes_gracefully_once_then_the_grace_runs_until_flushed() {
        let policies = TimePolicies {
            max_age: Some(Duration::from_secs(5)),
            max_age_grace: Duration::from_secs(2),
            ..TimePolicies::default()
        };
        let start = Instant::now();
        let mut clock = new_clock(&policies, start);
        let at = start + Duration::from_secs(5);
        assert_eq!(clock.next_deadline(&policies, false), Some(at));
        assert_eq!(
            clock.expire(&policies, at),
            Some(Expiry::CloseGracefully(LossReason::MaxAge))
        );
        let grace = at + Duration::from_secs(2);
        assert_eq!(clock.next_deadline(&policies, true), Some(grace));
        assert_eq!(clock.expire(&policies, at), None);
        assert_eq!(
            clock.expire(&policies, grace),
            Some(Expiry::Close(LossReason::MaxAgeGrace))
        );
        // Flushed in time: no grace deadline any more.
        let mut clock = new_clock(&policies, start);
        clock.expire(&policies, at);
        clock.flushed();
        assert_eq!(clock.next_deadline(&policies, true), None);
    }

    /// One thing that can happen to a connection, at some offset (ms) after the previous one.
    #[derive(Debug, Clone)]
    enum Event {
        Read {
            after_ms: u64,
            n: usize,
            pending: bool,
        },
        WriteProgress {
            after_ms: u64,
            pending: bool,
        },
        Flushed,
        /// The timer fired (or the driver looked) at this offset.
        Expire {
            after_ms: u64,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0..3000u64, 0..5000usize, any::<bool>()).prop_map(|(after_ms, n, pending)| {
                Event::Read {
                    after_ms,
                    n,
                    pending,
                }
            }),
            (0..3000u64, any::<bool>())
                .prop_map(|(after_ms, pending)| Event::WriteProgress { after_ms, pending }),
            Just(Event::Flushed),
            (0..3000u64).prop_map(|after_ms| Event::Expire { after_ms }),
        ]
    }

    fn optional_ms(max: u64) -> impl Strategy<Value = Option<Duration>> {
        proptest::option::of((1..max).prop_map(Duration::from_millis))
    }

    fn time_policies() -> impl Strategy<Value = TimePolicies> {
        (
            optional_ms(5000),
            optional_ms(5000),
            optional_ms(10_000),
            0..2000u64,
            0..3000u64,
            proptest::option::of(1..100_000u64),
        )
            .prop_map(|(idle, stall, age, jitter, grace, rate)| TimePolicies {
                idle_timeout: idle,
                write_stall_timeout: stall,
                max_age: age,
                max_age_jitter: Duration::from_millis(jitter).min(age.unwrap_or_default()),
                max_age_grace: Duration::from_millis(grace),
                throttle_bytes_per_second: rate,
            })
    }

    proptest! {
        /// The rule the driver's timer loop relies on: whenever `expire(t)` finds nothing due,
        /// the next deadline is after `t` (or there is none), whatever happened before.
        #[test]
        fn nothing_due_means_the_next_deadline_is_later(
            policies in time_policies(),
            id in any::<u64>(),
            events in proptest::collection::vec(event(), 0..40),
        ) {
            let start = Instant::now();
            let Some(mut clock) = PolicyClock::for_connection(&policies, id, start) else {
                return Ok(());
            };
            let mut now = start;
            let mut closing = false;
            for event in events {
                match event {
                    Event::Read { after_ms, n, pending } => {
                        now += Duration::from_millis(after_ms);
                        clock.record_read(now, n, pending);
                    }
                    Event::WriteProgress { after_ms, pending } => {
                        now += Duration::from_millis(after_ms);
                        clock.record_write_progress(now, pending);
                    }
                    Event::Flushed => clock.flushed(),
                    Event::Expire { after_ms } => {
                        now += Duration::from_millis(after_ms);
                        match clock.expire(&policies, now) {
                            None => {
                                let next = clock.next_deadline(&policies, closing);
                                prop_assert!(
                                    next.is_none_or(|at| at > now),
                                    "nothing due at {:?} but next deadline {:?}",
                                    now - start,
                                    next.map(|at| at - start)
                                );
                            }
                            Some(Expiry::Close(_)) => return Ok(()),
                            Some(Expiry::CloseGracefully(_)) => closing = true,
                        }
                    }
                }
            }
        }
    }
}
