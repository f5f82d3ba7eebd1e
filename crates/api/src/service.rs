//! The `Service` kind: a deployable application and everything needed to
//! run, place, check, update and scale it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::decode::{Cx, Decode, integer};
use crate::meta::Labels;
use crate::net::{PortRef, decode_port, is_port_name};
use crate::quantity::{Duration, Quantity};
use crate::string_enum;
use crate::yaml::{Node, Plain, Value, plain_scalar};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    pub replicas: u32,
    pub run: Run,
    pub resources: Resources,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    pub health: Health,
    pub placement: Placement,
    pub rollout: Rollout,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub command: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// User name or uid to run as; the agent's unprivileged default if unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Resources {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

string_enum! {
    /// Application protocol of a port; decides how the proxy handles it.
    pub enum AppProtocol {
        Http = "http",
        Http2 = "http2",
        Grpc = "grpc",
        Tcp = "tcp",
        /// Datagrams: policies see the port as UDP; the proxy passes it by.
        Udp = "udp",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: AppProtocol,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Health {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(flatten)]
    pub check: Check,
    pub period: Duration,
    pub timeout: Duration,
    pub initial_delay: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// What a probe does: exactly one of an HTTP GET, a TCP connect, a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    Http { path: String, port: PortRef },
    Tcp { port: PortRef },
    Command(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: Labels,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<Spread>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<AntiAffinity>,
    pub priority: i32,
}

string_enum! {
    pub enum TolerationOperator {
        Equal = "Equal",
        Exists = "Exists",
    }
}

string_enum! {
    pub enum TaintEffect {
        NoSchedule = "NoSchedule",
        PreferNoSchedule = "PreferNoSchedule",
        NoExecute = "NoExecute",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Toleration {
    /// Empty with `Exists` tolerates every taint.
    pub key: String,
    pub operator: TolerationOperator,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// `None` tolerates every effect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

string_enum! {
    /// A hard constraint filters nodes; a soft one only scores them.
    pub enum Enforcement {
        Hard = "hard",
        Soft = "soft",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spread {
    /// Node label to spread over; `hostname` means the node itself.
    pub topology_key: String,
    pub max_skew: u32,
    pub mode: Enforcement,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AntiAffinity {
    pub topology_key: String,
    /// At most this many instances of the service per topology domain.
    pub max_per_domain: u32,
    pub mode: Enforcement,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Rollout {
    Rolling {
        max_surge: IntOrPercent,
        max_unavailable: IntOrPercent,
    },
    Canary {
        steps: Vec<CanaryStep>,
        analysis: Analysis,
    },
}

/// `3` or `25%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntOrPercent {
    Int(u32),
    Percent(u32),
}

impl IntOrPercent {
    /// Resolves against a replica count, rounding up (as Kubernetes does for surge).
    pub fn resolve_ceil(self, replicas: u32) -> u32 {
        match self {
            IntOrPercent::Int(n) => n,
            IntOrPercent::Percent(p) => (u64::from(replicas) * u64::from(p)).div_ceil(100) as u32,
        }
    }

    /// Resolves against a replica count, rounding down (for unavailability).
    pub fn resolve_floor(self, replicas: u32) -> u32 {
        match self {
            IntOrPercent::Int(n) => n,
            IntOrPercent::Percent(p) => (u64::from(replicas) * u64::from(p) / 100) as u32,
        }
    }
}

impl Serialize for IntOrPercent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrPercent::Int(n) => s.serialize_u32(*n),
            IntOrPercent::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CanaryStep {
    /// Percent of traffic to the new version, 1-100.
    pub weight: u32,
    /// How long to hold the step before judging it.
    pub pause: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Minimum success rate (percent of non-5xx responses) to go on.
    pub success_rate: f64,
    /// Maximum p99 latency to go on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_latency: Option<Duration>,
    pub interval: Duration,
    /// Failed checks tolerated before rolling back.
    pub failure_limit: u32,
}

string_enum! {
    pub enum ScaleMetric {
        /// Requests per second per instance, from the proxies.
        Rps = "rps",
        /// CPU use as percent of the request, from the cgroups.
        Cpu = "cpu",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    pub metric: ScaleMetric,
    pub target: f64,
}

impl Decode for ServiceSpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &[
                "replicas",
                "run",
                "resources",
                "ports",
                "health",
                "placement",
                "rollout",
                "autoscale",
            ],
        )?;
        let replicas = m.opt(cx, "replicas").unwrap_or(1);
        let run = m.req(cx, "run");
        let resources = m.or_default(cx, "resources");
        let ports: Vec<ServicePort> = m.or_default(cx, "ports");
        for (i, p) in ports.iter().enumerate() {
            let dup_name = ports[..i].iter().any(|q| q.name == p.name);
            // The same number may serve TCP and UDP (DNS on 53), as in Kubernetes.
            let udp = |q: &ServicePort| q.protocol == AppProtocol::Udp;
            let dup_port = ports[..i]
                .iter()
                .any(|q| q.port == p.port && udp(q) == udp(p));
            m.check(cx, "ports", !dup_name && !dup_port, || {
                format!(
                    "port {} ({}) is listed twice; names, and numbers per protocol, must be unique",
                    p.port, p.name
                )
            });
        }
        let health: Health = m.or_default(cx, "health");
        for (name, probe) in [
            ("readiness", &health.readiness),
            ("liveness", &health.liveness),
        ] {
            if let Some(Probe {
                check:
                    Check::Http {
                        port: PortRef::Name(n),
                        ..
                    }
                    | Check::Tcp {
                        port: PortRef::Name(n),
                    },
                ..
            }) = probe
            {
                m.check(cx, "health", ports.iter().any(|p| &p.name == n), || {
                    format!("{name} probe names port `{n}`, which is not in `ports`")
                });
            }
        }
        let placement = m.or_default(cx, "placement");
        let rollout = m.opt(cx, "rollout").unwrap_or(Rollout::Rolling {
            max_surge: IntOrPercent::Percent(25),
            max_unavailable: IntOrPercent::Int(0),
        });
        let autoscale: Option<Autoscale> = m.opt(cx, "autoscale");
        if let Some(a) = &autoscale
            && m.has("replicas")
        {
            m.check(cx, "replicas", (a.min..=a.max).contains(&replicas), || {
                format!(
                    "replicas {replicas} is outside autoscale bounds {}..={}",
                    a.min, a.max
                )
            });
        }
        Some(ServiceSpec {
            replicas,
            run: run?,
            resources,
            ports,
            health,
            placement,
            rollout,
            autoscale,
        })
    }
}

impl Decode for Run {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["command", "args", "env", "user"])?;
        let command: Option<String> = m.req(cx, "command");
        if let Some(c) = &command {
            m.check(cx, "command", !c.trim().is_empty(), || {
                "command must not be empty".to_string()
            });
        }
        let args = m.or_default(cx, "args");
        let env: BTreeMap<String, String> = m.or_default(cx, "env");
        for key in env.keys() {
            let ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            m.check(cx, "env", ok, || {
                format!("`{key}` is not a valid environment variable name")
            });
        }
        let user = m.opt(cx, "user");
        Some(Run {
            command: command?,
            args,
            env,
            user,
        })
    }
}

impl Decode for Resources {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["requests", "limits"])?;
        let requests: BTreeMap<String, Quantity> = m.or_default(cx, "requests");
        let limits: BTreeMap<String, Quantity> = m.or_default(cx, "limits");
        for (name, limit) in &limits {
            if let Some(request) = requests.get(name) {
                m.check(cx, "limits", limit.milli() >= request.milli(), || {
                    format!(
                        "{name} limit {} is below its request {}",
                        limit.as_str(),
                        request.as_str()
                    )
                });
            }
        }
        for name in requests.keys().chain(limits.keys()) {
            let ok = crate::meta::check_label_key(name).is_ok();
            m.check(cx, "requests", ok, || {
                format!("`{name}` is not a valid resource name")
            });
        }
        Some(Resources { requests, limits })
    }
}

impl Decode for ServicePort {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["name", "port", "protocol"])?;
        let name: Option<String> = m.req(cx, "name");
        if let Some(n) = &name {
            m.check(cx, "name", is_port_name(n), || {
                format!("`{n}` is not a valid port name: at most 15 lowercase letters, digits and '-', with at least one letter")
            });
        }
        let port = m
            .raw("port")
            .map(|n| cx.at("port", |cx| decode_port(n, cx)));
        if port.is_none() {
            m.req::<u16>(cx, "port");
        }
        let protocol = m.or_default(cx, "protocol");
        Some(ServicePort {
            name: name?,
            port: port.flatten()?,
            protocol,
        })
    }
}

