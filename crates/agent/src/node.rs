//! The real node agent: registers its Node, heartbeats, keeps host-gw
//! routes to the other nodes' pod ranges, and runs the instances the
//! control plane assigns to it, fenced by the node's generation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use skiff_api::KindInfo;
use skiff_api::resource::Resource;
use skiff_api::service::ServiceSpec;
use skiff_client::{Client, ClientError, EventType};
use tokio::sync::watch;

use crate::runtime::cgroup::Cgroups;
use crate::runtime::instance::{Handle, NodeRuntime, Plan, Stop};
use crate::runtime::net::{self, PodNet};
use crate::{id_of, name_of};

/// How this node presents itself and where it keeps things.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    /// The address other nodes route this node's pod range to.
    pub address: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub cpu: String,
    pub memory: String,
    /// Prefix of this agent's network namespaces and cgroup directory;
    /// unique per agent on a machine (several `skiff dev` nodes share one).
    pub tag: String,
    /// The `skiff` binary (for `internal-exec`).
    pub exe: PathBuf,
    /// Logs and state.
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    pub stop_grace: Duration,
    /// Port of the log endpoint, on `address`.
    pub log_port: u16,
    /// The join token: it verifies the API server's signed log reads.
    pub join_token: String,
    /// Enforce network policy with the eBPF datapath (`None`: do not).
    pub network_policy: Option<skiff_api::policy::DefaultPolicy>,
    /// Stop every instance once heartbeats have failed for half the
    /// control plane's node grace (before replacements start elsewhere).
    pub self_fence: bool,
    /// Inject the sidecar proxy into every instance, with identities in
    /// this trust domain (`None`: no mesh).
    pub mesh: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("{0}")]
    Setup(String),
}

fn kind(name: &str) -> Result<&'static KindInfo, AgentError> {
    KindInfo::find(name).ok_or_else(|| AgentError::Setup(format!("no kind {name}")))
}

