//! Kinds the control plane writes: `Node` and `Instance`, and the `Route`
//! kind for traffic splits.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::decode::{Cx, Decode, integer};
use crate::net::Cidr;
use crate::quantity::{Duration, Quantity};
use crate::service::TaintEffect;
use crate::string_enum;
use crate::yaml::Node;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(rename = "podCIDR", skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<Cidr>,
    pub unschedulable: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Taint {
    pub key: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: TaintEffect,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub capacity: BTreeMap<String, Quantity>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub allocatable: BTreeMap<String, Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    pub ready: bool,
    /// Fencing generation: bumped each time the node is declared lost.
    pub generation: u64,
    /// The agent's port for log reads (signed by the API server), on `address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_port: Option<u16>,
    /// Which resource limits the node enforces, and why not where it does not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runtime: Vec<String>,
    /// What the node's sidecar proxies acknowledge having applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshStatus>,
}

/// A node's mesh acknowledgements: rollouts wait until every node's
/// proxies have applied the revision of the change they made.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct MeshStatus {
    /// Sidecar proxies on the node.
    pub proxies: u32,
    /// How many of them answered the last time they were asked.
    pub answered: u32,
    /// Per kind (`instances`, `routes`, …), the control plane revision
    /// every answering proxy has applied (the lowest among them).
    pub applied: BTreeMap<String, u64>,
}

impl Decode for MeshStatus {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["proxies", "answered", "applied"])?;
        Some(MeshStatus {
            proxies: m.or_default(cx, "proxies"),
            answered: m.or_default(cx, "answered"),
            applied: m.or_default(cx, "applied"),
        })
    }
}

impl Decode for NodeSpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["podCIDR", "unschedulable", "taints"])?;
        Some(NodeSpec {
            pod_cidr: m.opt(cx, "podCIDR"),
            unschedulable: m.or_default(cx, "unschedulable"),
            taints: m.or_default(cx, "taints"),
        })
    }
}

impl Decode for Taint {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["key", "value", "effect"])?;
        let key = m.req(cx, "key");
        let effect = m.req(cx, "effect");
        Some(Taint {
            key: key?,
            value: m.or_default(cx, "value"),
            effect: effect?,
        })
    }
}

impl Decode for NodeStatus {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &[
                "capacity",
                "allocatable",
                "address",
                "ready",
                "generation",
                "agentPort",
                "runtime",
                "mesh",
            ],
        )?;
        Some(NodeStatus {
            capacity: m.or_default(cx, "capacity"),
            allocatable: m.or_default(cx, "allocatable"),
            address: m.opt(cx, "address"),
            ready: m.or_default(cx, "ready"),
            generation: m.or_default(cx, "generation"),
            agent_port: m.opt(cx, "agentPort"),
            runtime: m.or_default(cx, "runtime"),
            mesh: m.opt(cx, "mesh"),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// The Service this instance runs, in the same namespace.
    pub service: String,
    /// Hash of the Service spec this instance was made from (rollouts).
    pub template_hash: String,
    /// Assigned node, once scheduled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The node's fencing generation at assignment.
    pub node_generation: u64,
}

string_enum! {
    pub enum Phase {
        Pending = "pending",
        Starting = "starting",
        Running = "running",
        Terminating = "terminating",
        Succeeded = "succeeded",
        Failed = "failed",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    pub phase: Phase,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    pub restarts: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The most recent things that happened to the instance, oldest first
    /// (bounded: see [`InstanceEvent::KEEP`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<InstanceEvent>,
}

/// Status of a `Service`, written by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// The service's virtual address: apps connect to it (on the service's
    /// ports) and their sidecar proxies balance across ready instances. It
    /// is never routed: the proxies intercept it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_address: Option<IpAddr>,
}

impl Decode for ServiceStatus {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["virtualAddress"])?;
        Some(ServiceStatus {
            virtual_address: m.opt(cx, "virtualAddress"),
        })
    }
}

/// Something that happened to an instance: scheduled, started, unhealthy…
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct InstanceEvent {
    /// RFC 3339, UTC.
    pub time: String,
    /// One CamelCase word: `Scheduled`, `Started`, `BackOff`, `OOMKilled`…
    pub reason: String,
    pub message: String,
}

