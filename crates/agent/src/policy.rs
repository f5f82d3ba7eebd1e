//! Network policy on this node: follows Policies, NetworkPolicies,
//! Services and every Instance in the cluster, compiles them with
//! `skiff_netpol::compile` for the instances running here, and writes the
//! differences into the eBPF maps: new entries before old ones go, then a
//! new epoch, so a change never drops a flow both the old and the new
//! policy allow. Instances register their host-side veth here before their
//! process starts; until their endpoint entry is written the veth drops
//! everything (fail closed).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cache::{Cache, LocalInstances};
use serde_json::Value;
use skiff_api::policy::DefaultPolicy;
use skiff_netpol::PolicyRule;
use skiff_netpol::cluster;
use skiff_netpol::compile::{self, Compiled, Identities, Input};
use skiff_netpol::datapath::Datapath;
use skiff_netpol::maps::SKIFF_MAX_POLICY;
use tokio::sync::{Notify, watch};

/// What instances and the policy loop share.
#[derive(Debug)]
pub struct Enforcer {
    datapath: Mutex<Datapath>,
    /// Local instances (`ns/name`) → host-side ifindex and address.
    local: Mutex<BTreeMap<String, (u32, Ipv4Addr)>>,
    changed: Notify,
    /// Endpoints written to the maps so far.
    applied: watch::Sender<BTreeSet<u32>>,
    /// For reports: rule numbers' policies, and instances by address.
    rules: Mutex<Vec<String>>,
    names: Mutex<BTreeMap<Ipv4Addr, Named>>,
    /// The node's name, in flow records.
    node: String,
    /// The most recent flows, oldest first, and everyone following them.
    recent: Mutex<std::collections::VecDeque<Flow>>,
    flows: tokio::sync::broadcast::Sender<Flow>,
    /// Denials and audits so far, by policy (or "no policy allows").
    by_policy: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Entries per map after the last write.
    entries: Mutex<[usize; 3]>,
}

/// Flow records kept per node for `skiff flows` without `-f`.
const RECENT_FLOWS: usize = 4096;

/// An instance as flow records name it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Named {
    pub namespace: String,
    pub instance: String,
    pub service: String,
}

/// One end of a reported flow.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct End {
    pub address: Ipv4Addr,
    pub identity: u32,
    #[serde(flatten)]
    pub named: Named,
}

/// A flow the datapath denied, or passed with an audit-mode objection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Flow {
    pub time: String,
    pub node: String,
    /// `denied` or `audit-denied`.
    pub verdict: &'static str,
    /// The side that decided: the receiver's `ingress` or the sender's `egress`.
    pub direction: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub src: End,
    pub dst: End,
    /// `Policy ns/name` (or NetworkPolicy), or `no policy allows`.
    pub policy: String,
    /// For a request refused by a proxy under L7 policy: what it asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpDetail>,
}

/// The request of an L7 denial.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HttpDetail {
    pub method: String,
    pub path: String,
    /// The caller's verified identity, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

use crate::lock;

impl Enforcer {
    pub fn new(datapath: Datapath, node: &str) -> Arc<Enforcer> {
        Arc::new(Enforcer {
            datapath: Mutex::new(datapath),
            local: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            applied: watch::channel(BTreeSet::new()).0,
            rules: Mutex::new(Vec::new()),
            names: Mutex::new(BTreeMap::new()),
            node: node.to_string(),
            recent: Mutex::new(std::collections::VecDeque::new()),
            flows: tokio::sync::broadcast::channel(1024).0,
            by_policy: Mutex::new(BTreeMap::new()),
            entries: Mutex::new([0; 3]),
        })
    }

    /// The recent flows, and a receiver for the ones after them.
    pub fn flows(&self) -> (Vec<Flow>, tokio::sync::broadcast::Receiver<Flow>) {
        let recent = lock(&self.recent);
        (recent.iter().cloned().collect(), self.flows.subscribe())
    }

