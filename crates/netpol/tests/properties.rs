//! Property tests: the indexed engine against a plain reference reading of
//! the semantics, order independence, and the two cluster defaults.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use std::net::IpAddr;

use proptest::prelude::*;
use skiff_api::meta::{Labels, NAMESPACE_NAME_LABEL};
use skiff_api::net::{Cidr, PortRef, Protocol};
use skiff_api::policy::{DefaultPolicy, Mode, PolicyPort};
use skiff_api::policytest::{Endpoint, NamedPort};
use skiff_api::selector::{LabelSelector, Operator, Requirement};
use skiff_netpol::model::{Namespaces, Peer, PolicyKind, PolicyRef, Rule};
use skiff_netpol::{Decision, Engine, Flow, PolicyRule, World};

const NS: [&str; 3] = ["n0", "n1", "n2"];

#[derive(Debug, Clone)]
struct Workload {
    ns: usize,
    labels: Labels,
    ip: IpAddr,
}

fn ns_labels(i: usize) -> Labels {
    [
        (NAMESPACE_NAME_LABEL.to_string(), NS[i].to_string()),
        (
            "env".to_string(),
            if i == 0 { "prod" } else { "dev" }.to_string(),
        ),
    ]
    .into()
}

fn ports() -> Vec<NamedPort> {
    vec![
        NamedPort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Tcp,
        },
        NamedPort {
            name: Some("dns".into()),
            port: 53,
            protocol: Protocol::Udp,
        },
    ]
}

fn labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        prop::sample::select(vec!["app", "tier"]),
        prop::sample::select(vec!["a", "b", "c"]),
        0..=2,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    let expr = (
        prop::sample::select(vec!["app", "tier", "env"]),
        prop::sample::select(vec![
            Operator::In,
            Operator::NotIn,
            Operator::Exists,
            Operator::DoesNotExist,
        ]),
        prop::collection::vec(prop::sample::select(vec!["a", "b", "prod"]), 1..=2),
    )
        .prop_map(|(key, operator, values)| Requirement {
            key: key.to_string(),
            operator,
            values: if matches!(operator, Operator::In | Operator::NotIn) {
                values.into_iter().map(String::from).collect()
            } else {
                vec![]
            },
        });
    (labels(), prop::collection::vec(expr, 0..=1)).prop_map(|(match_labels, match_expressions)| {
        LabelSelector {
            match_labels,
            match_expressions,
        }
    })
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        (
            prop::option::of(selector()),
            prop::option::of(selector()),
            0..3usize
        )
            .prop_map(|(ns, workloads, own)| Peer::Select {
                namespaces: match ns {
                    Some(sel) => Namespaces::Matching(sel),
                    None => Namespaces::Same(NS[own].to_string()),
                },
                workloads,
            }),
        (0u8..4, prop::bool::ANY).prop_map(|(third, except)| Peer::Cidr {
            cidr: format!("198.19.{third}.0/24").parse().unwrap(),
            except: if except {
                vec![format!("198.19.{third}.0/30").parse::<Cidr>().unwrap()]
            } else {
                vec![]
            },
        }),
    ]
}

fn port() -> impl Strategy<Value = PolicyPort> {
    let proto = prop::sample::select(vec![Protocol::Tcp, Protocol::Udp]);
    (proto, 0..5u8).prop_map(|(protocol, kind)| match kind {
        0 => PolicyPort {
            protocol,
            port: None,
            end_port: None,
        },
        1 => PolicyPort {
            protocol,
            port: Some(PortRef::Number(80)),
            end_port: None,
        },
        2 => PolicyPort {
            protocol,
            port: Some(PortRef::Number(50)),
            end_port: Some(81),
        },
        3 => PolicyPort {
            protocol,
            port: Some(PortRef::Name("http".into())),
            end_port: None,
        },
        _ => PolicyPort {
            protocol,
            port: Some(PortRef::Name("dns".into())),
            end_port: None,
        },
    })
}

fn rules() -> impl Strategy<Value = Option<Vec<Rule>>> {
    let rule = (
        prop::collection::vec(peer(), 0..=2),
        prop::collection::vec(port(), 0..=2),
    )
        .prop_map(|(peers, ports)| Rule {
            peers,
            ports,
            http: None,
        });
    prop::option::of(prop::collection::vec(rule, 0..=2))
}

fn policies() -> impl Strategy<Value = Vec<PolicyRule>> {
    let policy = (
        0..3usize,
        selector(),
        rules(),
        rules(),
        prop::bool::weighted(0.2),
        prop::bool::ANY,
    );
    prop::collection::vec(policy, 0..=5).prop_map(|ps| {
        ps.into_iter()
            .enumerate()
            .map(
                |(i, (ns, selector, ingress, egress, audit, k8s))| PolicyRule {
                    id: PolicyRef {
                        namespace: NS[ns].to_string(),
                        name: format!("p{i}"),
                        kind: if k8s {
                            PolicyKind::NetworkPolicy
                        } else {
                            PolicyKind::Policy
                        },
                    },
                    mode: if audit { Mode::Audit } else { Mode::Enforce },
                    selector,
                    ingress,
                    egress,
                },
            )
            .collect()
    })
}

fn workloads() -> impl Strategy<Value = Vec<Workload>> {
    prop::collection::vec((0..3usize, labels()), 2..=6).prop_map(|ws| {
        ws.into_iter()
            .enumerate()
            .map(|(i, (ns, labels))| Workload {
                ns,
                labels,
                ip: std::net::Ipv4Addr::new(198, 19, (i % 4) as u8, i as u8).into(),
            })
            .collect()
    })
}

fn endpoint(count: usize) -> impl Strategy<Value = usize> {
    // Index `count` stands for an outside address.
    0..=count
}

