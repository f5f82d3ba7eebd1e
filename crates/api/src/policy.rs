//! Network policy kinds: Skiff's native `Policy` and Kubernetes'
//! `NetworkPolicy` (networking.k8s.io/v1), accepted unchanged.

use serde::Serialize;

use crate::decode::{Cx, Decode, Fields};
use crate::net::{Cidr, PortRef, Protocol, decode_port};
use crate::selector::LabelSelector;
use crate::string_enum;
use crate::yaml::Node;

string_enum! {
    /// Whether a policy's denials are enforced or only reported.
    pub enum Mode {
        Enforce = "enforce",
        /// Flows the policy would deny pass and are reported `audit-denied`.
        Audit = "audit",
    }
}

string_enum! {
    /// What happens to a workload no policy selects.
    pub enum DefaultPolicy {
        /// Kubernetes semantics: a workload is isolated in a direction once a
        /// policy governing that direction selects it; otherwise all passes.
        IsolateSelected = "isolate-selected",
        /// Zero trust: every workload is isolated in both directions.
        DenyAll = "deny-all",
    }
}

/// Spec of the native `Policy` kind.
///
/// A direction (`ingress`, `egress`) is governed by the policy when its key
/// is present: `ingress: []` isolates ingress and allows nothing, a missing
/// `ingress` leaves ingress to other policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Workloads in the policy's namespace that the policy applies to.
    pub selector: LabelSelector,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

/// One rule: traffic from (ingress) or to (egress) any of its peers, on any
/// of `ports`. A missing or empty list means "any". Only one of `from` and
/// `to` is ever set, by the direction the rule was read for. Kubernetes
/// rules (`P = NetworkPolicyPeer`) never have `http`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule<P = Peer> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<P>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<P>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRule>,
}

impl<P> Rule<P> {
    /// The rule's peers, whichever direction it was read for.
    pub fn peers(&self) -> &[P] {
        if self.from.is_empty() {
            &self.to
        } else {
            &self.from
        }
    }
}

/// A peer of a rule: selected workloads, or addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged, rename_all = "camelCase")]
pub enum Peer {
    /// Workloads matching `workloads` (all if absent) in the namespaces
    /// matching `namespaces` (the policy's own namespace if absent).
    Workloads {
        #[serde(skip_serializing_if = "Option::is_none")]
        workloads: Option<LabelSelector>,
        #[serde(skip_serializing_if = "Option::is_none")]
        namespaces: Option<LabelSelector>,
    },
    /// Addresses in `cidr` but not in any of `except`.
    Cidr {
        cidr: Cidr,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        except: Vec<Cidr>,
    },
}

/// A port, a port range (`port`..=`endPort`), or all ports of a protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPort {
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

/// L7 restrictions enforced by the receiving proxy (L4 lets the flow pass).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HttpRule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact paths, or prefixes ending in `*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

const HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl Decode for PolicySpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["selector", "mode", "ingress", "egress"])?;
        let selector = m.req(cx, "selector");
        let mode = m.or_default(cx, "mode");
        let ingress = direction(&m, cx, "ingress", RuleFields::NATIVE_INGRESS);
        let egress = direction(&m, cx, "egress", RuleFields::NATIVE_EGRESS);
        m.check(cx, "ingress", m.has("ingress") || m.has("egress"), || {
            "a policy must govern `ingress`, `egress` or both (write `ingress: []` to deny all ingress)".to_string()
        });
        Some(PolicySpec {
            selector: selector?,
            mode,
            ingress,
            egress,
        })
    }
}

/// Reads `ingress`/`egress`: present (even null or empty) means governed.
fn direction(m: &Fields<'_>, cx: &mut Cx, name: &str, fields: RuleFields) -> Option<Vec<Rule>> {
    if !m.has(name) {
        return None;
    }
    let Some(node) = m.raw(name) else {
        return Some(Vec::new());
    };
    cx.at(name, |cx| decode_rules(node, cx, fields))
}

/// Which keys a rule has: its peer list's name and whether `http` is allowed.
#[derive(Debug, Clone, Copy)]
struct RuleFields {
    known: &'static [&'static str],
    ingress: bool,
}