    /// The node's policy metrics in Prometheus text format.
    pub fn metrics(&self) -> String {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let mut registry = prometheus_client::registry::Registry::with_prefix("skiff_policy");
        let stats = lock(&self.datapath).stats();
        let packets = Family::<Vec<(String, String)>, Counter>::default();
        for (verdict, n) in [
            ("allowed", stats.allowed),
            ("denied", stats.denied),
            ("audit", stats.audit),
            ("established", stats.established),
        ] {
            packets
                .get_or_create(&vec![("verdict".into(), verdict.into())])
                .inc_by(n);
        }
        registry.register(
            "packets",
            "Packets by datapath verdict (new flows decided, or passed as established)",
            packets,
        );
        let lost = Counter::<u64>::default();
        lost.inc_by(stats.events_lost);
        registry.register(
            "events_lost",
            "Flow reports the kernel could not queue (ring buffer full)",
            lost,
        );
        let flows = Family::<Vec<(String, String)>, Counter>::default();
        for ((policy, verdict), n) in lock(&self.by_policy).iter() {
            flows
                .get_or_create(&vec![
                    ("policy".into(), policy.clone()),
                    ("verdict".into(), verdict.to_string()),
                ])
                .inc_by(*n);
        }
        registry.register(
            "flows",
            "Denied and audit-denied flows, by deciding policy",
            flows,
        );
        let entries = Family::<Vec<(String, String)>, Gauge>::default();
        let counts = *lock(&self.entries);
        for (map, n) in ["ipcache", "endpoints", "policy"].iter().zip(counts) {
            entries
                .get_or_create(&vec![("map".into(), map.to_string())])
                .set(n as i64);
        }
        registry.register("map_entries", "Entries in the datapath's maps", entries);
        let capacity = Family::<Vec<(String, String)>, Gauge>::default();
        for (map, n) in [
            ("ipcache", skiff_netpol::maps::SKIFF_MAX_IPCACHE),
            ("endpoints", skiff_netpol::maps::SKIFF_MAX_ENDPOINTS),
            ("policy", SKIFF_MAX_POLICY),
        ] {
            capacity
                .get_or_create(&vec![("map".into(), map.to_string())])
                .set(i64::from(n));
        }
        registry.register(
            "map_capacity",
            "Entries the datapath's maps can hold",
            capacity,
        );
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        skiff_api::prometheus::to_text_format(&text)
    }

    /// Attaches the datapath to an instance's veth and registers it; returns
    /// once its endpoint entry is in the maps (or after `within`, still
    /// failing closed).
    pub async fn admit(
        &self,
        instance: &str,
        host_if: &str,
        address: Ipv4Addr,
        within: Duration,
    ) -> Result<(), String> {
        let ifindex =
            nix::net::if_::if_nametoindex(host_if).map_err(|e| format!("{host_if}: {e}"))?;
        lock(&self.datapath)
            .attach(host_if)
            .map_err(|e| e.to_string())?;
        lock(&self.local).insert(instance.to_string(), (ifindex, address));
        let mut applied = self.applied.subscribe();
        self.changed.notify_one();
        let wait = applied.wait_for(|set| set.contains(&ifindex));
        match tokio::time::timeout(within, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(format!(
                "policy for {instance} not written within {}s",
                within.as_secs()
            )),
        }
    }

    /// Logs, counts and keeps one flow record, and hands it to whoever
    /// follows (`skiff flows -f`).
    fn record(&self, flow: Flow) {
        if flow.verdict == "denied" {
            tracing::info!(src = %flow.src.address, dst = %flow.dst.address, port = flow.port, protocol = flow.protocol, policy = %flow.policy, "Denied");
        } else {
            tracing::info!(src = %flow.src.address, dst = %flow.dst.address, port = flow.port, protocol = flow.protocol, policy = %flow.policy, "Audit: would deny");
        }
        *lock(&self.by_policy)
            .entry((flow.policy.clone(), flow.verdict))
            .or_default() += 1;
        {
            let mut recent = lock(&self.recent);
            if recent.len() == RECENT_FLOWS {
                recent.pop_front();
            }
            recent.push_back(flow.clone());
        }
        let _ = self.flows.send(flow);
    }

