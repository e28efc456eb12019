//! Fault injection (issue 10): misbehave on purpose, per connection, so users can watch how
//! their load balancers, meshes and clients react to a slow, resetting, refusing or silent
//! backend. Every injected fault is chosen deliberately (a probability, a seeded draw, an
//! optional client filter), counted (`echo_faults_injected_total{fault}`), visible on the
//! connection span (`echo.fault`) and in the loss reason (`fault_close`, `fault_reset`), and
//! costs nothing when off: the layer is not even in the stack then.
//!
//! - `spec.rs`: the one way to write a fault (`--fault`, `ECHO_FAULTS`, JSON on the admin
//!   port), parsed and validated in one place.
//! - `set.rs`: the faults in force (replaced at runtime by `PUT /faults`) and the seeded
//!   choice of a connection's fault.
//! - `layer.rs`: the wrapping factory and protocol that apply it through the transport.

mod layer;
mod set;
mod spec;

pub use layer::{FaultFactory, Faulty};
pub use set::{choose, draw, FaultControl, FaultCounters};
pub use spec::{duration_text, parse_json, parse_specs, FaultError, FaultKind, FaultSpec};
