//! Skiff's node agent: runs the instances assigned to its node (network
//! namespace, cgroups, supervised process, health checks), and its hollow
//! mode (as Kubemark and KWOK do) for control-plane scale tests.

pub mod cache;
pub mod logs;
pub mod node;
pub mod policy;
pub mod runtime;
pub mod supervise;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use skiff_api::KindInfo;
use skiff_client::{Client, ClientError, EventType};
use tokio::sync::Mutex;

/// What the hollow nodes look like.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// Node names are `{prefix}{i}`.
    pub prefix: String,
    pub nodes: usize,
    pub cpu: String,
    pub memory: String,
    /// Nodes are labelled `zone: zone-{i % zones}`.
    pub zones: usize,
    pub heartbeat: Duration,
}

fn kind(name: &str) -> Result<&'static KindInfo, ClientError> {
    KindInfo::find(name).ok_or_else(|| ClientError::Setup(format!("no kind {name}")))
}

/// Runs the hollow nodes until the process ends. The client must use the
/// join token (each request names the node it acts for).
pub async fn simulate(client: Client, sim: Simulation) -> Result<(), ClientError> {
    let nodes: Vec<String> = (0..sim.nodes)
        .map(|i| format!("{}{i}", sim.prefix))
        .collect();
    for (i, name) in nodes.iter().enumerate() {
        register(&client.with_node(name), name, &sim, i).await?;
    }
    tracing::info!(nodes = nodes.len(), "Hollow nodes registered");
    // Instances this process has reported running, by `ns/name`.
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    for name in &nodes {
        let (client, name, every) = (client.with_node(name), name.clone(), sim.heartbeat);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = client.heartbeat(&name).await {
                    tracing::warn!(node.name = %name, error = %e, "Heartbeat failed");
                }
            }
        });
    }
    let mine: Arc<HashSet<String>> = Arc::new(nodes.iter().cloned().collect());
    // Status reports go out 16 at a time: one by one, a thousand nodes'
    // worth of new instances waits on round trips.
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    // Reads act for the first node (a join-token request must name one).
    let client = match nodes.first() {
        Some(first) => client.with_node(first),
        None => return Ok(()),
    };
    let instances = kind("instances")?;
    let list = client.list(instances, None, None).await?;
    for v in list.items {
        spawn_report(&client, &mine, v, &running, &slots).await;
    }
    let mut watch = client.watch(instances, None, None, list.revision);
    while let Some(event) = watch.next().await {
        let event = event?;
        match event.kind {
            EventType::Added | EventType::Modified => {
                spawn_report(&client, &mine, event.object, &running, &slots).await
            }
            EventType::Deleted => {
                let id = id_of(&event.object);
                if running.lock().await.remove(&id) {
                    tracing::info!(instance = %id, "Stopped (deleted)");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `namespace/name` of an object.
/// Locks plain data: a panic elsewhere while it was held leaves it usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn id_of(v: &Value) -> String {
    format!(
        "{}/{}",
        v.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        name_of(v)
    )
}

/// `metadata.name` of an object (empty when missing).
pub(crate) fn name_of(v: &Value) -> String {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

async fn register(
    client: &Client,
    name: &str,
    sim: &Simulation,
    i: usize,
) -> Result<(), ClientError> {
    let nodes = kind("nodes")?;
    let node = json!({
        "apiVersion": "skiff.dev/v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"zone": format!("zone-{}", i % sim.zones.max(1)), "skiff.dev/hollow": "true"}},
        "spec": {},
        "status": {"capacity": {"cpu": sim.cpu, "memory": sim.memory}, "allocatable": {"cpu": sim.cpu, "memory": sim.memory}, "ready": true, "generation": 0},
    });
    match client.create(nodes, None, &node).await {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(409) => {
            // Known from before: keep its fencing generation, refresh the rest.
            let current = client.get(nodes, None, name).await?.unwrap_or_default();
            let mut update = node.clone();
            update["status"]["generation"] = current
                .pointer("/status/generation")
                .cloned()
                .unwrap_or(json!(0));
            client
                .update_status(nodes, None, name, &update)
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Reports an instance in its own task once one of the `slots` is free.
async fn spawn_report(
    client: &Client,
    mine: &Arc<HashSet<String>>,
    v: Value,
    running: &Arc<Mutex<HashSet<String>>>,
    slots: &Arc<tokio::sync::Semaphore>,
) {
    let Ok(slot) = slots.clone().acquire_owned().await else {
        return;
    };
    let (client, mine, running) = (client.clone(), mine.clone(), running.clone());
    tokio::spawn(async move {
        report(&client, &mine, &v, &running).await;
        drop(slot);
    });
}

/// Marks an instance assigned to one of our nodes as running and ready.
async fn report(
    client: &Client,
    mine: &HashSet<String>,
    v: &Value,
    running: &Mutex<HashSet<String>>,
) {
    let Some(node) = v
        .pointer("/spec/node")
        .and_then(Value::as_str)
        .filter(|n| mine.contains(*n))
    else {
        return;
    };
    let id = id_of(v);
    if v.pointer("/status/phase").and_then(Value::as_str) == Some("running") {
        running.lock().await.insert(id);
        return;
    }
    let mut status = v.clone();
    status["status"] = json!({"phase": "running", "ready": true, "restarts": 0});
    let ns = v.pointer("/metadata/namespace").and_then(Value::as_str);
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Ok(instances) = kind("instances") else {
        return;
    };
    match client
        .with_node(node)
        .update_status(instances, ns, name, &status)
        .await
    {
        Ok(_) => {
            running.lock().await.insert(id.clone());
            tracing::info!(instance = %id, node.name = %node, "Running (hollow)");
        }
        Err(e) => {
            tracing::debug!(instance = %id, error = %e, "Status update failed; the watch will retry")
        }
    }
}
