//! The PROXY protocol (v1 and v2): see the original client through a load balancer.
//!
//! - [`parser`]: the header parser, pure and I/O-free.
//! - `layer.rs`: [`ProxyProtocolFactory`], the wrapping factory and protocol that read the
//!   header and show the inner protocol the original client.
//! - `trust.rs`: [`TrustedNetworks`], whose headers are believed.
//! - [`encode`]: the sender's side, for tests, fuzz seeds and benchmarks.
//! - `crc32c`: the checksum of the v2 CRC32C TLV.

mod crc32c;
pub mod encode;
mod layer;
#[cfg(test)]
mod layer_tests;
pub mod parser;
#[cfg(test)]
mod parser_tests;
mod trust;

pub use crc32c::checksum as crc32c;
pub use layer::{
    Proxied, ProxyMode, ProxyProtocol, ProxyProtocolFactory, ProxyResult, ProxySettings,
};
pub use parser::{parse, Addresses, Header, ParseError, Parsed, SslInfo, Tlvs, Version};
pub use trust::{Cidr, TrustedNetworks};