impl Decode for Health {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["readiness", "liveness"])?;
        Some(Health {
            readiness: m.opt(cx, "readiness"),
            liveness: m.opt(cx, "liveness"),
        })
    }
}

impl Decode for Probe {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &[
                "http",
                "tcp",
                "command",
                "period",
                "timeout",
                "initialDelay",
                "successThreshold",
                "failureThreshold",
            ],
        )?;
        let kinds = ["http", "tcp", "command"]
            .iter()
            .filter(|k| m.has(k))
            .count();
        if kinds != 1 {
            cx.error(
                m.mark(),
                "a probe needs exactly one of `http`, `tcp` or `command`",
            );
        }
        let check = if let Some(n) = m.raw("http") {
            cx.at("http", |cx| {
                let h = cx.fields(n, &["path", "port"])?;
                let path: String = h.opt(cx, "path").unwrap_or_else(|| "/".to_string());
                h.check(cx, "path", path.starts_with('/'), || {
                    format!("path `{path}` must start with '/'")
                });
                Some(Check::Http {
                    path,
                    port: h.req(cx, "port")?,
                })
            })
        } else if let Some(n) = m.raw("tcp") {
            cx.at("tcp", |cx| {
                let t = cx.fields(n, &["port"])?;
                Some(Check::Tcp {
                    port: t.req(cx, "port")?,
                })
            })
        } else if m.has("command") {
            let argv: Option<Vec<String>> = m.req(cx, "command");
            if let Some(a) = &argv {
                m.check(cx, "command", !a.is_empty(), || {
                    "command needs at least one word".to_string()
                });
            }
            argv.map(Check::Command)
        } else {
            None
        };
        let seconds = |s| Duration(std::time::Duration::from_secs(s));
        let period = m.opt(cx, "period").unwrap_or(seconds(5));
        let timeout = m.opt(cx, "timeout").unwrap_or(seconds(1));
        let initial_delay = m.or_default(cx, "initialDelay");
        let success_threshold = m.opt(cx, "successThreshold").unwrap_or(1);
        let failure_threshold = m.opt(cx, "failureThreshold").unwrap_or(3);
        m.check(
            cx,
            "period",
            period.0 >= std::time::Duration::from_millis(100),
            || "period must be at least 100ms".to_string(),
        );
        m.check(
            cx,
            "timeout",
            timeout <= period && !timeout.0.is_zero(),
            || "timeout must be positive and no longer than period".to_string(),
        );
        m.check(cx, "successThreshold", success_threshold >= 1, || {
            "successThreshold must be at least 1".to_string()
        });
        m.check(cx, "failureThreshold", failure_threshold >= 1, || {
            "failureThreshold must be at least 1".to_string()
        });
        Some(Probe {
            check: check?,
            period,
            timeout,
            initial_delay,
            success_threshold,
            failure_threshold,
        })
    }
}

