//! Network vocabulary: protocols, ports (numbers, names, ranges) and CIDRs.

use std::net::IpAddr;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::decode::{Cx, Decode, integer, parse_scalar};
use crate::meta::is_dns_label;
use crate::string_enum;
use crate::yaml::{Node, Plain, Value, plain_scalar};

string_enum! {
    /// Transport protocol of a flow or a policy port.
    pub enum Protocol {
        Tcp = "TCP",
        Udp = "UDP",
        Sctp = "SCTP",
    }
}

/// A port as policies write it: a number or the name of a workload's port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(s) => f.write_str(s),
        }
    }
}

impl Serialize for PortRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortRef::Number(n) => s.serialize_u16(*n),
            PortRef::Name(n) => s.serialize_str(n),
        }
    }
}

impl Decode for PortRef {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        if let Value::Scalar {
            text,
            quoted: false,
        } = &node.value
            && let Plain::Int(_) = plain_scalar(text)
        {
            return integer(node, cx, 1, 65535)
                .and_then(|n| u16::try_from(n).ok())
                .map(PortRef::Number);
        }
        let name: String = Decode::decode(node, cx)?;
        if is_port_name(&name) {
            Some(PortRef::Name(name))
        } else {
            cx.error(node.mark, format!("expected a port number 1-65535 or a port name (at most 15 lowercase letters, digits and '-', with a letter), found {name:?}"));
            None
        }
    }
}

/// An IANA service name as Kubernetes uses for named ports.
pub fn is_port_name(s: &str) -> bool {
    s.len() <= 15
        && is_dns_label(s)
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.contains("--")
}

/// A port number, 1-65535.
pub fn decode_port(node: &Node, cx: &mut Cx) -> Option<u16> {
    integer(node, cx, 1, 65535).and_then(|n| u16::try_from(n).ok())
}

/// An IPv4 or IPv6 network in CIDR notation, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
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

    /// Whether `other` lies entirely inside `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("expected a CIDR such as 10.0.0.0/8, found {s:?}"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix length must be 0-{max}, found {prefix:?}"))?;
        let cidr = Cidr { addr, prefix };
        let host = Cidr { addr, prefix: max };
        let base = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        };
        if base != host.addr {
            return Err(format!(
                "{s} has host bits set; did you mean {base}/{prefix}?"
            ));
        }
        Ok(cidr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Decode for Cidr {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        parse_scalar(node, cx, str::parse)
    }
}

impl Decode for IpAddr {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        parse_scalar(node, cx, |text| {
            text.parse()
                .map_err(|_| format!("expected an IP address, found {text:?}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_containment() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert!(
            "10.1.0.1/16"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("10.1.0.0/16")
        );
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("198.18.0.1".parse().unwrap()));
        assert!(all.covers(&c));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn port_names() {
        assert!(is_port_name("http"));
        assert!(is_port_name("grpc-web"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("a-very-long-port-name"));
    }
}
