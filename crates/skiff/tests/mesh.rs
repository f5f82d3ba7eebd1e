//! The mesh on a real `skiff dev --mesh` cluster (root): every instance
//! gets a sidecar proxy; apps talk plainly and the wire between nodes
//! carries only TLS. Skipped without root unless `SKIFF_E2E=require`.

mod devsupport;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use devsupport::*;
use serde_json::Value;

fn service(name: &str, replicas: u32, app: &str) -> String {
    format!(
        r#"apiVersion: skiff.dev/v1
kind: Service
metadata: {{name: {name}, namespace: mesh}}
spec:
  replicas: {replicas}
  run: {{command: skiff, args: [demo-app, --name, {app}, --listen, "0.0.0.0:8080"]}}
  resources: {{requests: {{cpu: 100m, memory: 32Mi}}, limits: {{memory: 256Mi}}}}
  ports: [{{name: http, port: 8080}}]
  health:
    readiness: {{http: {{path: /ready, port: http}}, period: 1s}}
  placement:
    spread: [{{topologyKey: hostname, maxSkew: 1, mode: hard}}]
"#
    )
}

fn ready_instances(c: &Cluster, service: &str, n: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(60),
        &format!("{n} ready {service} instances"),
        || {
            let items = instances(c, "mesh", service);
            (items.len() == n && items.iter().all(ready)).then_some(items)
        },
        || server_log_tail(c),
    )
}

fn metrics_in(netns: &str) -> String {
    curl_in(netns, "http://127.0.0.1:4191/metrics").unwrap_or_else(|e| panic!("{e}"))
}

