//! Differential test (root): the repository's policies on a real three-node
//! `skiff dev` cluster must give, connection for connection, exactly the
//! verdicts `skiff policy test` computes. Every PolicyTest's namespaces and
//! workloads are deployed (each workload a one-replica service echoing on
//! every port in play, TCP and UDP); then its own cases and at least 200
//! generated ones are tried as real connections from the source instance's
//! namespace (or from the host, an outside address). `SKIFF_SEED` replays
//! a run's generated cases.

mod devsupport;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devsupport::*;
use serde_json::Value;
use skiff_api::Resource;
use skiff_api::net::Protocol;
use skiff_api::policy::DefaultPolicy;
use skiff_api::policytest::{Endpoint, NamedPort, PolicyTestSpec};
use skiff_netpol::{Decision, Engine, PolicyRule, Resolved, World};

/// A small deterministic generator (xorshift), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One flow to try, and where it came from.
#[derive(Debug, Clone)]
struct Case {
    from: Option<String>, // `ns/name`, None = the host (outside)
    to: String,
    port: u16,
    protocol: Protocol,
    origin: String,
}

/// Runs `f` on a thread inside network namespace `ns` (None: here).
fn in_netns<T: Send + 'static>(ns: Option<String>, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let path = format!("/run/netns/{ns}");
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        }
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("connection thread panicked"))
}

/// Whether the echo at `to:port` answers over `protocol`.
fn answers(to: Ipv4Addr, port: u16, protocol: Protocol) -> bool {
    let timeout = Duration::from_millis(400);
    match protocol {
        Protocol::Udp => {
            let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 16];
            for _ in 0..2 {
                let _ = s.send_to(b"ping", (to, port));
                if matches!(s.recv_from(&mut buf), Ok((4, _))) {
                    return true;
                }
            }
            false
        }
        _ => {
            let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((to, port)), timeout)
            else {
                return false;
            };
            let _ = s.set_read_timeout(Some(timeout));
            if s.write_all(b"ping\n").is_err() {
                return false;
            }
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line == "ping\n"
        }
    }
}

