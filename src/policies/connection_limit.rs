//! `--max-connections`: refuse connections while the service already has that many open.
//!
//! The server accepts and closes refused connections at once (they don't wait in the kernel
//! backlog), and `/readyz` reports `at_capacity` while the limit is reached, so Kubernetes sends
//! new traffic to other pods.

use std::sync::Arc;

use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::state::ServiceState;

/// Wraps a factory and refuses with [`Refusal::Limit`] at the service's connection limit
/// ([`ServiceState::max_connections`]); no limit configured means no refusals.
pub struct ConnectionLimit<F> {
    inner: F,
    state: Arc<ServiceState>,
}

impl<F> ConnectionLimit<F> {
    /// Limit `inner` to the `max_connections` configured in `state`.
    pub fn new(inner: F, state: Arc<ServiceState>) -> Self {
        ConnectionLimit { inner, state }
    }
}

impl<F: Factory> Factory for ConnectionLimit<F> {
    type Protocol = F::Protocol;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<F::Protocol, Refusal> {
        // The accept loop builds protocols one at a time and `active` only goes up after a
        // build, so this check cannot be raced past the limit.
        if self.state.at_capacity() {
            return Err(Refusal::Limit);
        }
        self.inner.build_protocol(conn)
    }

    fn start_factory(&self) {
        self.inner.start_factory();
    }

    fn stop_factory(&self) {
        self.inner.stop_factory();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::EchoFactory;

    fn conn() -> ConnectionInfo {
        ConnectionInfo {
            id: 1,
            peer: "127.0.0.1:1000".parse().unwrap(),
            local: "127.0.0.1:8000".parse().unwrap(),
        }
    }

    #[test]
    fn refuses_at_the_limit_and_admits_below_it() {
        let state = Arc::new(ServiceState::new(Some(2)));
        let factory = ConnectionLimit::new(EchoFactory, state.clone());
        assert!(factory.build_protocol(&conn()).is_ok());
        state.stats.opened();
        // The limit counts every listener's connections.
        state.for_listener("tls").stats.opened();
        assert_eq!(factory.build_protocol(&conn()).err(), Some(Refusal::Limit));
        state.stats.closed();
        assert!(factory.build_protocol(&conn()).is_ok());
    }

    #[test]
    fn no_limit_never_refuses() {
        let state = Arc::new(ServiceState::new(None));
        for _ in 0..100_000 {
            state.stats.opened();
        }
        let factory = ConnectionLimit::new(EchoFactory, state);
        assert!(factory.build_protocol(&conn()).is_ok());
    }
}
