//! The policy engine: decides a flow and says why.
//!
//! A flow passes when the sender's egress AND the receiver's ingress allow
//! it. A side is checked only for workloads (outside addresses have no
//! policy) and only when the workload is isolated in that direction: under
//! `isolate-selected` once any policy governing the direction selects it,
//! under `deny-all` always. An isolated side passes when any rule of any
//! selecting policy matches the peer and the port.
//!
//! Policies selecting each workload are indexed once, at construction, so
//! evaluating a flow looks only at the policies of its two workloads.

use std::net::IpAddr;

use skiff_api::net::{PortRef, Protocol};
use skiff_api::policy::{DefaultPolicy, Mode, PolicyPort};
use skiff_api::policytest::Endpoint;

use crate::model::{Direction, Flow, Namespaces, Peer, PolicyRule, Rule, port_text};
use crate::world::{NamespaceId, Selector, WorkloadId, World};

/// Index of a policy in an [`Engine`] (policies are kept sorted by name).
pub type PolicyId = u32;

/// The decision for a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Allow,
    Deny,
    /// Allowed, but an audit-mode policy would deny it.
    AuditDenied,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::AuditDenied => "audit-denied",
        }
    }
}

/// How one side (sender egress or receiver ingress) treated a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The endpoint is an outside address: no policy applies to it.
    External,
    /// Not isolated in this direction: everything passes.
    Open,
    Allowed {
        policy: PolicyId,
        rule: u32,
    },
    /// Isolated and no rule allows. `first` is the first isolating policy
    /// (by name), `None` when isolation comes from the `deny-all` default.
    Denied {
        first: Option<PolicyId>,
        count: u32,
    },
}

impl Outcome {
    pub fn passes(self) -> bool {
        !matches!(self, Outcome::Denied { .. })
    }
}

/// One side's result: enforced, and with audit-mode policies applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Side {
    pub enforced: Outcome,
    /// Set when audit-mode policies would deny what enforcement allows.
    pub audit_denied: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub decision: Decision,
    pub egress: Side,
    pub ingress: Side,
}

/// A flow endpoint resolved against the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolved {
    Workload(WorkloadId),
    Address(IpAddr),
}

/// Why a flow could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWorkload(pub String);

impl std::fmt::Display for UnknownWorkload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "workload {} is not declared in any PolicyTest", self.0)
    }
}

impl std::error::Error for UnknownWorkload {}

/// Policies compiled over a world.
#[derive(Debug, Clone)]
pub struct Engine {
    default: DefaultPolicy,
    world: World,
    policies: Vec<Compiled>,
    /// Per workload, the policies selecting it, by direction, in id order.
    selecting: Vec<[Vec<PolicyId>; 2]>,
}

#[derive(Debug, Clone)]
struct Compiled {
    source: PolicyRule,
    namespace: Option<NamespaceId>,
    ingress: Option<Vec<CRule>>,
    egress: Option<Vec<CRule>>,
}

#[derive(Debug, Clone)]
struct CRule {
    peers: Vec<CPeer>,
    ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone)]
enum CPeer {
    Select {
        namespaces: CNamespaces,
        workloads: Option<Selector>,
    },
    Cidr {
        cidr: skiff_api::net::Cidr,
        except: Vec<skiff_api::net::Cidr>,
    },
}

#[derive(Debug, Clone)]
enum CNamespaces {
    /// `None` when the namespace has no workloads in the world.
    Same(Option<NamespaceId>),
    Matching(Selector),
}

