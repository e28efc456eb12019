//! `--throttle-bytes-per-second`: a per-connection read throttle (Twisted's
//! `ThrottlingFactory`). A token bucket with one second of burst: each read is sized to the
//! tokens left, and while the bucket is empty the connection stops reading until it has
//! refilled; the peer's writes then back up in its kernel buffers, so the throttle needs no
//! buffer of its own.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket of bytes.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl Throttle {
    /// A full bucket of `rate` bytes, refilling at `rate` bytes per second.
    pub fn new(rate: u64, now: Instant) -> Self {
        Throttle {
            rate: rate as f64,
            tokens: rate as f64,
            refilled_at: now,
        }
    }

    /// Add the tokens earned since the last refill. At or after [`Throttle::resume_at`] the
    /// bucket is out of debt even if floating-point rounding says otherwise, so the two agree.
    pub fn refill(&mut self, now: Instant) {
        let due = self.resume_at().is_some_and(|at| now >= at);
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if due {
            self.tokens = self.tokens.max(0.0);
        }
        self.refilled_at = now;
    }

    /// Spend `n` bytes read at `now`.
    pub fn consume(&mut self, now: Instant, n: usize) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// Most bytes the next read may take: the whole tokens, at least one byte (so a bucket
    /// with a fraction of a token left still makes progress and goes at most a byte into debt).
    pub fn allowance(&self) -> usize {
        self.tokens.floor().max(1.0) as usize
    }

    /// Must reading pause?
    pub fn in_debt(&self) -> bool {
        self.tokens < 0.0
    }

    /// When reading may resume, if the bucket is in debt.
    pub fn resume_at(&self) -> Option<Instant> {
        // Rounded up to the next nanosecond and at least one: always after the last refill.
        self.in_debt().then(|| {
            let nanos = (-self.tokens / self.rate * 1e9).ceil().clamp(1.0, 1e18);
            self.refilled_at + Duration::from_nanos(nanos as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_when_in_debt_and_resumes_after_refill() {
        let now = Instant::now();
        let mut throttle = Throttle::new(1000, now);
        assert!(throttle.resume_at().is_none());
        throttle.consume(now, 1500);
        assert!(throttle.in_debt());
        assert_eq!(
            throttle.resume_at().unwrap() - now,
            Duration::from_millis(500)
        );
        throttle.refill(now + Duration::from_secs(1));
        assert!(!throttle.in_debt());
    }
}
