//! The policy compiler: the engine's meaning, turned into the datapath's
//! map entries for one node. Pure: it takes the cluster's instances, the
//! policies and which instances are local, and returns the entries.
//!
//! For every local endpoint, direction, peer identity, protocol and port
//! that matters, it asks [`Engine::decide`], so the kernel enforces exactly
//! what `skiff policy test` computes. Ports that matter are those the
//! policies and the instances name; one extra port that nothing names
//! decides the "any port" entry. Addresses outside the cluster are decided
//! per CIDR block the policies name (each block its own identity) and once
//! for everything else (the world identity).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use skiff_api::net::{Cidr, PortRef, Protocol};
use skiff_api::policy::DefaultPolicy;
use skiff_api::policytest::NamedPort;

use crate::engine::{Engine, Outcome, Resolved, Side};
use crate::maps::*;
use crate::model::{Peer, PolicyRule};
use crate::world::World;

/// Identities of outside CIDR blocks start here (instance identities are below).
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

/// One instance anywhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<NamedPort>,
    pub address: Ipv4Addr,
}

/// Numbers for (namespace, label set) pairs, stable while a node's maps
/// live: new pairs take the lowest free number.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identities {
    pub assigned: BTreeMap<String, u32>,
}

impl Identities {
    fn key(namespace: &str, labels: &BTreeMap<String, String>) -> String {
        let mut k = namespace.to_string();
        for (l, v) in labels {
            k.push_str(&format!("\u{1f}{l}={v}"));
        }
        k
    }

    /// The identity of a label set, allocating one if it has none.
    pub fn of(&mut self, namespace: &str, labels: &BTreeMap<String, String>) -> u32 {
        let key = Self::key(namespace, labels);
        if let Some(&n) = self.assigned.get(&key) {
            return n;
        }
        let used: BTreeSet<u32> = self.assigned.values().copied().collect();
        let n = (SKIFF_ID_FIRST_LOCAL..FIRST_CIDR_IDENTITY)
            .find(|n| !used.contains(n))
            .unwrap_or(FIRST_CIDR_IDENTITY - 1);
        self.assigned.insert(key, n);
        n
    }

    /// Forgets label sets no instance has any more.
    pub fn retain(&mut self, live: &BTreeSet<u32>) {
        self.assigned.retain(|_, n| live.contains(n));
    }
}

/// What one node's maps should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub ipcache: BTreeMap<(Ipv4Addr, u8), u32>,
    pub endpoints: BTreeMap<u32, Endpoint>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// Rule numbers in policy values and events: 1 + index here.
    pub rules: Vec<String>,
}

/// One identity's namespace, labels, and the union of its instances' ports.
type Representative = (String, BTreeMap<String, String>, Vec<NamedPort>);

/// The input for one node.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub policies: &'a [PolicyRule],
    pub default: DefaultPolicy,
    /// Namespace labels (namespaces not listed have only their name label).
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub instances: &'a [Instance],
    /// Local endpoints: host-side ifindex → index into `instances`.
    pub local: &'a BTreeMap<u32, usize>,
    /// The node's own addresses (its address, every veth's gateway).
    pub host: &'a [Ipv4Addr],
    /// Entries the maps can hold.
    pub max_policy_entries: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("the policy map needs {needed} entries; it holds {capacity}")]
    PolicyMapFull { needed: usize, capacity: usize },
    #[error("the ipcache needs {needed} entries; it holds {capacity}")]
    IpcacheFull { needed: usize, capacity: usize },
}

const PROTOCOLS: [(Protocol, u8); 2] = [(Protocol::Tcp, 6), (Protocol::Udp, 17)];

