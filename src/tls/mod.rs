//! TLS and mTLS echo: a TLS layer wraps whatever protocol a listener serves, as Twisted wraps
//! protocols in `TLSMemoryBIOProtocol`. The connection driver moves ciphertext; nothing in it
//! knows about TLS, and the echo protocol does not change.
//!
//! - `settings.rs`: the flags and building a rustls `ServerConfig` (ring provider, TLS 1.2 and
//!   1.3, optional or required client certificates, ALPN).
//! - `store.rs`: the current configuration, re-read when the files change (Secret rotation).
//! - `protocol.rs`: [`TlsFactory`] / [`TlsProtocol`], the wrapping layer.
//! - `x509.rs`: the certificate fields the service reports (validity, subject).
//! - `tests.rs`: the layer against an in-memory rustls client (what reaches the driver, and in
//!   how many writes).

mod protocol;
mod settings;
mod store;
mod x509;

#[cfg(test)]
mod tests;

pub use protocol::{TlsFactory, TlsProtocol};
pub use settings::{ClientAuth, TlsSettings};
pub use store::CertStore;
pub use x509::Validity;
