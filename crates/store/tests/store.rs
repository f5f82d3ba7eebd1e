//! The embedded store's contract: compare-and-swap, ordered exactly-once
//! watches, compaction signals, leases, and durability across reopen.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use skiff_store::embedded::Clock;
use skiff_store::{Config, EmbeddedStore, Event, Store, StoreError};

#[derive(Debug)]
struct ManualClock(Mutex<Instant>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

fn open(dir: &tempfile::TempDir, config: Config) -> EmbeddedStore {
    EmbeddedStore::open(&dir.path().join("store.redb"), config).unwrap()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Collects the next `n` events, failing after a generous timeout.
async fn take(watch: &mut skiff_store::Watch, n: usize) -> Vec<Arc<Event>> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .expect("watch stalled");
        out.push(next.expect("watch ended").expect("watch error"));
    }
    out
}

#[tokio::test]
async fn compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, Config::default());
    let r1 = s.create("/a/x", b("1"), None).await.unwrap();
    assert_eq!(r1, 1);
    assert_eq!(
        s.create("/a/x", b("again"), None).await,
        Err(StoreError::AlreadyExists {
            key: "/a/x".into(),
            revision: 1
        })
    );
    let r2 = s.update("/a/x", b("2"), r1).await.unwrap();
    assert_eq!(
        s.update("/a/x", b("3"), r1).await,
        Err(StoreError::Conflict {
            key: "/a/x".into(),
            expected: 1,
            actual: 2
        })
    );
    assert_eq!(
        s.update("/a/none", b("3"), 1).await,
        Err(StoreError::NotFound {
            key: "/a/none".into()
        })
    );
    let kv = s.get("/a/x").await.unwrap().unwrap();
    assert_eq!(
        (kv.value, kv.create_revision, kv.mod_revision),
        (b("2"), 1, r2)
    );
    assert_eq!(
        s.delete("/a/x", Some(r1)).await,
        Err(StoreError::Conflict {
            key: "/a/x".into(),
            expected: 1,
            actual: 2
        })
    );
    // Failed writes take no revision.
    assert_eq!(s.revision(), 2);
    s.delete("/a/x", Some(r2)).await.unwrap();
    assert_eq!(s.get("/a/x").await.unwrap(), None);
    // Created again: a new create_revision.
    let r4 = s.create("/a/x", b("new"), None).await.unwrap();
    assert_eq!(s.get("/a/x").await.unwrap().unwrap().create_revision, r4);
    s.close().await;
}

#[tokio::test]
async fn list_by_prefix_with_snapshot_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, Config::default());
    for k in ["/b/2", "/a/1", "/b/1", "/bb/1", "/c"] {
        s.create(k, b(k), None).await.unwrap();
    }
    let (items, rev) = s.list("/b/").await.unwrap();
    assert_eq!(
        items.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["/b/1", "/b/2"]
    );
    assert_eq!(rev, 5);
    let (all, _) = s.list("").await.unwrap();
    assert_eq!(all.len(), 5);
    s.close().await;
}

#[tokio::test]
async fn watch_replays_then_follows_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir, Config::default());
    s.create("/a/1", b("x"), None).await.unwrap();
    s.create("/z/1", b("x"), None).await.unwrap();
    let r = s.create("/a/2", b("x"), None).await.unwrap();
    let mut w = s.watch("/a/", 0).await.unwrap();
    let mut from_middle = s.watch("/a/", 1).await.unwrap();
    s.update("/a/2", b("y"), r).await.unwrap();
    s.delete("/a/1", None).await.unwrap();
    let got: Vec<(u64, String)> = take(&mut w, 4)
        .await
        .iter()
        .map(|e| (e.revision(), e.key().to_string()))
        .collect();
    assert_eq!(
        got,
        [
            (1, "/a/1".into()),
            (3, "/a/2".into()),
            (4, "/a/2".into()),
            (5, "/a/1".into())
        ]
    );
    let got: Vec<u64> = take(&mut from_middle, 3)
        .await
        .iter()
        .map(|e| e.revision())
        .collect();
    assert_eq!(got, [3, 4, 5]);
    assert!(matches!(*take(&mut w, 0).await, []));
    s.close().await;
    // Closing ends watches cleanly.
    assert!(w.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_watched_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(
        &dir,
        Config {
            fanout_buffer: 16,
            ..Config::default()
        },
    ));
    let mut watches = Vec::new();
    for _ in 0..8 {
        watches.push(s.watch("", 0).await.unwrap());
    }
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    s.create(&format!("/k/{w}/{i}"), b("v"), None)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(s.revision(), 3200);
    for mut w in watches {
        // A small live buffer forces slow watchers back to the log: still no gap, no repeat.
        let revs: Vec<u64> = take(&mut w, 3200)
            .await
            .iter()
            .map(|e| e.revision())
            .collect();
        assert_eq!(revs, (1..=3200).collect::<Vec<_>>());
    }
    s.close().await;
}

