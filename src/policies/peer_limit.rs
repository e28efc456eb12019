//! `--max-connections-per-peer`: refuse a peer IP that already has that many connections open,
//! so one client can't take all the capacity.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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
}

impl<F> PeerConnectionLimit<F> {
    /// Allow at most `max` open connections per peer IP.
    pub fn new(inner: F, max: Option<u32>) -> Self {
        PeerConnectionLimit {
            inner,
            max,
            counts: PeerCounts::default(),
        }
    }
}

impl<F: Factory> Factory for PeerConnectionLimit<F> {
    type Protocol = PeerLimited<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        let Some(max) = self.max else {
            return Ok(PeerLimited {
                inner: self.inner.build_protocol(conn)?,
                slot: None,
            });
        };
        let ip = conn.peer.ip();
        {
            let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            if counts.get(&ip).copied().unwrap_or(0) >= max {
                return Err(Refusal::PeerLimit);
            }
        }
        let inner = self.inner.build_protocol(conn)?;
        Ok(PeerLimited {
            inner,
            slot: Some(Box::new(PeerSlot::take(self.counts.clone(), ip))),
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
    fn take(counts: PeerCounts, ip: IpAddr) -> Self {
        *counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ip)
            .or_insert(0) += 1;
        PeerSlot { counts, ip }
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
/// one pointer in every connection's task when the policy is off).
pub struct PeerLimited<P> {
    inner: P,
    #[allow(dead_code)] // held for its Drop
    slot: Option<Box<PeerSlot>>,
}

impl<P: Protocol> Protocol for PeerLimited<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
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
    fn disabled_keeps_no_bookkeeping() {
        let factory = PeerConnectionLimit::new(EchoFactory, None);
        let _held: Vec<_> = (0..100)
            .map(|_| factory.build_protocol(&from("10.0.0.1")).unwrap())
            .collect();
        assert!(factory.counts.lock().unwrap().is_empty());
    }
}
