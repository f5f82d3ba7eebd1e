//! One policy model for both kinds: `Policy` and Kubernetes `NetworkPolicy`
//! translate into [`PolicyRule`]s with identical meaning.

use std::fmt;

use skiff_api::net::{Cidr, PortRef, Protocol};
use skiff_api::policy::{
    HttpRule, Mode, NetworkPolicyPeer, NetworkPolicyRule, NetworkPolicySpec, Peer as NativePeer,
    PolicyPort, PolicySpec, Rule as ApiRule,
};
use skiff_api::selector::LabelSelector;
use skiff_api::{Object, Resource};

/// Which kind a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum PolicyKind {
    Policy,
    NetworkPolicy,
}

/// Names a policy; ordering is the deterministic tie-break between policies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    pub kind: PolicyKind,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PolicyKind::Policy => "Policy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        };
        write!(f, "{kind} {}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// A policy reduced to what decides flows.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRule {
    pub id: PolicyRef,
    pub mode: Mode,
    /// Selects workloads in `id.namespace`.
    pub selector: LabelSelector,
    /// `None`: the policy does not govern ingress.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

/// One rule. Empty `peers` or `ports` mean "any".
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PolicyPort>,
    pub http: Option<HttpRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Peer {
    /// Workloads matching `workloads` (all if `None`) in `namespaces`.
    Select {
        namespaces: Namespaces,
        workloads: Option<LabelSelector>,
    },
    Cidr {
        cidr: Cidr,
        except: Vec<Cidr>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Namespaces {
    /// The policy's own namespace.
    Same(String),
    Matching(LabelSelector),
}

impl PolicyRule {
    /// Translates a `Policy` or `NetworkPolicy`; `None` for other kinds.
    pub fn from_resource(resource: &Resource) -> Option<PolicyRule> {
        match resource {
            Resource::Policy(p) => Some(Self::from_native(p)),
            Resource::NetworkPolicy(p) => Some(Self::from_k8s(p)),
            _ => None,
        }
    }

    pub fn from_native(p: &Object<PolicySpec>) -> PolicyRule {
        let ns = p.namespace();
        let rules = |rules: &Vec<ApiRule>| translate(rules, |peer| native_peer(peer, ns));
        PolicyRule {
            id: PolicyRef {
                namespace: ns.to_string(),
                name: p.name().to_string(),
                kind: PolicyKind::Policy,
            },
            mode: p.spec.mode,
            selector: p.spec.selector.clone(),
            ingress: p.spec.ingress.as_ref().map(rules),
            egress: p.spec.egress.as_ref().map(rules),
        }
    }

    /// Kubernetes semantics: `policyTypes` defaulting, peers of
    /// podSelector (own namespace), namespaceSelector (all pods there), both
    /// (AND), or ipBlock.
    pub fn from_k8s(p: &Object<NetworkPolicySpec>) -> PolicyRule {
        let ns = p.namespace();
        let (ingress, egress) = p.spec.effective_policy_types();
        let rules = |rules: &Vec<NetworkPolicyRule>| translate(rules, |peer| k8s_peer(peer, ns));
        PolicyRule {
            id: PolicyRef {
                namespace: ns.to_string(),
                name: p.name().to_string(),
                kind: PolicyKind::NetworkPolicy,
            },
            mode: Mode::Enforce,
            selector: p.spec.pod_selector.clone(),
            ingress: ingress.then(|| rules(&p.spec.ingress)),
            egress: egress.then(|| rules(&p.spec.egress)),
        }
    }

    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

fn translate<P>(rules: &[ApiRule<P>], peer: impl Fn(&P) -> Peer) -> Vec<Rule> {
    rules
        .iter()
        .map(|r| Rule {
            peers: r.peers().iter().map(&peer).collect(),
            ports: r.ports.clone(),
            http: r.http.clone(),
        })
        .collect()
}

fn k8s_peer(peer: &NetworkPolicyPeer, ns: &str) -> Peer {
    match &peer.ip_block {
        Some(b) => Peer::Cidr {
            cidr: b.cidr,
            except: b.except.clone(),
        },
        None => Peer::Select {
            namespaces: match &peer.namespace_selector {
                Some(sel) => Namespaces::Matching(sel.clone()),
                None => Namespaces::Same(ns.to_string()),
            },
            workloads: peer.pod_selector.clone(),
        },
    }
}

fn native_peer(peer: &NativePeer, ns: &str) -> Peer {
    match peer {
        NativePeer::Cidr { cidr, except } => Peer::Cidr {
            cidr: *cidr,
            except: except.clone(),
        },
        NativePeer::Workloads {
            workloads,
            namespaces,
        } => Peer::Select {
            namespaces: match namespaces {
                Some(sel) => Namespaces::Matching(sel.clone()),
                None => Namespaces::Same(ns.to_string()),
            },
            workloads: workloads.clone(),
        },
    }
}

/// How a rule's port entry reads for humans: `8080/TCP`, `http/TCP`, `8000-8100/UDP`, `any/TCP`.
pub fn port_text(p: &PolicyPort) -> String {
    match (&p.port, p.end_port) {
        (Some(PortRef::Number(a)), Some(b)) => format!("{a}-{b}/{}", p.protocol),
        (Some(port), _) => format!("{port}/{}", p.protocol),
        (None, _) => format!("any/{}", p.protocol),
    }
}

/// A flow to decide: who talks to whom, on which port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flow {
    pub from: skiff_api::policytest::Endpoint,
    pub to: skiff_api::policytest::Endpoint,
    pub port: u16,
    pub protocol: Protocol,
}