pub fn compile(input: &Input, ids: &mut Identities) -> Result<Compiled, CompileError> {
    let mut out = Compiled::default();
    // One representative workload per identity.
    let mut world = World::new();
    for (ns, labels) in input.namespaces {
        let _ = world.add_namespace(ns, labels);
    }
    let mut by_identity: BTreeMap<u32, Representative> = BTreeMap::new();
    let mut identity_of = Vec::with_capacity(input.instances.len());
    for i in input.instances {
        let id = ids.of(&i.namespace, &i.labels);
        identity_of.push(id);
        out.ipcache.insert((i.address, 32), id);
        let entry = by_identity
            .entry(id)
            .or_insert_with(|| (i.namespace.clone(), i.labels.clone(), Vec::new()));
        for p in &i.ports {
            if !entry.2.contains(p) {
                entry.2.push(p.clone());
            }
        }
    }
    let mut workload_of = BTreeMap::new();
    for (id, (ns, labels, ports)) in &by_identity {
        if let Ok(w) = world.add_workload(ns, &format!("identity-{id}"), labels, ports, None) {
            workload_of.insert(*id, w);
        }
    }
    for &h in input.host {
        out.ipcache.insert((h, 32), SKIFF_ID_HOST);
    }
    // Outside addresses: one class per named block, and the world.
    let blocks = cidr_blocks(input.policies);
    let mut outside: Vec<(u32, Ipv4Addr)> = Vec::new();
    for (n, block) in blocks.iter().enumerate() {
        let id = FIRST_CIDR_IDENTITY + n as u32;
        if let Some(sample) = sample_of(block, &blocks) {
            outside.push((id, sample));
            if let IpAddr::V4(a) = block.addr {
                out.ipcache.insert((a, block.prefix), id);
            }
        }
    }
    out.ipcache
        .insert((Ipv4Addr::UNSPECIFIED, 0), SKIFF_ID_WORLD);
    if let Some(sample) = world_sample(&blocks) {
        outside.push((SKIFF_ID_WORLD, sample));
    }
    if out.ipcache.len() > SKIFF_MAX_IPCACHE as usize {
        return Err(CompileError::IpcacheFull {
            needed: out.ipcache.len(),
            capacity: SKIFF_MAX_IPCACHE as usize,
        });
    }

    let engine = Engine::new(input.policies.to_vec(), world, input.default);
    out.rules = engine.policies().map(|p| p.id.to_string()).collect();
    let ports = candidate_ports(input.policies, input.instances);
    let other = (1..=u16::MAX)
        .rev()
        .find(|p| !ports.contains(p))
        .unwrap_or(0);

    for (&ifindex, &idx) in input.local {
        let Some(&me_id) = identity_of.get(idx) else {
            continue;
        };
        let Some(&me) = workload_of.get(&me_id) else {
            continue;
        };
        let mut flags = 0;
        let peers: Vec<(u32, Resolved)> = workload_of
            .iter()
            .map(|(&id, &w)| (id, Resolved::Workload(w)))
            .chain(
                outside
                    .iter()
                    .map(|&(id, a)| (id, Resolved::Address(IpAddr::V4(a)))),
            )
            .collect();
        for dir in [Dir::Ingress, Dir::Egress] {
            let side = |peer: Resolved, port: u16, proto: Protocol| -> Side {
                match dir {
                    Dir::Ingress => {
                        engine
                            .decide(peer, Resolved::Workload(me), port, proto)
                            .ingress
                    }
                    Dir::Egress => {
                        engine
                            .decide(Resolved::Workload(me), peer, port, proto)
                            .egress
                    }
                }
            };
            // Isolation is the endpoint's, whatever the peer.
            let probe = side(Resolved::Workload(me), other, Protocol::Tcp);
            let (enforce, audit_bit) = match dir {
                Dir::Ingress => (SKIFF_EP_INGRESS_ENFORCE, SKIFF_EP_INGRESS_AUDIT),
                Dir::Egress => (SKIFF_EP_EGRESS_ENFORCE, SKIFF_EP_EGRESS_AUDIT),
            };
            let enforced = !matches!(probe.enforced, Outcome::Open);
            let mut audited = false;
            let mut entries = Vec::new();
            for &(peer_id, peer) in &peers {
                for (proto, proto_num) in PROTOCOLS {
                    let value = |port: u16| verdict(side(peer, port, proto));
                    let any = value(other);
                    audited |= matches!(any, Some(v) if v.audit);
                    if let Some(v) = any {
                        entries.push((
                            PolicyKey {
                                ifindex,
                                peer: peer_id,
                                port: 0,
                                proto: proto_num,
                                dir,
                            },
                            v,
                        ));
                    }
                    for &port in &ports {
                        let v = value(port);
                        audited |= matches!(v, Some(v) if v.audit);
                        if v != any
                            && let Some(v) = v
                        {
                            entries.push((
                                PolicyKey {
                                    ifindex,
                                    peer: peer_id,
                                    port,
                                    proto: proto_num,
                                    dir,
                                },
                                v,
                            ));
                        }
                    }
                }
            }
            if enforced {
                flags |= enforce;
            } else if audited {
                flags |= audit_bit;
            }
            // Not isolated: the endpoint passes everything; entries would be unused.
            if enforced || audited {
                for (k, v) in entries {
                    out.policy.insert(k, v);
                }
            }
            if out.policy.len() > input.max_policy_entries {
                return Err(CompileError::PolicyMapFull {
                    needed: out.policy.len(),
                    capacity: input.max_policy_entries,
                });
            }
        }
        out.endpoints.insert(
            ifindex,
            Endpoint {
                identity: me_id,
                flags,
            },
        );
    }
    Ok(out)
}