#[test]
fn real_connections_give_exactly_the_engines_verdicts() {
    if !can_run("real_connections_give_exactly_the_engines_verdicts") {
        return;
    }
    let repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies"));
    let report = skiff_api::load_paths(std::slice::from_ref(&repo));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let policies: Vec<PolicyRule> = report
        .resources
        .iter()
        .filter_map(|l| PolicyRule::from_resource(&l.resource))
        .collect();
    let tests: Vec<(String, PolicyTestSpec)> = report
        .resources
        .iter()
        .filter_map(|l| match &l.resource {
            Resource::PolicyTest(t) if t.spec.policy_default == DefaultPolicy::IsolateSelected => {
                Some((t.metadata.name.clone(), t.spec.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(!tests.is_empty(), "no PolicyTest under policies/");
    let seed: u64 = std::env::var("SKIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(1),
            ) | 1
        });
    println!("generated cases from seed {seed} (SKIFF_SEED={seed} repeats them)");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = cluster(dir.path(), 3, false);
    let host = Ipv4Addr::new(198, 18, c.slot, 1);
    for (test, spec) in &tests {
        // Every workload listens on its ports, the ports cases use, and one more.
        let mut echo: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        for w in &spec.workloads {
            let e = echo
                .entry(format!("{}/{}", w.namespace, w.name))
                .or_default();
            e.extend(w.ports.iter().map(|p| p.port));
            e.insert(7001);
        }
        for case in &spec.cases {
            if let Endpoint::Workload { namespace, name } = &case.to {
                echo.entry(format!("{namespace}/{name}"))
                    .or_default()
                    .insert(case.port);
            }
        }
        let mut manifests = Vec::new();
        for ns in &spec.namespaces {
            let labels: Vec<String> = ns.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            manifests.push(format!("apiVersion: skiff.dev/v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{{}}}}}\n", ns.name, labels.join(", ")));
        }
        for w in &spec.workloads {
            let id = format!("{}/{}", w.namespace, w.name);
            let ports: Vec<String> = echo[&id].iter().map(u16::to_string).collect();
            let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let named: Vec<String> = w
                .ports
                .iter()
                .filter_map(|p| {
                    Some(format!(
                        "{{name: {}, port: {}, protocol: {}}}",
                        p.name.as_ref()?,
                        p.port,
                        if p.protocol == Protocol::Udp {
                            "udp"
                        } else {
                            "tcp"
                        }
                    ))
                })
                .collect();
            manifests.push(format!(
                "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\nspec:\n  run: {{command: skiff, args: [demo-app, --name, {id}, --echo, \"{}\"]}}\n  ports: [{}]\n",
                w.name,
                w.namespace,
                labels.join(", "),
                ports.join(","),
                named.join(", ")
            ));
        }
        apply(
            &c,
            dir.path(),
            &format!("{test}-workloads.yaml"),
            &manifests.join("---\n"),
        );
        let mut placed: BTreeMap<String, (Ipv4Addr, String)> = BTreeMap::new();
        eventually(
            Duration::from_secs(90),
            "every workload ready",
            || {
                placed.clear();
                let (_, out, _) = skiff(&c, &["get", "instances", "-A", "-o", "json"]);
                let v: Value = serde_json::from_str(&out).ok()?;
                for i in v["items"].as_array()? {
                    if ready(i) {
                        let id =
                            format!("{}/{}", s(i, "/metadata/namespace"), s(i, "/spec/service"));
                        placed.insert(
                            id,
                            (
                                s(i, "/status/address").parse().ok()?,
                                s(i, "/metadata/name").to_string(),
                            ),
                        );
                    }
                }
                (placed.len() >= spec.workloads.len()).then_some(())
            },
            || skiff(&c, &["get", "instances", "-A", "-o", "wide"]).1,
        );
        let (ok, out, err) = skiff(&c, &["apply", "-f", &repo.display().to_string()]);
        assert!(ok, "{out}{err}");

        // The engine, over the cluster as deployed.
        let mut world = World::new();
        for ns in &spec.namespaces {
            world
                .add_namespace(&ns.name, &ns.labels)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut ids = BTreeMap::new();
        for w in &spec.workloads {
            let id = format!("{}/{}", w.namespace, w.name);
            let mut labels = w.labels.clone();
            labels.insert("skiff.dev/service".into(), w.name.clone());
            let ports: Vec<NamedPort> = w.ports.clone();
            let addr = placed[&id].0;
            let wid = world
                .add_workload(
                    &w.namespace,
                    &w.name,
                    &labels,
                    &ports,
                    Some(IpAddr::V4(addr)),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            ids.insert(id, wid);
        }
        let engine = Engine::new(policies.clone(), world, DefaultPolicy::IsolateSelected);

        // The test's own cases (outside destinations are not reachable from
        // here and are left out), then generated ones.
        let mut cases: Vec<Case> = Vec::new();
        for case in &spec.cases {
            let Endpoint::Workload { namespace, name } = &case.to else {
                continue;
            };
            let from = match &case.from {
                Endpoint::Workload { namespace, name } => Some(format!("{namespace}/{name}")),
                Endpoint::Address(_) => None,
            };
            cases.push(Case {
                from,
                to: format!("{namespace}/{name}"),
                port: case.port,
                protocol: case.protocol,
                origin: format!("{test} line {}", case.line),
            });
        }
        let own = cases.len();
        let names: Vec<String> = ids.keys().cloned().collect();
        while cases.len() < own + 240 {
            let to = names[rng.below(names.len())].clone();
            let from = match rng.below(names.len() + 2) {
                n if n >= names.len() => None,
                n => Some(names[n].clone()),
            };
            if from.as_ref() == Some(&to) {
                continue;
            }
            let ports: Vec<u16> = echo[&to].iter().copied().collect();
            let port = ports[rng.below(ports.len())];
            let protocol = if rng.below(3) == 0 {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            cases.push(Case {
                from,
                to,
                port,
                protocol,
                origin: "generated".into(),
            });
        }

        let netns: BTreeMap<String, String> = placed
            .iter()
            .map(|(id, (addr, _))| (id.clone(), netns_of(&c, &addr.to_string())))
            .collect();
        let verdicts: Vec<Decision> = cases
            .iter()
            .map(|case| {
                let from = match &case.from {
                    Some(f) => Resolved::Workload(ids[f]),
                    None => Resolved::Address(IpAddr::V4(host)),
                };
                engine
                    .decide(
                        from,
                        Resolved::Workload(ids[&case.to]),
                        case.port,
                        case.protocol,
                    )
                    .decision
            })
            .collect();
        // Try every case, 24 at a time; a disagreement is tried again for a
        // few seconds (the policy may still be on its way to a node).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut pending: Vec<usize> = (0..cases.len()).collect();
        loop {
            let mut still = Vec::new();
            for chunk in pending.chunks(24) {
                let results: Vec<(usize, bool)> = chunk
                    .iter()
                    .map(|&i| {
                        let case = cases[i].clone();
                        let ns = case.from.as_ref().map(|f| netns[f].clone());
                        let to = placed[&case.to].0;
                        (
                            i,
                            std::thread::spawn(move || {
                                in_netns(ns, move || answers(to, case.port, case.protocol))
                            }),
                        )
                    })
                    .map(|(i, h)| (i, h.join().unwrap_or(false)))
                    .collect();
                for (i, got) in results {
                    if got != (verdicts[i] != Decision::Deny) {
                        still.push(i);
                    }
                }
            }
            pending = still;
            if pending.is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let agreeing = |deny: bool| {
            (0..cases.len())
                .filter(|i| (verdicts[*i] == Decision::Deny) == deny && !pending.contains(i))
                .count()
        };
        let (passed, refused) = (agreeing(false), agreeing(true));
        let differ: Vec<String> = pending
            .iter()
            .map(|&i| {
                let case = &cases[i];
                format!(
                    "{}: {} -> {} port {}/{:?}: engine says {}, the connection {}",
                    case.origin,
                    case.from
                        .clone()
                        .unwrap_or_else(|| format!("{host} (outside)")),
                    case.to,
                    case.port,
                    case.protocol,
                    verdicts[i].as_str(),
                    if verdicts[i] == Decision::Deny {
                        "went through"
                    } else {
                        "was refused"
                    }
                )
            })
            .collect();
        println!(
            "{test} ({own} of its cases, then generated): {} cases: {passed} passed, {refused} refused, {} differ",
            cases.len(),
            differ.len()
        );
        assert!(
            differ.is_empty(),
            "{} of {} cases differ from the engine:\n{}",
            differ.len(),
            cases.len(),
            differ.join("\n")
        );
    }
}
