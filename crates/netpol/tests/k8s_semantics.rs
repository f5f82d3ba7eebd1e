//! Kubernetes NetworkPolicy semantics, case by case.
//!
//! The cases are written from the behaviour described by the Kubernetes
//! e2e suite `test/e2e/network/netpol/network_policy.go` (its truth-table
//! model: namespaces x, y, z; pods a, b, c labelled `pod: <name>`; ports 80
//! and 81 over TCP and UDP, named `serve-80-tcp` etc.) and by the
//! "Network Policies" concept page of the Kubernetes documentation. Each
//! test names its source. As in the e2e suite, a pod talking to itself is
//! not judged (loopback semantics differ between implementations).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use skiff_api::load_str;
use skiff_api::meta::Labels;
use skiff_api::net::Protocol;
use skiff_api::policy::DefaultPolicy;
use skiff_api::policytest::{Endpoint, NamedPort};
use skiff_netpol::suite::policies;
use skiff_netpol::{Decision, Engine, Flow, World};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn ip_of(ns: usize, pod: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(198, 19, ns as u8 + 1, pod as u8 + 10).into()
}

/// The e2e model with `yaml` (NetworkPolicies, namespace x unless set) applied.
fn model(yaml: &str) -> Engine {
    let loaded = load_str("case.yaml", yaml).unwrap_or_else(|e| panic!("{e:?}"));
    let mut world = World::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        world
            .add_namespace(ns, &[("ns".to_string(), ns.to_string())].into())
            .unwrap();
        for (p, pod) in PODS.iter().enumerate() {
            let labels: Labels = [("pod".to_string(), pod.to_string())].into();
            let ports: Vec<NamedPort> = [80, 81]
                .iter()
                .flat_map(|&port| {
                    [Protocol::Tcp, Protocol::Udp].map(|protocol| NamedPort {
                        name: Some(format!("serve-{port}-{}", protocol.as_str().to_lowercase())),
                        port,
                        protocol,
                    })
                })
                .collect();
            world
                .add_workload(ns, pod, &labels, &ports, Some(ip_of(n, p)))
                .unwrap();
        }
    }
    Engine::new(policies(&loaded), world, DefaultPolicy::IsolateSelected)
}

/// Checks every pair of distinct pods against `expect(from, to)`, where
/// pods are written `x/a`. Reports all mismatches at once.
fn check(engine: &Engine, port: u16, protocol: Protocol, expect: impl Fn(&str, &str) -> bool) {
    let mut wrong = Vec::new();
    for from_ns in NAMESPACES {
        for from_pod in PODS {
            for to_ns in NAMESPACES {
                for to_pod in PODS {
                    let (from, to) = (format!("{from_ns}/{from_pod}"), format!("{to_ns}/{to_pod}"));
                    if from == to {
                        continue;
                    }
                    let flow = Flow {
                        from: from.parse().unwrap(),
                        to: to.parse().unwrap(),
                        port,
                        protocol,
                    };
                    let v = engine.evaluate(&flow).unwrap();
                    let allowed = v.decision != Decision::Deny;
                    if allowed != expect(&from, &to) {
                        wrong.push(format!(
                            "{from} -> {to} {port}/{protocol}: got {}: {}",
                            v.decision.as_str(),
                            engine.reason(&flow, &v)
                        ));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} mismatches:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

fn ns(pod: &str) -> &str {
    pod.split('/').next().unwrap()
}

// e2e: "should support a 'default-deny-ingress' policy"
#[test]
fn default_deny_ingress() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-ingress, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
    );
    check(&e, 80, Protocol::Tcp, |_, to| ns(to) != "x");
}

// e2e: "should support a 'default-deny-all' policy"
#[test]
fn default_deny_all() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        ns(to) != "x" && ns(from) != "x"
    });
}

// e2e: "should enforce policy to allow traffic from pods within server namespace based on PodSelector"
#[test]
fn pod_selector_is_namespace_local() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x-a-allows-x-b, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        to != "x/a" || from == "x/b"
    });
}