/// The entry for one side's result: `None` when it denies (or is open,
/// where no entry is consulted).
fn verdict(side: Side) -> Option<PolicyValue> {
    let rule = |o: Outcome| match o {
        Outcome::Allowed { policy, .. } => policy + 1,
        Outcome::Denied { first: Some(p), .. } => p + 1,
        _ => 0,
    };
    match (side.enforced, side.audit_denied) {
        (Outcome::Denied { .. }, _) => None,
        (_, Some(objection)) => Some(PolicyValue {
            audit: true,
            rule: rule(objection),
        }),
        (Outcome::Open, None) => Some(PolicyValue {
            audit: false,
            rule: 0,
        }),
        (allowed, None) => Some(PolicyValue {
            audit: false,
            rule: rule(allowed),
        }),
    }
}

/// Every port a policy rule or an instance names (ranges expanded).
fn candidate_ports(policies: &[PolicyRule], instances: &[Instance]) -> BTreeSet<u16> {
    let mut ports: BTreeSet<u16> = instances
        .iter()
        .flat_map(|i| i.ports.iter().map(|p| p.port))
        .collect();
    for p in policies {
        for rule in p.ingress.iter().chain(p.egress.iter()).flatten() {
            for port in &rule.ports {
                if let Some(PortRef::Number(n)) = port.port {
                    let end = port.end_port.unwrap_or(n).max(n);
                    ports.extend(n..=end);
                }
            }
        }
    }
    ports.remove(&0);
    ports
}

/// IPv4 blocks the policies name as peers (and their exceptions).
fn cidr_blocks(policies: &[PolicyRule]) -> Vec<Cidr> {
    let mut blocks = BTreeSet::new();
    for p in policies {
        for rule in p.ingress.iter().chain(p.egress.iter()).flatten() {
            for peer in &rule.peers {
                if let Peer::Cidr { cidr, except } = peer {
                    for c in std::iter::once(cidr).chain(except) {
                        if let IpAddr::V4(a) = c.addr {
                            let mask = u32::MAX.checked_shl(32 - u32::from(c.prefix)).unwrap_or(0);
                            blocks.insert((Ipv4Addr::from(u32::from(a) & mask), c.prefix));
                        }
                    }
                }
            }
        }
    }
    blocks
        .into_iter()
        .filter(|&(_, prefix)| prefix > 0)
        .map(|(a, prefix)| Cidr {
            addr: IpAddr::V4(a),
            prefix,
        })
        .collect()
}

/// An address whose longest named block is `block`.
fn sample_of(block: &Cidr, blocks: &[Cidr]) -> Option<Ipv4Addr> {
    let IpAddr::V4(base) = block.addr else {
        return None;
    };
    let size = 1u64 << (32 - u32::from(block.prefix));
    let longer: Vec<&Cidr> = blocks
        .iter()
        .filter(|b| b.prefix > block.prefix && block.covers(b))
        .collect();
    // A few candidates spread over the block are enough unless it is
    // carved up by longer blocks almost entirely.
    let step = (size / 64).max(1);
    (0..size.min(64 * step))
        .step_by(step as usize)
        .map(|off| Ipv4Addr::from(u32::from(base).wrapping_add(off as u32)))
        .find(|a| !longer.iter().any(|b| b.contains(IpAddr::V4(*a))))
}