impl RuleFields {
    const NATIVE_INGRESS: Self = Self {
        known: &["from", "ports", "http"],
        ingress: true,
    };
    const NATIVE_EGRESS: Self = Self {
        known: &["to", "ports", "http"],
        ingress: false,
    };
    const K8S_INGRESS: Self = Self {
        known: &["from", "ports"],
        ingress: true,
    };
    const K8S_EGRESS: Self = Self {
        known: &["to", "ports"],
        ingress: false,
    };
}

fn decode_rules<P: Decode>(node: &Node, cx: &mut Cx, fields: RuleFields) -> Option<Vec<Rule<P>>> {
    let items: Vec<&Node> = match &node.value {
        crate::yaml::Value::Seq(items) => items.iter().collect(),
        _ => {
            cx.error(
                node.mark,
                format!("expected a list of rules, found {}", node.describe()),
            );
            return None;
        }
    };
    let mut rules = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let rule = cx.at_index(i, |cx| {
            let m = cx.fields(item, fields.known)?;
            let peers: Vec<P> = m.or_default(cx, if fields.ingress { "from" } else { "to" });
            let ports = m.or_default(cx, "ports");
            let http = m.opt(cx, "http");
            let (from, to) = if fields.ingress {
                (peers, Vec::new())
            } else {
                (Vec::new(), peers)
            };
            Some(Rule {
                from,
                to,
                ports,
                http,
            })
        });
        rules.extend(rule);
    }
    Some(rules)
}

impl Decode for Peer {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["workloads", "namespaces", "cidr", "except"])?;
        let workloads = m.opt(cx, "workloads");
        let namespaces = m.opt(cx, "namespaces");
        let cidr: Option<Cidr> = m.opt(cx, "cidr");
        let except: Vec<Cidr> = m.or_default(cx, "except");
        let selects = m.has("workloads") || m.has("namespaces");
        if m.has("cidr") {
            m.check(cx, "cidr", !selects, || {
                "`cidr` cannot be combined with `workloads` or `namespaces` in one peer; list them as separate peers".to_string()
            });
            let cidr = cidr?;
            check_except(&m, cx, &cidr, &except);
            Some(Peer::Cidr { cidr, except })
        } else {
            m.check(cx, "except", except.is_empty(), || {
                "`except` needs a `cidr`".to_string()
            });
            if !selects {
                cx.error(m.mark(), "a peer needs `workloads`, `namespaces` or `cidr`; to allow any peer, leave the peer list out");
                return None;
            }
            Some(Peer::Workloads {
                workloads,
                namespaces,
            })
        }
    }
}

fn check_except(m: &Fields<'_>, cx: &mut Cx, cidr: &Cidr, except: &[Cidr]) {
    for e in except {
        m.check(
            cx,
            "except",
            cidr.covers(e) && e.prefix > cidr.prefix,
            || format!("except {e} must be a strict subnet of {cidr}"),
        );
    }
}

impl Decode for PolicyPort {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["port", "endPort", "protocol"])?;
        let protocol = m.or_default(cx, "protocol");
        let port: Option<PortRef> = m.opt(cx, "port");
        let end_port = m
            .raw("endPort")
            .and_then(|n| cx.at("endPort", |cx| decode_port(n, cx)));
        check_end_port(&m, cx, port.as_ref(), end_port);
        Some(PolicyPort {
            protocol,
            port,
            end_port,
        })
    }
}

/// `endPort` needs a numeric `port` no greater than it (Kubernetes rules).
fn check_end_port(m: &Fields<'_>, cx: &mut Cx, port: Option<&PortRef>, end_port: Option<u16>) {
    if let Some(end) = end_port {
        match port {
            Some(PortRef::Number(p)) => {
                m.check(cx, "endPort", end >= *p, || {
                    format!("endPort {end} is below port {p}")
                });
            }
            Some(PortRef::Name(_)) => {
                m.check(cx, "endPort", false, || {
                    "endPort cannot be used with a named port".to_string()
                });
            }
            None => {
                m.check(cx, "endPort", false, || {
                    "endPort needs a numeric `port`".to_string()
                });
            }
        }
    }
}

