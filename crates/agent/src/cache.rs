//! The agent's copy of the cluster: one list-then-watch per kind for the
//! whole node, read by network policy and by the mesh's discovery alike,
//! so a node holds one watch per kind on the control plane however many
//! consumers it has. Each consumer waits on [`Cache::subscribe`] and reads
//! the state under its lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_api::policytest::NamedPort;
use skiff_client::Client;
use skiff_netpol::PolicyRule;
use skiff_netpol::cluster;
use tokio::sync::watch;

/// The cluster as this node's consumers need it.
#[derive(Debug, Default)]
pub struct State {
    /// Policies and NetworkPolicies by `kind:ns/name`.
    pub policies: BTreeMap<String, PolicyRule>,
    /// `ns/name` of a Service → its ports.
    pub services: BTreeMap<String, Vec<NamedPort>>,
    /// `ns/name` of a Service → its virtual address.
    pub virtual_addresses: BTreeMap<String, String>,
    /// `ns/name` of a Service → its ports declared `tcp`: bytes only, no
    /// protocol detection (server-first protocols get no detection delay).
    pub opaque_ports: BTreeMap<String, Vec<u16>>,
    /// Namespace labels (namespace selectors match them).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub instances: BTreeMap<String, Value>,
    /// The same instances as discovery reads them, by `ns/name`.
    pub members: BTreeMap<String, Member>,
    /// Routes by `ns/name`.
    pub routes: BTreeMap<String, Value>,
    /// The control plane revision each followed kind is known up to.
    pub revisions: BTreeMap<&'static str, u64>,
    /// The `instances` revision at which an instance last left a node
    /// (deleted, or assigned to another; a relist counts, as it may hide
    /// either): a leaving instance waits until every node's proxies have
    /// applied that revision, so only then are a node's acknowledgements
    /// of instance changes wanted.
    pub left: u64,
}

/// What discovery reads of an instance, taken from its object once when
/// it changes: walking tens of thousands of stored objects on every table
/// cost most of the table's time.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub namespace: String,
    pub service: String,
    pub labels: skiff_api::meta::Labels,
    /// Its address on the pod network, once it has one.
    pub address: Option<std::net::Ipv4Addr>,
    pub ready: bool,
}

impl Member {
    pub fn of(v: &Value) -> Member {
        Member {
            namespace: cluster::text(v, "/metadata/namespace").to_string(),
            service: cluster::text(v, "/spec/service").to_string(),
            labels: skiff_api::meta::labels_in(v),
            address: cluster::text(v, "/status/address").parse().ok(),
            ready: v.pointer("/status/ready").and_then(Value::as_bool) == Some(true),
        }
    }
}

impl State {
    pub fn put_instance(&mut self, v: Value) {
        let id = crate::id_of(&v);
        self.members.insert(id.clone(), Member::of(&v));
        self.instances.insert(id, v);
    }

    pub fn remove_instance(&mut self, id: &str) {
        self.members.remove(id);
        self.instances.remove(id);
    }
}

/// The last known object of each local instance, so that one deleted from
/// the cluster keeps its policy (L4 and L7) while it drains, until its
/// agent releases it: cutting it off at once would strand the requests it
/// is still answering.
#[derive(Debug, Default)]
pub struct LocalInstances(BTreeMap<String, Value>);

impl LocalInstances {
    /// Takes the current objects of the instances in `local` from `s`,
    /// keeping the last copy of those `s` no longer has; forgets the rest.
    pub fn update<'k>(&mut self, s: &State, local: impl IntoIterator<Item = &'k String>) {
        let mut next = BTreeMap::new();
        for id in local {
            if let Some(v) = s.instances.get(id).or_else(|| self.0.get(id)) {
                next.insert(id.clone(), v.clone());
            }
        }
        self.0 = next;
    }

    pub fn get(&self, id: &str) -> Option<&Value> {
        self.0.get(id)
    }

    /// Local instances the cluster no longer lists (deleted, draining).
    pub fn departed<'a>(&'a self, s: &'a State) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.0
            .iter()
            .filter(|(id, _)| !s.instances.contains_key(*id))
    }
}

/// When a consumer that remakes its output from the whole cluster (the
/// policy maps, the discovery table) may start its next pass: 20 ms after
/// changes begin, so that a burst settles into one pass, and no sooner than
/// four times the last pass's cost after it. Under constant churn in a
/// large cluster a consumer then spends at most about a fifth of a core,
/// and changes reach the node a few passes' time later instead.
#[derive(Debug, Default)]
pub struct Pace {
    cost: Duration,
}

/// How long a burst of changes is let settle before a pass.
const SETTLE: Duration = Duration::from_millis(20);

impl Pace {
    /// Waits until the next pass may start.
    pub async fn wait(&self) {
        tokio::time::sleep(SETTLE.max(self.cost * 4)).await;
    }

    /// Records what the pass begun at `started` cost.
    pub fn done(&mut self, started: Instant) {
        self.cost = started.elapsed();
    }
}