fn expiry(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("skiff_proxy_identity_cert_expiry_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn apps_talk_plainly_and_only_tls_crosses_between_nodes() {
    if !can_run("apps_talk_plainly_and_only_tls_crosses_between_nodes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Certificates live 20 s, so the agents renew them during the test.
    let c = mesh_cluster(dir.path(), 2, 20.0);
    let suffix = rand_suffix();
    apply(
        &c,
        dir.path(),
        "db.yaml",
        &service("db", 2, &format!("db-{suffix}")),
    );
    apply(
        &c,
        dir.path(),
        "web.yaml",
        &service("web", 1, &format!("web-{suffix}")),
    );
    let dbs = ready_instances(&c, "db", 2);
    let web = ready_instances(&c, "web", 1).remove(0);
    let web_ns = netns_of(&c, s(&web, "/status/address"));
    // The db instance on the other node: its traffic crosses the lan.
    let db = dbs
        .iter()
        .find(|d| s(d, "/spec/node") != s(&web, "/spec/node"))
        .unwrap_or_else(|| panic!("no db instance off web's node: {dbs:?}"));
    let db_addr = s(db, "/status/address").to_string();
    let db_ns = netns_of(&c, &db_addr);
    // web's proxy must know db's address is meshed before the first call
    // (new instances are announced to proxies through their agents).
    eventually(
        Duration::from_secs(10),
        "web's proxy knows db",
        || {
            curl_in(&web_ns, "http://127.0.0.1:4191/peers")
                .ok()
                .filter(|p| p.contains(&format!("\"{db_addr}\"")))
        },
        || log_tail(&c, "n1"),
    );

    // The app (curl, as root in web's namespace) talks plain HTTP to db's
    // address; the capture on the lan sees none of it.
    let capture = dir.path().join("lan.pcap");
    // Immediate mode: without it libpcap hands packets over only when a
    // ring block fills or its 1 s timer fires, and the packets still in
    // the ring when tcpdump stops are lost.
    let mut tcpdump = Command::new("ip")
        .args(["netns", "exec", &c.lan, "tcpdump", "-i", "br0"])
        .args(["--immediate-mode", "-U", "-w"])
        .arg(&capture)
        .arg(format!("tcp and host {db_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("tcpdump: {e}"));
    // tcpdump says "listening on" once its filter is in place.
    let mut tcpdump_err = std::io::BufReader::new(tcpdump.stderr.take().expect("piped"));
    let mut said = String::new();
    while !said.contains("listening on") {
        use std::io::BufRead;
        let before = said.len();
        tcpdump_err
            .read_line(&mut said)
            .unwrap_or_else(|e| panic!("tcpdump's stderr: {e}"));
        assert!(
            said.len() > before,
            "tcpdump stopped before capturing: {said}"
        );
    }
    let marker = format!("marker-{suffix}");
    let body = curl_in(&web_ns, &format!("http://{db_addr}:8080/?{marker}"))
        .unwrap_or_else(|e| panic!("through the mesh: {e}\n{}", log_tail(&c, "n1")));
    assert!(body.contains(&format!("db-{suffix}")), "{body}");
    // SIGINT, so that tcpdump writes out what it holds before it exits.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap_or_else(|e| panic!("stopping tcpdump: {e}"));
    std::io::Read::read_to_string(&mut tcpdump_err, &mut said)
        .unwrap_or_else(|e| panic!("tcpdump's stderr: {e}"));
    let _ = tcpdump.wait();
    let dump = Command::new("tcpdump")
        .args(["-r"])
        .arg(&capture)
        .args(["-A", "-nn"])
        .output()
        .unwrap_or_else(|e| panic!("tcpdump -r: {e}"));
    let text = String::from_utf8_lossy(&dump.stdout);
    let packets = text.lines().filter(|l| l.contains(" > ")).count();
    assert!(
        packets > 0,
        "the capture saw nothing: {text}\ntcpdump said: {said}"
    );
    assert!(
        !text.contains(&marker) && !text.contains("HTTP/1.1"),
        "plaintext on the wire:\n{text}"
    );

    // db's proxy saw web's verified identity; its metrics are valid.
    let metrics = metrics_in(&db_ns);
    assert!(
        metrics
            .contains("peer=\"spiffe://skiff.local/ns/mesh/sa/web\",tls=\"true\",status=\"200\""),
        "{metrics}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap_or_else(|| panic!("stdin"))
        .write_all(metrics.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let checked = promtool
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // Destinations outside the mesh are reached as without the proxy: the
    // API server, with the app's own TLS, straight through.
    let outside = Command::new("ip")
        .args(["netns", "exec", &web_ns, "curl", "-sSk", "--max-time", "3"])
        .arg(format!("{}/healthz", c.url))
        .output()
        .unwrap_or_else(|e| panic!("curl: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&outside.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&outside.stderr)
    );

    // Plaintext from outside the mesh (the other node itself) is refused.
    let other_node = c
        .nodes
        .iter()
        .find(|n| n.name != s(db, "/spec/node"))
        .unwrap_or_else(|| panic!("no other node"));
    let refused =
        curl_in(&other_node.netns, &format!("http://{db_addr}:8080/")).unwrap_or_default();
    assert!(refused.contains("only mTLS"), "{refused}");

    // describe names the identity and the certificate's expiry.
    let (_, described, _) = skiff(
        &c,
        &[
            "describe",
            "instance",
            s(&web, "/metadata/name"),
            "-n",
            "mesh",
        ],
    );
    assert!(
        described.contains("mTLS as spiffe://skiff.local/ns/mesh/sa/web; certificate valid until"),
        "{described}"
    );

    // HTTP/2 through the mesh: h2load from web to db's instance.
    let h2 = Command::new("ip")
        .args([
            "netns", "exec", &web_ns, "h2load", "-n", "2000", "-c", "4", "-m", "10",
        ])
        .arg(format!("http://{db_addr}:8080/"))
        .output()
        .unwrap_or_else(|e| panic!("h2load: {e}"));
    let h2_out = String::from_utf8_lossy(&h2.stdout);
    assert!(
        h2_out.contains("2000 succeeded, 0 failed"),
        "{h2_out}{}",
        String::from_utf8_lossy(&h2.stderr)
    );
    assert!(
        metrics_in(&db_ns).contains("protocol=\"http2\",tls=\"true\""),
        "db's proxy saw no HTTP/2 over mTLS"
    );

    // Load through db's virtual address, from web: the proxies balance over
    // db's three instances. Meanwhile one instance's app is killed, and both
    // proxies' 20 s certificates are renewed. No GET may fail.
    let (_, out, _) = skiff(&c, &["get", "service", "db", "-n", "mesh", "-o", "json"]);
    let vip = serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| {
            v.pointer("/status/virtualAddress")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| panic!("db has no virtual address: {out}"));
    apply(
        &c,
        dir.path(),
        "db.yaml",
        &service("db", 3, &format!("db-{suffix}")),
    );
    let dbs = ready_instances(&c, "db", 3);
    eventually(
        Duration::from_secs(10),
        "web's proxy knows db's three instances",
        || {
            let peers = curl_in(&web_ns, "http://127.0.0.1:4191/peers").ok()?;
            let v: Value = serde_json::from_str(&peers).ok()?;
            let n = v
                .pointer(&format!("/services/{}/endpoints", vip.replace('/', "~1")))?
                .as_array()?
                .len();
            (n == 3).then_some(())
        },
        || log_tail(&c, "n1"),
    );
    let before = (expiry(&metrics_in(&web_ns)), expiry(&metrics));
    // Cluster DNS: the name resolves to the virtual address, in web's
    // namespace, through whatever nameserver the host's resolv.conf names.
    let name = "db.mesh.svc.skiff.local";
    let resolved = Command::new("ip")
        .args(["netns", "exec", &web_ns, "getent", "hosts", name])
        .output()
        .unwrap_or_else(|e| panic!("getent: {e}"));
    let resolved = String::from_utf8_lossy(&resolved.stdout).to_string();
    assert_eq!(
        resolved.split_whitespace().next(),
        Some(vip.as_str()),
        "{resolved}"
    );
    let by_name =
        curl_in(&web_ns, &format!("http://{name}:8080/")).unwrap_or_else(|e| panic!("{e}"));
    assert!(by_name.contains(&format!("db-{suffix}")), "{by_name}");
    // A bare name is a service of the caller's own namespace; and DNS
    // over TCP is answered too.
    let bare = Command::new("ip")
        .args(["netns", "exec", &web_ns, "getent", "hosts", "db"])
        .output()
        .unwrap_or_else(|e| panic!("getent: {e}"));
    let bare = String::from_utf8_lossy(&bare.stdout).to_string();
    assert_eq!(bare.split_whitespace().next(), Some(vip.as_str()), "{bare}");
    let tcp = Command::new("ip")
        .args([
            "netns", "exec", &web_ns, "dig", "+tcp", "+short", "+time=3", "+tries=1", name,
        ])
        .output()
        .unwrap_or_else(|e| panic!("dig: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&tcp.stdout).trim(),
        vip,
        "{}",
        String::from_utf8_lossy(&tcp.stderr)
    );

    // The ingress gateway: plain HTTP on a localhost port, mTLS into the
    // mesh as its own identity, balanced over db's instances.
    let gateway_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"));
    let gateway_runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("{e}"));
    let gateway_client = c.client().unwrap_or_else(|e| panic!("{e}"));
    let gateway_dir = dir.path().join("gateway");
    // HTTPS toward outside clients, with a certificate for localhost.
    let (cert, key) = (dir.path().join("edge.crt"), dir.path().join("edge.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap_or_else(|e| panic!("openssl: {e}"));
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let gateway_tls = (cert.clone(), key.clone());
    gateway_runtime.spawn(async move {
        let never = std::future::pending::<()>();
        skiff_cli::gateway::run(
            gateway_client,
            &gateway_dir,
            gateway_port,
            "db.mesh:8080",
            Some(gateway_tls),
            "skiff.local",
            never,
        )
        .await
    });
    let through_gateway = eventually(
        Duration::from_secs(10),
        "the gateway answers",
        || {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "3", "--cacert"])
                .arg(&cert)
                .arg("--resolve")
                .arg(format!("localhost:{}:127.0.0.1", gateway_port.port()))
                .arg(format!("https://localhost:{}/", gateway_port.port()))
                .output()
                .ok()?;
            let body = String::from_utf8_lossy(&out.stdout).to_string();
            body.contains(&format!("db-{suffix}")).then_some(body)
        },
        || log_tail(&c, "n1"),
    );
    assert!(through_gateway.contains("\"service\""), "{through_gateway}");
    let db_metrics = metrics_in(&db_ns);
    assert!(
        metrics_in(&db_ns).contains("spiffe://skiff.local/ns/skiff-system/sa/gateway")
            || dbs
                .iter()
                .any(|d| metrics_in(&netns_of(&c, s(d, "/status/address"))).contains("sa/gateway")),
        "no db proxy saw the gateway's identity:\n{db_metrics}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let caller = {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let (web_ns, url) = (web_ns.clone(), format!("http://{vip}:8080/"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match curl_in(&web_ns, &url) {
                    Ok(b) if b.contains("\"service\"") => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let served = |n: usize| {
        eventually(
            Duration::from_secs(20),
            &format!("{n} more requests served"),
            || (ok.load(Ordering::SeqCst) >= n).then_some(()),
            || log_tail(&c, "n1"),
        )
    };
    served(120);
    // Every instance took a share.
    for d in &dbs {
        let ns = netns_of(&c, s(d, "/status/address"));
        let m = metrics_in(&ns);
        assert!(
            m.contains("skiff_proxy_requests_total{direction=\"inbound\""),
            "{} got nothing:\n{m}",
            s(d, "/status/address")
        );
    }
    let victims = pids_with(&format!("db-{suffix}"));
    assert_eq!(victims.len(), 3, "{victims:?}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victims[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let at_kill = ok.load(Ordering::SeqCst);
    served(at_kill + 100);
    // (Whether the dead instance was still picked before its agent reported
    // it, and its 502s retried elsewhere, depends on timing here; the
    // loopback test of the same case proves the retry path.)
    eventually(
        Duration::from_secs(30),
        "both proxies' certificates renewed",
        || {
            let now = (expiry(&metrics_in(&web_ns)), expiry(&metrics_in(&db_ns)));
            (now.0 > before.0 && now.1 > before.1).then_some(())
        },
        || log_tail(&c, "n1"),
    );
    let at_renewal = ok.load(Ordering::SeqCst);
    served(at_renewal + 50);
    stop.store(true, Ordering::SeqCst);
    let _ = caller.join();
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(failures, Vec::<String>::new());
}

/// `metadata.revision` of an object, from `skiff get … -o json`.
fn revision_of(c: &Cluster, kind: &str, name: &str) -> u64 {
    let (_, out, _) = skiff(c, &["get", kind, name, "-n", "mesh", "-o", "json"]);
    serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v.pointer("/metadata/revision").and_then(Value::as_u64))
        .unwrap_or_else(|| panic!("{kind} {name} has no revision: {out}"))
}

/// Waits until every node's proxies acknowledge `kind` at `revision` or
/// later (the Node's `status.mesh`, as a rollout would wait).
fn acknowledged(c: &Cluster, kind: &str, revision: u64) {
    eventually(
        Duration::from_secs(15),
        &format!("every node's proxies applied {kind} revision {revision}"),
        || {
            let (_, out, _) = skiff(c, &["get", "nodes", "-o", "json"]);
            let v: Value = serde_json::from_str(&out).ok()?;
            let nodes = v.get("items")?.as_array()?;
            nodes
                .iter()
                .all(|n| {
                    let proxies = n.pointer("/status/mesh/proxies").and_then(Value::as_u64);
                    let answered = n.pointer("/status/mesh/answered").and_then(Value::as_u64);
                    let applied = n
                        .pointer(&format!("/status/mesh/applied/{kind}"))
                        .and_then(Value::as_u64);
                    proxies.is_some() && proxies == answered && applied >= Some(revision)
                })
                .then_some(())
        },
        || skiff(c, &["get", "nodes", "-o", "json"]).1,
    );
}

#[test]
fn routes_and_l7_policy_reach_the_proxies_and_are_acknowledged() {
    if !can_run("routes_and_l7_policy_reach_the_proxies_and_are_acknowledged") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = mesh_cluster(dir.path(), 2, 3600.0);
    let sfx = rand_suffix();
    apply(
        &c,
        dir.path(),
        "apps.yaml",
        &[
            service("api", 2, &format!("api-v1-{sfx}")),
            service("api-v2", 1, &format!("api-v2-{sfx}")),
            service("client", 1, &format!("client-{sfx}")),
        ]
        .join("---\n"),
    );
    ready_instances(&c, "api", 2);
    let v2 = ready_instances(&c, "api-v2", 1).remove(0);
    let client = ready_instances(&c, "client", 1).remove(0);
    let client_ns = netns_of(&c, s(&client, "/status/address"));
    let (_, out, _) = skiff(&c, &["get", "service", "api", "-n", "mesh", "-o", "json"]);
    let vip = serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| {
            v.pointer("/status/virtualAddress")?
                .as_str()
                .map(String::from)
        })
        .unwrap_or_else(|| panic!("api has no virtual address: {out}"));
    let url = format!("http://{vip}:8080/");
    let answers = |args: &[&str], n: usize| -> Vec<String> {
        (0..n)
            .map(|_| match curl_with(&client_ns, args, &url) {
                Ok((200, body)) if body.contains(&format!("api-v2-{sfx}")) => "v2".to_string(),
                Ok((200, body)) if body.contains(&format!("api-v1-{sfx}")) => "v1".to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    };
    eventually(
        Duration::from_secs(10),
        "client reaches api through its virtual address",
        || answers(&[], 1).iter().all(|a| a == "v1").then_some(()),
        || log_tail(&c, "n1"),
    );

    // A Route: x-canary requests go to v2, the rest to v1 (v2 weight 0).
    // Once every node acknowledges the Route's revision, every request
    // goes where it says: no waiting, no retry.
    let route = |v1: u32, v2: u32| {
        format!(
            "apiVersion: skiff.dev/v1\nkind: Route\nmetadata: {{name: api-canary, namespace: mesh}}\nspec:\n  service: api\n  rules:\n    - matches: [{{headers: [{{name: x-canary, value: \"1\"}}]}}]\n      backends: [{{service: api-v2}}]\n    - backends: [{{service: api, weight: {v1}}}, {{service: api-v2, weight: {v2}}}]\n"
        )
    };
    apply(&c, dir.path(), "route.yaml", &route(100, 0));
    acknowledged(&c, "routes", revision_of(&c, "route", "api-canary"));
    assert_eq!(answers(&[], 10), vec!["v1"; 10]);
    assert_eq!(answers(&["-H", "x-canary: 1"], 10), vec!["v2"; 10]);

    // Scale-down under POSTs (never retried): the leaving instance stops
    // only once every node's proxies have stopped sending it requests, so
    // none fails.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let poster = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let (ns, url) = (client_ns.clone(), url.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                // When it was sent, to match against the nodes' logs.
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                match curl_with(&ns, &["-X", "POST"], &url) {
                    Ok((200, _)) => {}
                    other => failures.push(format!("at {at:.3}: {other:?}")),
                }
                sent.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
            failures
        })
    };
    apply(
        &c,
        dir.path(),
        "api.yaml",
        &service("api", 1, &format!("api-v1-{sfx}")),
    );
    eventually(
        Duration::from_secs(30),
        "api down to one instance, its old one's process gone",
        || {
            (instances(&c, "mesh", "api").len() == 1
                && pids_with(&format!("api-v1-{sfx}")).len() == 1)
                .then_some(())
        },
        || log_tail(&c, "n1"),
    );
    let at = sent.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(10),
        "POSTs after the scale-down",
        || (sent.load(Ordering::SeqCst) >= at + 20).then_some(()),
        String::new,
    );
    stop.store(true, Ordering::SeqCst);
    let failures = poster.join().unwrap_or_else(|_| panic!("poster panicked"));
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "of {} POSTs",
        sent.load(Ordering::SeqCst)
    );
    // The leaving instance stopped on every node's acknowledgement, not
    // because the wait for it gave up.
    for n in &c.nodes {
        let log =
            std::fs::read_to_string(c.dir.join(format!("{}.log", n.name))).unwrap_or_default();
        assert!(
            !log.contains("acknowledged this instance's removal in time"),
            "{}: {}",
            n.name,
            log_tail(&c, &n.name)
        );
    }
    // The split moves entirely to v2.
    apply(&c, dir.path(), "route.yaml", &route(0, 100));
    acknowledged(&c, "routes", revision_of(&c, "route", "api-canary"));
    assert_eq!(answers(&[], 10), vec!["v2"; 10]);

    // L7 policy on v2: client may only GET /. The denial is a 403 from
    // v2's proxy naming the policy, and a line in `skiff flows`. A cidr
    // peer (the node v2 does not run on) may connect without mTLS.
    let other = c
        .nodes
        .iter()
        .find(|n| n.name != s(&v2, "/spec/node"))
        .unwrap_or_else(|| panic!("no node without api-v2"));
    let policy = format!(
        "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {{name: api-read, namespace: mesh}}\nspec:\n  selector: {{matchLabels: {{skiff.dev/service: api-v2}}}}\n  ingress:\n    - from: [{{workloads: {{matchLabels: {{skiff.dev/service: client}}}}}}]\n      ports: [{{port: 8080}}]\n      http: {{methods: [GET], paths: [/]}}\n    - from: [{{cidr: {}/32}}]\n      ports: [{{port: 8080}}]\n",
        other.address
    );
    apply(&c, dir.path(), "policy.yaml", &policy);
    acknowledged(&c, "policies", revision_of(&c, "policy", "api-read"));
    assert_eq!(answers(&[], 5), vec!["v2"; 5]);
    let (status, body) =
        curl_with(&client_ns, &["-X", "POST"], &url).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Policy mesh/api-read"), "{body}");
    let (status, _) = curl_with(&client_ns, &[], &format!("http://{vip}:8080/healthz"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 403, "a path the rule does not list");
    let line = eventually(
        Duration::from_secs(10),
        "the L7 denial in skiff flows",
        || {
            let (_, out, _) = skiff(&c, &["flows", "-n", "mesh", "--verdict", "denied"]);
            out.lines()
                .find(|l| {
                    l.contains("8080/HTTP ingress: Policy mesh/api-read (POST / by spiffe://skiff.local/ns/mesh/sa/client)")
                })
                .map(String::from)
        },
        || skiff(&c, &["flows", "--json"]).1,
    );
    assert!(line.contains(s(&client, "/metadata/name")), "{line}");
    let plain = curl_with(
        &other.netns,
        &[],
        &format!("http://{}:8080/", s(&v2, "/status/address")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        plain.0, 200,
        "plaintext from the allowed address: {plain:?}"
    );

    // Audit mode: with api-read gone and an audit-mode policy in its
    // place, a POST passes, and `skiff flows` says which policy would
    // have refused it.
    let (ok, _, err) = skiff(&c, &["delete", "policy", "api-read", "-n", "mesh"]);
    assert!(ok, "{err}");
    let watch = "apiVersion: skiff.dev/v1\nkind: Policy\nmetadata: {name: api-watch, namespace: mesh}\nspec:\n  mode: audit\n  selector: {matchLabels: {skiff.dev/service: api-v2}}\n  ingress:\n    - from: [{workloads: {matchLabels: {skiff.dev/service: client}}}]\n      ports: [{port: 8080}]\n      http: {methods: [GET]}\n";
    apply(&c, dir.path(), "watch.yaml", watch);
    acknowledged(&c, "policies", revision_of(&c, "policy", "api-watch"));
    let (status, body) =
        curl_with(&client_ns, &["-X", "POST"], &url).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "audit mode lets it pass: {body}");
    eventually(
        Duration::from_secs(10),
        "the audit denial in skiff flows",
        || {
            let (_, out, _) = skiff(&c, &["flows", "-n", "mesh", "--verdict", "audit-denied"]);
            out.lines()
                .find(|l| l.contains("8080/HTTP ingress: Policy mesh/api-watch (POST / by"))
                .map(String::from)
        },
        || skiff(&c, &["flows", "--json"]).1,
    );
}