impl Decode for HttpRule {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["methods", "paths"])?;
        let methods: Vec<String> = m.or_default(cx, "methods");
        for method in &methods {
            m.check(
                cx,
                "methods",
                HTTP_METHODS.contains(&method.as_str()),
                || {
                    format!(
                        "unknown HTTP method `{method}`; expected one of {}",
                        HTTP_METHODS.join(", ")
                    )
                },
            );
        }
        let paths: Vec<String> = m.or_default(cx, "paths");
        for path in &paths {
            let star_ok = !path.trim_end_matches('*').contains('*') && !path.ends_with("**");
            m.check(cx, "paths", path.starts_with('/') && star_ok, || {
                format!("path `{path}` must start with '/' and may only end in a single '*' (prefix match)")
            });
        }
        Some(HttpRule { methods, paths })
    }
}

// ---- Kubernetes NetworkPolicy (networking.k8s.io/v1) ----

string_enum! {
    pub enum PolicyType {
        Ingress = "Ingress",
        Egress = "Egress",
    }
}

/// `NetworkPolicySpec`, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    pub pod_selector: LabelSelector,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<NetworkPolicyRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<NetworkPolicyRule>,
    /// As written; see [`NetworkPolicySpec::effective_policy_types`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy_types: Vec<PolicyType>,
}

impl NetworkPolicySpec {
    /// Kubernetes defaulting: without `policyTypes`, a policy governs Ingress,
    /// and Egress too if it has egress rules.
    pub fn effective_policy_types(&self) -> (bool, bool) {
        if self.policy_types.is_empty() {
            (true, !self.egress.is_empty())
        } else {
            (
                self.policy_types.contains(&PolicyType::Ingress),
                self.policy_types.contains(&PolicyType::Egress),
            )
        }
    }
}

/// `NetworkPolicyIngressRule` / `NetworkPolicyEgressRule`.
pub type NetworkPolicyRule = Rule<NetworkPolicyPeer>;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpBlock {
    pub cidr: Cidr,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Cidr>,
}

impl Decode for NetworkPolicySpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["podSelector", "ingress", "egress", "policyTypes"])?;
        let pod_selector = m.req(cx, "podSelector");
        let ingress = m
            .raw("ingress")
            .and_then(|n| cx.at("ingress", |cx| decode_rules(n, cx, RuleFields::K8S_INGRESS)))
            .unwrap_or_default();
        let egress = m
            .raw("egress")
            .and_then(|n| cx.at("egress", |cx| decode_rules(n, cx, RuleFields::K8S_EGRESS)))
            .unwrap_or_default();
        let policy_types: Vec<PolicyType> = m.or_default(cx, "policyTypes");
        Some(NetworkPolicySpec {
            pod_selector: pod_selector?,
            ingress,
            egress,
            policy_types,
        })
    }
}

impl Decode for NetworkPolicyPeer {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["podSelector", "namespaceSelector", "ipBlock"])?;
        let pod_selector = m.opt(cx, "podSelector");
        let namespace_selector = m.opt(cx, "namespaceSelector");
        let ip_block = m.opt(cx, "ipBlock");
        let selects = m.has("podSelector") || m.has("namespaceSelector");
        if m.has("ipBlock") {
            m.check(cx, "ipBlock", !selects, || {
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer"
                    .to_string()
            });
        } else if !selects {
            cx.error(
                m.mark(),
                "a peer needs podSelector, namespaceSelector or ipBlock",
            );
        }
        Some(NetworkPolicyPeer {
            pod_selector,
            namespace_selector,
            ip_block,
        })
    }
}

impl Decode for IpBlock {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["cidr", "except"])?;
        let cidr: Option<Cidr> = m.req(cx, "cidr");
        let except: Vec<Cidr> = m.or_default(cx, "except");
        let cidr = cidr?;
        check_except(&m, cx, &cidr, &except);
        Some(IpBlock { cidr, except })
    }
}
