//! Address ranges in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or a bare address), for
//! `listen.trusted_proxies`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range. An IPv4 peer seen on a dual-stack socket as `::ffff:a.b.c.d`
    /// is the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => masked(u32::from(ip).into(), 32, self.prefix) == u32::from(net).into(),
            (IpAddr::V6(net), IpAddr::V6(ip)) => masked(u128::from(ip), 128, self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

/// Whether any range of `list` holds `ip`.
pub fn any_contains(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// `bits` keeps its first `prefix` bits of `width`.
fn masked(bits: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let mask = (u128::MAX >> (128 - u32::from(width))) & !((1u128 << (width - prefix)) - 1);
    bits & mask
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let ip = ip.to_canonical();
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            // Digits only, no leading zero or sign ("08" and "+8" are typos more likely than intent).
            Some(text) => match text.parse::<u8>() {
                Ok(p) if p <= width && p.to_string() == text => p,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {width}")),
            },
        };
        let bits = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        if masked(bits, width, prefix) != bits {
            return Err(format!("{s:?} has host bits set: the range starts at a lower address"));
        }
        Ok(Cidr { network: ip, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_hold_their_addresses_only() {
        let net = cidr("10.1.0.0/16");
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "an IPv4-mapped peer is its IPv4 address");
        assert!(!net.contains("fd00::1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("192.0.2.1".parse().unwrap()));
        assert!(cidr("127.0.0.1").contains("127.0.0.1".parse().unwrap()));
        assert!(!cidr("127.0.0.1").contains("127.0.0.2".parse().unwrap()));
        let v6 = cidr("fd00::/8");
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(cidr("::1/128").contains("::1".parse().unwrap()));
        assert_eq!(cidr("::/0").to_string(), "::/0");
    }

    #[test]
    fn bad_ranges_are_refused() {
        for bad in ["10.0.0.0/33", "10.0.0.1/8", "host", "10.0.0.0/", "10.0.0.0/+8", "fd00::/129", "10.0.0.0/08"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} must be refused");
        }
    }
}