fn dir_index(dir: Direction) -> usize {
    match dir {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl Engine {
    /// Compiles `policies` over `world`. Cost: one pass over each policy's
    /// candidate workloads (narrowed by a `matchLabels` term when present).
    pub fn new(mut policies: Vec<PolicyRule>, mut world: World, default: DefaultPolicy) -> Engine {
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        let compiled: Vec<Compiled> = policies
            .into_iter()
            .map(|p| {
                let namespace = world.namespace_by_name(&p.id.namespace);
                let mut rules = |rules: &Option<Vec<Rule>>| {
                    rules
                        .as_ref()
                        .map(|rules| rules.iter().map(|r| compile_rule(r, &mut world)).collect())
                };
                let ingress = rules(&p.ingress);
                let egress = rules(&p.egress);
                Compiled {
                    source: p,
                    namespace,
                    ingress,
                    egress,
                }
            })
            .collect();
        let mut selecting = vec![[Vec::new(), Vec::new()]; world.workload_count()];
        for (pid, p) in compiled.iter().enumerate() {
            let Some(ns) = p.namespace else { continue };
            let sel = world.compile(&p.source.selector);
            for w in selected(&world, ns, &sel) {
                for (dir, rules) in [
                    (Direction::Ingress, &p.ingress),
                    (Direction::Egress, &p.egress),
                ] {
                    if rules.is_some() {
                        selecting[w as usize][dir_index(dir)].push(pid as PolicyId);
                    }
                }
            }
        }
        Engine {
            default,
            world,
            policies: compiled,
            selecting,
        }
    }

    /// The policies, in the engine's (name) order.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyRule> {
        self.policies.iter().map(|p| &p.source)
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
    }

    pub fn policy(&self, id: PolicyId) -> &PolicyRule {
        &self.policies[id as usize].source
    }

    /// Resolves an endpoint by name.
    pub fn resolve(&self, end: &Endpoint) -> Result<Resolved, UnknownWorkload> {
        match end {
            Endpoint::Address(ip) => Ok(Resolved::Address(*ip)),
            Endpoint::Workload { namespace, name } => self
                .world
                .lookup(namespace, name)
                .map(Resolved::Workload)
                .ok_or_else(|| UnknownWorkload(format!("{namespace}/{name}"))),
        }
    }

    /// Decides a flow named by endpoints.
    pub fn evaluate(&self, flow: &Flow) -> Result<Verdict, UnknownWorkload> {
        let from = self.resolve(&flow.from)?;
        let to = self.resolve(&flow.to)?;
        Ok(self.decide(from, to, flow.port, flow.protocol))
    }

    /// Decides a flow between resolved endpoints. Allocation-free.
    pub fn decide(&self, from: Resolved, to: Resolved, port: u16, protocol: Protocol) -> Verdict {
        let egress = match from {
            Resolved::Workload(w) => self.side(Direction::Egress, w, to, to, port, protocol),
            Resolved::Address(_) => Side {
                enforced: Outcome::External,
                audit_denied: None,
            },
        };
        let ingress = match to {
            Resolved::Workload(w) => self.side(Direction::Ingress, w, from, to, port, protocol),
            Resolved::Address(_) => Side {
                enforced: Outcome::External,
                audit_denied: None,
            },
        };
        let decision = if !egress.enforced.passes() || !ingress.enforced.passes() {
            Decision::Deny
        } else if egress.audit_denied.is_some() || ingress.audit_denied.is_some() {
            Decision::AuditDenied
        } else {
            Decision::Allow
        };
        Verdict {
            decision,
            egress,
            ingress,
        }
    }

    /// One side: `subject` is the workload whose policies apply, `peer` the
    /// other end, `dest` the receiver (named ports resolve against it).
    fn side(
        &self,
        dir: Direction,
        subject: WorkloadId,
        peer: Resolved,
        dest: Resolved,
        port: u16,
        proto: Protocol,
    ) -> Side {
        let deny_all = self.default == DefaultPolicy::DenyAll;
        let mut enforce = Tally::default();
        let mut audit = Tally::default();
        for &pid in &self.selecting[subject as usize][dir_index(dir)] {
            let p = &self.policies[pid as usize];
            let tally = if p.source.mode == Mode::Enforce {
                &mut enforce
            } else {
                &mut audit
            };
            tally.isolating += 1;
            tally.first.get_or_insert(pid);
            if tally.allowed.is_none() {
                let rules = match dir {
                    Direction::Ingress => p.ingress.as_deref(),
                    Direction::Egress => p.egress.as_deref(),
                };
                if let Some(i) = rules
                    .unwrap_or_default()
                    .iter()
                    .position(|r| self.rule_matches(r, peer, dest, port, proto))
                {
                    tally.allowed = Some((pid, i as u32));
                }
            }
        }
        let enforced = enforce.outcome(deny_all);
        let audit_denied = if audit.isolating > 0 && enforced.passes() {
            // With audit policies enforced too: isolated if either isolates,
            // allowed if either allows.
            let mut all = enforce;
            all.isolating += audit.isolating;
            all.first = match (enforce.first, audit.first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            all.allowed = enforce.allowed.or(audit.allowed);
            let with_audit = all.outcome(deny_all);
            (!with_audit.passes()).then_some(Outcome::Denied {
                first: audit.first,
                count: audit.isolating,
            })
        } else {
            None
        };
        Side {
            enforced,
            audit_denied,
        }
    }

    fn rule_matches(
        &self,
        rule: &CRule,
        peer: Resolved,
        dest: Resolved,
        port: u16,
        proto: Protocol,
    ) -> bool {
        (rule.peers.is_empty() || rule.peers.iter().any(|p| self.peer_matches(p, peer)))
            && (rule.ports.is_empty()
                || rule
                    .ports
                    .iter()
                    .any(|p| self.port_matches(p, dest, port, proto)))
    }

    fn peer_matches(&self, peer: &CPeer, end: Resolved) -> bool {
        match peer {
            CPeer::Select {
                namespaces,
                workloads,
            } => {
                let Resolved::Workload(w) = end else {
                    return false;
                };
                let ns = self.world.workload(w).namespace;
                let ns_ok = match namespaces {
                    CNamespaces::Same(id) => *id == Some(ns),
                    CNamespaces::Matching(sel) => sel.matches(self.world.namespace_labels(ns)),
                };
                ns_ok
                    && workloads
                        .as_ref()
                        .is_none_or(|sel| sel.matches(self.world.workload_labels(w)))
            }
            CPeer::Cidr { cidr, except } => {
                let ip = match end {
                    Resolved::Address(ip) => Some(ip),
                    Resolved::Workload(w) => self.world.workload(w).ip,
                };
                ip.is_some_and(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)))
            }
        }
    }

    fn port_matches(&self, p: &PolicyPort, dest: Resolved, port: u16, proto: Protocol) -> bool {
        if p.protocol != proto {
            return false;
        }
        match &p.port {
            None => true,
            Some(PortRef::Number(n)) => match p.end_port {
                Some(end) => (*n..=end).contains(&port),
                None => *n == port,
            },
            // Named ports resolve against the receiving workload's ports.
            Some(PortRef::Name(name)) => match dest {
                Resolved::Workload(w) => self.world.workload(w).ports.iter().any(|wp| {
                    wp.name.as_deref() == Some(name) && wp.port == port && wp.protocol == proto
                }),
                Resolved::Address(_) => false,
            },
        }
    }

    /// How many (workload, direction, policy) selections the index holds.
    pub fn selection_count(&self) -> usize {
        self.selecting.iter().map(|[i, e]| i.len() + e.len()).sum()
    }

    /// The policies selecting a workload for a direction, in name order.
    pub fn selecting(&self, w: WorkloadId, dir: Direction) -> impl Iterator<Item = PolicyId> + '_ {
        self.selecting[w as usize][dir_index(dir)].iter().copied()
    }

    /// A one-line reason for a verdict.
    pub fn reason(&self, flow: &Flow, v: &Verdict) -> String {
        let egress = self.side_text(Direction::Egress, &flow.from, v.egress.enforced);
        let ingress = self.side_text(Direction::Ingress, &flow.to, v.ingress.enforced);
        match v.decision {
            Decision::Deny => {
                let mut parts = Vec::new();
                if !v.egress.enforced.passes() {
                    parts.push(egress);
                }
                if !v.ingress.enforced.passes() {
                    parts.push(ingress);
                }
                parts.join("; ")
            }
            Decision::AuditDenied => {
                let mut parts = Vec::new();
                for (dir, end, side) in [
                    (Direction::Egress, &flow.from, v.egress),
                    (Direction::Ingress, &flow.to, v.ingress),
                ] {
                    if let Some(Outcome::Denied { first, count }) = side.audit_denied {
                        let by = first
                            .map(|p| self.policy(p).id.to_string())
                            .unwrap_or_default();
                        let more = if count > 1 {
                            format!(" (and {} more)", count - 1)
                        } else {
                            String::new()
                        };
                        parts.push(format!("{dir} of {end}: audit-mode {by}{more} would deny it; passes because audit mode only reports"));
                    }
                }
                parts.join("; ")
            }
            Decision::Allow => format!("{egress}; {ingress}"),
        }
    }

    fn side_text(&self, dir: Direction, end: &Endpoint, o: Outcome) -> String {
        match o {
            Outcome::External => format!("{dir} of {end}: outside address, no policy applies"),
            Outcome::Open => format!("{dir} of {end}: not isolated (no {dir} policy selects it)"),
            Outcome::Allowed { policy, rule } => {
                let p = self.policy(policy);
                let l7 = match p
                    .rules(dir)
                    .and_then(|r| r.get(rule as usize))
                    .and_then(|r| r.http.as_ref())
                {
                    Some(h) => format!(
                        " (L7 limits for the proxy: methods [{}], paths [{}])",
                        h.methods.join(","),
                        h.paths.join(",")
                    ),
                    None => String::new(),
                };
                format!("{dir} of {end}: allowed by {} rule {dir}[{rule}]{l7}", p.id)
            }
            Outcome::Denied { first: None, .. } => {
                format!(
                    "{dir} of {end}: isolated by the cluster default deny-all and no policy allows it"
                )
            }
            Outcome::Denied {
                first: Some(p),
                count,
            } => {
                let more = if count > 1 {
                    format!(" and {} more", count - 1)
                } else {
                    String::new()
                };
                format!(
                    "{dir} of {end}: isolated by {}{more}; no rule allows it",
                    self.policy(p).id
                )
            }
        }
    }

    /// The full chain of reasoning for a flow, for humans: every policy that
    /// selects either end and what each of its rules made of the flow.
    pub fn trace(&self, flow: &Flow) -> Result<(Verdict, Vec<String>), UnknownWorkload> {
        let from = self.resolve(&flow.from)?;
        let to = self.resolve(&flow.to)?;
        let v = self.decide(from, to, flow.port, flow.protocol);
        let mut lines = Vec::new();
        for (dir, subject, end, peer) in [
            (Direction::Egress, from, &flow.from, to),
            (Direction::Ingress, to, &flow.to, from),
        ] {
            let side = if dir == Direction::Egress {
                v.egress
            } else {
                v.ingress
            };
            lines.push(self.side_text(dir, end, side.enforced));
            let Resolved::Workload(w) = subject else {
                continue;
            };
            let pids: Vec<PolicyId> = self.selecting(w, dir).collect();
            if pids.is_empty() {
                let why = match self.default {
                    DefaultPolicy::DenyAll => "cluster default deny-all isolates every workload",
                    DefaultPolicy::IsolateSelected => {
                        "cluster default isolate-selected leaves it open"
                    }
                };
                lines.push(format!("  no policy selects {end} for {dir}; {why}"));
            }
            for pid in pids {
                let p = &self.policies[pid as usize];
                let rules = match dir {
                    Direction::Ingress => p.ingress.as_deref(),
                    Direction::Egress => p.egress.as_deref(),
                }
                .unwrap_or_default();
                lines.push(format!(
                    "  {} ({}) selects {end} with {}; {} {dir} rule(s)",
                    p.source.id,
                    p.source.mode,
                    p.source.selector,
                    rules.len()
                ));
                if rules.is_empty() {
                    lines.push(format!("    no rules: denies all {dir}"));
                }
                for (i, rule) in rules.iter().enumerate() {
                    let src = &p.source.rules(dir).unwrap_or_default()[i];
                    let peer_ok = rule.peers.is_empty()
                        || rule.peers.iter().any(|x| self.peer_matches(x, peer));
                    let port_ok = rule.ports.is_empty()
                        || rule
                            .ports
                            .iter()
                            .any(|x| self.port_matches(x, to, flow.port, flow.protocol));
                    let peers = if src.peers.is_empty() {
                        "any peer".to_string()
                    } else {
                        src.peers
                            .iter()
                            .map(peer_text)
                            .collect::<Vec<_>>()
                            .join(" | ")
                    };
                    let ports = if src.ports.is_empty() {
                        "any port".to_string()
                    } else {
                        src.ports
                            .iter()
                            .map(port_text)
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    let verdict = match (peer_ok, port_ok) {
                        (true, true) => "matches".to_string(),
                        (false, true) => format!(
                            "peer {} not in [{peers}]",
                            if dir == Direction::Egress {
                                &flow.to
                            } else {
                                &flow.from
                            }
                        ),
                        (true, false) => {
                            format!("port {}/{} not in [{ports}]", flow.port, flow.protocol)
                        }
                        (false, false) => "neither peer nor port matches".to_string(),
                    };
                    lines.push(format!(
                        "    {dir}[{i}] peers [{peers}] ports [{ports}]: {verdict}"
                    ));
                }
            }
        }
        if let Some(Outcome::Denied { first: Some(p), .. }) =
            v.egress.audit_denied.or(v.ingress.audit_denied)
        {
            lines.push(format!(
                "audit: {} would deny this flow if enforced",
                self.policy(p).id
            ));
        }
        Ok((v, lines))
    }
}

