//! Controllers: keep each Service's instances at its replica count, placed
//! by the scheduler; declare nodes lost when their heartbeat lease expires,
//! fence them (generation + 1) and replace their instances at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use skiff_api::Resource;
use skiff_api::quantity::Quantity;
use skiff_api::service::{Enforcement, ServiceSpec, TaintEffect, TolerationOperator};
use skiff_scheduler as sched;
use skiff_store::{EmbeddedStore, Event, Store, StoreError};
use tokio::sync::watch;

use skiff_api::net::Cidr;

use crate::api::NODE_LEASES;

/// Starts the controllers; they stop when `shutdown` turns true.
/// Address ranges the controllers hand out from.
#[derive(Debug, Clone)]
pub struct Ranges {
    /// Nodes' pod ranges (a /24 each).
    pub pods: Cidr,
    /// Services' virtual addresses.
    pub services: Cidr,
}

pub fn spawn(store: Arc<EmbeddedStore>, ranges: Ranges, shutdown: watch::Receiver<bool>) {
    tokio::spawn(node_lifecycle(store.clone(), shutdown.clone()));
    tokio::spawn(replicas(store, ranges, shutdown));
}

fn object(value: &[u8]) -> Option<Value> {
    serde_json::from_slice(value).ok()
}

/// Reads, changes and writes back an object with compare-and-swap, retrying on conflict.
async fn modify(
    store: &EmbeddedStore,
    key: &str,
    change: impl Fn(&mut Value),
) -> Result<(), StoreError> {
    for _ in 0..10 {
        let Some(kv) = store.get(key).await? else {
            return Ok(());
        };
        let Some(mut v) = object(&kv.value) else {
            return Ok(());
        };
        change(&mut v);
        match store
            .update(key, Bytes::from(v.to_string()), kv.mod_revision)
            .await
        {
            Err(StoreError::Conflict { .. }) => continue,
            other => return other.map(|_| ()),
        }
    }
    Ok(())
}

/// Node lease deleted (expired) → node lost; created → node ready.
async fn node_lifecycle(store: Arc<EmbeddedStore>, mut shutdown: watch::Receiver<bool>) {
    loop {
        // After a compaction there is nothing to replay: leases that expired
        // meanwhile show as nodes without a lease in the replica controller.
        let mut w = match store.watch(NODE_LEASES, store.revision()).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "Node lifecycle watch failed");
                return;
            }
        };
        loop {
            let event = tokio::select! {
                _ = shutdown.changed() => return,
                e = w.next() => e,
            };
            match event {
                None => return,
                Some(Err(StoreError::Compacted { .. })) => break,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "Node lifecycle watch failed");
                    return;
                }
                Some(Ok(e)) => {
                    let node = e.key().trim_start_matches(NODE_LEASES).to_string();
                    let result = match &*e {
                        Event::Delete { .. } => node_lost(&store, &node).await,
                        Event::Put(_) => {
                            modify(&store, &format!("/registry/nodes/{node}"), |v| {
                                v["status"]["ready"] = json!(true)
                            })
                            .await
                        }
                    };
                    if let Err(err) = result {
                        tracing::error!(node.name = %node, error = %err, "Cannot update node");
                    }
                }
            }
        }
    }
}

/// Fences a lost node and removes its instances; the replica controller
/// replaces them elsewhere. An agent that comes back finds its instances
/// gone and a higher generation, and stops what it still runs.
async fn node_lost(store: &EmbeddedStore, node: &str) -> Result<(), StoreError> {
    modify(store, &format!("/registry/nodes/{node}"), |v| {
        let generation = v
            .pointer("/status/generation")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        v["status"]["ready"] = json!(false);
        v["status"]["generation"] = json!(generation + 1);
    })
    .await?;
    let (instances, _) = store.list("/registry/instances/").await?;
    let mut removed = 0;
    for kv in instances {
        if object(&kv.value)
            .and_then(|v| {
                v.pointer("/spec/node")
                    .and_then(Value::as_str)
                    .map(|n| n == node)
            })
            .unwrap_or(false)
        {
            match store.delete(&kv.key, Some(kv.mod_revision)).await {
                Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {
                    removed += 1
                }
                Err(e) => return Err(e),
            }
        }
    }
    tracing::warn!(node.name = %node, instances = removed, "Node lost: fenced, instances replaced");
    Ok(())
}

