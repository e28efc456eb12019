//! `--max-connections-per-peer`: refuse a peer IP that already has that many connections open,
//! so one client can't take all the capacity.
//!
//! The peer is normally known at accept, and the policy refuses before a protocol exists.
//! Behind a PROXY header layer the peer that counts is the original client, known only once
//! the header is read: [`PeerConnectionLimit::when_made`] checks at `connection_made`, through
//! the transport's `peer_addr()` (which the layer sets to the original client), and a refused
//! connection is reset and counted in `echo_connections_rejected_total{reason="peer_limit"}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;

use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::{LossReason, Protocol};
use crate::transport::Transport;

type PeerCounts = Arc<Mutex<HashMap<IpAddr, u32>>>;

/// Wraps a factory and refuses with [`Refusal::PeerLimit`] when the peer's IP is at `max`.
/// `None` disables the policy (and its bookkeeping).
pub struct PeerConnectionLimit<F> {
    inner: F,
    max: Option<u32>,
    counts: PeerCounts,
    /// Set by [`PeerConnectionLimit::when_made`]: check at `connection_made`, not at accept.
    deferred: Option<Arc<Deferred>>,
}

/// What a protocol needs to check its peer at `connection_made`.
struct Deferred {
    counts: PeerCounts,
    max: u32,
    /// `echo_connections_rejected_total{reason="peer_limit"}`.
    rejected: IntCounter,
}

impl<F> PeerConnectionLimit<F> {
    /// Allow at most `max` open connections per peer IP, checked at accept.
    pub fn new(inner: F, max: Option<u32>) -> Self {
        PeerConnectionLimit {
            inner,
            max,
            counts: PeerCounts::default(),
            deferred: None,
        }
    }

    /// Allow at most `max` open connections per peer IP, checked when the connection is made
    /// against the transport's peer (the original client behind a PROXY header layer);
    /// refusals reset the connection and count in `rejected`.
    pub fn when_made(inner: F, max: Option<u32>, rejected: IntCounter) -> Self {
        let counts = PeerCounts::default();
        PeerConnectionLimit {
            inner,
            max,
            deferred: max.map(|max| {
                Arc::new(Deferred {
                    counts: counts.clone(),
                    max,
                    rejected,
                })
            }),
            counts,
        }
    }
}

impl<F: Factory> Factory for PeerConnectionLimit<F> {
    type Protocol = PeerLimited<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        let Some(max) = self.max.filter(|_| self.deferred.is_none()) else {
            return Ok(PeerLimited {
                inner: self.inner.build_protocol(conn)?,
                slot: self
                    .deferred
                    .clone()
                    .map(|deferred| Box::new(Slot::Unchecked(deferred))),
            });
        };
        let slot =
            PeerSlot::try_take(&self.counts, conn.peer.ip(), max).ok_or(Refusal::PeerLimit)?;
        Ok(PeerLimited {
            inner: self.inner.build_protocol(conn)?,
            slot: Some(Box::new(Slot::Held(slot))),
        })
    }

    fn start_factory(&self) {
        self.inner.start_factory();
    }

    fn stop_factory(&self) {
        self.inner.stop_factory();
    }
}

/// One open connection counted against its peer IP; released on drop, so a panicking
/// protocol still frees its slot.
struct PeerSlot {
    counts: PeerCounts,
    ip: IpAddr,
}