fn peer_text(p: &Peer) -> String {
    match p {
        Peer::Cidr { cidr, except } if except.is_empty() => format!("cidr {cidr}"),
        Peer::Cidr { cidr, except } => format!(
            "cidr {cidr} except {}",
            except
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        Peer::Select {
            namespaces,
            workloads,
        } => {
            let ns = match namespaces {
                Namespaces::Same(ns) => format!("namespace {ns}"),
                Namespaces::Matching(sel) => format!("namespaces {sel}"),
            };
            match workloads {
                Some(sel) => format!("workloads {sel} in {ns}"),
                None => format!("all workloads in {ns}"),
            }
        }
    }
}

/// Counts for one mode's policies on one side.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    isolating: u32,
    first: Option<PolicyId>,
    allowed: Option<(PolicyId, u32)>,
}

impl Tally {
    fn outcome(self, deny_all: bool) -> Outcome {
        match self.allowed {
            Some((policy, rule)) => Outcome::Allowed { policy, rule },
            None if self.isolating > 0 => Outcome::Denied {
                first: self.first,
                count: self.isolating,
            },
            None if deny_all => Outcome::Denied {
                first: None,
                count: 0,
            },
            None => Outcome::Open,
        }
    }
}

fn compile_rule(rule: &Rule, world: &mut World) -> CRule {
    CRule {
        peers: rule
            .peers
            .iter()
            .map(|p| match p {
                Peer::Cidr { cidr, except } => CPeer::Cidr {
                    cidr: *cidr,
                    except: except.clone(),
                },
                Peer::Select {
                    namespaces,
                    workloads,
                } => CPeer::Select {
                    namespaces: match namespaces {
                        Namespaces::Same(ns) => CNamespaces::Same(world.namespace_by_name(ns)),
                        Namespaces::Matching(sel) => CNamespaces::Matching(world.compile(sel)),
                    },
                    workloads: workloads.as_ref().map(|s| world.compile(s)),
                },
            })
            .collect(),
        ports: rule.ports.clone(),
    }
}

/// Workloads of `ns` matching `sel`: narrowed by the smallest index list
/// of its `matchLabels` terms, so a selective policy never scans its
/// whole namespace.
fn selected(world: &World, ns: NamespaceId, sel: &Selector) -> Vec<WorkloadId> {
    let narrowest = sel
        .labels
        .0
        .iter()
        .map(|&(k, v)| world.members_with(ns, k, v))
        .min_by_key(|m| m.len());
    match narrowest {
        Some(members) => members
            .iter()
            .copied()
            .filter(|&w| sel.matches(world.workload_labels(w)))
            .collect(),
        None => world
            .namespace(ns)
            .members
            .iter()
            .copied()
            .filter(|&w| sel.matches(world.workload_labels(w)))
            .collect(),
    }
}
