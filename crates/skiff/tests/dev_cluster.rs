//! End to end on a real `skiff dev` cluster (root): nodes are network
//! namespaces on a bridge, each with a real agent running real instances.
//! Skipped without root unless `SKIFF_E2E=require` (CI), where they fail.

mod devsupport;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use devsupport::*;
use serde_json::Value;

fn service(ns: &str, name: &str, replicas: u32, app_name: &str) -> String {
    format!(
        r#"apiVersion: skiff.dev/v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  run: {{command: skiff, args: [demo-app, --name, {app_name}, --listen, "0.0.0.0:8080"]}}
  resources: {{requests: {{cpu: 100m, memory: 32Mi}}, limits: {{memory: 128Mi}}}}
  ports: [{{name: http, port: 8080}}]
  health:
    readiness: {{http: {{path: /ready, port: http}}, period: 1s}}
  placement:
    spread: [{{topologyKey: hostname, maxSkew: 1, mode: hard}}]
"#
    )
}

fn per_node(items: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(s(i, "/spec/node").to_string()).or_default() += 1;
    }
    m
}

/// Counts a service's processes every 20 ms in the background; keeps the peak.
struct Sampler {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(needle: String) -> Sampler {
        let peak = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(pids_with(&needle).len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak(&mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

#[test]
fn replicas_spread_answer_across_nodes_and_fail_over_without_resurrection() {
    if !can_run("replicas_spread_answer_across_nodes_and_fail_over_without_resurrection") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = cluster(dir.path(), 3, false);
    let app = format!("spread-{}", rand_suffix());
    apply(
        &c,
        dir.path(),
        "spread.yaml",
        &service("demo", "spread", 6, &app),
    );
    let items = ready_replicas(&c, "spread", 6, None);
    let (_, table, _) = skiff(&c, &["get", "instances", "-n", "demo", "-o", "wide"]);
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("RESTARTS") && h.contains("AGE")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l.contains(" running ") && (l.contains("s ") || l.contains("m "))),
        "{table}"
    );
    let spread = per_node(&items);
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{spread:?}"
    );
    assert_eq!(pids_with(&app).len(), 6, "one process per replica");

    // Every replica answers from another node's namespace (host-gw routes).
    for i in &items {
        let node = s(i, "/spec/node");
        let from = c
            .nodes
            .iter()
            .find(|n| n.name != node)
            .map(|n| n.netns.clone())
            .unwrap_or_default();
        let addr = s(i, "/status/address");
        let body = curl_in(&from, &format!("http://{addr}:8080/"))
            .unwrap_or_else(|e| panic!("{addr} from {from}: {e}"));
        assert!(
            body.contains(&format!("\"address\":\"{addr}\"")),
            "{addr} from {from}: {body}"
        );
        assert!(body.contains(&format!("\"service\":\"{app}\"")), "{body}");
    }

    // Node n1 dies: its agent, its instances, its link.
    let mut sampler = Sampler::start(app.clone());
    let victim = c.nodes[0].clone();
    let lost: Vec<String> = items
        .iter()
        .filter(|i| s(i, "/spec/node") == victim.name)
        .map(|i| s(i, "/metadata/name").to_string())
        .collect();
    c.kill_agent(0);
    skiff_agent::runtime::cgroup::remove_agent_dirs(&victim.tag);
    devsupport_ip(&["-n", &c.lan, "link", "set", &victim.lan_if, "down"]);
    let after = ready_replicas(&c, "spread", 6, Some(&victim.name));
    assert!(
        after
            .iter()
            .all(|i| !lost.contains(&s(i, "/metadata/name").to_string())),
        "lost instances were replaced, not kept"
    );
    let (_, node_yaml, _) = skiff(&c, &["get", "node", &victim.name, "-o", "json"]);
    let node: Value = serde_json::from_str(&node_yaml).unwrap_or_default();
    assert_eq!(
        node.pointer("/status/ready"),
        Some(&Value::Bool(false)),
        "{node_yaml}"
    );
    assert!(
        node.pointer("/status/generation")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            >= 1,
        "the lost node is fenced: {node_yaml}"
    );
    let (_, described, _) = skiff(&c, &["describe", "service", "spread", "-n", "demo"]);
    assert!(described.contains("Scheduled"), "{described}");