fn build(ws: &[Workload], ps: &[PolicyRule], default: DefaultPolicy) -> Engine {
    let mut world = World::new();
    for (i, ns) in NS.iter().enumerate() {
        world.add_namespace(ns, &ns_labels(i)).unwrap();
    }
    for (i, w) in ws.iter().enumerate() {
        world
            .add_workload(NS[w.ns], &format!("w{i}"), &w.labels, &ports(), Some(w.ip))
            .unwrap();
    }
    Engine::new(ps.to_vec(), world, default)
}

fn end_of(ws: &[Workload], i: usize) -> Endpoint {
    if i == ws.len() {
        Endpoint::Address("198.19.1.77".parse().unwrap())
    } else {
        Endpoint::Workload {
            namespace: NS[ws[i].ns].to_string(),
            name: format!("w{i}"),
        }
    }
}

/// The literal reading of the semantics, for a flow between generated endpoints.
fn reference(engine: &Engine, ps: &[PolicyRule], default: DefaultPolicy, flow: &Flow) -> Decision {
    let (from, to) = (
        engine.resolve(&flow.from).unwrap(),
        engine.resolve(&flow.to).unwrap(),
    );
    skiff_netpol::reference::decide(
        ps,
        engine.world(),
        default,
        from,
        to,
        flow.port,
        flow.protocol,
    )
}

fn flows() -> impl Strategy<Value = Vec<(usize, usize, u16, Protocol)>> {
    prop::collection::vec(
        (
            endpoint(6),
            endpoint(6),
            prop::sample::select(vec![53u16, 80, 81, 443]),
            prop::sample::select(vec![Protocol::Tcp, Protocol::Udp]),
        ),
        1..20,
    )
}

fn default_policy() -> impl Strategy<Value = DefaultPolicy> {
    prop::sample::select(vec![DefaultPolicy::IsolateSelected, DefaultPolicy::DenyAll])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The engine decides exactly as the literal reading of the semantics.
    #[test]
    fn engine_equals_reference(ws in workloads(), ps in policies(), fs in flows(), default in default_policy()) {
        let engine = build(&ws, &ps, default);
        for (from, to, port, protocol) in fs {
            let (from, to) = (from.min(ws.len()), to.min(ws.len()));
            let flow = Flow { from: end_of(&ws, from), to: end_of(&ws, to), port, protocol };
            let got = engine.evaluate(&flow).unwrap().decision;
            let want = reference(&engine, &ps, default, &flow);
            prop_assert_eq!(got, want, "{:?}: {}", flow, engine.reason(&flow, &engine.evaluate(&flow).unwrap()));
        }
    }

    /// Policy order changes nothing: not the decision, not the reason.
    #[test]
    fn order_independent(ws in workloads(), ps in policies(), fs in flows(), default in default_policy(), seed in any::<u64>()) {
        let engine = build(&ws, &ps, default);
        let mut shuffled = ps.clone();
        // A deterministic shuffle from the seed.
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let other = build(&ws, &shuffled, default);
        for (from, to, port, protocol) in fs {
            let flow = Flow { from: end_of(&ws, from.min(ws.len())), to: end_of(&ws, to.min(ws.len())), port, protocol };
            let (a, b) = (engine.evaluate(&flow).unwrap(), other.evaluate(&flow).unwrap());
            prop_assert_eq!(a.decision, b.decision);
            prop_assert_eq!(engine.reason(&flow, &a), other.reason(&flow, &b));
        }
    }

    /// Under isolate-selected, workloads no policy selects are reachable.
    #[test]
    fn unselected_is_reachable(ws in workloads(), ps in policies(), port in prop::sample::select(vec![80u16, 443]), protocol in prop::sample::select(vec![Protocol::Tcp, Protocol::Udp])) {
        let engine = build(&ws, &ps, DefaultPolicy::IsolateSelected);
        let selected = |w: &Workload| ps.iter().any(|p| p.id.namespace == NS[w.ns] && p.selector.matches(&w.labels));
        for (i, a) in ws.iter().enumerate() {
            for (j, b) in ws.iter().enumerate() {
                if !selected(a) && !selected(b) {
                    let flow = Flow { from: end_of(&ws, i), to: end_of(&ws, j), port, protocol };
                    prop_assert_eq!(engine.evaluate(&flow).unwrap().decision, Decision::Allow);
                }
            }
        }
    }

    /// Under deny-all, a flow passes only if a rule on each workload side allows it.
    #[test]
    fn deny_all_denies_what_nothing_allows(ws in workloads(), ps in policies(), fs in flows()) {
        let engine = build(&ws, &ps, DefaultPolicy::DenyAll);
        let no_rules: Vec<PolicyRule> = ps.iter().cloned().map(|mut p| { p.ingress = p.ingress.map(|_| vec![]); p.egress = p.egress.map(|_| vec![]); p }).collect();
        let closed = build(&ws, &no_rules, DefaultPolicy::DenyAll);
        for (from, to, port, protocol) in fs {
            let (from, to) = (from.min(ws.len()), to.min(ws.len()));
            let flow = Flow { from: end_of(&ws, from), to: end_of(&ws, to), port, protocol };
            let v = engine.evaluate(&flow).unwrap();
            if v.decision != Decision::Deny {
                for side in [v.egress.enforced, v.ingress.enforced] {
                    prop_assert!(matches!(side, skiff_netpol::Outcome::Allowed { .. } | skiff_netpol::Outcome::External), "{:?}", side);
                }
            }
            // With every rule removed, nothing between workloads passes.
            if from < ws.len() || to < ws.len() {
                prop_assert_eq!(closed.evaluate(&flow).unwrap().decision, Decision::Deny);
            }
        }
    }
}