// e2e: "should enforce policy to allow ingress traffic for a target"
// (a namespace-wide deny plus an allow-all for one pod: policies are additive)
#[test]
fn allow_policy_adds_to_default_deny() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all-to-a, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {}, namespaceSelector: {}}]\n",
    );
    check(&e, 80, Protocol::Tcp, |_, to| ns(to) != "x" || to == "x/a");
}

// e2e: "should enforce policy to allow ingress traffic from pods in all namespaces"
#[test]
fn empty_namespace_selector_matches_all_namespaces() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-from-another-ns, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n",
    );
    check(&e, 80, Protocol::Tcp, |_, _| true);
}

// e2e: "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector"
// docs: every namespace carries the label kubernetes.io/metadata.name.
#[test]
fn namespace_selector_with_implicit_name_label() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        to != "x/a" || ns(from) == "y"
    });
}

// e2e: "should enforce policy based on PodSelector or NamespaceSelector" (peers are OR'ed)
#[test]
fn peers_are_ored() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}\n    - podSelector: {matchLabels: {pod: b}}\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        to != "x/a" || ns(from) != "x" || from == "x/b"
    });
}

// e2e: "should enforce policy based on PodSelector and NamespaceSelector" (selectors in one peer are AND'ed)
#[test]
fn selectors_in_one_peer_are_anded() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}\n      podSelector: {matchLabels: {pod: b}}\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        to != "x/a" || from == "y/b" || from == "z/b"
    });
}

// e2e: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors"
#[test]
fn match_expressions_in_both_selectors() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}\n      podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        to != "x/a" || (ns(from) != "x" && !from.ends_with("/a"))
    });
}

// e2e: "should enforce policy based on Ports" (only 81 allowed)
#[test]
fn numeric_port_restricts() {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81}]\n";
    let e = model(yaml);
    check(&e, 80, Protocol::Tcp, |_, to| to != "x/a");
    check(&e, 81, Protocol::Tcp, |_, _| true);
    // The protocol defaults to TCP: UDP 81 is not allowed.
    check(&e, 81, Protocol::Udp, |_, to| to != "x/a");
}

// e2e: "should allow ingress access on one named port"
#[test]
fn named_port_resolves_against_destination() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: serve-80-tcp}]\n",
    );
    check(&e, 80, Protocol::Tcp, |_, _| true);
    check(&e, 81, Protocol::Tcp, |_, to| ns(to) != "x");
    // The name includes its protocol: UDP 80 is a different port.
    check(&e, 80, Protocol::Udp, |_, to| ns(to) != "x");
}

// e2e: "should allow egress access on one named port" (the name resolves
// against the destination pod, not the policy's pod)
#[test]
fn egress_named_port_resolves_against_destination() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: serve-81-udp, protocol: UDP}]\n",
    );
    check(&e, 81, Protocol::Udp, |_, _| true);
    check(&e, 80, Protocol::Udp, |from, _| from != "x/a");
    check(&e, 81, Protocol::Tcp, |from, _| from != "x/a");
}

// e2e: "should not allow access by TCP when a policy specifies only UDP"
#[test]
fn protocol_must_match() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81, protocol: UDP}]\n",
    );
    check(&e, 81, Protocol::Tcp, |_, to| to != "x/a");
    check(&e, 81, Protocol::Udp, |_, _| true);
}

// e2e: "should enforce ingress policy allowing any port traffic to a server on a specific protocol"
#[test]
fn protocol_without_port_allows_every_port() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{protocol: TCP}]\n",
    );
    check(&e, 80, Protocol::Tcp, |_, _| true);
    check(&e, 81, Protocol::Tcp, |_, _| true);
    check(&e, 80, Protocol::Udp, |_, to| to != "x/a");
}

// docs (NetworkPolicy API, endPort): "port" through "endPort" inclusive.
#[test]
fn end_port_range_is_inclusive() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 80, endPort: 81}]\n",
    );
    check(&e, 80, Protocol::Tcp, |_, _| true);
    check(&e, 81, Protocol::Tcp, |_, _| true);
    check(&e, 82, Protocol::Tcp, |_, to| to != "x/a");
    check(&e, 79, Protocol::Tcp, |_, to| to != "x/a");
}

