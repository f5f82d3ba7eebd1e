//! Addresses the control plane hands out. Pod ranges: each real node gets
//! one /24 from the cluster's pod range, kept in its `spec.podCIDR` for as
//! long as the Node exists (hollow nodes, which run nothing, get none).
//! Service virtual addresses: each Service gets one address from the
//! service range, kept in its `status.virtualAddress`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};
use skiff_api::net::Cidr;
use skiff_store::{EmbeddedStore, Store, StoreError};

/// The prefix length of each node's pod range.
pub const NODE_PREFIX: u8 = 24;

/// The lowest /24 of `range` that no node holds, or `None` when all are taken
/// (or `range` is not IPv4, or narrower than a /24).
pub fn next_free(range: &Cidr, used: &BTreeSet<Ipv4Addr>) -> Option<Cidr> {
    let IpAddr::V4(base) = range.addr else {
        return None;
    };
    if range.prefix > NODE_PREFIX {
        return None;
    }
    let count = 1u32 << (NODE_PREFIX - range.prefix);
    let first = u32::from(base)
        & (u32::MAX
            .checked_shl(32 - u32::from(range.prefix))
            .unwrap_or(0));
    (0..count)
        .map(|i| Ipv4Addr::from(first + (i << (32 - NODE_PREFIX))))
        .find(|net| !used.contains(net))
        .map(|net| Cidr {
            addr: IpAddr::V4(net),
            prefix: NODE_PREFIX,
        })
}

/// Gives every real node without a pod range the next free one. Writes are
/// compare-and-swap, so a node that changed meanwhile is handled next pass.
pub async fn assign(store: &EmbeddedStore, range: &Cidr) -> Result<(), StoreError> {
    let handout = Handout {
        prefix: "/registry/nodes/",
        field: ["spec", "podCIDR"],
        what: "pod range",
        flag: "--pod-cidr-range",
    };
    let hollow = |v: &Value| {
        v.pointer("/metadata/labels/skiff.dev~1hollow")
            .and_then(Value::as_str)
            == Some("true")
    };
    let network = |s: &str| match s.parse::<Cidr>().ok()?.addr {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    };
    handout
        .run(
            store,
            range,
            |v| !hollow(v),
            network,
            |used| {
                let cidr = next_free(range, used)?;
                match cidr.addr {
                    IpAddr::V4(a) => Some((a, cidr.to_string())),
                    IpAddr::V6(_) => None,
                }
            },
        )
        .await
}

/// Gives every Service without a virtual address the next free one.
pub async fn assign_service_addresses(
    store: &EmbeddedStore,
    range: &Cidr,
) -> Result<(), StoreError> {
    let handout = Handout {
        prefix: "/registry/services/",
        field: ["status", "virtualAddress"],
        what: "virtual address",
        flag: "--service-cidr",
    };
    handout
        .run(
            store,
            range,
            |_| true,
            |s| s.parse().ok(),
            |used| next_free_address(range, used).map(|a| (a, a.to_string())),
        )
        .await
}

/// Addresses of one kind and where objects keep them.
struct Handout {
    prefix: &'static str,
    field: [&'static str; 2],
    what: &'static str,
    flag: &'static str,
}

impl Handout {
    /// Gives each object that `wants` one and has none the value `next`
    /// picks, given the addresses in use (`used_of` reads one from a
    /// stored value). Writes are compare-and-swap, so an object that
    /// changed meanwhile is handled next pass.
    async fn run(
        &self,
        store: &EmbeddedStore,
        range: &Cidr,
        wants: impl Fn(&Value) -> bool,
        used_of: impl Fn(&str) -> Option<Ipv4Addr>,
        next: impl Fn(&BTreeSet<Ipv4Addr>) -> Option<(Ipv4Addr, String)>,
    ) -> Result<(), StoreError> {
        let pointer = format!("/{}/{}", self.field[0], self.field[1]);
        let (kvs, _) = store.list(self.prefix).await?;
        let objects: Vec<(String, u64, Value)> = kvs
            .iter()
            .filter_map(|kv| {
                Some((
                    kv.key.clone(),
                    kv.mod_revision,
                    serde_json::from_slice(&kv.value).ok()?,
                ))
            })
            .collect();
        let mut used: BTreeSet<Ipv4Addr> = objects
            .iter()
            .filter_map(|(_, _, v)| used_of(v.pointer(&pointer)?.as_str()?))
            .collect();
        for (key, revision, mut v) in objects {
            if !wants(&v) || v.pointer(&pointer).is_some_and(|c| !c.is_null()) {
                continue;
            }
            let Some((address, value)) = next(&used) else {
                tracing::error!(object = %key, range = %range, "No {} left: widen {}", self.what, self.flag);
                return Ok(());
            };
            v[self.field[0]][self.field[1]] = json!(value);
            match store
                .update(&key, bytes::Bytes::from(v.to_string()), revision)
                .await
            {
                Ok(_) => {
                    used.insert(address);
                    tracing::info!(object = %key, value = %value, "Assigned a {}", self.what);
                }
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The lowest address of `range` (neither its network nor its broadcast
/// address) not in `used`.
pub fn next_free_address(range: &Cidr, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let IpAddr::V4(base) = range.addr else {
        return None;
    };
    let size = 1u64 << (32 - u32::from(range.prefix.min(32)));
    let first = u64::from(u32::from(base)) & !(size - 1);
    (1..size.saturating_sub(1))
        .map(|i| Ipv4Addr::from((first + i) as u32))
        .find(|a| !used.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses_skip_network_and_broadcast_and_used_ones() {
        let range = cidr("198.18.128.0/30");
        let mut used = BTreeSet::new();
        assert_eq!(
            next_free_address(&range, &used),
            Some(Ipv4Addr::new(198, 18, 128, 1))
        );
        used.insert(Ipv4Addr::new(198, 18, 128, 1));
        assert_eq!(
            next_free_address(&range, &used),
            Some(Ipv4Addr::new(198, 18, 128, 2))
        );
        used.insert(Ipv4Addr::new(198, 18, 128, 2));
        assert_eq!(next_free_address(&range, &used), None);
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn hands_out_the_lowest_free_24_and_stops_when_full() {
        let range = cidr("198.19.0.0/22");
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(c) = next_free(&range, &used) {
            if let IpAddr::V4(a) = c.addr {
                used.insert(a);
            }
            got.push(c.to_string());
        }
        assert_eq!(
            got,
            [
                "198.19.0.0/24",
                "198.19.1.0/24",
                "198.19.2.0/24",
                "198.19.3.0/24"
            ]
        );
        used.remove(&Ipv4Addr::new(198, 19, 1, 0));
        assert_eq!(
            next_free(&range, &used).map(|c| c.to_string()),
            Some("198.19.1.0/24".into())
        );
        assert_eq!(next_free(&cidr("198.19.0.0/25"), &BTreeSet::new()), None);
    }
}
