//! Kill the store with SIGKILL under write load, again and again: every
//! acknowledged write must survive, and a watch resumed from its last
//! revision must see every later change exactly once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use skiff_store::{Config, EmbeddedStore, Store};

const ROUNDS: usize = 25;

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut counters: HashMap<u64, u64> = HashMap::new();
    let mut last_event = 0u64;
    let mut events_seen = 0usize;
    for round in 0..ROUNDS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skiff-store-crashtest"))
            .arg(dir.path())
            .arg(last_event.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill after a random number of acknowledgements: early (during
        // recovery and watch catch-up) as well as mid-stream.
        let kill_after = next(400);
        let mut acks_this_round = 0;
        let mut lines = Vec::new();
        while acks_this_round < kill_after {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    acks_this_round += usize::from(line.starts_with("ack ")) as u64;
                    lines.push(line);
                }
                Err(e) => panic!("round {round}: helper stopped answering ({e}); seed {seed}"),
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        // Lines written before the kill are still in the pipe.
        lines.extend(rx.try_iter());
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["ack", "create", rev, key] => {
                    acked.insert(key.to_string(), rev.parse().unwrap());
                }
                ["ack", "counter", w, value, _rev] => {
                    let value: u64 = value.parse().unwrap();
                    let w: u64 = w.parse().unwrap();
                    let prev = counters.insert(w, value).unwrap_or(0);
                    assert!(
                        value > prev,
                        "round {round}: counter {w} went from {prev} to {value}; seed {seed}"
                    );
                }
                ["event", rev, _key] => {
                    let rev: u64 = rev.parse().unwrap();
                    assert_eq!(
                        rev,
                        last_event + 1,
                        "round {round}: watch gap or repeat; seed {seed}"
                    );
                    last_event = rev;
                    events_seen += 1;
                }
                _ => panic!("unexpected line {line:?}"),
            }
        }
    }
    println!(
        "{ROUNDS} kills, {} acknowledged creates, {events_seen} events watched",
        acked.len()
    );
    assert!(acked.len() > ROUNDS, "too little load to mean anything");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(&dir.path().join("store.redb"), Config::default()).unwrap();
        for (key, rev) in &acked {
            let kv = store
                .get(key)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged {key} at {rev} is lost; seed {seed}"));
            assert_eq!(kv.mod_revision, *rev, "{key}");
        }
        for (w, value) in &counters {
            let kv = store
                .get(&format!("/crash/counter/{w}"))
                .await
                .unwrap()
                .unwrap();
            let stored: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
            // The write after the last acknowledged one may have committed
            // without its acknowledgement reaching us: never less.
            assert!(
                stored == *value || stored == value + 1,
                "counter {w}: acknowledged {value}, stored {stored}; seed {seed}"
            );
        }
        // The watch resumes from where it stopped, with nothing missing up to now.
        let head = store.revision();
        let mut watch = store.watch("/crash/", last_event).await.unwrap();
        for expected in last_event + 1..=head {
            let e = tokio::time::timeout(Duration::from_secs(20), watch.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(e.revision(), expected);
        }
        store.close().await;
    });
}