// docs: `ingress: [{}]` allows everything, `ingress: []` (with policyTypes) nothing.
#[test]
fn empty_rule_allows_all_but_empty_list_denies_all() {
    let allow = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n",
    );
    check(&allow, 80, Protocol::Tcp, |_, _| true);
    let deny = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: []\n",
    );
    check(&deny, 80, Protocol::Tcp, |_, to| ns(to) != "x");
}

// docs: "If no policyTypes are specified ... Ingress will always be set and
// Egress will be set if the NetworkPolicy has any egress rules": an
// egress-only policy without policyTypes also isolates ingress.
#[test]
fn policy_types_default_includes_ingress() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        to != "x/a" && (from != "x/a" || ns(to) == "y")
    });
}

// e2e: "should support denying of egress traffic on the client side (even if
// the server explicitly allows this traffic)": egress AND ingress.
#[test]
fn egress_deny_wins_over_ingress_allow() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-deny, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-allow, namespace: y}\nspec:\n  podSelector: {}\n  ingress: [{}]\n",
    );
    check(&e, 80, Protocol::Tcp, |from, _| from != "x/a");
}

// e2e: "should enforce multiple, stacked policies with overlapping podSelectors"
#[test]
fn stacked_policies_are_additive() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-b, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-c, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        ns(to) != "x" || from == "x/b" && to == "x/a" || from == "x/c"
    });
}

// e2e: "should enforce except clause while egress access to server in CIDR block"
#[test]
fn ip_block_except() {
    // y's pods are 198.19.2.10-12; except y/b (198.19.2.11).
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 198.19.2.0/24, except: [198.19.2.11/32]}}]\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        from != "x/a" || (ns(to) == "y" && to != "y/b")
    });
}

// e2e: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed"
// (another peer may still allow what one peer's except removes)
#[test]
fn except_of_one_peer_does_not_veto_another() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 198.19.2.0/24, except: [198.19.2.11/32]}\n    - ipBlock: {cidr: 198.19.2.11/32}\n",
    );
    check(&e, 80, Protocol::Tcp, |from, to| {
        from != "x/a" || ns(to) == "y"
    });
}

// docs: policies only select pods in their own namespace; y-to-y is untouched.
#[test]
fn policy_selects_only_its_namespace() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: []\n",
    );
    check(&e, 80, Protocol::Tcp, |_, to| to != "y/a");
}

// The native kind means the same as its Kubernetes twin.
#[test]
fn native_policy_matches_network_policy() {
    let k8s = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n    - podSelector: {matchLabels: {pod: c}}\n    ports: [{port: serve-80-tcp}, {port: 81, endPort: 82}]\n  egress:\n  - to: [{ipBlock: {cidr: 198.19.3.0/24, except: [198.19.3.10/32]}}]\n",
    );
    let native = model(
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaces: {matchLabels: {ns: y}}\n      workloads: {matchLabels: {pod: b}}\n    - workloads: {matchLabels: {pod: c}}\n    ports: [{port: serve-80-tcp}, {port: 81, endPort: 82}]\n  egress:\n  - to: [{cidr: 198.19.3.0/24, except: [198.19.3.10/32]}]\n",
    );
    for port in [80, 81, 82] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            check(&native, port, protocol, |from, to| {
                let flow = Flow {
                    from: from.parse().unwrap(),
                    to: to.parse().unwrap(),
                    port,
                    protocol,
                };
                k8s.evaluate(&flow).unwrap().decision != Decision::Deny
            });
        }
    }
}

// An outside address has no policy of its own: only the workload side counts.
#[test]
fn outside_addresses_match_only_ip_blocks() {
    let e = model(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {}}, {ipBlock: {cidr: 192.0.2.0/24}}]\n",
    );
    let outside = |ip: &str, to: &str| {
        let flow = Flow {
            from: Endpoint::Address(ip.parse().unwrap()),
            to: to.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        e.evaluate(&flow).unwrap().decision
    };
    assert_eq!(outside("192.0.2.1", "x/a"), Decision::Allow);
    assert_eq!(outside("203.0.113.1", "x/a"), Decision::Deny);
    assert_eq!(outside("203.0.113.1", "x/b"), Decision::Allow);
}
