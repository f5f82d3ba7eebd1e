//! Synthetic clusters for `skiff bench policy-eval`: many workloads, many
//! policies, random flows. Deterministic for a seed.

use std::collections::BTreeMap;

use skiff_api::meta::Labels;
use skiff_api::net::{PortRef, Protocol};
use skiff_api::policy::{DefaultPolicy, Mode, PolicyPort};
use skiff_api::policytest::NamedPort;
use skiff_api::selector::{LabelSelector, Operator, Requirement};

use crate::engine::{Engine, Resolved};
use crate::model::{Namespaces, Peer, PolicyKind, PolicyRef, PolicyRule, Rule};
use crate::world::World;

/// A small, fast, seedable generator (SplitMix64); benches need no crypto.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A generated cluster: the engine and the workloads to draw flows from.
#[derive(Debug)]
pub struct Synthetic {
    pub engine: Engine,
    pub workloads: Vec<Resolved>,
    pub ports: Vec<u16>,
}

const PORTS: [u16; 4] = [80, 443, 8080, 9090];

/// Builds `workloads` workloads in `workloads / 100` namespaces (at least
/// one), each labelled `app`, `tier`, `team`, with ports, and `policies`
/// policies of both kinds selecting by `app` or `tier`, with peers by
/// workload, namespace and CIDR, numeric, named and ranged ports.
pub fn synthetic(workloads: usize, policies: usize, seed: u64) -> Synthetic {
    let mut rng = Rng::new(seed);
    let namespaces = (workloads / 100).max(1);
    let apps = (workloads / 4).max(1);
    let mut world = World::new();
    let mut ids = Vec::with_capacity(workloads);
    for i in 0..workloads {
        let ns = format!("ns{}", i % namespaces);
        let labels: Labels = [
            ("app".to_string(), format!("app{}", rng.below(apps))),
            ("tier".to_string(), format!("tier{}", rng.below(5))),
            ("team".to_string(), format!("team{}", rng.below(20))),
        ]
        .into();
        let ports: Vec<NamedPort> = PORTS
            .iter()
            .enumerate()
            .map(|(j, &p)| NamedPort {
                name: Some(format!("p{j}")),
                port: p,
                protocol: Protocol::Tcp,
            })
            .collect();
        let ip = std::net::Ipv4Addr::from(0xC613_0000u32 + i as u32).into();
        if let Ok(id) = world.add_workload(&ns, &format!("w{i}"), &labels, &ports, Some(ip)) {
            ids.push(Resolved::Workload(id));
        }
    }
    for n in 0..namespaces {
        let labels: Labels = [(
            "env".to_string(),
            ["prod", "dev", "stage"][n % 3].to_string(),
        )]
        .into();
        let _ = world.add_namespace(&format!("ns{n}"), &labels);
    }
    let mut rules = Vec::with_capacity(policies);
    for i in 0..policies {
        let ns = format!("ns{}", rng.below(namespaces));
        let selector = if rng.below(4) == 0 {
            sel("tier", format!("tier{}", rng.below(5)))
        } else {
            sel("app", format!("app{}", rng.below(apps)))
        };
        let rule_set = |rng: &mut Rng| -> Vec<Rule> {
            (0..1 + rng.below(3))
                .map(|_| {
                    let peer = match rng.below(5) {
                        0 => Peer::Select {
                            namespaces: Namespaces::Matching(sel("env", "prod".to_string())),
                            workloads: None,
                        },
                        1 => Peer::Cidr {
                            cidr: "198.19.0.0/16".parse().unwrap_or_else(|_| unreachable!()),
                            except: Vec::new(),
                        },
                        2 => Peer::Select {
                            namespaces: Namespaces::Same(ns.clone()),
                            workloads: Some(LabelSelector {
                                match_labels: BTreeMap::new(),
                                match_expressions: vec![Requirement {
                                    key: "team".to_string(),
                                    operator: Operator::In,
                                    values: vec![
                                        format!("team{}", rng.below(20)),
                                        format!("team{}", rng.below(20)),
                                    ],
                                }],
                            }),
                        },
                        _ => Peer::Select {
                            namespaces: Namespaces::Same(ns.clone()),
                            workloads: Some(sel("app", format!("app{}", rng.below(apps)))),
                        },
                    };
                    let port = match rng.below(3) {
                        0 => PolicyPort {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Number(PORTS[rng.below(4)])),
                            end_port: None,
                        },
                        1 => PolicyPort {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Name(format!("p{}", rng.below(4)))),
                            end_port: None,
                        },
                        _ => PolicyPort {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Number(8000)),
                            end_port: Some(9100),
                        },
                    };
                    Rule {
                        peers: vec![peer],
                        ports: vec![port],
                        http: None,
                    }
                })
                .collect()
        };
        let ingress = Some(rule_set(&mut rng));
        let egress = if rng.below(3) == 0 {
            Some(rule_set(&mut rng))
        } else {
            None
        };
        rules.push(PolicyRule {
            id: PolicyRef {
                namespace: ns.clone(),
                name: format!("p{i}"),
                kind: if i % 2 == 0 {
                    PolicyKind::Policy
                } else {
                    PolicyKind::NetworkPolicy
                },
            },
            mode: if rng.below(10) == 0 {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            selector,
            ingress,
            egress,
        });
    }
    let engine = Engine::new(rules, world, DefaultPolicy::IsolateSelected);
    Synthetic {
        engine,
        workloads: ids,
        ports: PORTS.to_vec(),
    }
}

fn sel(key: &str, value: String) -> LabelSelector {
    LabelSelector {
        match_labels: [(key.to_string(), value)].into(),
        match_expressions: Vec::new(),
    }
}
