//! The PROXY protocol (v1 and v2): see the original client through a load balancer.
//!
//! - [`parser`]: the header parser, pure and I/O-free.
//! - [`encode`]: the sender's side, for tests, fuzz seeds and benchmarks.
//! - `crc32c`: the checksum of the v2 CRC32C TLV.

mod crc32c;
pub mod encode;
pub mod parser;
#[cfg(test)]
mod parser_tests;

pub use crc32c::checksum as crc32c;
pub use parser::{parse, Addresses, Header, ParseError, Parsed, SslInfo, Tlvs, Version};
