//! Reading the compiler's input from stored objects (JSON, as the API and
//! watches deliver them): the agents and the API server's capacity check
//! build the same [`crate::compile::Input`] from the same objects.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::Value;
use skiff_api::net::Protocol;
use skiff_api::policytest::NamedPort;
use skiff_api::{Resource, meta};

use crate::compile::Instance;
use crate::model::PolicyRule;

/// The string at `pointer` in a stored object, or "".
pub fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A Service's ports as named ports resolve against its instances.
pub fn service_ports(service: &Value) -> Vec<NamedPort> {
    service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    Some(NamedPort {
                        name: p.get("name").and_then(Value::as_str).map(str::to_string),
                        port: u16::try_from(p.get("port")?.as_u64()?).ok()?,
                        protocol: if p.get("protocol").and_then(Value::as_str) == Some("udp") {
                            Protocol::Udp
                        } else {
                            Protocol::Tcp
                        },
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An Instance as the compiler sees it; `None` until it has an address
/// (`address` overrides the reported one, for instances starting here).
/// `ports` are its Service's, by `namespace/service`.
pub fn instance(
    v: &Value,
    ports: &BTreeMap<String, Vec<NamedPort>>,
    address: Option<Ipv4Addr>,
) -> Option<Instance> {
    let address = address.or_else(|| text(v, "/status/address").parse().ok())?;
    let ns = text(v, "/metadata/namespace");
    Some(Instance {
        namespace: ns.to_string(),
        labels: meta::labels_in(v),
        ports: ports
            .get(&format!("{ns}/{}", text(v, "/spec/service")))
            .cloned()
            .unwrap_or_default(),
        address,
    })
}

/// A stored Policy or NetworkPolicy; `None` for anything else or for an
/// object that does not decode.
pub fn policy(v: &Value) -> Option<PolicyRule> {
    let loaded = skiff_api::load_str("store", &v.to_string()).ok()?;
    loaded.iter().find_map(|l| match &l.resource {
        Resource::Policy(_) | Resource::NetworkPolicy(_) => PolicyRule::from_resource(&l.resource),
        _ => None,
    })
}
