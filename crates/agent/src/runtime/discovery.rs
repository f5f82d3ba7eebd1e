//! Mesh discovery on a node: one stream for every local proxy, made from
//! the agent's copy of the cluster ([`crate::cache`]), and the way back:
//! each proxy's acknowledgement of what it applied (published in the
//! Node's status for rollouts to wait on) and its L7 denials (merged into
//! the node's flow records for `skiff flows`).
//!
//! The stream is JSON lines on a unix socket: a proxy writes `since N`
//! (its version, 0 at first) and gets the updates after N (or a snapshot
//! when N is too old), then each new update as it is made. An update is
//! `{"version", "revisions", "snapshot", "set": {section: {key: entry}},
//! "remove": {section: [key]}}`, numbered consecutively and stamped with
//! the control plane revision of each kind it reflects. The sections:
//! - `peers`: every addressed instance's identity;
//! - `services`: every Service's virtual address and ready instances;
//! - `routes`: the `Route` rules of each service, in the proxy's format;
//! - `inbound`: per local instance, the L7 rules of the policies that
//!   select it and the sources policy lets in without mTLS.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use skiff_api::meta::{Labels, NAMESPACE_NAME_LABEL};
use skiff_api::net::{PortRef, Protocol};
use skiff_api::policy::Mode;
use skiff_api::policytest::NamedPort;
use skiff_api::{Resource, meta};
use skiff_client::Client;
use skiff_identity::SpiffeId;
use skiff_netpol::PolicyRule;
use skiff_netpol::cluster::text;
use skiff_netpol::model::{Namespaces, Peer};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, broadcast, watch};

use crate::cache::{Cache, LocalInstances, Pace, State};
use crate::lock;
use skiff_proxy::transparent::SECTIONS;

/// A node's (or a gateway's) discovery stream and the local instances it
/// covers.
#[derive(Debug)]
pub struct Discovery {
    /// The unix socket proxies subscribe on.
    path: PathBuf,
    trust_domain: String,
    published: Mutex<Published>,
    updates: broadcast::Sender<Update>,
    /// Local instances (`ns/name`) → address, and a generation bumped on
    /// each change.
    local: Mutex<(u64, BTreeMap<String, Ipv4Addr>)>,
    wake: Notify,
    /// The local generation the last published update covers.
    written: watch::Sender<u64>,
}

/// One update line and its version.
type Update = (u64, Arc<str>);

/// What has been published: the whole table as of `version`, and the
/// recent updates, for subscribers catching up.
#[derive(Debug, Default)]
struct Published {
    version: u64,
    table: Value,
    recent: VecDeque<Update>,
}

/// Updates kept for subscribers that reconnect.
const KEPT_UPDATES: usize = 256;

impl Published {
    /// The snapshot update of the current table.
    fn snapshot(&self) -> Arc<str> {
        let mut set = self.table.clone();
        let revisions = set
            .as_object_mut()
            .and_then(|m| m.remove("revisions"))
            .unwrap_or_default();
        if let Some(m) = set.as_object_mut() {
            m.remove("version");
        }
        let line = json!({
            "version": self.version,
            "revisions": revisions,
            "snapshot": true,
            "set": set,
        });
        Arc::from(format!("{line}\n"))
    }
}

/// The update from table `old` to `new` (both as [`render`] makes them):
/// entries set (new or changed) and removed, per section.
pub fn delta(old: &Value, new: &Value) -> Value {
    let mut set = Map::new();
    let mut remove = Map::new();
    let empty = Map::new();
    for section in SECTIONS {
        let before = old
            .get(section)
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let after = new
            .get(section)
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let changed: Map<String, Value> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let gone: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        if !changed.is_empty() {
            set.insert(section.to_string(), Value::Object(changed));
        }
        if !gone.is_empty() {
            remove.insert(section.to_string(), json!(gone));
        }
    }
    json!({
        "version": new["version"],
        "revisions": new["revisions"],
        "snapshot": false,
        "set": set,
        "remove": remove,
    })
}

impl Discovery {
    pub fn new(path: PathBuf, trust_domain: &str) -> Arc<Discovery> {
        Arc::new(Discovery {
            path,
            trust_domain: trust_domain.to_string(),
            published: Mutex::new(Published::default()),
            updates: broadcast::channel(1024).0,
            local: Mutex::new((0, BTreeMap::new())),
            wake: Notify::new(),
            written: watch::channel(0).0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Registers a local instance before its proxy starts; returns once the
    /// published table holds its inbound policy (or fails after `within`):
    /// a proxy never serves its instance without the policy that governs
    /// it.
    pub async fn admit(&self, id: &str, address: Ipv4Addr, within: Duration) -> Result<(), String> {
        let generation = {
            let mut local = lock(&self.local);
            local.0 += 1;
            local.1.insert(id.to_string(), address);
            local.0
        };
        let mut written = self.written.subscribe();
        self.wake.notify_one();
        match tokio::time::timeout(within, written.wait_for(|g| *g >= generation)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(format!(
                "mesh discovery did not take {id} within {}s",
                within.as_secs()
            )),
        }
    }

    /// Forgets a local instance, if it still has this address (a newer
    /// instance of the same name may have taken its place).
    pub fn release(&self, id: &str, address: Ipv4Addr) {
        let mut local = lock(&self.local);
        if local.1.get(id) == Some(&address) {
            local.1.remove(id);
            local.0 += 1;
            self.wake.notify_one();
        }
    }

    /// Local instances and their addresses.
    pub fn locals(&self) -> BTreeMap<String, Ipv4Addr> {
        lock(&self.local).1.clone()
    }

    /// Serves the stream on its unix socket (replacing a stale one) and
    /// publishes an update after each change settles. Runs until the task
    /// ends.
    pub async fn follow(self: Arc<Self>, cache: Arc<Cache>) {
        let _ = std::fs::remove_file(&self.path);
        match tokio::net::UnixListener::bind(&self.path) {
            Ok(listener) => {
                // Only the proxies' user (and root) may subscribe: the
                // table names every instance and the L7 rules. (Run as
                // another user, as a gateway may be, the socket stays its
                // own.)
                let _ = std::os::unix::fs::chown(&self.path, Some(super::mesh::PROXY_UID), None);
                let _ = std::fs::set_permissions(
                    &self.path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                );
                tokio::spawn(self.clone().serve(listener));
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "Cannot serve mesh discovery");
                return;
            }
        }
        let mut changes = cache.subscribe();
        changes.mark_changed();
        let mut version = 0u64;
        let mut known = LocalInstances::default();
        let mut pace = Pace::default();
        loop {
            tokio::select! {
                _ = changes.changed() => {}
                _ = self.wake.notified() => {}
            }
            pace.wait().await;
            version += 1;
            let (generation, local) = lock(&self.local).clone();
            // On a blocking thread: at tens of thousands of instances a
            // table takes a good part of a second to make.
            let (me, cache) = (self.clone(), cache.clone());
            let made = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let table = {
                    let s = cache.state();
                    known.update(&s, local.keys());
                    render(&s, &known, &me.trust_domain, &local, version)
                };
                me.publish(table);
                (known, started)
            })
            .await;
            match made {
                Ok((k, started)) => {
                    known = k;
                    pace.done(started);
                }
                Err(e) => {
                    tracing::error!(error = %e, "Making the discovery table failed");
                    known = LocalInstances::default();
                    continue;
                }
            }
            self.written.send_replace(generation);
        }
    }

