//! Decoding every kind: what valid files mean and how invalid ones are reported.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use proptest::prelude::*;
use skiff_api::policy::{DefaultPolicy, Mode, Peer};
use skiff_api::service::{Check, IntOrPercent, Rollout, ScaleMetric};
use skiff_api::{Resource, load_paths, load_str};

/// The messages of every error, as `line:col: field: message`.
fn errors(src: &str) -> Vec<String> {
    match load_str("t.yaml", src) {
        Ok(_) => vec![],
        Err(errs) => errs
            .iter()
            .map(|e| format!("{}:{}: {}: {}", e.line, e.col, e.field, e.message))
            .collect(),
    }
}

fn assert_error(src: &str, want: &str) {
    let errs = errors(src);
    assert!(
        errs.iter().any(|e| e.contains(want)),
        "no error containing {want:?} in {errs:#?}"
    );
}

fn one(src: &str) -> Resource {
    let mut l = load_str("t.yaml", src).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(l.len(), 1);
    l.remove(0).resource
}

#[test]
fn reference_example_means_what_it_says() {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/reference.yaml");
    let report = load_paths(&[root]);
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    let Resource::Service(svc) = &report.resources[0].resource else {
        panic!()
    };
    let s = &svc.spec;
    assert_eq!(svc.namespace(), "reference");
    assert_eq!(s.replicas, 3);
    assert_eq!(s.resources.requests["cpu"].milli(), 250);
    assert_eq!(s.resources.limits["memory"].units_ceil(), 256 << 20);
    assert_eq!(s.ports[1].port, 9100);
    let readiness = s.health.readiness.as_ref().unwrap();
    assert!(matches!(&readiness.check, Check::Http { path, .. } if path == "/ready"));
    assert_eq!(readiness.period.0.as_secs(), 2);
    assert_eq!(s.placement.spread[0].max_skew, 1);
    assert_eq!(s.placement.priority, 100);
    let Rollout::Canary { steps, analysis } = &s.rollout else {
        panic!()
    };
    assert_eq!(
        steps.iter().map(|s| s.weight).collect::<Vec<_>>(),
        [5, 25, 50]
    );
    assert_eq!(steps[0].pause.0.as_secs(), 120);
    assert_eq!(analysis.p99_latency.unwrap().0.as_millis(), 300);
    assert_eq!(s.autoscale.as_ref().unwrap().metric, ScaleMetric::Rps);
    let Resource::Service(catalog) = &report.resources[1].resource else {
        panic!()
    };
    assert_eq!(catalog.spec.replicas, 1);
    assert!(matches!(
        catalog.spec.rollout,
        Rollout::Rolling {
            max_surge: IntOrPercent::Percent(25),
            max_unavailable: IntOrPercent::Int(0)
        }
    ));
    let kinds: Vec<&str> = report.resources.iter().map(|l| l.resource.kind()).collect();
    assert_eq!(
        kinds,
        [
            "Service",
            "Service",
            "Route",
            "Node",
            "Instance",
            "Namespace"
        ]
    );
}

#[test]
fn service_defaults_are_explicit() {
    let Resource::Service(s) = one(
        "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  run: {command: /bin/a}\n",
    ) else {
        panic!()
    };
    assert_eq!(s.namespace(), "default");
    assert_eq!(s.spec.replicas, 1);
    assert!(s.spec.autoscale.is_none());
    assert!(matches!(s.spec.rollout, Rollout::Rolling { .. }));
}

