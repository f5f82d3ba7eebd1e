//! Kill `skiff server` with SIGKILL under a steady write load, over and
//! over: every write the API acknowledged must be there after each restart,
//! and a watch resuming from its last revision sees every change exactly once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::json;
use skiff_api::KindInfo;
use support::{Server, free_port};

const ROUNDS: usize = 20;
const WRITERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_api_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policies = KindInfo::find("policies").unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = seed;
    let mut random = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };

    // One watch for the whole test; it reconnects across every restart.
    let first = Server::start(dir.path(), port);
    let client = first.client();
    let mut watch = client.watch(policies, Some("shop"), None, 0);
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            match event {
                Ok(e) => {
                    if events_tx.send(e.revision).is_err() {
                        break;
                    }
                }
                Err(e) => panic!("watch failed: {e}"),
            }
        }
    });
    drop(first);

    let mut acked: HashMap<String, u64> = HashMap::new();
    for round in 0..ROUNDS {
        let mut server = Server::start(dir.path(), port);
        let stop = Arc::new(AtomicBool::new(false));
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (client, stop, ack_tx) = (server.client(), stop.clone(), ack_tx.clone());
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let name = format!("r{round}-w{w}-{i}");
                    let body = json!({"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": name, "namespace": "shop"}, "spec": {"selector": {}, "ingress": []}});
                    match client.create(policies, Some("shop"), &body).await {
                        Ok(v) => {
                            let _ = ack_tx.send((name, v["metadata"]["revision"].as_u64().unwrap()));
                        }
                        // The server was killed under us: this write is not acknowledged.
                        Err(_) => break,
                    }
                }
            }));
        }
        drop(ack_tx);
        let kill_after = 1 + random(60) as usize;
        for _ in 0..kill_after {
            let (name, rev) = tokio::time::timeout(Duration::from_secs(30), ack_rx.recv())
                .await
                .expect("writes stalled")
                .expect("writers stopped");
            acked.insert(name, rev);
        }
        server.kill();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        while let Ok((name, rev)) = ack_rx.try_recv() {
            acked.insert(name, rev);
        }
    }

    let server = Server::start(dir.path(), port);
    let list = server
        .client()
        .list(policies, Some("shop"), None)
        .await
        .unwrap();
    let stored: HashMap<String, u64> = list
        .items
        .iter()
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap().to_string(),
                o["metadata"]["revision"].as_u64().unwrap(),
            )
        })
        .collect();
    for (name, rev) in &acked {
        assert_eq!(
            stored.get(name),
            Some(rev),
            "acknowledged {name} at revision {rev} is lost or changed; seed {seed}"
        );
    }
    // Every change, once, in order, across {ROUNDS} kills.
    let mut seen = Vec::new();
    while seen.last() != Some(&list.revision) {
        let rev = tokio::time::timeout(Duration::from_secs(30), events_rx.recv())
            .await
            .expect("watch stalled")
            .unwrap();
        seen.push(rev);
    }
    assert_eq!(seen, (1..=list.revision).collect::<Vec<_>>(), "seed {seed}");
    println!(
        "{ROUNDS} kills: {} acknowledged writes, {} stored, {} watched",
        acked.len(),
        stored.len(),
        seen.len()
    );
}

/// SIGTERM under write load: the server exits 0, and every write it
/// acknowledged before stopping is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policies = KindInfo::find("policies").unwrap();
    let mut acked: HashMap<String, u64> = HashMap::new();
    for round in 0..3 {
        let mut server = Server::start(dir.path(), port);
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (client, ack_tx) = (server.client(), ack_tx.clone());
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("t{round}-w{w}-{i}");
                    let body = json!({"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": name, "namespace": "shop"}, "spec": {"selector": {}, "ingress": []}});
                    match client.create(policies, Some("shop"), &body).await {
                        Ok(v) => {
                            let _ = ack_tx.send((name, v["metadata"]["revision"].as_u64().unwrap()));
                        }
                        // Refused or cut off once the server stops: never a 5xx.
                        Err(e) => {
                            assert!(e.status().is_none_or(|s| s == 503), "{e}");
                            break;
                        }
                    }
                }
            }));
        }
        drop(ack_tx);
        for _ in 0..50 {
            let (name, rev) = tokio::time::timeout(Duration::from_secs(30), ack_rx.recv())
                .await
                .unwrap()
                .unwrap();
            acked.insert(name, rev);
        }
        let status = server.terminate();
        assert!(status.success(), "{status:?}");
        for w in writers {
            w.await.unwrap();
        }
        while let Ok((name, rev)) = ack_rx.try_recv() {
            acked.insert(name, rev);
        }
    }
    let server = Server::start(dir.path(), port);
    let list = server
        .client()
        .list(policies, Some("shop"), None)
        .await
        .unwrap();
    for (name, rev) in &acked {
        assert!(
            list.items.iter().any(
                |o| o["metadata"]["name"] == name.as_str() && o["metadata"]["revision"] == *rev
            ),
            "{name} lost"
        );
    }
}
