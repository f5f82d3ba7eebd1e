//! The `PolicyTest` kind: reachability cases kept next to the policies.

use std::net::IpAddr;

use serde::Serialize;

use crate::decode::{Cx, Decode, Fields, parse_scalar};
use crate::meta::{Labels, check_labels, is_dns_label, is_dns_subdomain};
use crate::net::{Protocol, decode_port, is_port_name};
use crate::policy::DefaultPolicy;
use crate::string_enum;
use crate::yaml::Node;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTestSpec {
    pub policy_default: DefaultPolicy,
    pub namespaces: Vec<TestNamespace>,
    pub workloads: Vec<TestWorkload>,
    pub cases: Vec<TestCase>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestNamespace {
    pub name: String,
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// A workload (`namespace/name`) with the labels and ports policies see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestWorkload {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
    /// Address, for policies with CIDR peers.
    pub ip: Option<IpAddr>,
}

impl Serialize for TestWorkload {
    /// Written as it is read: `name: namespace/name`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shape<'a> {
            name: String,
            labels: &'a Labels,
            #[serde(skip_serializing_if = "<[NamedPort]>::is_empty")]
            ports: &'a [NamedPort],
            #[serde(skip_serializing_if = "Option::is_none")]
            ip: Option<IpAddr>,
        }
        Shape {
            name: format!("{}/{}", self.namespace, self.name),
            labels: &self.labels,
            ports: &self.ports,
            ip: self.ip,
        }
        .serialize(s)
    }
}

/// A port of a workload as named ports resolve against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedPort {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// One end of a flow: a workload or an outside address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Workload { namespace: String, name: String },
    Address(IpAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Workload { namespace, name } => write!(f, "{namespace}/{name}"),
            Endpoint::Address(ip) => write!(f, "{ip}"),
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// `namespace/name` or an IP address.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse() {
            return Ok(Endpoint::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => {
                Ok(Endpoint::Workload {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!(
                "expected `namespace/name` or an IP address, found {s:?}"
            )),
        }
    }
}

string_enum! {
    pub enum Expect {
        Allow = "allow",
        Deny = "deny",
        /// Allowed, but an audit-mode policy would deny it.
        AuditDenied = "audit-denied",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestCase {
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: u16,
    pub protocol: Protocol,
    pub expect: Expect,
    /// Source line, for reporting.
    #[serde(skip)]
    pub line: usize,
}

impl Decode for PolicyTestSpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["policyDefault", "namespaces", "workloads", "cases"])?;
        let policy_default = m.or_default(cx, "policyDefault");
        let namespaces: Vec<TestNamespace> = m.or_default(cx, "namespaces");
        let before = cx.error_count();
        let workloads: Vec<TestWorkload> = m.or_default(cx, "workloads");
        // Without a complete workload list, "not declared" would be noise.
        let declared = (cx.error_count() == before).then_some(workloads.as_slice());
        let cases = decode_cases(&m, cx, declared);
        for (i, w) in workloads.iter().enumerate() {
            let dup = workloads[..i]
                .iter()
                .any(|o| o.namespace == w.namespace && o.name == w.name);
            m.check(cx, "workloads", !dup, || {
                format!("workload {}/{} is listed twice", w.namespace, w.name)
            });
        }
        for (i, ns) in namespaces.iter().enumerate() {
            let dup = namespaces[..i].iter().any(|o| o.name == ns.name);
            m.check(cx, "namespaces", !dup, || {
                format!("namespace {} is listed twice", ns.name)
            });
        }
        Some(PolicyTestSpec {
            policy_default,
            namespaces,
            workloads,
            cases,
        })
    }
}

/// Decodes each case and checks it names workloads the test declares.
fn decode_cases(m: &Fields<'_>, cx: &mut Cx, workloads: Option<&[TestWorkload]>) -> Vec<TestCase> {
    let Some(node) = m.raw("cases") else {
        return Vec::new();
    };
    let crate::yaml::Value::Seq(items) = &node.value else {
        return m.opt::<Vec<TestCase>>(cx, "cases").unwrap_or_default();
    };
    let mut cases = Vec::new();
    cx.at("cases", |cx| {
        for (i, item) in items.iter().enumerate() {
            cx.at_index(i, |cx| {
                let Some(case) = TestCase::decode(item, cx) else {
                    return;
                };
                for (field, end) in [("from", &case.from), ("to", &case.to)] {
                    if let (Endpoint::Workload { namespace, name }, Some(workloads)) =
                        (end, workloads)
                        && !workloads
                            .iter()
                            .any(|w| &w.namespace == namespace && &w.name == name)
                    {
                        let mark = item.get(field).map_or(item.mark, |n| n.mark);
                        cx.at(field, |cx| {
                            cx.error(
                                mark,
                                format!(
                                    "workload {namespace}/{name} is not declared under `workloads`"
                                ),
                            )
                        });
                    }
                }
                cases.push(case);
            });
        }
    });
    cases
}

impl Decode for TestNamespace {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["name", "labels"])?;
        let name: Option<String> = m.req(cx, "name");
        if let Some(n) = &name {
            m.check(cx, "name", is_dns_label(n), || {
                format!("`{n}` is not a valid namespace name")
            });
        }
        let labels = decode_labels(&m, cx);
        Some(TestNamespace {
            name: name?,
            labels,
        })
    }
}

fn decode_labels(m: &Fields<'_>, cx: &mut Cx) -> Labels {
    let labels: Labels = m.or_default(cx, "labels");
    if let Some(n) = m.raw("labels") {
        cx.at("labels", |cx| check_labels(&labels, n, cx));
    }
    labels
}

impl Decode for TestWorkload {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["name", "labels", "ports", "ip"])?;
        let name = m
            .req(cx, "name")
            .and_then(|full: String| match full.parse() {
                Ok(Endpoint::Workload { namespace, name }) => Some((namespace, name)),
                _ => {
                    m.check(cx, "name", false, || {
                        format!("expected `namespace/name`, found {full:?}")
                    });
                    None
                }
            });
        let labels = decode_labels(&m, cx);
        let ports = m.or_default(cx, "ports");
        let ip = m.opt(cx, "ip");
        let (namespace, name) = name?;
        Some(TestWorkload {
            namespace,
            name,
            labels,
            ports,
            ip,
        })
    }
}

impl Decode for NamedPort {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["name", "port", "protocol"])?;
        let name: Option<String> = m.opt(cx, "name");
        if let Some(n) = &name {
            m.check(cx, "name", is_port_name(n), || {
                format!("`{n}` is not a valid port name")
            });
        }
        let port = m
            .raw("port")
            .and_then(|n| cx.at("port", |cx| decode_port(n, cx)));
        if !m.has("port") {
            m.req::<u16>(cx, "port");
        }
        Some(NamedPort {
            name,
            port: port?,
            protocol: m.or_default(cx, "protocol"),
        })
    }
}

impl Decode for Endpoint {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        parse_scalar(node, cx, str::parse)
    }
}

impl Decode for TestCase {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["from", "to", "port", "protocol", "expect"])?;
        let from = m.req(cx, "from");
        let to = m.req(cx, "to");
        let port = m
            .raw("port")
            .and_then(|n| cx.at("port", |cx| decode_port(n, cx)));
        if !m.has("port") {
            m.req::<u16>(cx, "port");
        }
        let protocol = m.or_default(cx, "protocol");
        let expect = m.req(cx, "expect");
        Some(TestCase {
            from: from?,
            to: to?,
            port: port?,
            protocol,
            expect: expect?,
            line: node.mark.line,
        })
    }
}