impl Decode for Placement {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &[
                "nodeSelector",
                "tolerations",
                "spread",
                "antiAffinity",
                "priority",
            ],
        )?;
        let node_selector: Labels = m.or_default(cx, "nodeSelector");
        if let Some(n) = m.raw("nodeSelector") {
            cx.at("nodeSelector", |cx| {
                crate::meta::check_labels(&node_selector, n, cx)
            });
        }
        Some(Placement {
            node_selector,
            tolerations: m.or_default(cx, "tolerations"),
            spread: m.or_default(cx, "spread"),
            anti_affinity: m.or_default(cx, "antiAffinity"),
            priority: m
                .raw("priority")
                .and_then(|n| {
                    cx.at("priority", |cx| {
                        integer(n, cx, -1_000_000_000, 1_000_000_000)
                    })
                })
                .map_or(0, |p| p as i32),
        })
    }
}

impl Decode for Toleration {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["key", "operator", "value", "effect"])?;
        let key: String = m.or_default(cx, "key");
        let operator = m.or_default(cx, "operator");
        let value: String = m.or_default(cx, "value");
        match operator {
            TolerationOperator::Equal => {
                m.check(cx, "key", !key.is_empty(), || {
                    "operator Equal needs a `key`".to_string()
                });
            }
            TolerationOperator::Exists => {
                m.check(cx, "value", value.is_empty(), || {
                    "operator Exists takes no `value`".to_string()
                });
            }
        }
        Some(Toleration {
            key,
            operator,
            value,
            effect: m.opt(cx, "effect"),
        })
    }
}

impl Decode for Spread {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["topologyKey", "maxSkew", "mode"])?;
        let topology_key = m.req(cx, "topologyKey");
        let max_skew = m.opt(cx, "maxSkew").unwrap_or(1);
        m.check(cx, "maxSkew", max_skew >= 1, || {
            "maxSkew must be at least 1".to_string()
        });
        Some(Spread {
            topology_key: topology_key?,
            max_skew,
            mode: m.or_default(cx, "mode"),
        })
    }
}

impl Decode for AntiAffinity {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["topologyKey", "maxPerDomain", "mode"])?;
        let topology_key = m
            .opt(cx, "topologyKey")
            .unwrap_or_else(|| "hostname".to_string());
        let max_per_domain = m.opt(cx, "maxPerDomain").unwrap_or(1);
        m.check(cx, "maxPerDomain", max_per_domain >= 1, || {
            "maxPerDomain must be at least 1".to_string()
        });
        Some(AntiAffinity {
            topology_key,
            max_per_domain,
            mode: m.or_default(cx, "mode"),
        })
    }
}

