//! Controllers end to end on hollow nodes: replicas placed with spread,
//! a node lost and its instances replaced without ever exceeding the
//! replica count, the node coming back without its old instances,
//! unschedulable services explained, scale down.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skiff_api::KindInfo;
use skiff_client::{Client, EventType};
use support::{Agent, Server};

fn kind(name: &str) -> &'static KindInfo {
    KindInfo::find(name).unwrap()
}

fn service(replicas: u32, cpu: &str) -> Value {
    json!({
        "apiVersion": "skiff.dev/v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "replicas": replicas,
            "run": {"command": "/bin/web"},
            "resources": {"requests": {"cpu": cpu, "memory": "256Mi"}},
            "placement": {"spread": [{"topologyKey": "hostname", "maxSkew": 1, "mode": "hard"}]},
        },
    })
}

/// Running instances per node.
async fn running(c: &Client) -> BTreeMap<String, usize> {
    let list = c.list(kind("instances"), Some("shop"), None).await.unwrap();
    let mut out = BTreeMap::new();
    for i in list.items {
        if i.pointer("/status/phase").and_then(Value::as_str) == Some("running") {
            *out.entry(
                i.pointer("/spec/node")
                    .and_then(Value::as_str)
                    .unwrap_or("-")
                    .to_string(),
            )
            .or_default() += 1;
        }
    }
    out
}

async fn until_ready_nodes(c: &Client, n: usize) {
    until(c, &format!("{n} ready nodes"), async |c| {
        c.list(kind("nodes"), None, None)
            .await
            .unwrap()
            .items
            .iter()
            .filter(|x| x["status"]["ready"] == true)
            .count()
            == n
    })
    .await;
}

/// Polls `check` after every change to instances or nodes until it holds.
async fn until(c: &Client, what: &str, check: impl AsyncFn(&Client) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut changes = c.watch(
        kind("instances"),
        None,
        None,
        c.list(kind("instances"), None, None)
            .await
            .unwrap()
            .revision,
    );
    loop {
        if check(c).await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Wake on the next change, or after a second (node status changes
        // are not instance events).
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.next()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fail_over_and_never_exceed_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), 0, &["--node-grace", "2"]);
    let c = server.client();
    let mut a = Agent::start(&server, "node-a-", 1);
    let _b = Agent::start(&server, "node-b-", 1);
    let _c = Agent::start(&server, "node-c-", 1);
    until_ready_nodes(&c, 3).await;

    // Count instance objects as they come and go: never more than 6.
    let live = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let mut watch = c.watch(
        kind("instances"),
        Some("shop"),
        None,
        c.list(kind("instances"), None, None)
            .await
            .unwrap()
            .revision,
    );
    let (l, p) = (live.clone(), peak.clone());
    tokio::spawn(async move {
        while let Some(Ok(e)) = watch.next().await {
            let now = match e.kind {
                EventType::Added => l.fetch_add(1, Ordering::SeqCst) + 1,
                EventType::Deleted => l.fetch_sub(1, Ordering::SeqCst) - 1,
                _ => continue,
            };
            p.fetch_max(now, Ordering::SeqCst);
        }
    });

    c.create(kind("services"), Some("shop"), &service(6, "500m"))
        .await
        .unwrap();
    until(&c, "6 running, 2 per node", async |c| {
        running(c).await.values().copied().collect::<Vec<_>>() == [2, 2, 2]
    })
    .await;

    a.kill();
    until(&c, "node-a lost and its replicas replaced", async |c| {
        let r = running(c).await;
        !r.contains_key("node-a-0") && r.values().sum::<usize>() == 6
    })
    .await;
    let node = c
        .get(kind("nodes"), None, "node-a-0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node["status"]["ready"], false);
    assert_eq!(node["status"]["generation"], 1, "fenced");

    // The node comes back: ready again, with none of its old instances.
    let _a = Agent::start(&server, "node-a-", 1);
    until(&c, "node-a ready again", async |c| {
        c.get(kind("nodes"), None, "node-a-0")
            .await
            .unwrap()
            .unwrap()["status"]["ready"]
            == true
    })
    .await;
    assert_eq!(running(&c).await.get("node-a-0"), None);
    assert_eq!(running(&c).await.values().sum::<usize>(), 6);
    assert!(
        peak.load(Ordering::SeqCst) <= 6,
        "{} instances existed at once",
        peak.load(Ordering::SeqCst)
    );

    // Scale down: the extras go.
    let mut svc = c
        .get(kind("services"), Some("shop"), "web")
        .await
        .unwrap()
        .unwrap();
    svc["spec"]["replicas"] = json!(2);
    c.update(kind("services"), Some("shop"), "web", &svc)
        .await
        .unwrap();
    until(&c, "2 instances", async |c| {
        c.list(kind("instances"), Some("shop"), None)
            .await
            .unwrap()
            .items
            .len()
            == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_too_big_for_any_node_stays_pending_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let c = server.client();
    let _agents = Agent::start(&server, "node-", 2);
    until_ready_nodes(&c, 2).await;
    c.create(kind("services"), Some("shop"), &service(1, "64"))
        .await
        .unwrap();
    until(&c, "a pending instance", async |c| {
        c.list(kind("instances"), Some("shop"), None)
            .await
            .unwrap()
            .items
            .len()
            == 1
    })
    .await;
    let inst = &c
        .list(kind("instances"), Some("shop"), None)
        .await
        .unwrap()
        .items[0];
    assert_eq!(inst["status"]["phase"], "pending");
    assert_eq!(
        inst["status"]["message"],
        "0/2 nodes fit: 2 insufficient cpu"
    );
    assert!(inst.pointer("/spec/node").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_instances_off_and_cordon_keeps_new_ones_away() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let c = server.client();
    let _agents = Agent::start(&server, "node-", 3);
    until_ready_nodes(&c, 3).await;
    c.create(kind("services"), Some("shop"), &service(6, "500m"))
        .await
        .unwrap();
    until(&c, "6 running, 2 per node", async |c| {
        running(c).await.values().copied().collect::<Vec<_>>() == [2, 2, 2]
    })
    .await;

    let config = server.admin_config_path();
    let cli = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = tokio::task::spawn_blocking(move || cli(&["drain", "node-1"]))
        .await
        .unwrap();
    assert!(
        out.contains("Node node-1 cordoned") && out.contains("Node node-1 drained"),
        "{out}"
    );
    assert_eq!(out.matches(" evicted").count(), 2, "{out}");
    let r = running(&c).await;
    assert_eq!(
        (r.get("node-1"), r.values().sum::<usize>()),
        (None, 6),
        "{r:?}"
    );
    assert_eq!(
        c.get(kind("nodes"), None, "node-1").await.unwrap().unwrap()["spec"]["unschedulable"],
        true
    );
}
