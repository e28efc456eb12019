//! The fault set in force and the choice, per connection, of the fault it gets.
//!
//! [`FaultControl`] holds the current list (replaced whole by `PUT /faults`; connections keep
//! the fault they were given) and the seed. The choice is a pure function of the seed, the
//! connection number (accept order) and the client's address: each fault in list order
//! draws `u = splitmix64(seed, connection, position)` in [0, 1) and applies when
//! `u < probability` and the client is in its `peers`; the first that applies wins, so a
//! connection gets at most one fault. A run with the same `--fault-seed` and the same
//! connections in the same order faults the same connections.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use prometheus::{IntCounter, IntGauge};

use super::spec::{FaultKind, FaultSpec};
use crate::mix::{splitmix64, unit};

/// The fault metrics, one child per [`FaultKind::LABELS`] entry (registered with the rest in
/// `telemetry/metrics.rs`, which reads the labels from here: data flows one way).
#[derive(Debug)]
pub struct FaultCounters {
    /// `echo_faults_enabled{fault}`: 1 while a fault of that kind is configured with a
    /// probability above 0.
    pub enabled: [IntGauge; 7],
    /// `echo_faults_injected_total{fault}`: connections that got a fault of that kind.
    pub injected: [IntCounter; 7],
}

/// The faults in force and what counts them.
pub struct FaultControl {
    current: RwLock<Arc<Vec<FaultSpec>>>,
    seed: u64,
    metrics: Arc<FaultCounters>,
}

impl FaultControl {
    /// Start with `faults`, choosing with `seed`, counting into `metrics`.
    pub fn new(faults: Vec<FaultSpec>, seed: u64, metrics: Arc<FaultCounters>) -> Self {
        let control = FaultControl {
            current: RwLock::new(Arc::new(Vec::new())),
            seed,
            metrics,
        };
        control.replace(faults);
        control
    }

    /// The faults in force now.
    pub fn current(&self) -> Arc<Vec<FaultSpec>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the whole set (new connections only); returns the previous one.
    pub fn replace(&self, faults: Vec<FaultSpec>) -> Arc<Vec<FaultSpec>> {
        for kind in FaultKind::ALL {
            let on = faults.iter().any(|f| f.kind == kind && f.probability > 0.0);
            self.metrics.enabled[kind.index()].set(i64::from(on));
        }
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(faults),
        )
    }

    /// The fault connection `conn_id` from `client` gets, if any; counted as injected.
    pub fn choose(&self, conn_id: u64, client: IpAddr) -> Option<FaultSpec> {
        let faults = self.current();
        let chosen = choose(&faults, self.seed, conn_id, client)?.clone();
        self.metrics.injected[chosen.kind.index()].inc();
        Some(chosen)
    }
}

/// The first fault of `faults` that applies to connection `conn_id` from `client`.
pub fn choose(faults: &[FaultSpec], seed: u64, conn_id: u64, client: IpAddr) -> Option<&FaultSpec> {
    faults.iter().enumerate().find_map(|(position, fault)| {
        let u = unit(draw(seed, conn_id, position as u64));
        (fault.covers(client) && u < fault.probability).then_some(fault)
    })
}

/// One 64-bit draw per (seed, connection, fault position): splitmix64 over a counter made of
/// the three, so draws are independent across connections and faults.
pub fn draw(seed: u64, conn_id: u64, position: u64) -> u64 {
    splitmix64(splitmix64(seed ^ splitmix64(conn_id)).wrapping_add(position))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::spec::parse_specs;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn same_seed_same_choice_and_the_rate_is_the_probability() {
        let faults = parse_specs("refuse,probability=0.5").unwrap();
        let run = |seed| {
            (1..=10_000u64)
                .filter(|&id| choose(&faults, seed, id, ip("127.0.0.1")).is_some())
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (run(7), run(7), run(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Binomial(10000, 0.5): sd 50; 5 sd either way.
        assert!((4750..=5250).contains(&a.len()), "{}", a.len());
    }

    #[test]
    fn first_applicable_fault_wins_and_peers_limit_it() {
        let faults = parse_specs("refuse,peers=10.0.0.0/8; latency,delay=1ms; reset").unwrap();
        let from_10 = choose(&faults, 1, 1, ip("10.0.0.1")).unwrap();
        assert_eq!(from_10.kind, FaultKind::Refuse);
        let other = choose(&faults, 1, 1, ip("192.0.2.1")).unwrap();
        assert_eq!(other.kind, FaultKind::Latency);
        let never = parse_specs("reset,probability=0").unwrap();
        assert!((1..1000).all(|id| choose(&never, 1, id, ip("::1")).is_none()));
    }
}
