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
    let (kvs, _) = store.list("/registry/nodes/").await?;
    let nodes: Vec<(String, u64, Value)> = kvs
        .iter()
        .filter_map(|kv| {
            let v: Value = serde_json::from_slice(&kv.value).ok()?;
            Some((kv.key.clone(), kv.mod_revision, v))
        })
        .collect();
    let mut used: BTreeSet<Ipv4Addr> = nodes
        .iter()
        .filter_map(|(_, _, v)| v.pointer("/spec/podCIDR")?.as_str()?.parse::<Cidr>().ok())
        .filter_map(|c| match c.addr {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect();
    for (key, revision, mut v) in nodes {
        let hollow = v
            .pointer("/metadata/labels/skiff.dev~1hollow")
            .and_then(Value::as_str)
            == Some("true");
        if hollow || v.pointer("/spec/podCIDR").is_some_and(|c| !c.is_null()) {
            continue;
        }
        let Some(cidr) = next_free(range, &used) else {
            tracing::error!(node = %key, range = %range, "No pod range left for a new node: widen --pod-cidr-range");
            return Ok(());
        };
        v["spec"]["podCIDR"] = json!(cidr.to_string());
        match store
            .update(&key, bytes::Bytes::from(v.to_string()), revision)
            .await
        {
            Ok(_) => {
                if let IpAddr::V4(a) = cidr.addr {
                    used.insert(a);
                }
                tracing::info!(node = %key, pod_cidr = %cidr, "Assigned a pod range");
            }
            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Gives every Service without a virtual address the next free one.
pub async fn assign_service_addresses(
    store: &EmbeddedStore,
    range: &Cidr,
) -> Result<(), StoreError> {
    let (kvs, _) = store.list("/registry/services/").await?;
    let services: Vec<(String, u64, Value)> = kvs
        .iter()
        .filter_map(|kv| {
            Some((
                kv.key.clone(),
                kv.mod_revision,
                serde_json::from_slice(&kv.value).ok()?,
            ))
        })
        .collect();
    let mut used: BTreeSet<Ipv4Addr> = services
        .iter()
        .filter_map(|(_, _, v)| v.pointer("/status/virtualAddress")?.as_str()?.parse().ok())
        .collect();
    for (key, revision, mut v) in services {
        if v.pointer("/status/virtualAddress")
            .is_some_and(|a| !a.is_null())
        {
            continue;
        }
        let Some(address) = next_free_address(range, &used) else {
            tracing::error!(service = %key, range = %range, "No virtual address left for a new service: widen --service-cidr");
            return Ok(());
        };
        v["status"]["virtualAddress"] = json!(address.to_string());
        match store
            .update(&key, bytes::Bytes::from(v.to_string()), revision)
            .await
        {
            Ok(_) => {
                used.insert(address);
                tracing::info!(service = %key, virtual_address = %address, "Assigned a virtual address");
            }
            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