impl Decode for Rollout {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["rolling", "canary"])?;
        if m.has("rolling") == m.has("canary") {
            cx.error(
                m.mark(),
                "a rollout needs exactly one of `rolling` or `canary`",
            );
            return None;
        }
        if let Some(n) = m.raw("rolling") {
            return cx.at("rolling", |cx| {
                let r = cx.fields(n, &["maxSurge", "maxUnavailable"])?;
                let max_surge = r.opt(cx, "maxSurge").unwrap_or(IntOrPercent::Percent(25));
                let max_unavailable = r.opt(cx, "maxUnavailable").unwrap_or(IntOrPercent::Int(0));
                let both_zero =
                    max_surge.resolve_ceil(100) == 0 && max_unavailable.resolve_floor(100) == 0;
                r.check(cx, "maxUnavailable", !both_zero, || {
                    "maxSurge and maxUnavailable cannot both be 0: the rollout could never progress"
                        .to_string()
                });
                Some(Rollout::Rolling {
                    max_surge,
                    max_unavailable,
                })
            });
        }
        let n = m.raw("canary")?;
        cx.at("canary", |cx| {
            let c = cx.fields(n, &["steps", "analysis"])?;
            let steps: Option<Vec<CanaryStep>> = c.req(cx, "steps");
            if let Some(steps) = &steps {
                let increasing = steps.windows(2).all(|w| w[0].weight < w[1].weight);
                c.check(cx, "steps", !steps.is_empty() && increasing, || {
                    "steps need at least one entry, with increasing weights".to_string()
                });
            }
            let analysis = c.req(cx, "analysis");
            Some(Rollout::Canary {
                steps: steps?,
                analysis: analysis?,
            })
        })
    }
}

impl Decode for IntOrPercent {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        if let Value::Scalar { text, quoted } = &node.value {
            if let Some(p) = text.strip_suffix('%') {
                if let Ok(p) = p.parse::<u32>()
                    && p <= 100
                {
                    return Some(IntOrPercent::Percent(p));
                }
            } else if let (false, Plain::Int(i)) = (*quoted, plain_scalar(text))
                && let Ok(n) = u32::try_from(i)
            {
                return Some(IntOrPercent::Int(n));
            }
        }
        cx.error(
            node.mark,
            format!(
                "expected a count such as 2 or a percentage such as 25%, found {}",
                node.describe()
            ),
        );
        None
    }
}

impl Decode for CanaryStep {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["weight", "pause"])?;
        let weight = m
            .raw("weight")
            .map(|n| cx.at("weight", |cx| integer(n, cx, 1, 100)));
        if weight.is_none() {
            m.req::<u32>(cx, "weight");
        }
        let pause = m
            .opt(cx, "pause")
            .unwrap_or(Duration(std::time::Duration::from_secs(60)));
        Some(CanaryStep {
            weight: weight.flatten()? as u32,
            pause,
        })
    }
}

impl Decode for Analysis {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &["successRate", "p99Latency", "interval", "failureLimit"],
        )?;
        let success_rate: f64 = m.opt(cx, "successRate").unwrap_or(99.0);
        m.check(
            cx,
            "successRate",
            (0.0..=100.0).contains(&success_rate),
            || "successRate is a percentage, 0-100".to_string(),
        );
        let p99_latency = m.opt(cx, "p99Latency");
        let interval = m
            .opt(cx, "interval")
            .unwrap_or(Duration(std::time::Duration::from_secs(30)));
        let failure_limit = m.opt(cx, "failureLimit").unwrap_or(1);
        Some(Analysis {
            success_rate,
            p99_latency,
            interval,
            failure_limit,
        })
    }
}

impl Decode for Autoscale {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(node, &["min", "max", "metric", "target"])?;
        let min: u32 = m.opt(cx, "min").unwrap_or(1);
        let max: Option<u32> = m.req(cx, "max");
        let metric = m.req(cx, "metric");
        let target: Option<f64> = m.req(cx, "target");
        if let Some(max) = max {
            m.check(cx, "max", min >= 1 && min <= max, || {
                format!("need 1 <= min <= max, found min {min}, max {max}")
            });
        }
        if let Some(t) = target {
            m.check(cx, "target", t > 0.0, || {
                "target must be positive".to_string()
            });
        }
        Some(Autoscale {
            min,
            max: max?,
            metric: metric?,
            target: target?,
        })
    }
}
