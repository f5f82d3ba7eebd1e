//! Refuses, at apply time, a Policy, NetworkPolicy or Namespace write after
//! which some node's datapath maps could not hold the compiled policy set:
//! the write is answered 422 naming the node and the map, and nothing
//! changes. (Agents would refuse such a set too and keep the previous one;
//! this makes the failure visible to whoever applied it.) The check compiles
//! the set as each node's agent would.

use std::collections::BTreeMap;

use serde_json::Value;
use skiff_api::policy::DefaultPolicy;
use skiff_netpol::cluster;
use skiff_netpol::compile::{self, Identities, Input};
use skiff_netpol::maps::SKIFF_MAX_POLICY;
use skiff_store::{EmbeddedStore, Store};

use crate::error::ApiError;

/// Kinds whose writes can change what nodes' maps must hold.
pub fn applies_to(kind: &str) -> bool {
    matches!(kind, "Policy" | "NetworkPolicy" | "Namespace")
}

/// Checks the policy set with `key` holding `object` (as it would after the write).
pub async fn check(
    store: &EmbeddedStore,
    key: &str,
    object: &Value,
    what: &str,
) -> Result<(), ApiError> {
    let list = |prefix: &'static str| async move {
        let (kvs, _) = store.list(prefix).await?;
        Ok::<_, skiff_store::StoreError>(
            kvs.into_iter()
                .filter_map(|kv| Some((kv.key, serde_json::from_slice::<Value>(&kv.value).ok()?)))
                .collect::<BTreeMap<String, Value>>(),
        )
    };
    let mut policies = list("/registry/policies/").await?;
    policies.extend(list("/registry/networkpolicies/").await?);
    let mut namespaces = list("/registry/namespaces/").await?;
    let services = list("/registry/services/").await?;
    let instances = list("/registry/instances/").await?;
    if key.starts_with("/registry/namespaces/") {
        namespaces.insert(key.to_string(), object.clone());
    } else {
        policies.insert(key.to_string(), object.clone());
    }
    let rules: Vec<_> = policies.values().filter_map(cluster::policy).collect();
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .values()
        .map(|v| {
            (
                v.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                skiff_api::meta::labels_in(v),
            )
        })
        .collect();
    let ports = services
        .values()
        .map(|v| {
            let id = format!(
                "{}/{}",
                v.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                v.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            );
            (id, cluster::service_ports(v))
        })
        .collect();
    let mut all = Vec::new();
    let mut by_node: BTreeMap<String, BTreeMap<u32, usize>> = BTreeMap::new();
    for v in instances.values() {
        let Some(i) = cluster::instance(v, &ports, None) else {
            continue;
        };
        if let Some(node) = v.pointer("/spec/node").and_then(Value::as_str) {
            let local = by_node.entry(node.to_string()).or_default();
            local.insert(local.len() as u32 + 1, all.len());
        }
        all.push(i);
    }
    for (node, local) in &by_node {
        let input = Input {
            policies: &rules,
            default: DefaultPolicy::IsolateSelected,
            namespaces: &namespaces,
            instances: &all,
            local,
            host: &[],
            max_policy_entries: SKIFF_MAX_POLICY as usize,
        };
        if let Err(e) = compile::compile(&input, &mut Identities::default()) {
            return Err(ApiError::new(
                hyper::StatusCode::UNPROCESSABLE_ENTITY,
                format!("{what}: refused, nothing changed: on node {node}: {e}"),
            ));
        }
    }
    Ok(())
}