    // The node comes back: it runs none of its old instances.
    devsupport_ip(&["-n", &c.lan, "link", "set", &victim.lan_if, "up"]);
    let agent = c.start_agent(0).unwrap_or_else(|e| panic!("{e}"));
    c.adopt_agent(0, agent);
    node_ready_again(&c, &victim.name);
    std::thread::sleep(Duration::from_secs(2));
    let now = instances(&c, "demo", "spread");
    assert_eq!(now.len(), 6);
    assert_eq!(pids_with(&app).len(), 6, "no old instance came back");
    let peak = sampler.peak();
    assert!(
        peak <= 6,
        "at most 6 copies ran at any sampled moment, saw {peak}"
    );
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&format!("{}-", victim.tag)))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "the returning agent removed its old namespaces: {leftovers:?}"
    );
}

#[test]
fn a_partitioned_node_fences_itself_before_its_replacements_start() {
    if !can_run("a_partitioned_node_fences_itself_before_its_replacements_start") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = cluster(dir.path(), 3, true);
    let app = format!("fence-{}", rand_suffix());
    apply(
        &c,
        dir.path(),
        "fence.yaml",
        &service("demo", "fence", 6, &app),
    );
    ready_replicas(&c, "fence", 6, None);
    // Cut n1 off; its agent and instances keep running.
    let mut sampler = Sampler::start(app.clone());
    let victim = c.nodes[0].clone();
    devsupport_ip(&["-n", &c.lan, "link", "set", &victim.lan_if, "down"]);
    ready_replicas(&c, "fence", 6, Some(&victim.name));
    devsupport_ip(&["-n", &c.lan, "link", "set", &victim.lan_if, "up"]);
    node_ready_again(&c, &victim.name);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        pids_with(&app).len(),
        6,
        "the returning node did not restart its old instances"
    );
    let peak = sampler.peak();
    assert!(
        peak <= 6,
        "self-fencing kept the copies at 6 or fewer, saw {peak}"
    );
}

