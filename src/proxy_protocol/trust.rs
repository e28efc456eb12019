//! `--proxy-protocol-trusted`: the networks whose PROXY headers are believed. A header is a
//! claim about who the client is; only a load balancer the operator trusts may make it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One network, `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Is `ip` inside this network? IPv4-mapped IPv6 peers are compared as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("'{text}' is not an IP address or CIDR"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{text}': prefix length must be 0..={max}"))?,
        };
        Ok(Cidr {
            network: network.to_canonical(),
            prefix: if network.to_canonical().is_ipv4() && !network.is_ipv4() {
                prefix.saturating_sub(96)
            } else {
                prefix
            },
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The trusted networks; empty means every peer is trusted (the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedNetworks(Vec<Cidr>);

impl TrustedNetworks {
    /// Is a header from `peer` believed?
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|cidr| cidr.contains(peer))
    }
}

impl FromStr for TrustedNetworks {
    type Err = String;

    /// A comma-separated list of CIDRs; empty entries are ignored.
    fn from_str(text: &str) -> Result<Self, String> {
        text.split(',')
            .filter(|part| !part.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedNetworks)
    }
}

impl fmt::Display for TrustedNetworks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("any");
        }
        for (i, cidr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{cidr}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_family_and_prefix() {
        let nets: TrustedNetworks = "10.0.0.0/8, 192.168.1.7,2001:db8::/32,::ffff:172.16.0.0/108"
            .parse()
            .unwrap();
        for (ip, trusted) in [
            ("10.255.0.1", true),
            ("11.0.0.1", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("2001:db8:1::1", true),
            ("2001:db9::1", false),
            ("::ffff:10.1.1.1", true),
            ("172.16.3.4", true),
            ("172.32.0.1", false),
        ] {
            assert_eq!(nets.trusts(ip.parse().unwrap()), trusted, "{ip}");
        }
        assert!(TrustedNetworks::default().trusts("8.8.8.8".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "nope", "10.0.0.0/x"] {
            assert!(bad.parse::<TrustedNetworks>().is_err(), "{bad}");
        }
    }
}