/// Reconciles after any change (debounced), and every second.
async fn replicas(store: Arc<EmbeddedStore>, ranges: Ranges, mut shutdown: watch::Receiver<bool>) {
    let mut changes = match store.watch("/registry/", store.revision()).await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "Replica controller cannot watch");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
            e = changes.next() => match e {
                // Agents' status reports (instance modifications) change
                // nothing the replica count depends on.
                Some(Ok(e)) if matches!(&*e, Event::Put(kv) if kv.key.starts_with("/registry/instances/") && kv.create_revision != kv.mod_revision) => continue,
                // Let a burst of changes settle into one pass.
                Some(Ok(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                Some(Err(_)) => match store.watch("/registry/", store.revision()).await {
                    Ok(w) => changes = w,
                    Err(_) => return,
                },
                None => return,
            },
        }
        if let Err(e) = crate::ipam::assign(&store, &ranges.pods).await {
            tracing::warn!(error = %e, "Pod range assignment failed; retrying");
        }
        if let Err(e) = crate::ipam::assign_service_addresses(&store, &ranges.services).await {
            tracing::warn!(error = %e, "Virtual address assignment failed; retrying");
        }
        if let Err(e) = reconcile(&store).await {
            tracing::warn!(error = %e, "Reconcile failed; retrying");
        }
    }
}

/// One instance as the controller reads it.
struct Live {
    key: String,
    name: String,
    node: Option<String>,
    revision: u64,
    value: Value,
}

