//! Stop `skiff server` under a steady write load, over and over: with
//! SIGKILL, every write the API acknowledged must be there after each
//! restart, and a watch resuming from its last revision sees every change
//! exactly once; with SIGTERM, the server exits 0 and loses nothing either.

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
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

const ROUNDS: usize = 20;
const WRITERS: usize = 4;

fn policies() -> &'static KindInfo {
    KindInfo::find("policies").unwrap()
}

/// Writers creating uniquely named policies until stopped or refused.
struct Load {
    writers: Vec<JoinHandle<()>>,
    acks: UnboundedReceiver<(String, u64)>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(server: &Server, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let writers = (0..WRITERS)
            .map(|w| {
                let (client, stop, tx, prefix) = (server.client(), stop.clone(), tx.clone(), prefix.to_string());
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let name = format!("{prefix}-w{w}-{i}");
                        let body = json!({"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": name, "namespace": "shop"}, "spec": {"selector": {}, "ingress": []}});
                        match client.create(policies(), Some("shop"), &body).await {
                            Ok(v) => {
                                let _ = tx.send((name, v["metadata"]["revision"].as_u64().unwrap()));
                            }
                            // The server went away under us: this write is not
                            // acknowledged. Refused or cut off, never a 5xx but 503.
                            Err(e) => {
                                assert!(e.status().is_none_or(|s| s == 503), "{e}");
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            writers,
            acks,
            stop,
        }
    }

    /// Waits for `n` acknowledgements.
    async fn take(&mut self, n: usize, acked: &mut HashMap<String, u64>) {
        for _ in 0..n {
            let (name, rev) = tokio::time::timeout(Duration::from_secs(30), self.acks.recv())
                .await
                .expect("writes stalled")
                .expect("writers stopped");
            acked.insert(name, rev);
        }
    }

    /// Stops the writers and collects the acknowledgements still queued.
    async fn finish(mut self, acked: &mut HashMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.writers {
            w.await.unwrap();
        }
        while let Ok((name, rev)) = self.acks.try_recv() {
            acked.insert(name, rev);
        }
    }
}

/// Every acknowledged write is stored, at the revision acknowledged.
async fn assert_all_stored(server: &Server, acked: &HashMap<String, u64>) -> u64 {
    let list = server
        .client()
        .list(policies(), Some("shop"), None)
        .await
        .unwrap();
    let stored: HashMap<&str, u64> = list
        .items
        .iter()
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap(),
                o["metadata"]["revision"].as_u64().unwrap(),
            )
        })
        .collect();
    for (name, rev) in acked {
        assert_eq!(
            stored.get(name.as_str()),
            Some(rev),
            "acknowledged {name} at revision {rev} is lost or changed"
        );
    }
    println!(
        "{} acknowledged writes, {} stored",
        acked.len(),
        stored.len()
    );
    list.revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_api_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
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
    let mut watch = first.client().watch(policies(), Some("shop"), None, 0);
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

    let mut acked = HashMap::new();
    for round in 0..ROUNDS {
        let mut server = Server::start(dir.path(), port);
        let mut load = Load::start(&server, &format!("r{round}"));
        load.take(1 + random(60) as usize, &mut acked).await;
        server.kill();
        load.finish(&mut acked).await;
    }

    let server = Server::start(dir.path(), port);
    let head = assert_all_stored(&server, &acked).await;
    // Every change, once, in order, across all the kills.
    let mut seen = Vec::new();
    while seen.last() != Some(&head) {
        let rev = tokio::time::timeout(Duration::from_secs(30), events_rx.recv())
            .await
            .expect("watch stalled")
            .unwrap();
        seen.push(rev);
    }
    assert_eq!(seen, (1..=head).collect::<Vec<_>>(), "seed {seed}");
    println!("{ROUNDS} kills; {} changes watched", seen.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut acked = HashMap::new();
    for round in 0..3 {
        let mut server = Server::start(dir.path(), port);
        let mut load = Load::start(&server, &format!("t{round}"));
        load.take(50, &mut acked).await;
        let status = server.terminate();
        assert!(status.success(), "{status:?}");
        load.finish(&mut acked).await;
    }
    let server = Server::start(dir.path(), port);
    assert_all_stored(&server, &acked).await;
}