    /// Publishes the update from the last table to `table`.
    fn publish(&self, table: Value) {
        let mut p = lock(&self.published);
        let update = delta(&p.table, &table);
        let line: Arc<str> = Arc::from(format!("{update}\n"));
        p.version = table["version"].as_u64().unwrap_or(0);
        p.table = table;
        if p.recent.len() == KEPT_UPDATES {
            p.recent.pop_front();
        }
        let version = p.version;
        p.recent.push_back((version, line.clone()));
        // Sent under the lock: a subscriber joining sees each update once,
        // either in what it catches up on or from the channel.
        let _ = self.updates.send((version, line));
    }

    /// What a subscriber that has `since` gets first: the updates after it,
    /// or a snapshot when those are no longer kept (or it has nothing);
    /// with the version that brings it to, and a receiver for the rest.
    fn catch_up(&self, since: u64) -> (Vec<Arc<str>>, u64, broadcast::Receiver<Update>) {
        let p = lock(&self.published);
        let rx = self.updates.subscribe();
        let kept_from = p.recent.front().map_or(u64::MAX, |(v, _)| *v);
        let lines = if since == p.version {
            Vec::new()
        } else if since > 0 && since < p.version && since + 1 >= kept_from {
            p.recent
                .iter()
                .filter(|(v, _)| *v > since)
                .map(|(_, l)| l.clone())
                .collect()
        } else {
            vec![p.snapshot()]
        };
        (lines, p.version, rx)
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.subscriber(stream).await {
                    tracing::debug!(error = %e, "Discovery subscriber gone");
                }
            });
        }
    }

    /// One proxy's subscription: `since N\n`, then updates as lines.
    async fn subscriber(&self, stream: tokio::net::UnixStream) -> std::io::Result<()> {
        use tokio::io::AsyncBufReadExt;
        let (read, mut write) = stream.into_split();
        let mut first = String::new();
        tokio::io::BufReader::new(read)
            .read_line(&mut first)
            .await?;
        let since = first
            .trim()
            .strip_prefix("since ")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let (lines, mut at, mut rx) = self.catch_up(since);
        for line in lines {
            write.write_all(line.as_bytes()).await?;
        }
        loop {
            match rx.recv().await {
                Ok((version, line)) if version > at => {
                    write.write_all(line.as_bytes()).await?;
                    at = version;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow for the updates: start it over.
                    let (lines, now, fresh) = self.catch_up(0);
                    for line in lines {
                        write.write_all(line.as_bytes()).await?;
                    }
                    (at, rx) = (now, fresh);
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

/// The peers file for `local` instances (`ns/name` → address).
pub fn render(
    s: &State,
    known: &LocalInstances,
    trust_domain: &str,
    local: &BTreeMap<String, Ipv4Addr>,
    version: u64,
) -> Value {
    let mut peers = Map::new();
    // By (namespace, service): the identity, and the ready addresses.
    let mut identities: HashMap<(&str, &str), Option<String>> = HashMap::new();
    let mut ready: HashMap<(&str, &str), Vec<String>> = HashMap::new();
    for m in s.members.values() {
        let Some(address) = m.address else {
            continue;
        };
        let service = (m.namespace.as_str(), m.service.as_str());
        let id = identities.entry(service).or_insert_with(|| {
            SpiffeId::new(trust_domain, service.0, service.1)
                .ok()
                .map(|id| id.to_string())
        });
        if let Some(id) = id {
            peers.insert(address.to_string(), Value::String(id.clone()));
        }
        if m.ready {
            ready.entry(service).or_default().push(address.to_string());
        }
    }
    let mut services = Map::new();
    for (name, vip) in &s.virtual_addresses {
        let endpoints = name
            .split_once('/')
            .and_then(|service| ready.remove(&service))
            .unwrap_or_default();
        let mut entry = json!({"name": name, "endpoints": endpoints});
        if let Some(opaque) = s.opaque_ports.get(name).filter(|p| !p.is_empty()) {
            entry["opaquePorts"] = json!(opaque);
        }
        services.insert(vip.clone(), entry);
    }
    let mut inbound = Map::new();
    if !local.is_empty() {
        let world = Workloads::of(s, trust_domain);
        for (id, address) in local {
            // A deleted instance draining here keeps its policy.
            if let Some(v) = known.get(id)
                && let Some(policy) = inbound_policy(s, &world, v)
            {
                inbound.insert(address.to_string(), policy);
            }
        }
    }
    let revisions: BTreeMap<&str, u64> = s.revisions.clone();
    json!({
        "version": version,
        "revisions": revisions,
        "peers": peers,
        "services": services,
        "routes": routes(s),
        "inbound": inbound,
    })
}

/// Every service's Route rules in the proxy's format, backends by
/// `ns/name`; several Routes for one service apply in name order.
fn routes(s: &State) -> Map<String, Value> {
    let mut by_service: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (id, v) in &s.routes {
        let Ok(loaded) = skiff_api::load_str("store", &v.to_string()) else {
            tracing::warn!(route = %id, "A stored Route does not decode; ignoring it");
            continue;
        };
        for l in &loaded {
            let Resource::Route(route) = &l.resource else {
                continue;
            };
            let ns = route.namespace();
            let rules = by_service
                .entry(format!("{ns}/{}", route.spec.service))
                .or_default();
            for rule in &route.spec.rules {
                let matches: Vec<Value> = rule
                    .matches
                    .iter()
                    .map(|m| {
                        let mut out = Map::new();
                        if let Some(p) = &m.path {
                            let key = match p.kind {
                                skiff_api::cluster::PathMatchType::Exact => "path",
                                skiff_api::cluster::PathMatchType::PathPrefix => "pathPrefix",
                            };
                            out.insert(key.into(), p.value.clone().into());
                        }
                        if let Some(method) = &m.method {
                            out.insert("method".into(), method.clone().into());
                        }
                        let headers: Map<String, Value> = m
                            .headers
                            .iter()
                            .map(|h| (h.name.clone(), h.value.clone().into()))
                            .collect();
                        out.insert("headers".into(), headers.into());
                        Value::Object(out)
                    })
                    .collect();
                let backends: Vec<Value> = rule
                    .backends
                    .iter()
                    .map(|b| json!({"service": format!("{ns}/{}", b.service), "weight": b.weight}))
                    .collect();
                let mut out = json!({
                    "name": format!("{ns}/{}", route.name()),
                    "matches": matches,
                    "backends": backends,
                });
                if rule.retry {
                    out["retry"] = json!({"nonIdempotent": true});
                }
                if let Some(t) = &rule.timeout {
                    out["timeoutMs"] = (t.0.as_millis() as u64).into();
                }
                rules.push(out);
            }
        }
    }
    by_service
        .into_iter()
        .map(|(k, v)| (k, Value::Array(v)))
        .collect()
}

/// Who can be a peer: each distinct (namespace, labels) group of instances
/// with its identity, and every namespace's labels.
struct Workloads<'s> {
    trust_domain: String,
    /// Distinct (namespace, labels, service) of the instances.
    groups: BTreeSet<(&'s str, &'s Labels, &'s str)>,
    namespaces: BTreeMap<String, Labels>,
}

impl<'s> Workloads<'s> {
    fn of(s: &'s State, trust_domain: &str) -> Workloads<'s> {
        let mut groups = BTreeSet::new();
        let mut namespaces: BTreeMap<String, Labels> = s.namespaces.clone();
        for m in s.members.values() {
            if !namespaces.contains_key(&m.namespace) {
                namespaces.insert(m.namespace.clone(), Labels::new());
            }
            groups.insert((m.namespace.as_str(), &m.labels, m.service.as_str()));
        }
        for (name, labels) in &mut namespaces {
            labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        }
        Workloads {
            trust_domain: trust_domain.to_string(),
            groups,
            namespaces,
        }
    }

    /// The identity patterns of a selecting peer: `…/ns/<ns>/sa/*` when it
    /// takes every workload of a namespace (the gateway's too), else the
    /// exact identities of the matching instances' Services.
    fn identities(
        &self,
        namespaces: &Namespaces,
        workloads: Option<&skiff_api::selector::LabelSelector>,
    ) -> Vec<String> {
        let in_scope: Vec<&String> = match namespaces {
            Namespaces::Same(ns) => vec![ns],
            Namespaces::Matching(sel) => self
                .namespaces
                .iter()
                .filter(|(_, labels)| sel.matches(labels))
                .map(|(name, _)| name)
                .collect(),
        };
        let mut out = BTreeSet::new();
        for ns in in_scope {
            match workloads {
                None => {
                    out.insert(format!("spiffe://{}/ns/{ns}/sa/*", self.trust_domain));
                }
                Some(sel) => {
                    for (gns, labels, service) in &self.groups {
                        if gns == ns
                            && sel.matches(labels)
                            && let Ok(id) = SpiffeId::new(&self.trust_domain, ns, service)
                        {
                            out.insert(id.to_string());
                        }
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

/// What one local instance's inbound side must know: `http` (every
/// ingress rule of the enforcing policies that select it, when any of
/// them has an `http` section), `audit` (the same, were the audit-mode
/// policies selecting it enforced too, when one of those has an `http`
/// section), `plaintext` (enforced rules with address peers) and
/// `opaquePorts` (its Service's ports declared `tcp`). `None` when none
/// applies.
fn inbound_policy(s: &State, world: &Workloads, instance: &Value) -> Option<Value> {
    let (ns, service) = (
        text(instance, "/metadata/namespace"),
        text(instance, "/spec/service"),
    );
    let labels = meta::labels_in(instance);
    let ports = s
        .services
        .get(&format!("{ns}/{service}"))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let selecting = |mode: Mode| -> Vec<&PolicyRule> {
        s.policies
            .values()
            .filter(|p| {
                p.mode == mode
                    && p.id.namespace == ns
                    && p.ingress.is_some()
                    && p.selector.matches(&labels)
            })
            .collect()
    };
    let enforced = http_rules(&selecting(Mode::Enforce), world, ports);
    let audited = http_rules(&selecting(Mode::Audit), world, ports);
    let opaque = s
        .opaque_ports
        .get(&format!("{ns}/{service}"))
        .cloned()
        .unwrap_or_default();
    let any_http = enforced.any_http;
    if !any_http && !audited.any_http && enforced.plaintext.is_empty() && opaque.is_empty() {
        return None;
    }
    let mut entry = json!({
        "http": if any_http { Value::Array(enforced.http.clone()) } else { Value::Null },
        "plaintext": enforced.plaintext,
    });
    if audited.any_http {
        // Policies only ever add what they allow: what would hold is the
        // enforced rules and the audited ones together.
        let mut would = enforced.http;
        would.extend(audited.http);
        entry["audit"] = Value::Array(would);
    }
    if !opaque.is_empty() {
        entry["opaquePorts"] = json!(opaque);
    }
    Some(entry)
}

/// Policies' ingress rules as the proxy's L7 rules.
struct HttpRules {
    /// Every rule (one without `http` allows every method and path).
    http: Vec<Value>,
    /// Rules with address peers: sources let in without mTLS.
    plaintext: Vec<Value>,
    /// Some rule has an `http` section (so L7 authorization applies).
    any_http: bool,
}

fn http_rules(policies: &[&PolicyRule], world: &Workloads, ports: &[NamedPort]) -> HttpRules {
    let mut out = HttpRules {
        http: Vec::new(),
        plaintext: Vec::new(),
        any_http: false,
    };
    for p in policies {
        for rule in p.ingress.iter().flatten() {
            let Some(tcp_ports) = tcp_port_ranges(&rule.ports, ports) else {
                continue;
            };
            out.any_http |= rule.http.is_some();
            let mut identities = Vec::new();
            let mut sources = Vec::new();
            for peer in &rule.peers {
                match peer {
                    Peer::Select {
                        namespaces,
                        workloads,
                    } => identities.extend(world.identities(namespaces, workloads.as_ref())),
                    Peer::Cidr { cidr, except } => sources.push(json!({
                        "cidr": cidr.to_string(),
                        "except": except.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    })),
                }
            }
            // Peers that select nobody admit nobody (not everybody).
            if !rule.peers.is_empty() && identities.is_empty() && sources.is_empty() {
                continue;
            }
            let (methods, paths) = rule
                .http
                .as_ref()
                .map(|h| (h.methods.clone(), h.paths.clone()))
                .unwrap_or_default();
            let policy = p.id.to_string();
            if !sources.is_empty() {
                out.plaintext
                    .push(json!({"policy": policy, "sources": sources, "ports": tcp_ports}));
            }
            out.http.push(json!({
                "policy": policy,
                "methods": methods,
                "paths": paths,
                "identities": identities,
                "sources": sources,
                "ports": tcp_ports,
            }));
        }
    }
    out
}

/// A rule's TCP ports as `[first, last]` ranges, named ports resolved
/// against the instance's Service: empty for every port, `None` when the
/// rule covers no TCP port at all.
fn tcp_port_ranges(
    rule_ports: &[skiff_api::policy::PolicyPort],
    service_ports: &[NamedPort],
) -> Option<Vec<[u16; 2]>> {
    if rule_ports.is_empty() {
        return Some(Vec::new());
    }
    let ranges: Vec<[u16; 2]> = rule_ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .filter_map(|p| match &p.port {
            None => Some([0, u16::MAX]),
            Some(PortRef::Number(n)) => Some([*n, p.end_port.unwrap_or(*n)]),
            Some(PortRef::Name(name)) => service_ports
                .iter()
                .find(|sp| sp.name.as_deref() == Some(name) && sp.protocol == Protocol::Tcp)
                .map(|sp| [sp.port, sp.port]),
        })
        .collect();
    (!ranges.is_empty()).then_some(ranges)
}

/// How often local proxies are asked what they applied and denied.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// How long a changed `status.mesh` that nobody waits for may go unwritten.
const PUBLISH_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// The kinds each of whose changes someone may wait to see applied: a
/// rollout waits for its Routes; whoever changes a policy, for its
/// enforcement (namespace labels select policy peers). Services are not
/// among them: every scale rewrites one. Instances are waited for only as
/// far as their last departure.
const WAITED_FOR: [&str; 4] = ["routes", "policies", "networkpolicies", "namespaces"];

/// Asks every local proxy (`/peers`, `/denials`) each second: their
/// acknowledgements go into the Node's `status.mesh` when someone may wait
/// for them (see [`publish_due`]), their L7 denials to `report`. Runs until
/// the task ends.
pub async fn collect(
    discovery: Arc<Discovery>,
    cache: Arc<Cache>,
    client: Client,
    node: String,
    admin_port: u16,
    report: impl Fn(Ipv4Addr, u16, &Value) + Send,
) {
    let mut after: BTreeMap<String, u64> = BTreeMap::new();
    let mut published: Option<(Value, Instant)> = None;
    loop {
        tokio::time::sleep(COLLECT_EVERY).await;
        let locals = discovery.locals();
        after.retain(|id, _| locals.contains_key(id));
        // Every proxy at once: a hung one costs the others nothing.
        let asked = locals.iter().map(|(id, address)| {
            let admin = SocketAddr::from((*address, admin_port));
            let seen = after.get(id).copied().unwrap_or(0);
            async move {
                let peers = get_json(admin, "/peers").await.ok()?;
                let denials = get_json(admin, &format!("/denials?after={seen}"))
                    .await
                    .ok();
                Some((id, *address, peers, denials))
            }
        });
        let answers = futures_util::future::join_all(asked).await;
        let mut applied: BTreeMap<String, u64> = BTreeMap::new();
        let mut answered = 0u32;
        for (id, address, peers, denials) in answers.into_iter().flatten() {
            answered += 1;
            if let Some(revisions) = peers.get("revisions").and_then(Value::as_object) {
                for (kind, r) in revisions {
                    let r = r.as_u64().unwrap_or(0);
                    applied
                        .entry(kind.clone())
                        .and_modify(|m| *m = (*m).min(r))
                        .or_insert(r);
                }
            }
            if let Some(d) = denials {
                let next = d.get("next").and_then(Value::as_u64).unwrap_or(0);
                for denial in d
                    .get("denials")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let port = denial.get("port").and_then(Value::as_u64).unwrap_or(0) as u16;
                    report(address, port, denial);
                }
                // A restarted proxy numbers from 1 again.
                after.insert(id.clone(), next);
            }
        }
        let status = json!({"proxies": locals.len(), "answered": answered, "applied": applied});
        let wanted = {
            let s = cache.state();
            let mut wanted: BTreeMap<&str, u64> = s
                .revisions
                .iter()
                .filter(|(kind, _)| WAITED_FOR.contains(kind))
                .map(|(kind, r)| (*kind, *r))
                .collect();
            wanted.insert("instances", s.left);
            wanted
        };
        let last = published.as_ref().map(|(v, at)| (v, at.elapsed()));
        if !publish_due(last, &status, &wanted) {
            continue;
        }
        match publish(&client, &node, &status).await {
            Ok(()) => published = Some((status, Instant::now())),
            Err(e) => {
                tracing::debug!(error = %e, "Cannot publish the mesh acknowledgements; retrying")
            }
        }
    }
}

/// Whether this node's `status.mesh` is written now, given the last one
/// written and how long ago (`last`). Writes cost the control plane, and
/// every agent with a leaving instance follows every Node, so a change is
/// written at once only when someone may be waiting for it:
/// - its proxies, or those that answer, are more or fewer (a node counts
///   only while some answer; this changes with the node's own instances,
///   not with the whole cluster's);
/// - its proxies applied a kind's revision past the one last written, and
///   that one is older than `wanted`: for the kinds in [`WAITED_FOR`], any
///   change; for instances, the last departure (a leaving instance waits
///   for it; new, ready or unready instances need no acknowledgement).
///
/// Any other change is written at most every [`PUBLISH_AT_LEAST_EVERY`],
/// so `status.mesh` is never far behind for `skiff describe`.
fn publish_due(
    last: Option<(&Value, Duration)>,
    status: &Value,
    wanted: &BTreeMap<&str, u64>,
) -> bool {
    let Some((last, since)) = last else {
        return true;
    };
    if last == status {
        return false;
    }
    let counts = |v: &Value| (v["proxies"].as_u64(), v["answered"].as_u64());
    let applied = |v: &Value, kind: &str| v["applied"][kind].as_u64().unwrap_or(0);
    let behind = wanted.iter().any(|(kind, want)| {
        let was = applied(last, kind);
        was < *want && applied(status, kind) > was
    });
    counts(last) != counts(status) || behind || since >= PUBLISH_AT_LEAST_EVERY
}

/// The lowest `instances` revision that every node's sidecar proxies have
/// applied (the Nodes' `status.mesh`), followed only while someone waits
/// on it: an instance leaving stops once no proxy would still send it
/// requests.
#[derive(Debug)]
pub struct ClusterAcks {
    floor: watch::Sender<u64>,
    waiters: std::sync::atomic::AtomicUsize,
    /// Nodes are being watched: `floor` is current.
    following: std::sync::atomic::AtomicBool,
    wake: Notify,
}

/// How long a Node watch outlives the last waiter, and the pause after a
/// failed list.
const ACKS_IDLE: Duration = Duration::from_secs(1);

impl ClusterAcks {
    pub fn new(client: Client) -> Arc<ClusterAcks> {
        let acks = Arc::new(ClusterAcks {
            floor: watch::channel(0).0,
            waiters: std::sync::atomic::AtomicUsize::new(0),
            following: std::sync::atomic::AtomicBool::new(false),
            wake: Notify::new(),
        });
        tokio::spawn(acks.clone().follow(client));
        acks
    }

    /// Waits until every node's proxies have applied `revision` of the
    /// instances (or `within` passes: a node whose proxies do not answer
    /// does not hold an instance forever). Returns whether they did.
    pub async fn wait(&self, revision: u64, within: Duration) -> bool {
        use std::sync::atomic::Ordering;
        if self.waiters.fetch_add(1, Ordering::SeqCst) == 0
            && !self.following.load(Ordering::SeqCst)
        {
            // Not followed while nobody waited: forget the old floor.
            self.floor.send_replace(0);
        }
        self.wake.notify_one();
        let mut floor = self.floor.subscribe();
        let done = tokio::time::timeout(within, floor.wait_for(|f| *f >= revision))
            .await
            .is_ok_and(|r| r.is_ok());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        done
    }

    /// While someone waits: lists the Nodes, then follows their watch,
    /// keeping each one's applied revision, so an acknowledgement counts
    /// as soon as it is written and a waiting agent costs the control
    /// plane one watch, not a list of every Node four times a second.
    async fn follow(self: Arc<Self>, client: Client) {
        use std::sync::atomic::Ordering;
        let Some(nodes) = skiff_api::KindInfo::find("nodes") else {
            return;
        };
        loop {
            if self.waiters.load(Ordering::SeqCst) == 0 {
                self.wake.notified().await;
                continue;
            }
            let list = match client.list(nodes, None, None).await {
                Ok(list) => list,
                Err(e) => {
                    tracing::debug!(error = %e, "Cannot read Nodes for mesh acknowledgements");
                    tokio::time::sleep(ACKS_IDLE).await;
                    continue;
                }
            };
            let mut applied: BTreeMap<String, u64> = list
                .items
                .iter()
                .filter_map(|n| Some((crate::name_of(n), node_floor(n)?)))
                .collect();
            let floor = |applied: &BTreeMap<String, u64>| {
                applied.values().copied().min().unwrap_or(u64::MAX)
            };
            self.floor.send_replace(floor(&applied));
            self.following.store(true, Ordering::SeqCst);
            let mut events = client.watch(nodes, None, None, list.revision);
            while self.waiters.load(Ordering::SeqCst) > 0 {
                let event = tokio::select! {
                    e = events.next() => e,
                    () = tokio::time::sleep(ACKS_IDLE) => continue,
                };
                let Some(Ok(event)) = event else { break };
                let name = crate::name_of(&event.object);
                match (event.kind, node_floor(&event.object)) {
                    (skiff_client::EventType::Deleted, _) | (_, None) => {
                        applied.remove(&name);
                    }
                    (_, Some(r)) => {
                        applied.insert(name, r);
                    }
                }
                self.floor.send_replace(floor(&applied));
            }
            self.following.store(false, Ordering::SeqCst);
        }
    }
}

/// The `instances` revision a Node's sidecar proxies applied, if it is
/// ready and has proxies that answer (else it is not waited for).
fn node_floor(node: &Value) -> Option<u64> {
    let ready = node.pointer("/status/ready").and_then(Value::as_bool) == Some(true);
    let answered = node
        .pointer("/status/mesh/answered")
        .and_then(Value::as_u64)
        .is_some_and(|a| a > 0);
    (ready && answered).then(|| {
        node.pointer("/status/mesh/applied/instances")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    })
}

/// Writes `status.mesh` of this node.
async fn publish(client: &Client, node: &str, mesh: &Value) -> Result<(), String> {
    let nodes = skiff_api::KindInfo::find("nodes").ok_or("no Node kind")?;
    let mut current = client
        .get(nodes, None, node)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("node {node} not found"))?;
    current["status"]["mesh"] = mesh.clone();
    client
        .update_status(nodes, None, node, &current)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A GET to a proxy's admin endpoint, its body as JSON (2 s at most).
async fn get_json(to: SocketAddr, path: &str) -> Result<Value, String> {
    let exchange = async {
        match super::probe::get(to, path).await? {
            (200, body) => serde_json::from_slice(&body).map_err(|e| e.to_string()),
            (status, _) => Err(format!("{to}{path}: status {status}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| format!("{to}{path}: no answer in 2 s"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(
        ns: &str,
        name: &str,
        service: &str,
        app: &str,
        address: &str,
        ready: bool,
    ) -> Value {
        json!({
            "apiVersion": "skiff.dev/v1", "kind": "Instance",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"service": service},
            "status": {"address": address, "ready": ready},
        })
    }

    /// A shop: web and web-v2 call db; db is local, under a read-only L7
    /// policy for web, a full-access one for admin, and plaintext for a
    /// probe range; web's traffic is split 90/10 by a Route.
    fn shop() -> State {
        let mut s = State::default();
        for v in [
            instance("shop", "db-1", "db", "db", "198.19.16.2", true),
            instance("shop", "web-1", "web", "web", "198.19.17.2", true),
            instance("shop", "web-2", "web", "web", "198.19.17.3", false),
            instance("shop", "v2-1", "web-v2", "web", "198.19.17.4", true),
            instance("ops", "admin-1", "admin", "admin", "198.19.18.2", true),
        ] {
            s.put_instance(v);
        }
        s.services.insert(
            "shop/db".into(),
            vec![NamedPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        );
        for (svc, vip) in [
            ("shop/db", "198.18.128.1"),
            ("shop/web", "198.18.128.2"),
            ("shop/web-v2", "198.18.128.3"),
        ] {
            s.virtual_addresses.insert(svc.into(), vip.into());
        }
        s.namespaces.insert(
            "ops".into(),
            [("team".to_string(), "ops".to_string())].into(),
        );
        let policy = |text: &str| {
            let v: Value = serde_json::from_str(text).unwrap();
            let rule = skiff_netpol::cluster::policy(&v).unwrap();
            (format!("policies:{}", crate::id_of(&v)), rule)
        };
        for text in [
            r#"{"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": "db-read", "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "db"}}, "ingress": [
                  {"from": [{"workloads": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}],
                   "http": {"methods": ["GET"], "paths": ["/items/*"]}},
                  {"from": [{"namespaces": {"matchLabels": {"team": "ops"}}}]},
                  {"from": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}], "ports": [{"port": 8080}]},
                  {"from": [{"workloads": {"matchLabels": {"app": "ghost"}}}]},
                  {"ports": [{"protocol": "UDP", "port": 53}]}]}}"#,
            r#"{"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": "watch", "namespace": "shop"},
                "spec": {"selector": {}, "mode": "audit", "ingress": [{"http": {"methods": ["HEAD"]}}]}}"#,
        ] {
            let (k, r) = policy(text);
            s.policies.insert(k, r);
        }
        let route = json!({
            "apiVersion": "skiff.dev/v1", "kind": "Route",
            "metadata": {"name": "web-canary", "namespace": "shop"},
            "spec": {"service": "web", "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}], "backends": [{"service": "web-v2"}]},
                {"backends": [{"service": "web", "weight": 90}, {"service": "web-v2", "weight": 10}], "timeout": "2s", "retry": true},
            ]},
        });
        s.routes.insert(crate::id_of(&route), route);
        s.revisions.insert("routes", 41);
        s.revisions.insert("instances", 40);
        s
    }

    #[test]
    fn the_peers_file_carries_routes_and_the_local_instances_policy() {
        let s = shop();
        let local: BTreeMap<String, Ipv4Addr> =
            [("shop/db-1".to_string(), Ipv4Addr::new(198, 19, 16, 2))].into();
        let mut known = LocalInstances::default();
        known.update(&s, local.keys());
        let file = render(&s, &known, "td", &local, 7);
        assert_eq!(file["revisions"], json!({"instances": 40, "routes": 41}));
        // Only ready instances are endpoints.
        assert_eq!(
            file["services"]["198.18.128.2"],
            json!({"name": "shop/web", "endpoints": ["198.19.17.2"]})
        );
        let routes = &file["routes"]["shop/web"];
        assert_eq!(
            routes[0]["backends"],
            json!([{"service": "shop/web-v2", "weight": 1}])
        );
        assert_eq!(routes[1]["timeoutMs"], json!(2000));
        assert_eq!(routes[1]["retry"], json!({"nonIdempotent": true}));
        let db = &file["inbound"]["198.19.16.2"];
        let http = db["http"].as_array().unwrap();
        // web's rule: named port resolved, identities of web's Services.
        assert_eq!(
            http[0]["identities"],
            json!([
                "spiffe://td/ns/shop/sa/web",
                "spiffe://td/ns/shop/sa/web-v2"
            ])
        );
        assert_eq!(http[0]["ports"], json!([[8080, 8080]]));
        assert_eq!(http[0]["policy"], json!("Policy shop/db-read"));
        // A namespace selector without workloads: every identity there.
        assert_eq!(http[1]["identities"], json!(["spiffe://td/ns/ops/sa/*"]));
        assert_eq!(http[1]["methods"], json!([]));
        // The ghost rule selects nobody and the UDP rule covers no TCP
        // port: neither is in (and the audit policy is not enforced).
        assert_eq!(http.len(), 3, "{http:?}");
        // Were the audit policy enforced too: the same rules, and its own.
        let audit = db["audit"].as_array().unwrap();
        assert_eq!(audit[..3], http[..]);
        assert_eq!(audit.len(), 4, "{audit:?}");
        assert_eq!(audit[3]["policy"], json!("Policy shop/watch"));
        assert_eq!(audit[3]["methods"], json!(["HEAD"]));
        assert_eq!(
            db["plaintext"],
            json!([{"policy": "Policy shop/db-read", "sources": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}], "ports": [[8080, 8080]]}])
        );
        // Non-local instances get nothing.
        assert!(file["inbound"].get("198.19.17.2").is_none());

        // Deleted while it drains here: no longer an endpoint, still
        // under its policy until the agent lets it go.
        let mut gone = shop();
        gone.remove_instance("shop/db-1");
        known.update(&gone, local.keys());
        let draining = render(&gone, &known, "td", &local, 8);
        assert_eq!(draining["services"]["198.18.128.1"]["endpoints"], json!([]));
        assert_eq!(
            draining["inbound"]["198.19.16.2"],
            file["inbound"]["198.19.16.2"]
        );
        known.update(&gone, []);
        assert_eq!(
            render(&gone, &known, "td", &BTreeMap::new(), 9)["inbound"],
            json!({})
        );

        // The proxy reads what the agent writes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        std::fs::write(&path, file.to_string()).unwrap();
        let peers = skiff_proxy::transparent::load_peers(&path).unwrap();
        assert_eq!(peers.revisions.get("routes"), Some(&41));
        let web = &peers.routes["shop/web"];
        assert_eq!(
            web.backends,
            vec!["shop/web".to_string(), "shop/web-v2".to_string()]
        );
        assert_eq!(web.routes[1].backends, vec![(0, 90), (1, 10)]);
        let inbound = &peers.inbound[&"198.19.16.2".parse().unwrap()];
        assert_eq!(inbound.http.as_ref().unwrap().len(), 3);
        assert!(inbound.plaintext[0].sources[0].contains("10.1.1.1".parse().unwrap()));
    }

    /// A table as `render` makes it, with the given services.
    fn table(version: u64, services: &[(&str, &str)]) -> Value {
        let services: Map<String, Value> = services
            .iter()
            .map(|(vip, name)| (vip.to_string(), json!({"name": name, "endpoints": []})))
            .collect();
        json!({"version": version, "revisions": {"services": version * 10}, "peers": {},
               "services": services, "routes": {}, "inbound": {}})
    }

    #[test]
    fn deltas_carry_only_changes_and_catching_up_replays_them() {
        let d = Discovery::new(PathBuf::from("/nonexistent"), "td");
        d.publish(table(1, &[("198.18.128.1", "shop/db")]));
        // A proxy at version 1.
        let by_deltas = std::sync::RwLock::new(skiff_proxy::transparent::Peers::default());
        let at_one: Value = serde_json::from_str(&d.catch_up(0).0[0]).unwrap();
        skiff_proxy::discovery::apply(&by_deltas, &at_one).unwrap();
        d.publish(table(
            2,
            &[("198.18.128.1", "shop/db"), ("198.18.128.2", "shop/web")],
        ));
        d.publish(table(3, &[("198.18.128.2", "shop/web")]));
        let (lines, at, _) = d.catch_up(1);
        assert_eq!(at, 3);
        let updates: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            updates[0]["set"],
            json!({"services": {"198.18.128.2": {"name": "shop/web", "endpoints": []}}})
        );
        assert_eq!(updates[1]["remove"], json!({"services": ["198.18.128.1"]}));
        assert_eq!(updates[1]["set"], json!({}));
        // Caught up from version 1 or from a snapshot: the same table.
        for u in &updates {
            skiff_proxy::discovery::apply(&by_deltas, u).unwrap();
        }
        let (first, _, _) = d.catch_up(0);
        assert_eq!(first.len(), 1, "a snapshot");
        let by_snapshot = std::sync::RwLock::new(skiff_proxy::transparent::Peers::default());
        skiff_proxy::discovery::apply(&by_snapshot, &serde_json::from_str(&first[0]).unwrap())
            .unwrap();
        let (a, b) = (by_snapshot.read().unwrap(), by_deltas.read().unwrap());
        assert_eq!(a.by_name, b.by_name);
        assert_eq!(a.services, b.services);
        assert_eq!((a.version, b.version), (3, 3));
        assert_eq!(a.revisions.get("services"), Some(&30));
        assert_eq!(d.catch_up(3).0.len(), 0, "nothing new");
        assert_eq!(
            d.catch_up(99).0.len(),
            1,
            "from another agent run: a snapshot"
        );
    }

    #[tokio::test]
    async fn a_proxy_follows_the_stream_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("discovery.sock");
        let d = Discovery::new(path.clone(), "td");
        d.publish(table(1, &[("198.18.128.1", "shop/db")]));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(d.clone().serve(listener));
        let peers = Arc::new(std::sync::RwLock::new(
            skiff_proxy::transparent::Peers::default(),
        ));
        skiff_proxy::discovery::follow(path, peers.clone())
            .await
            .unwrap();
        assert_eq!(peers.read().unwrap().version, 1);
        for v in 2..=40 {
            d.publish(table(
                v,
                &[
                    ("198.18.128.1", "shop/db"),
                    ("198.18.128.9", &format!("shop/s{v}")),
                ],
            ));
        }
        for _ in 0..100 {
            if peers.read().unwrap().version == 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = peers.read().unwrap();
        assert_eq!(p.version, 40);
        assert_eq!(p.services.len(), 2);
        assert!(p.by_name.contains_key("shop/s40"));
    }

    #[test]
    fn the_floor_is_the_slowest_ready_meshed_node() {
        let node = |ready: bool, answered: u64, applied: u64| json!({"status": {"ready": ready, "mesh": {"proxies": answered, "answered": answered, "applied": {"instances": applied}}}});
        let nodes = [
            node(true, 3, 50),
            node(true, 1, 42),
            // Lost, or without answering proxies: not waited for.
            node(false, 2, 7),
            node(true, 0, 0),
            json!({"status": {"ready": true}}),
        ];
        let floor = |nodes: &[Value]| nodes.iter().filter_map(node_floor).min();
        assert_eq!(floor(&nodes), Some(42));
        assert_eq!(floor(&nodes[2..]), None);
    }

    #[test]
    fn ports_declared_tcp_are_published_for_callers_and_the_instance() {
        let mut s = shop();
        s.policies.clear();
        s.opaque_ports.insert("shop/db".into(), vec![5432]);
        let local: BTreeMap<String, Ipv4Addr> =
            [("shop/db-1".to_string(), Ipv4Addr::new(198, 19, 16, 2))].into();
        let mut known = LocalInstances::default();
        known.update(&s, local.keys());
        let file = render(&s, &known, "td", &local, 1);
        assert_eq!(
            file["services"]["198.18.128.1"]["opaquePorts"],
            json!([5432])
        );
        assert_eq!(
            file["inbound"]["198.19.16.2"],
            json!({"http": null, "plaintext": [], "opaquePorts": [5432]})
        );
    }

    #[test]
    fn without_http_rules_or_address_peers_an_instance_has_no_inbound_policy() {
        let mut s = shop();
        s.policies.clear();
        let local: BTreeMap<String, Ipv4Addr> =
            [("shop/db-1".to_string(), Ipv4Addr::new(198, 19, 16, 2))].into();
        let mut known = LocalInstances::default();
        known.update(&s, local.keys());
        assert_eq!(render(&s, &known, "td", &local, 1)["inbound"], json!({}));
    }

    #[test]
    fn acknowledgements_are_written_when_someone_may_wait_for_them() {
        let status = |proxies: u64, answered: u64, instances: u64, routes: u64| {
            json!({"proxies": proxies, "answered": answered,
                   "applied": {"instances": instances, "routes": routes}})
        };
        // Instances last left at 50; Routes last changed at 40.
        let wanted: BTreeMap<&str, u64> = [("instances", 50), ("routes", 40)].into();
        let soon = Duration::from_secs(2);
        let due = |last: &Value, now: &Value, since| publish_due(Some((last, since)), now, &wanted);
        let last = status(2, 2, 45, 40);
        assert!(publish_due(None, &last, &wanted), "the first is written");
        assert!(
            !due(&last, &last, PUBLISH_AT_LEAST_EVERY * 2),
            "nothing changed"
        );
        // Instances past the departure: a leaving instance waits for it.
        assert!(due(&last, &status(2, 2, 51, 40), soon));
        // Already written past the last departure: churn alone waits.
        let past = status(2, 2, 55, 40);
        assert!(!due(&past, &status(2, 2, 60, 40), soon));
        assert!(due(&past, &status(2, 2, 60, 40), PUBLISH_AT_LEAST_EVERY));
        // A Route change not yet acknowledged: a rollout waits for it.
        let old_route = status(2, 2, 55, 30);
        assert!(!due(&old_route, &status(2, 2, 56, 30), soon));
        assert!(due(&old_route, &status(2, 2, 55, 40), soon));
        // Proxies come, go, or stop answering.
        assert!(due(&past, &status(3, 2, 55, 40), soon));
        assert!(due(&past, &status(2, 0, 55, 40), soon));
    }
}