/// Brings every service to its replica count.
pub async fn reconcile(store: &EmbeddedStore) -> Result<(), StoreError> {
    let (node_kvs, _) = store.list("/registry/nodes/").await?;
    let (svc_kvs, _) = store.list("/registry/services/").await?;
    let (inst_kvs, _) = store.list("/registry/instances/").await?;
    let (lease_kvs, _) = store.list(NODE_LEASES).await?;
    let alive: HashSet<String> = lease_kvs
        .iter()
        .map(|kv| kv.key.trim_start_matches(NODE_LEASES).to_string())
        .collect();

    let mut nodes = Vec::new();
    let mut generations = HashMap::new();
    for kv in &node_kvs {
        let Some(v) = object(&kv.value) else { continue };
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ready = v
            .pointer("/status/ready")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !ready || !alive.contains(&name) {
            continue;
        }
        generations.insert(
            name.clone(),
            v.pointer("/status/generation")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        );
        nodes.push(scheduler_node(&name, &v));
    }
    let node_names: HashSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let mut services: BTreeMap<(String, String), ServiceSpec> = BTreeMap::new();
    // Instances carry their service's labels (policies select by them).
    let mut service_labels: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
    for kv in &svc_kvs {
        let Ok(loaded) = skiff_api::load_str("store", &String::from_utf8_lossy(&kv.value)) else {
            continue;
        };
        for l in loaded {
            if let Resource::Service(s) = l.resource {
                let id = (s.namespace().to_string(), s.name().to_string());
                service_labels.insert(id.clone(), s.metadata.labels.clone());
                services.insert(id, s.spec);
            }
        }
    }
    let mut by_service: BTreeMap<(String, String), Vec<Live>> = BTreeMap::new();
    for kv in inst_kvs {
        let Some(v) = object(&kv.value) else { continue };
        let ns = v
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let svc = v
            .pointer("/spec/service")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let node = v
            .pointer("/spec/node")
            .and_then(Value::as_str)
            .map(String::from);
        by_service.entry((ns, svc)).or_default().push(Live {
            key: kv.key,
            name,
            node,
            revision: kv.mod_revision,
            value: v,
        });
    }

    let mut scheduler = sched::Scheduler::new(nodes, sched::Config::default());
    for ((ns, svc), live) in &by_service {
        let Some(spec) = services.get(&(ns.clone(), svc.clone())) else {
            continue;
        };
        for l in live {
            if let Some(node) = l.node.as_ref().filter(|n| node_names.contains(*n)) {
                let _ = scheduler.add_existing(node, &scheduler_instance(ns, svc, &l.name, spec));
            }
        }
    }

    // Instances of services that no longer exist go.
    for ((ns, svc), live) in &by_service {
        if !services.contains_key(&(ns.clone(), svc.clone())) {
            for l in live {
                let _ = store.delete(&l.key, Some(l.revision)).await;
            }
        }
    }
    let mut creates: Vec<(String, Bytes)> = Vec::new();
    for ((ns, svc), spec) in &services {
        let live = by_service
            .remove(&(ns.clone(), svc.clone()))
            .unwrap_or_default();
        let want = spec.replicas as usize;
        let hash = template_hash(spec);
        // Too many: drop unplaced ones first, then the newest.
        if live.len() > want {
            let mut extra: Vec<&Live> = live.iter().collect();
            extra.sort_by(|a, b| {
                a.node
                    .is_some()
                    .cmp(&b.node.is_some())
                    .then(b.name.cmp(&a.name))
            });
            for l in extra.into_iter().take(live.len() - want) {
                let id = format!("{ns}/{}", l.name);
                let _ = scheduler.remove(&id);
                let _ = store.delete(&l.key, Some(l.revision)).await;
            }
            continue;
        }
        // Unplaced ones: try again.
        for l in live.iter().filter(|l| l.node.is_none()) {
            let inst = scheduler_instance(ns, svc, &l.name, spec);
            let (node, message) = place(&mut scheduler, &inst);
            let mut v = l.value.clone();
            match &node {
                Some(n) => {
                    v["spec"]["node"] = json!(n);
                    v["spec"]["nodeGeneration"] = json!(generations.get(n).copied().unwrap_or(0));
                    v["status"]["message"] = json!("");
                    push_event(&mut v, "Scheduled", &format!("assigned to node {n}"));
                }
                None if v.pointer("/status/message").and_then(Value::as_str)
                    != Some(message.as_str()) =>
                {
                    v["status"]["message"] = json!(message);
                    push_event(&mut v, "FailedScheduling", &message);
                }
                None => continue,
            }
            let _ = store
                .update(&l.key, Bytes::from(v.to_string()), l.revision)
                .await;
        }
        for _ in live.len()..want {
            let name = format!("{svc}-{hash}-{}", suffix());
            let inst = scheduler_instance(ns, svc, &name, spec);
            let (node, message) = place(&mut scheduler, &inst);
            let mut spec_json = json!({"service": svc, "templateHash": hash, "nodeGeneration": 0});
            if let Some(n) = &node {
                spec_json["node"] = json!(n);
                spec_json["nodeGeneration"] = json!(generations.get(n).copied().unwrap_or(0));
            }
            let mut labels = service_labels
                .get(&(ns.clone(), svc.clone()))
                .cloned()
                .unwrap_or_default();
            labels.insert("skiff.dev/service".into(), svc.clone());
            let mut v = json!({
                "apiVersion": "skiff.dev/v1", "kind": "Instance",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": spec_json,
                "status": {"phase": "pending", "ready": false, "restarts": 0, "message": message},
            });
            match &node {
                Some(n) => push_event(&mut v, "Scheduled", &format!("assigned to node {n}")),
                None => push_event(&mut v, "FailedScheduling", &message),
            }
            match &node {
                Some(n) => tracing::debug!(instance = %name, node.name = %n, "Scheduled"),
                None => tracing::warn!(instance = %name, reason = %message, "Unschedulable"),
            }
            creates.push((
                format!("/registry/instances/{ns}/{name}"),
                Bytes::from(v.to_string()),
            ));
        }
    }
    // Written concurrently so the store can commit many per fsync.
    for chunk in creates.chunks(512) {
        let results = futures_util::future::join_all(
            chunk
                .iter()
                .map(|(key, value)| store.create(key, value.clone(), None)),
        )
        .await;
        for r in results {
            r?;
        }
    }
    if !creates.is_empty() {
        tracing::info!(instances = creates.len(), "Created instances");
    }
    Ok(())
}

