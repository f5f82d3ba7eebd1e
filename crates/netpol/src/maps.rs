//! The datapath's map entries as Rust values, and their bytes exactly as
//! `ebpf/include/skiff_maps.h` lays them out (native byte order, addresses
//! in network order). Plain byte arrays cross into the kernel, so no
//! `unsafe` is needed; the sizes come from the header.

use std::net::Ipv4Addr;

include!(concat!(env!("OUT_DIR"), "/skiff_maps.rs"));

pub const POLICY_KEY_LEN: usize = SKIFF_SIZEOF_POLICY_KEY as usize;
pub const POLICY_VALUE_LEN: usize = SKIFF_SIZEOF_POLICY_VALUE as usize;
pub const ENDPOINT_LEN: usize = SKIFF_SIZEOF_ENDPOINT as usize;
pub const EVENT_LEN: usize = SKIFF_SIZEOF_EVENT as usize;

/// Which way a flow goes, seen from the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    fn code(self) -> u8 {
        match self {
            Dir::Ingress => SKIFF_DIR_INGRESS as u8,
            Dir::Egress => SKIFF_DIR_EGRESS as u8,
        }
    }

    fn from_code(c: u8) -> Option<Dir> {
        match u32::from(c) {
            SKIFF_DIR_INGRESS => Some(Dir::Ingress),
            SKIFF_DIR_EGRESS => Some(Dir::Egress),
            _ => None,
        }
    }
}

/// A local instance's endpoint entry, keyed by its host-side ifindex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub identity: u32,
    pub flags: u32,
}

impl Endpoint {
    pub fn to_bytes(self) -> [u8; ENDPOINT_LEN] {
        let mut b = [0u8; ENDPOINT_LEN];
        b[0..4].copy_from_slice(&self.identity.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b
    }

    pub fn from_bytes(b: [u8; ENDPOINT_LEN]) -> Endpoint {
        Endpoint {
            identity: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            flags: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// One allow entry: endpoint, peer identity (0 = any), port (0 = any),
/// IP protocol (0 = any), direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub ifindex: u32,
    pub peer: u32,
    pub port: u16,
    pub proto: u8,
    pub dir: Dir,
}

impl PolicyKey {
    pub fn to_bytes(self) -> [u8; POLICY_KEY_LEN] {
        let mut b = [0u8; POLICY_KEY_LEN];
        b[0..4].copy_from_slice(&self.ifindex.to_ne_bytes());
        b[4..8].copy_from_slice(&self.peer.to_ne_bytes());
        b[8..10].copy_from_slice(&self.port.to_ne_bytes());
        b[10] = self.proto;
        b[11] = self.dir.code();
        b
    }

    pub fn from_bytes(b: [u8; POLICY_KEY_LEN]) -> Option<PolicyKey> {
        Some(PolicyKey {
            ifindex: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            peer: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            port: u16::from_ne_bytes([b[8], b[9]]),
            proto: b[10],
            dir: Dir::from_code(b[11])?,
        })
    }
}

/// What an entry allows: plainly, or with an audit report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub audit: bool,
    /// Index in the agent's rule table (names the deciding rule in events).
    pub rule: u32,
}

impl PolicyValue {
    pub fn to_bytes(self) -> [u8; POLICY_VALUE_LEN] {
        let verdict = if self.audit {
            SKIFF_VERDICT_AUDIT
        } else {
            SKIFF_VERDICT_ALLOW
        };
        let mut b = [0u8; POLICY_VALUE_LEN];
        b[0..4].copy_from_slice(&verdict.to_ne_bytes());
        b[4..8].copy_from_slice(&self.rule.to_ne_bytes());
        b
    }

    pub fn from_bytes(b: [u8; POLICY_VALUE_LEN]) -> PolicyValue {
        PolicyValue {
            audit: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) == SKIFF_VERDICT_AUDIT,
            rule: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// A verdict the datapath reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub time_ns: u64,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub ifindex: u32,
    pub rule: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: Option<Dir>,
    /// Denied, or passed with an audit-mode policy's objection.
    pub denied: bool,
}

impl Event {
    /// Reads one ring-buffer record; `None` when it is too short.
    pub fn parse(b: &[u8]) -> Option<Event> {
        if b.len() < EVENT_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let ip_at = |i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
        Some(Event {
            time_ns: u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            src: ip_at(8),
            dst: ip_at(12),
            src_identity: u32_at(16),
            dst_identity: u32_at(20),
            ifindex: u32_at(24),
            rule: u32_at(28),
            sport: u16_at(32),
            dport: u16_at(34),
            proto: b[36],
            dir: Dir::from_code(b[37]),
            denied: u32::from(b[38]) == SKIFF_EVENT_DENIED,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_their_bytes() {
        let k = PolicyKey {
            ifindex: 7,
            peer: 300,
            port: 8080,
            proto: 6,
            dir: Dir::Egress,
        };
        assert_eq!(PolicyKey::from_bytes(k.to_bytes()), Some(k));
        let v = PolicyValue {
            audit: true,
            rule: 9,
        };
        assert_eq!(PolicyValue::from_bytes(v.to_bytes()), v);
        let e = Endpoint {
            identity: 256,
            flags: SKIFF_EP_INGRESS_ENFORCE,
        };
        assert_eq!(Endpoint::from_bytes(e.to_bytes()), e);
    }

    #[test]
    fn the_header_numbers_arrive_in_rust() {
        assert_eq!(SKIFF_SIZEOF_POLICY_KEY, 12);
        assert_eq!(SKIFF_ID_WORLD, 2);
        assert_eq!(SKIFF_EP_EGRESS_AUDIT, 8);
        assert_eq!(SKIFF_EVENTS_BYTES, 1 << 20);
    }
}