/// An outside address in no named block.
fn world_sample(blocks: &[Cidr]) -> Option<Ipv4Addr> {
    [
        "203.0.113.7",
        "192.0.2.7",
        "198.51.100.7",
        "100.64.0.7",
        "8.8.8.8",
        "1.1.1.1",
        "172.31.255.7",
        "10.255.255.7",
    ]
    .iter()
    .filter_map(|a| a.parse::<Ipv4Addr>().ok())
    .find(|a| !blocks.iter().any(|b| b.contains(IpAddr::V4(*a))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Vec<PolicyRule> {
        skiff_api::load_str("t.yaml", yaml)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .iter()
            .filter_map(|l| PolicyRule::from_resource(&l.resource))
            .collect()
    }

    /// Compiles for `local` (ifindex → instance index) with the map limit `max`.
    fn compile_for(
        policies: &[PolicyRule],
        instances: &[Instance],
        local: &[(u32, usize)],
        host: &[Ipv4Addr],
        max: usize,
    ) -> (Result<Compiled, CompileError>, Identities) {
        let local: BTreeMap<u32, usize> = local.iter().copied().collect();
        let mut ids = Identities::default();
        let out = compile(
            &Input {
                policies,
                default: DefaultPolicy::IsolateSelected,
                namespaces: &BTreeMap::new(),
                instances,
                local: &local,
                host,
                max_policy_entries: max,
            },
            &mut ids,
        );
        (out, ids)
    }

    fn inst(ns: &str, app: &str, port: u16, last: u8) -> Instance {
        Instance {
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ports: vec![NamedPort {
                name: Some("http".into()),
                port,
                protocol: Protocol::Tcp,
            }],
            address: Ipv4Addr::new(198, 19, 0, last),
        }
    }

    #[test]
    fn an_ingress_rule_becomes_one_entry_per_allowed_peer_and_port() {
        let policies = load(
            "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: db, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{workloads: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n",
        );
        let instances = vec![
            inst("shop", "web", 8080, 2),
            inst("shop", "db", 5432, 3),
            inst("shop", "other", 9000, 4),
        ];
        let (out, mut ids) = compile_for(
            &policies,
            &instances,
            &[(10, 1), (11, 0)],
            &[Ipv4Addr::new(198, 19, 0, 1)],
            1000,
        );
        let out = out.unwrap_or_else(|e| panic!("{e}"));
        let web = ids.of("shop", &instances[0].labels);
        let db = ids.of("shop", &instances[1].labels);
        assert_eq!(
            out.endpoints[&10],
            Endpoint {
                identity: db,
                flags: SKIFF_EP_INGRESS_ENFORCE
            }
        );
        assert_eq!(
            out.endpoints[&11],
            Endpoint {
                identity: web,
                flags: 0
            },
            "web is not selected"
        );
        let keys: Vec<&PolicyKey> = out.policy.keys().collect();
        assert_eq!(
            keys,
            [&PolicyKey {
                ifindex: 10,
                peer: web,
                port: 5432,
                proto: 6,
                dir: Dir::Ingress
            }]
        );
        assert_eq!(out.policy.values().next().map(|v| v.audit), Some(false));
        assert_eq!(out.rules, ["Policy shop/db"]);
        assert_eq!(
            out.ipcache[&(Ipv4Addr::new(198, 19, 0, 1), 32)],
            SKIFF_ID_HOST
        );
        assert_eq!(out.ipcache[&(Ipv4Addr::UNSPECIFIED, 0)], SKIFF_ID_WORLD);
    }

    #[test]
    fn any_port_rules_become_wildcards_and_cidr_blocks_get_their_own_identity() {
        let policies = load(
            "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: out, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  egress:\n  - to: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]\n",
        );
        let instances = vec![inst("shop", "web", 8080, 2)];
        let (out, _) = compile_for(&policies, &instances, &[(5, 0)], &[], 1000);
        let out = out.unwrap_or_else(|e| panic!("{e}"));
        let block = out.ipcache[&(Ipv4Addr::new(203, 0, 113, 0), 24)];
        let except = out.ipcache[&(Ipv4Addr::new(203, 0, 113, 128), 25)];
        assert_ne!(block, except);
        let allowed: Vec<(u32, u16, u8)> = out
            .policy
            .keys()
            .map(|k| (k.peer, k.port, k.proto))
            .collect();
        assert_eq!(
            allowed,
            [(block, 0, 6), (block, 0, 17)],
            "any port, both protocols, the block but not its exception"
        );
        assert_eq!(out.endpoints[&5].flags, SKIFF_EP_EGRESS_ENFORCE);
    }

    #[test]
    fn audit_mode_objections_become_audit_entries() {
        let policies = load(
            "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: db, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{workloads: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n---\napiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: watch, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  mode: audit\n  egress: []\n",
        );
        let instances = vec![inst("shop", "web", 8080, 2), inst("shop", "db", 5432, 3)];
        let (out, mut ids) = compile_for(&policies, &instances, &[(10, 0)], &[], 1000);
        let out = out.unwrap_or_else(|e| panic!("{e}"));
        // web's egress is isolated only in audit mode: everything passes,
        // and everything is reported as what the audit policy would deny.
        let db = ids.of("shop", &instances[1].labels);
        assert_eq!(out.endpoints[&10].flags, SKIFF_EP_EGRESS_AUDIT);
        let v = out.policy.get(&PolicyKey {
            ifindex: 10,
            peer: db,
            port: 0,
            proto: 6,
            dir: Dir::Egress,
        });
        assert_eq!(v.map(|v| v.audit), Some(true), "{:?}", out.policy);
        let rule = v.map(|v| v.rule as usize).unwrap_or_default();
        assert_eq!(
            out.rules.get(rule.wrapping_sub(1)).map(String::as_str),
            Some("Policy shop/watch")
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_partial_set() {
        let policies = load(
            "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: wide, namespace: shop}\nspec:\n  selector: {}\n  ingress:\n  - ports: [{port: 1000, endPort: 3000}]\n",
        );
        let instances = vec![inst("shop", "a", 80, 2), inst("shop", "b", 80, 3)];
        let (err, _) = compile_for(&policies, &instances, &[(1, 0), (2, 1)], &[], 100);
        let err = err.unwrap_err();
        assert!(
            matches!(err, CompileError::PolicyMapFull { capacity: 100, .. }),
            "{err}"
        );
    }
}