/// Appends an event to an instance's status, keeping the newest few.
fn push_event(v: &mut Value, reason: &str, message: &str) {
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let status = &mut v["status"];
    if !status["events"].is_array() {
        status["events"] = json!([]);
    }
    if let Some(events) = status["events"].as_array_mut() {
        events.push(json!({"time": time, "reason": reason, "message": message}));
        let excess = events
            .len()
            .saturating_sub(skiff_api::cluster::InstanceEvent::KEEP);
        events.drain(..excess);
    }
}

fn place(scheduler: &mut sched::Scheduler, inst: &sched::Instance) -> (Option<String>, String) {
    match scheduler.place(inst) {
        Ok(n) => (Some(n), String::new()),
        Err(why) => (None, why.to_string()),
    }
}

fn suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A short, stable hash of what a running instance depends on.
fn template_hash(spec: &ServiceSpec) -> String {
    let text = serde_json::to_string(&json!({"run": spec.run, "resources": spec.resources, "ports": spec.ports, "health": spec.health})).unwrap_or_default();
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{:08x}", hash as u32)
}

fn quantity(v: Option<&Value>) -> Option<Quantity> {
    v.and_then(Value::as_str)
        .and_then(|s| Quantity::parse(s).ok())
}

fn effect(e: TaintEffect) -> sched::Effect {
    match e {
        TaintEffect::NoSchedule => sched::Effect::NoSchedule,
        TaintEffect::PreferNoSchedule => sched::Effect::PreferNoSchedule,
        TaintEffect::NoExecute => sched::Effect::NoExecute,
    }
}

fn scheduler_node(name: &str, v: &Value) -> sched::Node {
    let resources = v
        .pointer("/status/allocatable")
        .filter(|a| a.as_object().is_some_and(|o| !o.is_empty()))
        .or_else(|| v.pointer("/status/capacity"));
    let cpu = quantity(resources.and_then(|r| r.get("cpu"))).map_or(0, |q| q.milli() as u64);
    let memory =
        quantity(resources.and_then(|r| r.get("memory"))).map_or(0, |q| q.units_ceil() as u64);
    let labels = v
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let taints = v
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .map(|t| sched::Taint {
                    key: t["key"].as_str().unwrap_or_default().into(),
                    value: t["value"].as_str().unwrap_or_default().into(),
                    effect: effect(
                        t["effect"]
                            .as_str()
                            .and_then(TaintEffect::parse)
                            .unwrap_or_default(),
                    ),
                })
                .collect()
        })
        .unwrap_or_default();
    let schedulable = !v
        .pointer("/spec/unschedulable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    sched::Node {
        name: name.to_string(),
        capacity: sched::Res::new(cpu, memory),
        labels,
        taints,
        schedulable,
    }
}

fn scheduler_instance(ns: &str, service: &str, name: &str, spec: &ServiceSpec) -> sched::Instance {
    let req = |r: &str| spec.resources.requests.get(r);
    let mut inst = sched::Instance::new(
        format!("{ns}/{name}"),
        format!("{ns}/{service}"),
        sched::Res::new(
            req("cpu").map_or(0, |q| q.milli() as u64),
            req("memory").map_or(0, |q| q.units_ceil() as u64),
        ),
    );
    let p = &spec.placement;
    inst.node_selector = p.node_selector.clone();
    inst.priority = p.priority;
    inst.tolerations = p
        .tolerations
        .iter()
        .map(|t| sched::Toleration {
            key: t.key.clone(),
            exists: t.operator == TolerationOperator::Exists,
            value: t.value.clone(),
            effect: t.effect.map(effect),
        })
        .collect();
    inst.spread = p
        .spread
        .iter()
        .map(|s| sched::Spread {
            topology_key: s.topology_key.clone(),
            max_skew: s.max_skew,
            hard: s.mode == Enforcement::Hard,
        })
        .collect();
    inst.anti_affinity = p
        .anti_affinity
        .iter()
        .map(|a| sched::AntiAffinity {
            topology_key: a.topology_key.clone(),
            max_per_domain: a.max_per_domain,
            hard: a.mode == Enforcement::Hard,
        })
        .collect();
    inst
}