/// The followed state, and a counter bumped on every change.
#[derive(Debug)]
pub struct Cache {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Cache {
    /// Starts following `kinds` (plural names) and returns at once; the
    /// state fills as the lists arrive.
    pub fn follow(client: &Client, kinds: &[&'static str]) -> Arc<Cache> {
        let cache = Arc::new(Cache {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        });
        for &plural in kinds {
            let cache = cache.clone();
            tokio::spawn(list_and_watch(
                client.clone(),
                plural,
                move |change, revision| {
                    {
                        let mut s = cache.state();
                        if plural == "instances" && leaves(&s, &change) {
                            s.left = revision;
                        }
                        match change {
                            Change::Reset(items) => {
                                clear(&mut s, plural);
                                for v in items {
                                    put(&mut s, plural, v);
                                }
                            }
                            Change::Put(v) => put(&mut s, plural, v),
                            Change::Delete(v) => remove(&mut s, plural, v),
                        }
                        s.revisions.insert(plural, revision);
                    }
                    cache.changed.send_modify(|n| *n += 1);
                },
            ));
        }
        cache
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// Wakes (`changed()`) after every change from here on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Whether `change` to the instances takes one off a node.
fn leaves(s: &State, change: &Change<'_>) -> bool {
    match change {
        Change::Reset(_) | Change::Delete(_) => true,
        Change::Put(v) => s.instances.get(&crate::id_of(v)).is_some_and(|old| {
            let was = cluster::text(old, "/spec/node");
            !was.is_empty() && was != cluster::text(v, "/spec/node")
        }),
    }
}

fn clear(s: &mut State, plural: &str) {
    match plural {
        "namespaces" => s.namespaces.clear(),
        "services" => {
            s.services.clear();
            s.virtual_addresses.clear();
            s.opaque_ports.clear();
        }
        "instances" => {
            s.instances.clear();
            s.members.clear();
        }
        "routes" => s.routes.clear(),
        kind => s
            .policies
            .retain(|k, _| !k.starts_with(&format!("{kind}:"))),
    }
}

fn put(s: &mut State, plural: &str, v: &Value) {
    let id = crate::id_of(v);
    match plural {
        "namespaces" => {
            s.namespaces
                .insert(crate::name_of(v), skiff_api::meta::labels_in(v));
        }
        "instances" => s.put_instance(v.clone()),
        "services" => {
            s.services.insert(id.clone(), cluster::service_ports(v));
            let opaque: Vec<u16> = v
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|p| p.get("protocol").and_then(Value::as_str) == Some("tcp"))
                .filter_map(|p| u16::try_from(p.get("port")?.as_u64()?).ok())
                .collect();
            s.opaque_ports.insert(id.clone(), opaque);
            match v.pointer("/status/virtualAddress").and_then(Value::as_str) {
                Some(vip) => s.virtual_addresses.insert(id, vip.to_string()),
                None => s.virtual_addresses.remove(&id),
            };
        }
        "routes" => {
            s.routes.insert(id, v.clone());
        }
        kind => match cluster::policy(v) {
            Some(rule) => {
                s.policies.insert(format!("{kind}:{id}"), rule);
            }
            None => tracing::warn!(policy = %id, "A stored policy does not decode; ignoring it"),
        },
    }
}

fn remove(s: &mut State, plural: &str, v: &Value) {
    let id = crate::id_of(v);
    match plural {
        "namespaces" => {
            s.namespaces.remove(&crate::name_of(v));
        }
        "instances" => s.remove_instance(&id),
        "services" => {
            s.services.remove(&id);
            s.virtual_addresses.remove(&id);
            s.opaque_ports.remove(&id);
        }
        "routes" => {
            s.routes.remove(&id);
        }
        kind => {
            s.policies.remove(&format!("{kind}:{id}"));
        }
    }
}

/// One change to a followed kind.
#[derive(Debug)]
enum Change<'a> {
    /// Everything there is (after a list; replaces what came before).
    Reset(&'a [Value]),
    Put(&'a Value),
    Delete(&'a Value),
}

/// Lists one kind cluster-wide, then follows its watch, reporting each
/// change to `on` with the revision it brings the kind to; relists after
/// a failed watch. Runs until the task ends.
async fn list_and_watch(
    client: Client,
    plural: &'static str,
    mut on: impl FnMut(Change<'_>, u64) + Send,
) {
    let Some(kind) = skiff_api::KindInfo::find(plural) else {
        return;
    };
    loop {
        let list = match client.list(kind, None, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(kind = plural, error = %e, "Cannot list; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        on(Change::Reset(&list.items), list.revision);
        let mut watch = client.watch(kind, None, None, list.revision);
        while let Some(event) = watch.next().await {
            let Ok(event) = event else { break };
            match event.kind {
                skiff_client::EventType::Added | skiff_client::EventType::Modified => {
                    on(Change::Put(&event.object), event.revision)
                }
                skiff_client::EventType::Deleted => {
                    on(Change::Delete(&event.object), event.revision)
                }
                _ => {}
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn instance(node: &str) -> Value {
        json!({"metadata": {"namespace": "shop", "name": "web-1"}, "spec": {"node": node}})
    }

    #[test]
    fn an_instance_leaves_a_node_when_deleted_or_assigned_elsewhere() {
        let mut s = State::default();
        let unplaced = instance("");
        assert!(!leaves(&s, &Change::Put(&unplaced)), "a new instance");
        s.put_instance(unplaced);
        assert!(!leaves(&s, &Change::Put(&instance("n1"))), "placed");
        s.put_instance(instance("n1"));
        assert!(
            !leaves(&s, &Change::Put(&instance("n1"))),
            "its status changed"
        );
        assert!(leaves(&s, &Change::Put(&instance("n2"))), "moved");
        assert!(leaves(&s, &Change::Delete(&instance("n1"))));
        assert!(leaves(&s, &Change::Reset(&[])), "a relist may hide either");
    }
}