    /// A request a local proxy refused under L7 policy (its `/denials`
    /// record), as a flow record of this node.
    pub fn record_l7(&self, dst: Ipv4Addr, port: u16, denial: &Value) {
        let text = |k: &str| {
            denial
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let end = |address: Ipv4Addr| End {
            address,
            identity: 0,
            named: lock(&self.names).get(&address).cloned().unwrap_or_default(),
        };
        let src = text("address").parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
        self.record(Flow {
            time: Some(text("time"))
                .filter(|t| !t.is_empty())
                .unwrap_or_else(crate::runtime::instance::now_rfc3339),
            node: self.node.clone(),
            // What the proxy did: refused, or let pass what an
            // audit-mode policy would refuse.
            verdict: if text("verdict") == "audit-denied" {
                "audit-denied"
            } else {
                "denied"
            },
            direction: "ingress",
            protocol: "HTTP",
            port,
            src: end(src),
            dst: end(dst),
            policy: text("policy"),
            http: Some(HttpDetail {
                method: text("method"),
                path: text("path"),
                peer: denial
                    .get("peer")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }),
        });
    }

    /// Forgets an instance (its veth, and the filters on it, go with it),
    /// if it still has this address (a newer instance of the same name may
    /// have taken its place).
    pub fn release(&self, instance: &str, address: Ipv4Addr) {
        let mut local = lock(&self.local);
        if local.get(instance).is_some_and(|&(_, a)| a == address) {
            local.remove(instance);
            self.changed.notify_one();
        }
    }
}

/// Reads what the datapath denied or audited (every 100 ms, until the
/// process ends): logs it, counts it, keeps the recent ones and hands each
/// to whoever follows (`skiff flows -f`).
fn report_events(mut events: aya::maps::RingBuf<aya::maps::MapData>, enforcer: Arc<Enforcer>) {
    loop {
        while let Some(item) = events.next() {
            let Some(e) = skiff_netpol::maps::Event::parse(&item) else {
                continue;
            };
            enforcer.record(to_flow(&enforcer, &e));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn to_flow(enforcer: &Enforcer, e: &skiff_netpol::maps::Event) -> Flow {
    let end = |address: Ipv4Addr, identity: u32| End {
        address,
        identity,
        named: lock(&enforcer.names)
            .get(&address)
            .cloned()
            .unwrap_or_default(),
    };
    Flow {
        time: crate::runtime::instance::now_rfc3339(),
        node: enforcer.node.clone(),
        verdict: if e.denied { "denied" } else { "audit-denied" },
        direction: match e.dir {
            Some(skiff_netpol::maps::Dir::Egress) => "egress",
            _ => "ingress",
        },
        protocol: match e.proto {
            6 => "TCP",
            17 => "UDP",
            1 => "ICMP",
            _ => "IP",
        },
        port: e.dport,
        src: end(e.src, e.src_identity),
        dst: end(e.dst, e.dst_identity),
        policy: match e.rule {
            0 => "no policy allows".to_string(),
            n => lock(&enforcer.rules)
                .get(n as usize - 1)
                .map(|p| {
                    if e.denied {
                        p.clone()
                    } else {
                        format!("{p} (audit mode: would deny)")
                    }
                })
                .unwrap_or_else(|| format!("rule {n}")),
        },
        http: None,
    }
}

/// Follows the cluster and keeps the maps in step, until the process ends.
pub async fn run(
    cache: Arc<Cache>,
    enforcer: Arc<Enforcer>,
    host: Vec<Ipv4Addr>,
    default: DefaultPolicy,
) {
    let mut cluster_changed = cache.subscribe();
    let mut known = LocalInstances::default();
    // A first pass even if the lists arrived before this subscription.
    cluster_changed.mark_changed();
    let mut ids = Identities::default();
    let mut pace = crate::cache::Pace::default();
    // What the pinned maps hold now (from an earlier run, perhaps): the
    // first pass removes what no longer belongs.
    let mut current = {
        let dp = lock(&enforcer.datapath);
        Compiled {
            ipcache: dp.ipcache(),
            endpoints: dp.endpoints(),
            policy: dp.policy(),
            rules: Vec::new(),
        }
    };
    if let Some(events) = lock(&enforcer.datapath).take_events() {
        let e = enforcer.clone();
        std::thread::spawn(move || report_events(events, e));
    }
    loop {
        tokio::select! {
            _ = enforcer.changed.notified() => {}
            _ = cluster_changed.changed() => {}
        }
        pace.wait().await;
        let started = std::time::Instant::now();
        let local = lock(&enforcer.local).clone();
        let next = {
            let s = cache.state();
            known.update(&s, local.keys());
            build(&s, &known, &local, &host, default, &mut ids)
        };
        match next {
            Ok(next) => {
                if let Err(e) = apply(&enforcer, &current, &next) {
                    tracing::error!(error = %e, "Cannot write the policy maps; keeping what is there and retrying on the next change");
                    continue;
                }
                let live: BTreeSet<u32> = next.ipcache.values().copied().collect();
                ids.retain(&live);
                enforcer
                    .applied
                    .send_replace(next.endpoints.keys().copied().collect());
                *lock(&enforcer.rules) = next.rules.clone();
                *lock(&enforcer.entries) =
                    [next.ipcache.len(), next.endpoints.len(), next.policy.len()];
                *lock(&enforcer.names) = cache
                    .state()
                    .members
                    .iter()
                    .filter_map(|(id, m)| {
                        Some((
                            m.address?,
                            Named {
                                namespace: m.namespace.clone(),
                                instance: id.split_once('/')?.1.to_string(),
                                service: m.service.clone(),
                            },
                        ))
                    })
                    .collect();
                current = next;
            }
            Err(e) => {
                tracing::error!(error = %e, "This node cannot hold the policy set; the previous one stays enforced")
            }
        }
        pace.done(started);
    }
}

fn build(
    s: &crate::cache::State,
    known: &LocalInstances,
    local: &BTreeMap<String, (u32, Ipv4Addr)>,
    host: &[Ipv4Addr],
    default: DefaultPolicy,
    ids: &mut Identities,
) -> Result<Compiled, compile::CompileError> {
    let mut instances = Vec::new();
    let mut index = BTreeMap::new();
    for (id, v) in s.instances.iter().chain(known.departed(s)) {
        // A local instance's address is known here before its status says it.
        let Some(i) = cluster::instance(v, &s.services, local.get(id).map(|&(_, a)| a)) else {
            continue;
        };
        index.insert(id.clone(), instances.len());
        instances.push(i);
    }
    let local: BTreeMap<u32, usize> = local
        .iter()
        .filter_map(|(id, &(ifindex, _))| Some((ifindex, *index.get(id)?)))
        .collect();
    let policies: Vec<PolicyRule> = s.policies.values().cloned().collect();
    compile::compile(
        &Input {
            policies: &policies,
            default,
            namespaces: &s.namespaces,
            instances: &instances,
            local: &local,
            host,
            max_policy_entries: SKIFF_MAX_POLICY as usize,
        },
        ids,
    )
}

/// Writes `next` over `current`: additions and changes first, removals
/// after, then a new epoch when any decision changed.
fn apply(
    enforcer: &Enforcer,
    current: &Compiled,
    next: &Compiled,
) -> Result<(), skiff_netpol::datapath::DatapathError> {
    let mut dp = lock(&enforcer.datapath);
    for (&(a, p), &id) in &next.ipcache {
        if current.ipcache.get(&(a, p)) != Some(&id) {
            dp.set_ipcache(a, p, id)?;
        }
    }
    for (&k, &v) in &next.policy {
        if current.policy.get(&k) != Some(&v) {
            dp.set_policy(k, v)?;
        }
    }
    for (&i, &e) in &next.endpoints {
        if current.endpoints.get(&i) != Some(&e) {
            dp.set_endpoint(i, e)?;
        }
    }
    let mut changed = next.policy != current.policy || next.endpoints != current.endpoints;
    for &k in current
        .policy
        .keys()
        .filter(|k| !next.policy.contains_key(k))
    {
        dp.remove_policy(k)?;
    }
    for &i in current
        .endpoints
        .keys()
        .filter(|i| !next.endpoints.contains_key(i))
    {
        dp.remove_endpoint(i)?;
    }
    for &(a, p) in current
        .ipcache
        .keys()
        .filter(|k| !next.ipcache.contains_key(k))
    {
        dp.remove_ipcache(a, p)?;
        changed = true;
    }
    if changed {
        dp.bump_epoch()?;
    }
    Ok(())
}