#[tokio::test]
async fn compacted_history_is_signalled_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(
        &dir,
        Config {
            history: 100,
            fanout_buffer: 16,
            ..Config::default()
        },
    );
    let mut stalled = s.watch("", 0).await.unwrap();
    for i in 0..1000 {
        s.create(&format!("/k/{i}"), b("v"), None).await.unwrap();
    }
    // The stalled watcher must start from the log, which no longer reaches
    // back to revision 1: it is told so, once, and ends.
    let first = stalled.next().await.unwrap();
    assert!(
        matches!(first, Err(StoreError::Compacted { requested: 0, .. })),
        "{first:?}"
    );
    assert!(stalled.next().await.is_none());
    assert!(matches!(
        s.watch("", 3).await,
        Err(StoreError::Compacted { requested: 3, .. })
    ));
    // The way back: list, then watch from the list's revision.
    let (items, rev) = s.list("/k/").await.unwrap();
    assert_eq!((items.len(), rev), (1000, 1000));
    let mut w = s.watch("/k/", rev).await.unwrap();
    s.delete("/k/5", None).await.unwrap();
    assert_eq!(take(&mut w, 1).await[0].revision(), 1001);
    s.close().await;
}

#[tokio::test]
async fn leases_expire_and_take_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
    let s = open(
        &dir,
        Config {
            lease_tick: None,
            clock: clock.clone(),
            ..Config::default()
        },
    );
    let lease = s.lease_grant(Duration::from_secs(3)).await.unwrap();
    let other = s.lease_grant(Duration::from_secs(3)).await.unwrap();
    s.create("/nodes/n1", b("up"), Some(lease)).await.unwrap();
    s.create("/nodes/n2", b("up"), Some(other)).await.unwrap();
    s.create("/keep", b("x"), None).await.unwrap();
    assert_eq!(
        s.create("/x", b("x"), Some(999)).await,
        Err(StoreError::LeaseNotFound(999))
    );
    let mut w = s.watch("/nodes/", s.revision()).await.unwrap();

    clock.advance(Duration::from_secs(2));
    s.lease_keepalive(lease).await.unwrap();
    assert_eq!(s.expire_leases().await.unwrap(), 0);
    clock.advance(Duration::from_secs(2));
    // `other` was not kept alive: gone with its key; `lease` lives on.
    assert_eq!(s.expire_leases().await.unwrap(), 1);
    assert!(s.get("/nodes/n2").await.unwrap().is_none());
    assert!(s.get("/nodes/n1").await.unwrap().is_some());
    assert!(matches!(&*take(&mut w, 1).await[0], Event::Delete { key, .. } if key == "/nodes/n2"));
    assert_eq!(
        s.lease_keepalive(other).await,
        Err(StoreError::LeaseNotFound(other))
    );

    s.lease_revoke(lease).await.unwrap();
    assert!(s.get("/nodes/n1").await.unwrap().is_none());
    assert!(s.get("/keep").await.unwrap().is_some());
    assert_eq!(
        s.lease_revoke(lease).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    s.close().await;
}

#[tokio::test]
async fn lease_timer_expires_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(
        &dir,
        Config {
            lease_tick: Some(Duration::from_millis(10)),
            ..Config::default()
        },
    );
    let lease = s.lease_grant(Duration::from_millis(50)).await.unwrap();
    s.create("/hb", b("x"), Some(lease)).await.unwrap();
    let mut w = s.watch("/hb", s.revision()).await.unwrap();
    // Wait on the event, not on time.
    let gone = take(&mut w, 1).await;
    assert!(matches!(&*gone[0], Event::Delete { .. }));
    s.close().await;
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
    let config = || Config {
        lease_tick: None,
        clock: clock.clone(),
        ..Config::default()
    };
    let s = open(&dir, config());
    let lease = s.lease_grant(Duration::from_secs(5)).await.unwrap();
    s.create("/a", b("1"), None).await.unwrap();
    s.create("/l", b("1"), Some(lease)).await.unwrap();
    s.delete("/a", None).await.unwrap();
    s.create("/b", b("2"), None).await.unwrap();
    s.close().await;
    drop(s);

    let s = open(&dir, config());
    assert_eq!(s.revision(), 4);
    assert_eq!(s.get("/b").await.unwrap().unwrap().mod_revision, 4);
    let revs: Vec<u64> = take(&mut s.watch("", 0).await.unwrap(), 4)
        .await
        .iter()
        .map(|e| e.revision())
        .collect();
    assert_eq!(revs, [1, 2, 3, 4]);
    // Leases come back with a full TTL, and still expire.
    s.lease_keepalive(lease).await.unwrap();
    clock.advance(Duration::from_secs(6));
    s.expire_leases().await.unwrap();
    assert!(s.get("/l").await.unwrap().is_none());
    assert_eq!(
        s.lease_grant(Duration::from_secs(1)).await.unwrap(),
        lease + 1
    );
    s.close().await;
}