#[test]
fn oom_bad_command_unschedulable_and_control_plane_restart() {
    if !can_run("oom_bad_command_unschedulable_and_control_plane_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = cluster(dir.path(), 2, false);
    let app = format!("steady-{}", rand_suffix());
    apply(
        &c,
        dir.path(),
        "bad.yaml",
        &format!(
            r#"apiVersion: skiff.dev/v1
kind: Service
metadata: {{name: hog, namespace: demo}}
spec:
  run: {{command: sh, args: [-c, "head -c 400m /dev/zero | tail"]}}
  resources: {{limits: {{memory: 48Mi}}}}
---
apiVersion: skiff.dev/v1
kind: Service
metadata: {{name: missing, namespace: demo}}
spec:
  run: {{command: /no/such/command}}
---
apiVersion: skiff.dev/v1
kind: Service
metadata: {{name: huge, namespace: demo}}
spec:
  run: {{command: sleep, args: ["1000"]}}
  resources: {{requests: {{cpu: "64"}}}}
---
{}"#,
            service("demo", "steady", 2, &app)
        ),
    );

    // Out of memory: killed, restarted with growing backoff, visible in describe.
    let described = eventually(
        Duration::from_secs(40),
        "hog OOM-killed twice",
        || {
            let (_, out, _) = skiff(&c, &["describe", "service", "hog", "-n", "demo"]);
            (out.matches("OOMKilled").count() >= 2 && out.contains("restarting in 2s"))
                .then_some(out)
        },
        || skiff(&c, &["describe", "service", "hog", "-n", "demo"]).1,
    );
    assert!(described.contains("restarting in 1s"), "{described}");
    assert!(described.contains("limit 48Mi"), "{described}");

    // A command that does not exist: a clear event.
    let described = eventually(
        Duration::from_secs(30),
        "missing command reported",
        || {
            let (_, out, _) = skiff(&c, &["describe", "service", "missing", "-n", "demo"]);
            out.contains("command `/no/such/command` not found")
                .then_some(out)
        },
        || skiff(&c, &["describe", "service", "missing", "-n", "demo"]).1,
    );
    assert!(described.contains("exited with code 127"), "{described}");
    // The same line in its log, read through the server from the agent.
    let missing = instances(&c, "demo", "missing");
    let name = s(&missing[0], "/metadata/name").to_string();
    let (ok, log, err) = skiff(&c, &["logs", &name, "-n", "demo", "--tail", "1"]);
    assert!(ok, "{err}");
    assert_eq!(
        log.trim(),
        "skiff: command `/no/such/command` not found",
        "{log}"
    );
    // Agents answer only requests the server signed.
    let node = c
        .nodes
        .iter()
        .find(|n| n.name == s(&missing[0], "/spec/node"))
        .map(|n| n.address)
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let unsigned = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            &format!("http://{node}:7444/logs/demo/{name}"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert_eq!(unsigned, "401", "an unsigned log read is refused");

    // More than any node has: pending, with the scheduler's explanation.
    let huge = eventually(
        Duration::from_secs(20),
        "huge pending with an explanation",
        || {
            let items = instances(&c, "demo", "huge");
            items
                .into_iter()
                .find(|i| s(i, "/status/phase") == "pending" && !s(i, "/status/message").is_empty())
        },
        || format!("{:#?}", instances(&c, "demo", "huge")),
    );
    assert!(s(&huge, "/status/message").contains("cpu"), "{huge:#}");
    // `apply --wait` gives up with the same explanation.
    let huge_file = dir.path().join("huge.yaml");
    std::fs::write(&huge_file, "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: huge, namespace: demo}\nspec:\n  run: {command: sleep, args: [\"1000\"]}\n  resources: {requests: {cpu: \"64\"}}\n").unwrap_or_else(|e| panic!("{e}"));
    let (ok, out, err) = skiff(
        &c,
        &[
            "apply",
            "--wait",
            "--timeout",
            "2",
            "-f",
            &huge_file.display().to_string(),
        ],
    );
    assert!(!ok, "{out}{err}");
    assert!(out.contains("demo/huge 0/1 ready"), "{out}");
    assert!(
        err.contains("not ready after 2s") && err.contains(s(&huge, "/status/message")),
        "{err}"
    );

    // The control plane goes away for longer than the node grace.
    let steady = eventually(
        Duration::from_secs(60),
        "steady ready",
        || {
            let items = instances(&c, "demo", "steady");
            (items.len() == 2 && items.iter().all(ready)).then_some(items)
        },
        || format!("{:#?}", instances(&c, "demo", "steady")),
    );
    let pids_before = {
        let mut p = pids_with(&app);
        p.sort();
        p
    };
    assert_eq!(pids_before.len(), 2);
    c.stop_server();
    std::thread::sleep(Duration::from_secs(5));
    let mut pids_during = pids_with(&app);
    pids_during.sort();
    assert_eq!(
        pids_during, pids_before,
        "instances run on while the control plane is down"
    );
    c.start_server().unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_secs(4));
    let mut pids_after = pids_with(&app);
    pids_after.sort();
    assert_eq!(
        pids_after, pids_before,
        "no node was fenced and nothing restarted"
    );
    let names: Vec<&str> = steady.iter().map(|i| s(i, "/metadata/name")).collect();
    let now = instances(&c, "demo", "steady");
    assert!(
        now.iter().all(|i| names.contains(&s(i, "/metadata/name"))),
        "the same instances: {now:#?}"
    );
    // And the agents still act on changes.
    let scale = dir.path().join("scale.yaml");
    std::fs::write(&scale, service("demo", "steady", 3, &app)).unwrap_or_else(|e| panic!("{e}"));
    let (ok, out, err) = skiff(&c, &["apply", "--wait", "-f", &scale.display().to_string()]);
    assert!(ok, "{out}{err}");
    assert!(out.trim_end().ends_with("demo/steady 3/3 ready"), "{out}");
    assert_eq!(pids_with(&app).len(), 3);
}

/// Waits until `service` (namespace demo) has exactly `n` instances, all
/// ready and none on node `off`.
fn ready_replicas(c: &Cluster, service: &str, n: usize, off: Option<&str>) -> Vec<Value> {
    eventually(
        Duration::from_secs(60),
        &format!(
            "{n} ready {service} replicas{}",
            off.map(|o| format!(" off {o}")).unwrap_or_default()
        ),
        || {
            let items = instances(c, "demo", service);
            (items.len() == n
                && items
                    .iter()
                    .all(|i| ready(i) && Some(s(i, "/spec/node")) != off))
            .then_some(items)
        },
        || format!("{:#?}", instances(c, "demo", service)),
    )
}

/// Waits until a node that was lost is ready again.
fn node_ready_again(c: &Cluster, node: &str) {
    eventually(
        Duration::from_secs(20),
        &format!("{node} ready again"),
        || {
            let (_, out, _) = skiff(c, &["get", "node", node, "-o", "json"]);
            let v: Value = serde_json::from_str(&out).ok()?;
            (v.pointer("/status/ready") == Some(&Value::Bool(true))).then_some(())
        },
        || log_tail(c, node),
    );
}

fn devsupport_ip(args: &[&str]) {
    skiff_cli::dev::ip(args).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn bench_failover_on_a_real_cluster_prints_json() {
    if !can_run("bench_failover_on_a_real_cluster_prints_json") {
        return;
    }
    let v = bench_json(&[
        "failover",
        "--nodes",
        "2",
        "--replicas",
        "2",
        "--grace",
        "1",
        "--json",
    ]);
    assert_eq!(v["bench"], "failover");
    assert!(v["max_instances"].as_u64().is_some_and(|m| m <= 2), "{v}");
    let (detect, replaced) = (v["detect_s"].as_f64(), v["replaced_ready_s"].as_f64());
    assert!(detect.is_some() && replaced >= detect, "{v}");
}

/// `promtool check metrics` accepts the text.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (install prometheus): {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a TCP connection from `netns` to `address:port` is answered.
fn connects(netns: &str, address: &str, port: u16) -> bool {
    curl_in(netns, &format!("http://{address}:{port}/")).is_ok()
}

#[test]
fn policies_are_enforced_in_the_kernel_on_every_node() {
    if !can_run("policies_are_enforced_in_the_kernel_on_every_node") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = cluster(dir.path(), 3, false);
    let sfx = rand_suffix();
    let labelled = |name: &str, replicas: u32| {
        service("demo", name, replicas, &format!("{name}-{sfx}")).replace(
            &format!("metadata: {{name: {name}, namespace: demo}}"),
            &format!("metadata: {{name: {name}, namespace: demo, labels: {{app: {name}}}}}"),
        )
    };
    apply(
        &c,
        dir.path(),
        "apps.yaml",
        &[
            labelled("server", 3),
            labelled("good", 1),
            labelled("bad", 1),
        ]
        .join("---\n"),
    );
    let servers = ready_replicas(&c, "server", 3, None);
    let good = ready_replicas(&c, "good", 1, None);
    let bad = ready_replicas(&c, "bad", 1, None);
    let good_ns = netns_of(&c, s(&good[0], "/status/address"));
    let bad_ns = netns_of(&c, s(&bad[0], "/status/address"));
    let addrs: Vec<String> = servers
        .iter()
        .map(|i| s(i, "/status/address").to_string())
        .collect();
    for a in &addrs {
        assert!(
            connects(&good_ns, a, 8080) && connects(&bad_ns, a, 8080),
            "no policy: open ({a})"
        );
    }

    let policy = r#"apiVersion: skiff.dev/v1
kind: Policy
metadata: {name: server-ingress, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  ingress:
    - from: [{workloads: {matchLabels: {app: good}}}]
      ports: [{port: 8080}]
"#;
    apply(&c, dir.path(), "policy.yaml", policy);
    eventually(
        Duration::from_secs(15),
        "bad is refused by every server, on every node",
        || {
            addrs
                .iter()
                .all(|a| !connects(&bad_ns, a, 8080))
                .then_some(())
        },
        String::new,
    );
    for a in &addrs {
        assert!(connects(&good_ns, a, 8080), "good still reaches {a}");
    }
    // `skiff flows` names both ends and why: no policy allows bad.
    let bad_name = s(&bad[0], "/metadata/name").to_string();
    let flows = eventually(
        Duration::from_secs(10),
        "the denial in skiff flows",
        || {
            let (_, out, _) = skiff(&c, &["flows", "-n", "demo", "--verdict", "denied"]);
            out.lines()
                .any(|l| {
                    l.contains(&format!("demo/{bad_name}"))
                        && l.contains("8080/TCP ingress: no policy allows")
                })
                .then_some(out)
        },
        || skiff(&c, &["flows"]).1,
    );
    assert!(!flows.contains("audit-denied"), "{flows}");
    // An audit-mode policy reports what it would deny and blocks nothing:
    // bad's egress is isolated in audit mode only.
    apply(
        &c,
        dir.path(),
        "audit.yaml",
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: audit-bad, namespace: demo}\nspec:\n  selector: {matchLabels: {app: bad}}\n  mode: audit\n  egress: []\n",
    );
    eventually(
        Duration::from_secs(10),
        "the audit report in skiff flows",
        || {
            let _ = connects(&bad_ns, &addrs[0], 8080);
            let (_, out, _) = skiff(&c, &["flows", "-n", "demo", "--verdict", "audit-denied"]);
            out.lines()
                .any(|l| {
                    l.contains(&format!("demo/{bad_name}"))
                        && l.contains("egress: Policy demo/audit-bad (audit mode: would deny)")
                })
                .then_some(())
        },
        || skiff(&c, &["flows"]).1,
    );
    assert!(connects(&good_ns, &addrs[0], 8080), "good is unaffected");
    let (ok, _, err) = skiff(&c, &["delete", "policy", "audit-bad", "-n", "demo"]);
    assert!(ok, "{err}");
    let node = &c.nodes[0];
    let metrics = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "3",
            &format!("http://{}:7444/metrics", node.address),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert!(
        metrics.contains("skiff_policy_packets_total{verdict=\"denied\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("skiff_policy_map_capacity{map=\"policy\"}"),
        "{metrics}"
    );
    promtool_check(&metrics);

    // Health checks come from the node: isolated instances stay ready.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        instances(&c, "demo", "server").iter().all(ready),
        "servers stay ready under the policy"
    );

    // New instances never take a forbidden connection, from their first moment.
    let stop = Arc::new(AtomicBool::new(false));
    let leaked = Arc::new(AtomicUsize::new(0));
    let hammer = {
        let (stop, leaked, bad_ns, cfg) = (
            stop.clone(),
            leaked.clone(),
            bad_ns.clone(),
            c.config.clone(),
        );
        let known: Vec<String> = addrs.clone();
        std::thread::spawn(move || {
            let mut tried = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let out = std::process::Command::new(EXE)
                    .args(["get", "instances", "-n", "demo", "-o", "json"])
                    .env("SKIFF_CONFIG", &cfg)
                    .output();
                let v: Value = out
                    .ok()
                    .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                    .unwrap_or_default();
                for i in v["items"].as_array().cloned().unwrap_or_default() {
                    let a = s(&i, "/status/address").to_string();
                    if s(&i, "/spec/service") == "server" && !a.is_empty() && !known.contains(&a) {
                        for _ in 0..5 {
                            tried += 1;
                            if connects(&bad_ns, &a, 8080) {
                                leaked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            tried
        })
    };
    apply(&c, dir.path(), "scale.yaml", &labelled("server", 6));
    ready_replicas(&c, "server", 6, None);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let tried = hammer.join().unwrap_or(0);
    assert!(tried > 0, "the new instances were tried");
    assert_eq!(
        leaked.load(Ordering::Relaxed),
        0,
        "a new instance accepted a forbidden connection"
    );

    // The agent of a server's node dies: the kernel keeps enforcing.
    let victim_node = s(&servers[0], "/spec/node").to_string();
    let victim = c
        .nodes
        .iter()
        .position(|n| n.name == victim_node)
        .unwrap_or(0);
    c.kill_agent(victim);
    assert!(
        !connects(&bad_ns, &addrs[0], 8080),
        "still refused with the agent down"
    );
    assert!(
        connects(&good_ns, &addrs[0], 8080),
        "still allowed with the agent down"
    );
    let agent = c.start_agent(victim).unwrap_or_else(|e| panic!("{e}"));
    c.adopt_agent(victim, agent);
    let servers = eventually(
        Duration::from_secs(60),
        "servers ready after the agent restart",
        || {
            let items = instances(&c, "demo", "server");
            let fresh = items
                .iter()
                .all(|i| ready(i) && !s(i, "/status/events/0/time").is_empty());
            (items.len() == 6
                && fresh
                && items
                    .iter()
                    .filter(|i| s(i, "/spec/node") == victim_node)
                    .all(|i| {
                        i["status"]["events"].as_array().is_some_and(|e| {
                            e.iter().filter(|e| e["reason"] == "Started").count() >= 2
                        })
                    }))
            .then_some(items)
        },
        || format!("{:#?}", instances(&c, "demo", "server")),
    );
    let addrs: Vec<String> = servers
        .iter()
        .map(|i| s(i, "/status/address").to_string())
        .collect();
    // The clients may have been on that node too (restarted: new namespaces).
    let good_ns = netns_of(
        &c,
        s(&ready_replicas(&c, "good", 1, None)[0], "/status/address"),
    );
    let bad_ns = netns_of(
        &c,
        s(&ready_replicas(&c, "bad", 1, None)[0], "/status/address"),
    );
    for a in &addrs {
        assert!(
            !connects(&bad_ns, a, 8080),
            "refused after the agent restart ({a})"
        );
        assert!(
            connects(&good_ns, a, 8080),
            "allowed after the agent restart ({a})"
        );
    }

    // The policy goes: open again.
    let (ok, _, err) = skiff(&c, &["delete", "policy", "server-ingress", "-n", "demo"]);
    assert!(ok, "{err}");
    eventually(
        Duration::from_secs(15),
        "bad reaches every server again",
        || {
            addrs
                .iter()
                .all(|a| connects(&bad_ns, a, 8080))
                .then_some(())
        },
        String::new,
    );
}

#[test]
fn bench_policy_propagation_prints_json() {
    if !can_run("bench_policy_propagation_prints_json") {
        return;
    }
    let v = bench_json(&[
        "policy-propagation",
        "--nodes",
        "2",
        "--changes",
        "4",
        "--json",
    ]);
    assert_eq!(v["bench"], "policy-propagation");
    assert_eq!(v["changes"], 4);
    assert!(v["p99_ms"].as_f64() >= v["p50_ms"].as_f64(), "{v}");
}

#[test]
fn bench_policy_prints_json() {
    if !can_run("bench_policy_prints_json") {
        return;
    }
    let v = bench_json(&[
        "policy",
        "--rules",
        "50",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--json",
    ]);
    assert_eq!(v["bench"], "policy");
    assert_eq!(v["rules"], 50);
    for k in [
        "baseline_rps",
        "skiff_rps",
        "iptables_rps",
        "baseline_conn_per_s",
        "skiff_conn_per_s",
        "iptables_conn_per_s",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {v}");
    }
}