impl InstanceEvent {
    /// Events kept per instance; older ones are dropped.
    pub const KEEP: usize = 20;
}

impl Decode for InstanceEvent {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["time", "reason", "message"])?;
        let reason = m.req(cx, "reason");
        Some(InstanceEvent {
            time: m.or_default(cx, "time"),
            reason: reason?,
            message: m.or_default(cx, "message"),
        })
    }
}

impl Decode for InstanceSpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["service", "templateHash", "node", "nodeGeneration"])?;
        let service = m.req(cx, "service");
        Some(InstanceSpec {
            service: service?,
            template_hash: m.or_default(cx, "templateHash"),
            node: m.opt(cx, "node"),
            node_generation: m.or_default(cx, "nodeGeneration"),
        })
    }
}

impl Decode for InstanceStatus {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &["phase", "ready", "address", "restarts", "message", "events"],
        )?;
        Some(InstanceStatus {
            phase: m.or_default(cx, "phase"),
            ready: m.or_default(cx, "ready"),
            address: m.opt(cx, "address"),
            restarts: m.or_default(cx, "restarts"),
            message: m.or_default(cx, "message"),
            events: m.or_default(cx, "events"),
        })
    }
}

/// Spec of `Route`: how requests to `service` are matched and split
/// (Gateway API HTTPRoute semantics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteSpec {
    pub service: String,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteRule {
    /// Any match selects the rule; none means every request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<Backend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Opt non-idempotent requests into retries.
    pub retry: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RouteMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

string_enum! {
    pub enum PathMatchType {
        PathPrefix = "PathPrefix",
        Exact = "Exact",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(rename = "type")]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub service: String,
    /// Relative weight; 0 sends nothing.
    pub weight: u32,
}

impl Decode for RouteSpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["service", "rules"])?;
        let service = m.req(cx, "service");
        let rules: Option<Vec<RouteRule>> = m.req(cx, "rules");
        if let Some(r) = &rules {
            m.check(cx, "rules", !r.is_empty(), || {
                "a route needs at least one rule".to_string()
            });
        }
        Some(RouteSpec {
            service: service?,
            rules: rules?,
        })
    }
}

impl Decode for RouteRule {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["matches", "backends", "timeout", "retry"])?;
        let matches = m.or_default(cx, "matches");
        let backends: Option<Vec<Backend>> = m.req(cx, "backends");
        if let Some(b) = &backends {
            m.check(cx, "backends", !b.is_empty(), || {
                "a rule needs at least one backend".to_string()
            });
            m.check(
                cx,
                "backends",
                b.is_empty() || b.iter().any(|b| b.weight > 0),
                || "every backend has weight 0; give at least one a weight above 0".to_string(),
            );
        }
        Some(RouteRule {
            matches,
            backends: backends?,
            timeout: m.opt(cx, "timeout"),
            retry: m.or_default(cx, "retry"),
        })
    }
}

impl Decode for RouteMatch {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["path", "headers", "method"])?;
        Some(RouteMatch {
            path: m.opt(cx, "path"),
            headers: m.or_default(cx, "headers"),
            method: m.opt(cx, "method"),
        })
    }
}

impl Decode for PathMatch {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["type", "value"])?;
        let value: Option<String> = m.req(cx, "value");
        if let Some(v) = &value {
            m.check(cx, "value", v.starts_with('/'), || {
                format!("path `{v}` must start with '/'")
            });
        }
        Some(PathMatch {
            kind: m.or_default(cx, "type"),
            value: value?,
        })
    }
}

impl Decode for HeaderMatch {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["name", "value"])?;
        let name = m.req(cx, "name");
        let value = m.req(cx, "value");
        Some(HeaderMatch {
            name: name?,
            value: value?,
        })
    }
}

impl Decode for Backend {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["service", "weight"])?;
        let service = m.req(cx, "service");
        let weight = m
            .raw("weight")
            .and_then(|n| cx.at("weight", |cx| integer(n, cx, 0, 1_000_000)))
            .unwrap_or(1);
        Some(Backend {
            service: service?,
            weight: weight as u32,
        })
    }
}