/// Runs the node until `shutdown` resolves; then stops every instance
/// (SIGTERM, grace, SIGKILL) and removes their namespaces and cgroups.
pub async fn run(
    client: Client,
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let client = client.with_node(&cfg.name);
    net::remove_leftovers(&format!("{}-", cfg.tag)).await;
    let cgroups = Cgroups::detect(&cfg.tag)?;
    for line in &cgroups.enforcement {
        tracing::info!(cgroup = %line, "Cgroup hierarchy");
    }
    net::enable_forwarding()?;
    let enforcer = match cfg.network_policy {
        Some(_) => {
            let pins = std::path::Path::new(skiff_netpol::datapath::BPFFS)
                .join(format!("skiff-{}", cfg.tag));
            let dp = skiff_netpol::datapath::Datapath::load(&pins).map_err(|e| {
                AgentError::Setup(format!(
                    "network policy: {e} (this node needs eBPF; see deploy/README.md)"
                ))
            })?;
            Some(crate::policy::Enforcer::new(dp, &cfg.name))
        }
        None => {
            tracing::warn!(
                "Network policy is not enforced on this node (--dangerously-skip-network-policy)"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind((cfg.address, cfg.log_port))
        .await
        .map_err(|e| {
            AgentError::Setup(format!(
                "log endpoint on {}:{}: {e}",
                cfg.address, cfg.log_port
            ))
        })?;
    tokio::spawn(crate::logs::serve(
        listener,
        cfg.data_dir.join("logs"),
        cfg.join_token.clone(),
        enforcer.clone(),
    ));
    let generation = register(&client, &cfg, &cgroups).await?;
    let (gen_tx, gen_rx) = watch::channel(generation);
    let (cut_tx, cut_rx) = watch::channel(false);
    tokio::spawn(heartbeat(
        client.clone(),
        cfg.name.clone(),
        cfg.heartbeat,
        gen_tx,
        cfg.self_fence.then_some(cut_tx),
    ));
    let pod_cidr = wait_for_pod_cidr(&client, &cfg.name).await?;
    tracing::info!(node.name = %cfg.name, pod_cidr = %pod_cidr, "Pod range assigned");
    tokio::spawn(routes(client.clone(), cfg.name.clone()));
    // One watch per kind for policy and the mesh together.
    let policy = enforcer.as_ref().zip(cfg.network_policy);
    let mut kinds = Vec::new();
    if policy.is_some() || cfg.mesh.is_some() {
        kinds.extend([
            "policies",
            "networkpolicies",
            "namespaces",
            "services",
            "instances",
        ]);
    }
    if cfg.mesh.is_some() {
        kinds.push("routes");
    }
    let cache = crate::cache::Cache::follow(&client, &kinds);
    if let Some((e, default)) = policy {
        let host = vec![cfg.address, net::gateway_of(pod_cidr)];
        tokio::spawn(crate::policy::run(cache.clone(), e.clone(), host, default));
    }
    let mesh = match &cfg.mesh {
        Some(td) => {
            let mesh = Arc::new(
                crate::runtime::mesh::Mesh::new(&cfg.tag, td, &client)
                    .map_err(AgentError::Setup)?,
            );
            tokio::spawn(mesh.discovery.clone().follow(cache.clone()));
            let enforcer = enforcer.clone();
            tokio::spawn(crate::runtime::discovery::collect(
                mesh.discovery.clone(),
                cache.clone(),
                client.clone(),
                cfg.name.clone(),
                crate::runtime::mesh::ADMIN_PORT,
                move |dst, port, denial| {
                    if let Some(e) = &enforcer {
                        e.record_l7(dst, port, denial);
                    }
                },
            ));
            Some(mesh)
        }
        None => None,
    };
    let rt = Arc::new(NodeRuntime {
        enforcer,
        mesh,
        client: client.clone(),
        cgroups,
        exe: cfg.exe.clone(),
        logs: cfg.data_dir.join("logs"),
        stop_grace: cfg.stop_grace,
    });
    let mut node = Node {
        rt,
        name: cfg.name.clone(),
        tag: cfg.tag.clone(),
        pod_cidr,
        running: HashMap::new(),
        stopping: Vec::new(),
        serial: 0,
        generation: gen_rx,
        cut_off: cut_rx,
    };
    let result = tokio::select! {
        r = node.follow() => r,
        _ = shutdown => Ok(()),
    };
    tracing::info!(
        instances = node.running.len(),
        "Stopping every instance on this node"
    );
    let stops: Vec<_> = node
        .running
        .drain()
        .map(|(_, r)| r.handle.stop(Stop::Now))
        .collect();
    for s in stops {
        s.await;
    }
    for (_, _, stopping) in node.stopping.drain(..) {
        let _ = stopping.await;
    }
    result
}

/// Creates the Node, or refreshes it when it exists (keeping its fencing
/// generation); returns the generation.
async fn register(client: &Client, cfg: &NodeConfig, cgroups: &Cgroups) -> Result<u64, AgentError> {
    let nodes = kind("nodes")?;
    let (cpu, memory) = (&cfg.cpu, &cfg.memory);
    let mut labels = cfg.labels.clone();
    labels.insert("hostname".into(), cfg.name.clone());
    let status = |generation: Value| {
        json!({
            "capacity": {"cpu": cpu, "memory": memory},
            "allocatable": {"cpu": cpu, "memory": memory},
            "address": cfg.address.to_string(),
            "agentPort": cfg.log_port,
            "runtime": cgroups.enforcement,
            "ready": true,
            "generation": generation,
        })
    };
    if !cgroups.enforces_memory() || !cgroups.enforces_cpu() {
        tracing::warn!(
            memory = cgroups.enforces_memory(),
            cpu = cgroups.enforces_cpu(),
            "Some resource limits are not enforced on this node (see the cgroup lines above)"
        );
    }
    let node = json!({
        "apiVersion": "skiff.dev/v1", "kind": "Node",
        "metadata": {"name": cfg.name, "labels": labels},
        "spec": {},
        "status": status(json!(0)),
    });
    match client.create(nodes, None, &node).await {
        Ok(_) => Ok(0),
        Err(e) if e.status() == Some(409) => {
            let current = client
                .get(nodes, None, &cfg.name)
                .await?
                .unwrap_or_default();
            let generation = current
                .pointer("/status/generation")
                .cloned()
                .unwrap_or(json!(0));
            let mut update = current.clone();
            update["status"] = status(generation.clone());
            client
                .update_status(nodes, None, &cfg.name, &update)
                .await?;
            Ok(generation.as_u64().unwrap_or(0))
        }
        Err(e) => Err(e.into()),
    }
}

/// Renews the node's lease every `every`; publishes the fencing
/// generation and, with self-fencing, whether the node is cut off: no
/// successful heartbeat for half the node grace the server announced.
async fn heartbeat(
    client: Client,
    name: String,
    every: Duration,
    generation: watch::Sender<u64>,
    cut_off: Option<watch::Sender<bool>>,
) {
    let mut tick = tokio::time::interval(every.min(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut grace = Duration::from_secs(3);
    let mut last_ok = tokio::time::Instant::now();
    let mut last_try = tokio::time::Instant::now() - every;
    let mut pending: Option<tokio::task::JoinHandle<Result<Value, ClientError>>> = None;
    loop {
        tick.tick().await;
        if pending.as_ref().is_some_and(|p| p.is_finished())
            && let Some(p) = pending.take()
        {
            match p.await {
                Ok(Ok(v)) => {
                    last_ok = tokio::time::Instant::now();
                    if let Some(g) = v
                        .get("graceSeconds")
                        .and_then(Value::as_f64)
                        .filter(|g| g.is_finite() && *g > 0.0)
                    {
                        grace = Duration::from_secs_f64(g);
                    }
                    if let Some(g) = v.get("generation").and_then(Value::as_u64) {
                        generation.send_if_modified(|old| {
                            let newer = g > *old;
                            if newer {
                                tracing::warn!(node.name = %name, generation = g, "This node was declared lost: its old instances are fenced");
                                *old = g;
                            }
                            newer
                        });
                    }
                }
                Ok(Err(e)) => tracing::warn!(node.name = %name, error = %e, "Heartbeat failed"),
                Err(_) => {}
            }
        }
        // One heartbeat in flight at a time; a hung one does not stop the
        // clock. At least three per grace period, so one late or lost
        // heartbeat never costs the node its lease.
        if pending.is_none() && last_try.elapsed() >= every.min(grace / 3) {
            last_try = tokio::time::Instant::now();
            let (client, name) = (client.clone(), name.clone());
            pending = Some(tokio::spawn(async move { client.heartbeat(&name).await }));
        }
        if let Some(cut) = &cut_off {
            let is_cut = last_ok.elapsed() > grace / 2;
            cut.send_if_modified(|old| {
                let changed = *old != is_cut;
                if changed {
                    if is_cut {
                        tracing::warn!(node.name = %name, "Cut off from the control plane for half the node grace: stopping every instance (self-fencing)");
                    } else {
                        tracing::info!(node.name = %name, "Control plane reachable again");
                    }
                    *old = is_cut;
                }
                changed
            });
        }
    }
}

async fn wait_for_pod_cidr(client: &Client, name: &str) -> Result<Ipv4Addr, AgentError> {
    let nodes = kind("nodes")?;
    let mut warned = false;
    loop {
        if let Some(v) = client.get(nodes, None, name).await?
            && let Some(cidr) = v.pointer("/spec/podCIDR").and_then(Value::as_str)
        {
            return match cidr.split_once('/').map(|(a, _)| a.parse::<Ipv4Addr>()) {
                Some(Ok(a)) => Ok(a),
                _ => Err(AgentError::Setup(format!(
                    "node {name} has pod range {cidr:?}: need an IPv4 /24"
                ))),
            };
        }
        if !warned {
            tracing::info!(node.name = %name, "Waiting for the control plane to assign a pod range");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Host-gw: a route to every other node's pod range via that node.
async fn routes(client: Client, me: String) {
    let Ok(nodes) = kind("nodes") else { return };
    let mut routed: BTreeMap<String, (String, Ipv4Addr)> = BTreeMap::new();
    loop {
        let list = match client.list(nodes, None, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot list nodes for routes");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut objects: BTreeMap<String, Value> =
            list.items.into_iter().map(|v| (name_of(&v), v)).collect();
        sync_routes(&me, &objects, &mut routed).await;
        let mut watch = client.watch(nodes, None, None, list.revision);
        while let Some(event) = watch.next().await {
            let Ok(event) = event else { break };
            match event.kind {
                EventType::Added | EventType::Modified => {
                    objects.insert(name_of(&event.object), event.object);
                }
                EventType::Deleted => {
                    objects.remove(&name_of(&event.object));
                }
                _ => continue,
            }
            sync_routes(&me, &objects, &mut routed).await;
        }
    }
}

async fn sync_routes(
    me: &str,
    nodes: &BTreeMap<String, Value>,
    routed: &mut BTreeMap<String, (String, Ipv4Addr)>,
) {
    let mut want = BTreeMap::new();
    for (name, v) in nodes {
        if name == me {
            continue;
        }
        let cidr = v.pointer("/spec/podCIDR").and_then(Value::as_str);
        let addr = v
            .pointer("/status/address")
            .and_then(Value::as_str)
            .and_then(|a| a.parse::<Ipv4Addr>().ok());
        if let (Some(c), Some(a)) = (cidr, addr) {
            want.insert(name.clone(), (c.to_string(), a));
        }
    }
    for (name, (cidr, _)) in routed.clone() {
        if want.get(&name).map(|w| &w.0) != Some(&cidr) {
            net::unroute(&cidr).await;
            routed.remove(&name);
        }
    }
    for (name, (cidr, via)) in want {
        if routed.get(&name) == Some(&(cidr.clone(), via)) {
            continue;
        }
        match net::route_via(&cidr, via).await {
            Ok(()) => {
                tracing::info!(node.name = %name, pod_cidr = %cidr, via = %via, "Route to node");
                routed.insert(name, (cidr, via));
            }
            Err(e) => tracing::warn!(node.name = %name, error = %e, "Cannot route to node"),
        }
    }
}

struct Running {
    handle: Handle,
    node_generation: u64,
    uid: String,
}

struct Node {
    rt: Arc<NodeRuntime>,
    name: String,
    tag: String,
    pod_cidr: Ipv4Addr,
    running: HashMap<String, Running>,
    /// Instances stopping (concurrently): their id, their address (not
    /// handed out again until they are gone) and the stop's task.
    stopping: Vec<(String, Ipv4Addr, tokio::task::JoinHandle<()>)>,
    serial: u64,
    generation: watch::Receiver<u64>,
    /// True while self-fenced (never without `--self-fence`).
    cut_off: watch::Receiver<bool>,
}

impl Node {
    /// Follows the instances assigned here until the watch ends for good.
    async fn follow(&mut self) -> Result<(), AgentError> {
        let instances = kind("instances")?;
        loop {
            let list = match self.rt.client.list(instances, None, None).await {
                Ok(l) => l,
                Err(e) => {
                    // The control plane is away: instances carry on.
                    tracing::warn!(error = %e, "Cannot list instances; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let current: HashMap<String, Value> = list
                .items
                .into_iter()
                .filter(|v| self.is_mine(v))
                .map(|v| (id_of(&v), v))
                .collect();
            let gone: Vec<String> = self
                .running
                .keys()
                .filter(|id| !current.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                self.stop(&id, "deleted", Stop::AfterRevision(list.revision));
            }
            for v in current.values() {
                self.ensure(v, Stop::AfterRevision(list.revision)).await;
            }
            let mut watch = self.rt.client.watch(instances, None, None, list.revision);
            let mut generation = self.generation.clone();
            let mut cut_off = self.cut_off.clone();
            loop {
                tokio::select! {
                    changed = generation.changed() => {
                        if changed.is_err() { continue; }
                        self.fence().await;
                    }
                    changed = cut_off.changed(), if !cut_off.is_closed() => {
                        if changed.is_err() { continue; }
                        if *cut_off.borrow_and_update() {
                            let all: Vec<String> = self.running.keys().cloned().collect();
                            for id in all {
                                self.stop(&id, "self-fenced: cut off from the control plane", Stop::Now);
                            }
                        } else {
                            // Back: list again and start what is still ours.
                            break;
                        }
                    }
                    event = watch.next() => {
                        let Some(event) = event else { break };
                        let event = match event {
                            Ok(e) => e,
                            Err(e) => {
                                tracing::warn!(error = %e, "Instance watch failed; listing again");
                                break;
                            }
                        };
                        let after = Stop::AfterRevision(event.revision);
                        match event.kind {
                            EventType::Added | EventType::Modified => {
                                if self.is_mine(&event.object) {
                                    self.ensure(&event.object, after).await;
                                } else if self.running.contains_key(&id_of(&event.object)) {
                                    self.stop(&id_of(&event.object), "assigned elsewhere", after);
                                }
                            }
                            EventType::Deleted => self.stop(&id_of(&event.object), "deleted", after),
                            _ => {}
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn is_mine(&self, v: &Value) -> bool {
        v.pointer("/spec/node").and_then(Value::as_str) == Some(self.name.as_str())
    }

    /// Stops instances assigned under an older generation than the node's.
    async fn fence(&mut self) {
        let generation = *self.generation.borrow();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.node_generation < generation)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            self.stop(&id, "fenced: the node was declared lost", Stop::Now);
        }
    }

    /// Starts an instance that should run here and does not yet (`after`:
    /// when an instance it replaces may stop).
    async fn ensure(&mut self, v: &Value, after: Stop) {
        if *self.cut_off.borrow() {
            return;
        }
        let id = id_of(v);
        let uid = v
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some(r) = self.running.get(&id) {
            if r.uid == uid || uid.is_empty() {
                return;
            }
            // Same name, new object: the old one is gone.
            self.stop(&id, "replaced", after);
        }
        let node_generation = v
            .pointer("/spec/nodeGeneration")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if node_generation < *self.generation.borrow() {
            return;
        }
        let (ns, name) = (
            v.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            name_of(v),
        );
        let Some(service) = v.pointer("/spec/service").and_then(Value::as_str) else {
            return;
        };
        let spec = match self.service_spec(&ns, service).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "Cannot read the instance's service; will retry on the next change");
                return;
            }
        };
        self.stopping.retain(|(_, _, task)| !task.is_finished());
        let used: BTreeSet<Ipv4Addr> = self
            .running
            .values()
            .map(|r| r.handle.address)
            .chain(self.stopping.iter().map(|(_, a, _)| *a))
            .collect();
        let Some(address) = net::free_address(self.pod_cidr, &used) else {
            tracing::error!(instance = %id, "No free address in this node's pod range");
            return;
        };
        self.serial += 1;
        let netns = format!("{}-{}", self.tag, self.serial);
        let plan = Plan {
            namespace: ns,
            name,
            service: service.to_string(),
            spec,
            net: PodNet {
                host_if: net::host_if_name(&netns),
                netns,
                address,
                gateway: net::gateway_of(self.pod_cidr),
            },
        };
        tracing::info!(instance = %id, address = %address, "Starting");
        let handle = Handle::start(self.rt.clone(), plan);
        self.running.insert(
            id,
            Running {
                handle,
                node_generation,
                uid,
            },
        );
    }

    /// Stops an instance in the background: several leave at once, each
    /// waiting (with `Stop::AfterRevision`) until no proxy sends it
    /// requests.
    fn stop(&mut self, id: &str, why: &str, when: Stop) {
        if let Some(r) = self.running.remove(id) {
            tracing::info!(instance = %id, reason = why, "Stopping");
            let address = r.handle.address;
            let task = tokio::spawn(r.handle.stop(when));
            self.stopping.push((id.to_string(), address, task));
        }
    }

    async fn service_spec(&self, ns: &str, name: &str) -> Result<ServiceSpec, String> {
        let services = kind("services").map_err(|e| e.to_string())?;
        let v = self
            .rt
            .client
            .get(services, Some(ns), name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("Service {ns}/{name} not found"))?;
        let loaded = skiff_api::load_str("store", &v.to_string()).map_err(|d| format!("{d:?}"))?;
        loaded
            .into_iter()
            .find_map(|l| match l.resource {
                Resource::Service(s) => Some(s.spec),
                _ => None,
            })
            .ok_or_else(|| format!("Service {ns}/{name} does not decode"))
    }
}

/// The machine's CPU count and memory, as Node capacity quantities.
pub fn machine_capacity() -> (String, String) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(1024 * 1024);
    (cpus.to_string(), format!("{kib}Ki"))
}

/// The first IPv4 address of this host's (or namespace's) interfaces that
/// is not loopback, for `--address` when none is given.
pub fn guess_address() -> Option<Ipv4Addr> {
    // Connecting a UDP socket sends nothing; it only picks the source address.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.18.0.1:9").ok()?;
    match s.local_addr().ok()?.ip() {
        IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() => Some(a),
        _ => None,
    }
}