#[test]
fn service_mistakes_are_each_reported() {
    let src = "apiVersion: skiff.dev/v1
kind: Service
metadata: {name: a}
spec:
  replicas: 50
  run: {command: ''}
  resources:
    requests: {cpu: 2, memory: 1Gi}
    limits: {cpu: 500m}
  ports:
    - {name: http, port: 80}
    - {name: http, port: 81}
  health:
    readiness: {http: {port: metrics}, tcp: {port: 80}}
    liveness: {http: {port: nope}}
  rollout:
    rolling: {maxSurge: 0, maxUnavailable: 0%}
  autoscale: {min: 2, max: 10, metric: memory, target: 0}
";
    let errs = errors(src);
    let want = [
        "6:18: spec.run.command: command must not be empty",
        "9:13: spec.resources.limits: cpu limit 500m is below its request 2",
        "11:5: spec.ports: port 81 (http) is listed twice",
        "14:16: spec.health.readiness: a probe needs exactly one of `http`, `tcp` or `command`",
        "14:5: spec.health: liveness probe names port `nope`, which is not in `ports`",
        "17:44: spec.rollout.rolling.maxUnavailable: maxSurge and maxUnavailable cannot both be 0",
        "18:40: spec.autoscale.metric: expected one of rps, cpu, found \"memory\"",
        "18:56: spec.autoscale.target: target must be positive",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.starts_with(w)),
            "no error starting {w:?} in {errs:#?}"
        );
    }
}

#[test]
fn canary_steps_must_increase() {
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  run: {command: a}\n  rollout:\n    canary:\n      steps: [{weight: 50}, {weight: 10}]\n      analysis: {successRate: 99}\n",
        "increasing weights",
    );
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  run: {command: a}\n  rollout: {rolling: {}, canary: {}}\n",
        "exactly one of `rolling` or `canary`",
    );
}

#[test]
fn durations_and_quantities_need_units() {
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  run: {command: a}\n  health: {readiness: {tcp: {port: 1}, period: 10}}\n",
        "a duration needs a unit: write 10s or 10ms",
    );
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  run: {command: a}\n  resources: {requests: {memory: 1.5Xi}}\n",
        "invalid quantity",
    );
}