impl PeerSlot {
    /// Count one more connection of `ip`, unless it already has `max`: the check and the
    /// count under one lock.
    fn try_take(counts: &PeerCounts, ip: IpAddr, max: u32) -> Option<Self> {
        let mut locked = counts.lock().unwrap_or_else(|p| p.into_inner());
        if locked.get(&ip).copied().unwrap_or(0) >= max {
            return None;
        }
        *locked.entry(ip).or_insert(0) += 1;
        Some(PeerSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The wrapped protocol: forwards every event, holds the peer's slot while it lives (boxed:
/// one pointer in every connection's task when the policy is off). A connection refused at
/// `connection_made` (deferred mode) is reset; its inner protocol only sees `connection_lost`.
pub struct PeerLimited<P> {
    inner: P,
    slot: Option<Box<Slot>>,
}

/// A connection's standing with the policy.
enum Slot {
    /// Deferred mode, before `connection_made`: the check is still to do.
    Unchecked(Arc<Deferred>),
    /// Counted against its peer.
    #[allow(dead_code)] // held for its Drop
    Held(PeerSlot),
}

impl<P: Protocol> Protocol for PeerLimited<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        if let Some(Slot::Unchecked(deferred)) = self.slot.as_deref() {
            let ip = transport.peer_addr().ip();
            match PeerSlot::try_take(&deferred.counts, ip, deferred.max) {
                Some(slot) => self.slot = Some(Box::new(Slot::Held(slot))),
                None => {
                    deferred.rejected.inc();
                    tracing::debug!(peer = %ip, refusal = %Refusal::PeerLimit, "connection refused");
                    self.slot = None;
                    transport.abort_connection();
                    return;
                }
            }
        }
        self.inner.connection_made(transport);
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.inner.data_received(data, transport);
    }

    fn bytes_sent(&mut self, n: usize) {
        self.inner.bytes_sent(n);
    }

    fn connection_lost(&mut self, reason: LossReason) {
        self.inner.connection_lost(reason);
    }

    fn deadline(&self) -> Option<(tokio::time::Instant, LossReason)> {
        self.inner.deadline()
    }

    fn timer(&self) -> Option<tokio::time::Instant> {
        self.inner.timer()
    }

    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        self.inner.timer_fired(transport);
    }

    fn write_pending(&self) -> bool {
        self.inner.write_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::EchoFactory;

    fn from(ip: &str) -> ConnectionInfo {
        ConnectionInfo {
            id: 1,
            peer: format!("{ip}:1000").parse().unwrap(),
            local: "127.0.0.1:8000".parse().unwrap(),
        }
    }

    #[test]
    fn limits_each_peer_separately_and_frees_slots_on_drop() {
        let factory = PeerConnectionLimit::new(EchoFactory, Some(2));
        let a1 = factory.build_protocol(&from("10.0.0.1")).unwrap();
        let _a2 = factory.build_protocol(&from("10.0.0.1")).unwrap();
        assert_eq!(
            factory.build_protocol(&from("10.0.0.1")).err(),
            Some(Refusal::PeerLimit)
        );
        assert!(factory.build_protocol(&from("10.0.0.2")).is_ok());
        drop(a1);
        assert!(factory.build_protocol(&from("10.0.0.1")).is_ok());
    }

    #[test]
    fn deferred_mode_counts_the_peer_the_transport_reports() {
        use crate::transport::MemoryTransport;
        let rejected = IntCounter::new("rejected", "test").unwrap();
        let factory = PeerConnectionLimit::when_made(EchoFactory, Some(1), rejected.clone());
        // Both accepted from the same proxy address: nothing is decided at build time.
        let mut a = factory.build_protocol(&from("10.0.0.9")).unwrap();
        let mut b = factory.build_protocol(&from("10.0.0.9")).unwrap();
        let mut c = factory.build_protocol(&from("10.0.0.9")).unwrap();
        let local = "127.0.0.1:8000".parse().unwrap();
        let mut ta = MemoryTransport::with_addrs("192.0.2.1:5000".parse().unwrap(), local);
        let mut tb = MemoryTransport::with_addrs("192.0.2.2:5000".parse().unwrap(), local);
        let mut tc = MemoryTransport::with_addrs("192.0.2.1:5001".parse().unwrap(), local);
        a.connection_made(&mut ta);
        b.connection_made(&mut tb);
        c.connection_made(&mut tc);
        assert!(!ta.is_aborted() && !tb.is_aborted());
        assert!(
            tc.is_aborted(),
            "second connection of client 192.0.2.1 is refused"
        );
        assert_eq!(rejected.get(), 1);
        drop(a);
        let mut d = factory.build_protocol(&from("10.0.0.9")).unwrap();
        let mut td = MemoryTransport::with_addrs("192.0.2.1:5002".parse().unwrap(), local);
        d.connection_made(&mut td);
        assert!(!td.is_aborted(), "slot freed by the drop");
    }

    #[test]
    fn disabled_keeps_no_bookkeeping() {
        let factory = PeerConnectionLimit::new(EchoFactory, None);
        let _held: Vec<_> = (0..100)
            .map(|_| factory.build_protocol(&from("10.0.0.1")).unwrap())
            .collect();
        assert!(factory.counts.lock().unwrap().is_empty());
    }
}
