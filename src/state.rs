//! The service's shared state: connection counts and the lifecycle phase.
//!
//! This is the single source of truth that `/metrics`, `/healthz` and `/readyz` read. The
//! counters are Prometheus metrics (an atomic each), so a scrape and a health check can never
//! disagree. The server updates them at the edges of each connection, exactly once: `made` when a
//! protocol is built, `active` when the connection task is created and again when it is dropped
//! (so a panicking protocol still leaves the count right), and `lost{reason}` on that drop.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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

/// The `listener` label value of the echo port's connection metrics. Every connection metric
/// carries a `listener` label naming the listener kind (`tcp`, `identity`; `tls`, `udp` by
/// the same rule), `kind:port` (e.g. `tcp:8001`) only when several listeners of one kind exist.
pub const ECHO_LISTENER: &str = "tcp";

/// Connection counters of one listener, registered as Prometheus metrics. The vectors are
/// shared by every listener ([`ConnectionStats::for_listener`]); the children belong to one.
#[derive(Debug)]
pub struct ConnectionStats {
    /// `echo_connections_made_total{listener}`: protocols built.
    pub made: IntCounter,
    /// `echo_connections_active{listener}`: protocols built and not yet lost.
    pub active: IntGauge,
    /// `echo_connections_lost_total{listener,reason}`, one child per [`LossReason::LABELS`].
    lost: Vec<IntCounter>,
    /// `echo_connections_rejected_total{listener,reason}`, one child per [`Refusal::LABELS`].
    rejected: Vec<IntCounter>,
    /// `echo_accept_errors_total{listener}`: failed `accept()` calls.
    pub accept_errors: IntCounter,
    vecs: StatVecs,
}

/// The metric families, shared by the stats of every listener.
#[derive(Debug, Clone)]
struct StatVecs {
    /// Open connections over every listener: what `--max-connections` limits (the descriptors
    /// it protects are the process's, whichever port they came from).
    total_active: Arc<AtomicI64>,
    made: IntCounterVec,
    active: IntGaugeVec,
    lost: IntCounterVec,
    rejected: IntCounterVec,
    accept_errors: IntCounterVec,
}

impl ConnectionStats {
    fn new(listener: &str) -> Self {
        let vecs = StatVecs {
            total_active: Arc::new(AtomicI64::new(0)),
            made: IntCounterVec::new(
                Opts::new(
                    "echo_connections_made_total",
                    "Connections accepted and handed to a protocol.",
                ),
                &["listener"],
            )
            .expect("valid metric definition"),
            active: IntGaugeVec::new(
                Opts::new(
                    "echo_connections_active",
                    "Connections currently open (made and not yet lost).",
                ),
                &["listener"],
            )
            .expect("valid metric definition"),
            lost: IntCounterVec::new(
                Opts::new(
                    "echo_connections_lost_total",
                    "Connections that ended, by reason (peer_closed and closed are clean).",
                ),
                &["listener", "reason"],
            )
            .expect("valid metric definition"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "echo_connections_rejected_total",
                    "Connections accepted and closed at once because a policy refused them, by reason.",
                ),
                &["listener", "reason"],
            )
            .expect("valid metric definition"),
            accept_errors: IntCounterVec::new(
                Opts::new(
                    "echo_accept_errors_total",
                    "accept() calls that failed (EMFILE, ENFILE, ECONNABORTED, ...).",
                ),
                &["listener"],
            )
            .expect("valid metric definition"),
        };
        Self::with_vecs(vecs, listener)
    }

    fn with_vecs(vecs: StatVecs, listener: &str) -> Self {
        ConnectionStats {
            made: vecs.made.with_label_values(&[listener]),
            active: vecs.active.with_label_values(&[listener]),
            lost: LossReason::LABELS
                .iter()
                .map(|label| vecs.lost.with_label_values(&[listener, label]))
                .collect(),
            rejected: Refusal::LABELS
                .iter()
                .map(|label| vecs.rejected.with_label_values(&[listener, label]))
                .collect(),
            accept_errors: vecs.accept_errors.with_label_values(&[listener]),
            vecs,
        }
    }

    /// The counters of another listener (label value `listener`), in the same metric families.
    pub fn for_listener(&self, listener: &str) -> Self {
        Self::with_vecs(self.vecs.clone(), listener)
    }

    /// A connection of this listener opened: `echo_connections_active` and the process total.
    pub fn opened(&self) {
        self.active.inc();
        self.vecs.total_active.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection of this listener closed.
    pub fn closed(&self) {
        self.active.dec();
        self.vecs.total_active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Open connections over every listener.
    pub fn total_active(&self) -> i64 {
        self.vecs.total_active.load(Ordering::Relaxed)
    }

    /// Connections made and lost over every listener (for `/healthz`; reads every child).
    pub fn totals_made_lost(&self) -> (u64, u64) {
        let sum = |vec: &IntCounterVec| -> u64 {
            use prometheus::core::Collector;
            vec.collect()
                .iter()
                .flat_map(|family| family.get_metric())
                .map(|m| m.get_counter().get_value() as u64)
                .sum()
        };
        (sum(&self.vecs.made), sum(&self.vecs.lost))
    }

    /// Register every metric family in `registry` (once, whatever the number of listeners).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.vecs.made.clone()))?;
        registry.register(Box::new(self.vecs.active.clone()))?;
        registry.register(Box::new(self.vecs.lost.clone()))?;
        registry.register(Box::new(self.vecs.rejected.clone()))?;
        registry.register(Box::new(self.vecs.accept_errors.clone()))?;
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
    /// Fresh state in [`Phase::Serving`] for the echo port (listener `tcp`);
    /// `max_connections` is the total connection limit, if any.
    pub fn new(max_connections: Option<u64>) -> Self {
        Self::for_first_listener(max_connections, ECHO_LISTENER)
    }

    /// Fresh state whose own counters are labelled `listener` (the first echo port, `tcp` or
    /// `tcp:PORT`); other listeners get theirs from [`ServiceState::for_listener`]. Its phase is
    /// the one `/healthz` and `/readyz` report.
    pub fn for_first_listener(max_connections: Option<u64>, listener: &str) -> Self {
        ServiceState {
            stats: ConnectionStats::new(listener),
            phase: AtomicU8::new(Phase::Serving as u8),
            started_at: Instant::now(),
            max_connections,
            ready_disabled: AtomicBool::new(false),
        }
    }

    /// The state of another listener of the same process: its own counters, labelled
    /// `listener`, and its own phase, driven by its own server; the connection limit is the
    /// process's, counted over every listener.
    pub fn for_listener(&self, listener: &str) -> Self {
        ServiceState {
            stats: self.stats.for_listener(listener),
            phase: AtomicU8::new(Phase::Serving as u8),
            started_at: self.started_at,
            max_connections: self.max_connections,
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

    /// `--max-connections`, when set (exported as `echo_connections_limit`).
    pub fn max_connections(&self) -> Option<u64> {
        self.max_connections
    }

    /// True while the total connection limit is reached (over every listener).
    pub fn at_capacity(&self) -> bool {
        self.max_connections
            .is_some_and(|max| self.stats.total_active() >= max as i64)
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
        state.stats.opened();
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
