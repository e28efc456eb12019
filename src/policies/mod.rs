//! Connection policies, after Twisted's `twisted.protocols.policies`.
//!
//! Admission policies are wrapping factories: they wrap the factory of the service and refuse a
//! connection before a protocol exists ([`ConnectionLimit`] = `LimitTotalConnectionsFactory`,
//! [`PeerConnectionLimit`] = `LimitConnectionsByPeer`). Refusals are counted in
//! `echo_connections_rejected_total{reason}` by the server.
//!
//! Time policies (`TimeoutMixin`, `ThrottlingFactory`: idle timeout, write-stall timeout, max
//! connection age with jitter, read throttle) need the socket's state (is the peer reading? when
//! did bytes last move?), so the connection driver consults them: they are configured in
//! [`ConnectionSettings`](crate::ConnectionSettings), kept per connection in one boxed clock
//! (`timeouts.rs`, `throttle.rs`) that exists only when a time policy is set, and end connections
//! with their own [`LossReason`](crate::LossReason) (`idle_timeout`, `write_stall`, `max_age`).

mod connection_limit;
mod peer_limit;
pub(crate) mod throttle;
pub(crate) mod timeouts;

pub use connection_limit::ConnectionLimit;
pub use peer_limit::{PeerConnectionLimit, PeerLimited};