#[test]
fn native_policy_rules() {
    let Resource::Policy(p) = one(
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {}\n  mode: audit\n  ingress:\n  - from: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}, {namespaces: {}}]\n    http: {methods: [GET], paths: [/api/*]}\n",
    ) else {
        panic!()
    };
    assert_eq!(p.spec.mode, Mode::Audit);
    assert!(p.spec.egress.is_none());
    let rules = p.spec.ingress.as_ref().unwrap();
    assert!(matches!(&rules[0].peers()[0], Peer::Cidr { except, .. } if except.len() == 1));
    assert_eq!(rules[0].http.as_ref().unwrap().paths, ["/api/*"]);
}

#[test]
fn native_policy_mistakes() {
    let src = "apiVersion: skiff.dev/v1
kind: Policy
metadata: {name: p}
spec:
  selector: {matchExpressions: [{key: app, operator: In}]}
  ingress:
    - from: [{}, {cidr: 10.0.0.1/8}, {cidr: 10.0.0.0/8, workloads: {}}, {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]
      ports: [{port: http, endPort: 90}, {port: 90, endPort: 80}, {protocol: ICMP}]
      http: {methods: [FETCH], paths: [api, /a*b]}
";
    let errs = errors(src);
    let want = [
        "spec.selector.matchExpressions[0].values: operator In needs at least one value",
        "spec.ingress[0].from[0]: a peer needs `workloads`, `namespaces` or `cidr`",
        "spec.ingress[0].from[1].cidr: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
        "spec.ingress[0].from[2].cidr: `cidr` cannot be combined with `workloads` or `namespaces`",
        "spec.ingress[0].from[3].except: except 11.0.0.0/16 must be a strict subnet of 10.0.0.0/8",
        "spec.ingress[0].ports[0].endPort: endPort cannot be used with a named port",
        "spec.ingress[0].ports[1].endPort: endPort 80 is below port 90",
        "spec.ingress[0].ports[2].protocol: expected one of TCP, UDP, SCTP, found \"ICMP\"",
        "spec.ingress[0].http.methods: unknown HTTP method `FETCH`",
        "spec.ingress[0].http.paths: path `api` must start with '/'",
        "spec.ingress[0].http.paths: path `/a*b` must start with '/'",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.contains(w)),
            "no error containing {w:?} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: p}\nspec: {selector: {}}\n",
        "a policy must govern `ingress`, `egress` or both",
    );
}

#[test]
fn network_policy_full_schema() {
    let Resource::NetworkPolicy(p) = one("apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
        - namespaceSelector: {matchLabels: {project: myproject}}
        - podSelector: {matchLabels: {role: frontend}}
      ports: [{protocol: TCP, port: 6379}]
  egress:
    - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
      ports: [{protocol: SCTP, port: 32000, endPort: 32768}]
")
    else {
        panic!()
    };
    assert_eq!(p.spec.effective_policy_types(), (true, true));
    assert_eq!(p.spec.ingress[0].peers().len(), 3);
    assert_eq!(p.spec.egress[0].ports[0].end_port, Some(32768));
    assert_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n",
        "ipBlock cannot be combined with podSelector or namespaceSelector",
    );
    assert_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  policyTypes: [ingress]\n",
        "expected one of Ingress, Egress",
    );
    // The Kubernetes kind has no L7 section.
    assert_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress: [{http: {}}]\n",
        "unknown field `http`",
    );
    assert_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {ingress: []}\n",
        "missing required field `podSelector`",
    );
}

#[test]
fn envelope_mistakes() {
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Deployment\nmetadata: {name: a}\nspec: {}\n",
        "unknown kind `Deployment`; expected one of Service",
    );
    assert_error(
        "apiVersion: skiff.dev/v2\nkind: Policy\nmetadata: {name: a}\nspec: {selector: {}, ingress: []}\n",
        "kind Policy has apiVersion skiff.dev/v1, found `skiff.dev/v2`",
    );
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: PolicyTest\nmetadata: {name: a, namespace: x}\nspec: {}\n",
        "PolicyTest is not namespaced",
    );
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: a}\nspec: {selector: {}, ingress: []}\nstatus: {}\n",
        "Policy has no `status`",
    );
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: Bad_Name}\nspec: {selector: {}, ingress: []}\n",
        "`Bad_Name` is not a valid name",
    );
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: a, labels: {\"bad key\": x}}\nspec: {selector: {}, ingress: []}\n",
        "invalid label key `bad key`",
    );
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Policy\nkind: Policy\nmetadata: {name: a}\nspec: {selector: {}, ingress: []}\n",
        "field `kind` appears twice",
    );
    assert_error("- a\n- b\n", "expected a mapping, found a list");
    assert_error("a: [1, 2\n", "invalid YAML");
}

#[test]
fn policy_test_cases_name_declared_workloads() {
    let errs = errors(
        "apiVersion: skiff.dev/v1
kind: PolicyTest
metadata: {name: t}
spec:
  policyDefault: deny-all
  workloads:
    - {name: shop/web, labels: {app: web}}
    - {name: web, labels: {app: web}}
  cases:
    - {from: shop/web, to: shop/ghost, port: 80, expect: allow}
    - {from: shop/web, to: 10.0.0.1, port: 0, expect: maybe}
",
    );
    let want = [
        "8:14: spec.workloads[1].name: expected `namespace/name`, found \"web\"",
        "11:44: spec.cases[1].port: expected an integer from 1 to 65535, found \"0\"",
        "11:55: spec.cases[1].expect: expected one of allow, deny, audit-denied, found \"maybe\"",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.starts_with(w)),
            "no error starting {w:?} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: PolicyTest\nmetadata: {name: t}\nspec:\n  workloads: [{name: shop/web}]\n  cases: [{from: shop/web, to: shop/ghost, port: 80, expect: allow}]\n",
        "6:32: spec.cases[0].to: workload shop/ghost is not declared under `workloads`",
    );
    let Resource::PolicyTest(t) = one(
        "apiVersion: skiff.dev/v1\nkind: PolicyTest\nmetadata: {name: t}\nspec: {policyDefault: deny-all}\n",
    ) else {
        panic!()
    };
    assert_eq!(t.spec.policy_default, DefaultPolicy::DenyAll);
}

#[test]
fn json_documents_have_positions_too() {
    let l = load_str("t.json", r#"[{"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": "a"}, "spec": {"selector": {}, "ingress": []}},
 {"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": "b"}, "spec": {"selector": {}, "egress": []}}]"#)
    .unwrap();
    assert_eq!(l.len(), 2);
    let errs = load_str("t.json", "{\"apiVersion\": \"skiff.dev/v1\", \"kind\": \"Policy\",\n \"metadata\": {\"name\": \"a\"}, \"spec\": {\"selector\": {}, \"ingres\": []}}").unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "t.json:2:54: spec.ingres: unknown field `ingres`; did you mean `ingress`?"
    );
}

#[test]
fn duplicates_across_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let doc = "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: a, namespace: shop}\nspec: {selector: {}, ingress: []}\n";
    std::fs::write(dir.path().join("one.yaml"), doc).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/two.yml"), format!("---\n{doc}")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    std::fs::write(dir.path().join(".hidden.yaml"), "::: not yaml").unwrap();
    let report = load_paths(&[dir.path().to_path_buf()]);
    assert_eq!(report.resources.len(), 2);
    assert_eq!(report.errors.len(), 1, "{:#?}", report.errors);
    assert!(
        report.errors[0]
            .message
            .contains("Policy shop/a is also defined at"),
        "{}",
        report.errors[0]
    );
    assert_eq!(report.errors[0].line, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary text never panics the loader; errors always carry a position.
    #[test]
    fn arbitrary_text_never_panics(src in ".{0,400}") {
        if let Err(errs) = load_str("f.yaml", &src) {
            prop_assert!(errs.iter().all(|e| e.line >= 1));
        }
    }

    /// Mutations of a valid manifest never panic, and stay positioned.
    #[test]
    fn mutated_manifests_never_panic(cut in 0usize..400, insert in prop::sample::select(vec!["", ":", "- ", "{", "]", "\n  ", "&a ", "*a", "'", "~", "0x", "!!str "])) {
        let base = "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: a, labels: {x: y}}\nspec:\n  run: {command: a, args: [b]}\n  ports: [{name: http, port: 80}]\n  health: {readiness: {http: {port: http}}}\n  autoscale: {min: 1, max: 3, metric: cpu, target: 50}\n";
        let at = cut.min(base.len());
        let src = format!("{}{insert}{}", &base[..at], &base[at..]);
        if let Err(errs) = load_str("f.yaml", &src) {
            prop_assert!(errs.iter().all(|e| e.line >= 1 && e.col >= 1));
        }
    }
}

/// What is written out reads back as the same thing: the API will store and
/// serve resources in this shape, and `get -o yaml | apply` must round-trip.
#[test]
fn serialized_resources_read_back_identically() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let report = load_paths(&[root.join("examples"), root.join("policies")]);
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    assert!(report.resources.len() > 10);
    for loaded in &report.resources {
        let json = serde_json::to_string_pretty(&loaded.resource).unwrap();
        let back = load_str("roundtrip.json", &json)
            .unwrap_or_else(|e| panic!("{}:\n{json}\n{e:#?}", loaded.resource.display_name()));
        assert_eq!(back.len(), 1);
        assert_eq!(
            serde_json::to_string_pretty(&back[0].resource).unwrap(),
            json,
            "{}",
            loaded.resource.display_name()
        );
    }
}

#[test]
fn a_route_rule_sends_somewhere() {
    assert_error(
        "apiVersion: skiff.dev/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: web\n  rules:\n    - backends: [{service: web, weight: 0}, {service: web-v2, weight: 0}]\n",
        "spec.rules[0].backends: every backend has weight 0",
    );
    // 100/0 is a valid split (a canary at its start or end).
    let Resource::Route(r) = one(
        "apiVersion: skiff.dev/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: web\n  rules:\n    - backends: [{service: web, weight: 100}, {service: web-v2, weight: 0}]\n",
    ) else {
        panic!("not a Route")
    };
    assert_eq!(r.spec.rules[0].backends[1].weight, 0);
}
