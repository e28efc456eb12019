//! The service's shared state: connection counts and the lifecycle phase.
//!
//! This is the single source of truth that `/metrics`, `/healthz` and `/readyz` read. The
//! counters are Prometheus metrics (an atomic each), so a scrape and a health check can never
//! disagree. The server updates them at the edges of each connection, exactly once: `made` when a
//! protocol is built, `active` when the connection task is created and again when it is dropped
//! (so a panicking protocol still leaves the count right), and `lost{reason}` on that drop.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::factory::Refusal;
use crate::protocol::LossReason;

/// Where the service is in its life. It only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Accepting connections and ready for traffic.
    Serving,
    /// A shutdown signal arrived: still accepting for `--drain-delay`, but not ready.
    Draining,
    /// The listener is closed; open connections get `--shutdown-timeout` to finish.
    Stopping,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Stopping,
        }
    }

    /// The lowercase name used in `/healthz` (`serving`, `draining`, `stopping`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        }
    }
}

/// Connection counters, registered as Prometheus metrics.
#[derive(Debug)]
pub struct ConnectionStats {
    /// `echo_connections_made_total`: protocols built.
    pub made: IntCounter,
    /// `echo_connections_active`: protocols built and not yet lost.
    pub active: IntGauge,
    /// `echo_connections_lost_total{reason}`, one child per [`LossReason::LABELS`] entry.
    lost: Vec<IntCounter>,
    lost_vec: IntCounterVec,
    /// `echo_connections_rejected_total{reason}`, one child per [`Refusal::LABELS`] entry.
    rejected: Vec<IntCounter>,
    rejected_vec: IntCounterVec,
    /// `echo_accept_errors_total`: failed `accept()` calls.
    pub accept_errors: IntCounter,
}

impl ConnectionStats {
    fn new() -> Self {
        let lost_vec = IntCounterVec::new(
            Opts::new(
                "echo_connections_lost_total",
                "Connections that ended, by reason (peer_closed and closed are clean).",
            ),
            &["reason"],
        )
        .expect("valid metric definition");
        let rejected_vec = IntCounterVec::new(
            Opts::new(
                "echo_connections_rejected_total",
                "Connections accepted and closed at once because a policy refused them, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric definition");
        ConnectionStats {
            made: IntCounter::new(
                "echo_connections_made_total",
                "Connections accepted and handed to a protocol.",
            )
            .expect("valid metric definition"),
            active: IntGauge::new(
                "echo_connections_active",
                "Connections currently open (made and not yet lost).",
            )
            .expect("valid metric definition"),
            lost: LossReason::LABELS
                .iter()
                .map(|label| lost_vec.with_label_values(&[label]))
                .collect(),
            lost_vec,
            rejected: Refusal::LABELS
                .iter()
                .map(|label| rejected_vec.with_label_values(&[label]))
                .collect(),
            rejected_vec,
            accept_errors: IntCounter::new(
                "echo_accept_errors_total",
                "accept() calls that failed (EMFILE, ENFILE, ECONNABORTED, ...).",
            )
            .expect("valid metric definition"),
        }
    }

    /// Register every counter in `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.made.clone()))?;
        registry.register(Box::new(self.active.clone()))?;
        registry.register(Box::new(self.lost_vec.clone()))?;
        registry.register(Box::new(self.rejected_vec.clone()))?;
        registry.register(Box::new(self.accept_errors.clone()))?;
        Ok(())
    }

    /// The counter for connections lost for `reason`.
    pub fn lost(&self, reason: LossReason) -> &IntCounter {
        &self.lost[reason.index()]
    }

    /// Connections lost for any reason.
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().map(IntCounter::get).sum()
    }

    /// The counter for connections refused for `refusal`.
    pub fn rejected(&self, refusal: Refusal) -> &IntCounter {
        &self.rejected[refusal.index()]
    }
}

/// Everything shared between the server, the policies and the admin endpoints.
#[derive(Debug)]
pub struct ServiceState {
    /// Connection counters.
    pub stats: ConnectionStats,
    /// The current [`Phase`] as its `u8` discriminant; it only grows.
    phase: AtomicU8,
    started_at: Instant,
    /// `--max-connections`, when set: readiness reports "at capacity" at this many.
    max_connections: Option<u64>,
    /// `POST /readyz/disable` turned readiness off (reason `disabled`) while serving goes on.
    ready_disabled: AtomicBool,
}

impl ServiceState {
    /// Fresh state in [`Phase::Serving`]; `max_connections` is the total connection limit, if any.
    pub fn new(max_connections: Option<u64>) -> Self {
        ServiceState {
            stats: ConnectionStats::new(),
            phase: AtomicU8::new(Phase::Serving as u8),
            started_at: Instant::now(),
            max_connections,
            ready_disabled: AtomicBool::new(false),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Move to `phase` (never backwards).
    pub fn advance(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
    }

    /// True while the total connection limit is reached.
    pub fn at_capacity(&self) -> bool {
        self.max_connections
            .is_some_and(|max| self.stats.active.get() >= max as i64)
    }

    /// Why the service is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        match self.phase() {
            Phase::Serving if self.ready_disabled.load(Ordering::Relaxed) => Some("disabled"),
            Phase::Serving if self.at_capacity() => Some("at_capacity"),
            Phase::Serving => None,
            Phase::Draining => Some("draining"),
            Phase::Stopping => Some("stopping"),
        }
    }

    /// Turn readiness off (`POST /readyz/disable`: reason `disabled`) or back on; returns
    /// whether it was disabled before.
    pub fn set_ready_disabled(&self, disabled: bool) -> bool {
        self.ready_disabled.swap(disabled, Ordering::Relaxed)
    }

    /// Seconds since the state was created (process start, in practice).
    pub fn uptime_seconds(&self) -> f64 {
        self.started_at.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_only_moves_forward() {
        let state = ServiceState::new(None);
        state.advance(Phase::Stopping);
        state.advance(Phase::Draining);
        assert_eq!(state.phase(), Phase::Stopping);
    }

    #[test]
    fn readiness_reports_capacity_then_draining() {
        let state = ServiceState::new(Some(1));
        assert_eq!(state.not_ready_reason(), None);
        state.stats.active.inc();
        assert_eq!(state.not_ready_reason(), Some("at_capacity"));
        state.advance(Phase::Draining);
        assert_eq!(state.not_ready_reason(), Some("draining"));
    }

    #[test]
    fn readiness_can_be_disabled_and_enabled_while_serving() {
        let state = ServiceState::new(None);
        assert!(!state.set_ready_disabled(true));
        assert_eq!(state.not_ready_reason(), Some("disabled"));
        assert!(state.set_ready_disabled(false));
        assert_eq!(state.not_ready_reason(), None);
        state.set_ready_disabled(true);
        state.advance(Phase::Draining);
        assert_eq!(
            state.not_ready_reason(),
            Some("draining"),
            "draining says more"
        );
    }
}
