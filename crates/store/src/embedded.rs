//! The embedded backend: one redb file, one writer thread that
//! group-commits, and an in-memory fan-out of committed batches to watches.
//!
//! Writes queue to the writer thread. It takes everything queued (up to
//! `max_batch`), applies it in one redb transaction, commits durably (fsync),
//! and only then answers each caller and publishes the batch to watchers. So
//! N concurrent writers cost one fsync, not N, and no watcher ever sees a
//! change that a crash could take back.
//!
//! Every change is also appended to a log table keyed by revision, which is
//! what watches resume from; the oldest entries beyond `history` are
//! compacted away.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::codec::{Record, decode_event, decode_record, encode_event, encode_record};
use crate::{Event, KeyValue, LeaseId, Result, Revision, Store, StoreError, Watch, WatchSource};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Lease id → TTL in milliseconds.
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
const META_LEASE_SEQ: &str = "lease_seq";

/// Log entries a watch reads per step while catching up.
const CATCH_UP_CHUNK: usize = 1024;

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct Config {
    /// How many past revisions watches can resume from.
    pub history: u64,
    /// Most writes committed together in one transaction.
    pub max_batch: usize,
    /// Committed batches buffered for watches before a slow one must
    /// re-read from the log.
    pub fanout_buffer: usize,
    /// How often expired leases are looked for; `None` leaves it to
    /// [`EmbeddedStore::expire_leases`] (tests with a manual clock).
    pub lease_tick: Option<Duration>,
    pub clock: Arc<dyn Clock>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            history: 200_000,
            max_batch: 4096,
            fanout_buffer: 4096,
            lease_tick: Some(Duration::from_millis(100)),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Where lease deadlines come from; replaceable in tests.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
}

#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The embedded store. Open one per data file; it must be opened inside a
/// Tokio runtime (the lease timer runs on it).
#[derive(Debug)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    ops: mpsc::Sender<Op>,
    writer: Mutex<Option<JoinHandle<()>>>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct Shared {
    db: Arc<Database>,
    /// Taken on close so watches end.
    fanout: Mutex<Option<broadcast::Sender<Arc<Batch>>>>,
    head: AtomicU64,
    compacted: AtomicU64,
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
    commits: AtomicU64,
    writes: AtomicU64,
}

/// Counters of the writer, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Durable transactions committed.
    pub commits: u64,
    /// Write requests answered by those commits (successful or not).
    pub writes: u64,
}

#[derive(Debug, Clone, Copy)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

/// The changes of one commit, in revision order.
#[derive(Debug)]
struct Batch {
    events: Vec<Arc<Event>>,
}

#[derive(Debug)]
enum Op {
    Create {
        key: String,
        value: Bytes,
        lease: Option<LeaseId>,
        reply: Reply,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
        reply: Reply,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
        reply: Reply,
    },
    LeaseGrant {
        ttl: Duration,
        reply: Reply,
    },
    LeaseRevoke {
        lease: LeaseId,
        reply: Reply,
    },
    Shutdown,
}

/// Every write answers with a number: a revision, or a lease id for grants.
type Reply = oneshot::Sender<Result<u64>>;

fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (maps, an Option); continuing with it is safe.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, config: Config) -> Result<EmbeddedStore> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Storage("EmbeddedStore::open must run inside a Tokio runtime".into())
        })?;
        let db = Arc::new(Database::create(path).map_err(storage)?);
        let mut state = WriterState::load(&db, &config)?;
        let now = config.clock.now();
        let leases: HashMap<LeaseId, LeaseState> = {
            // As etcd does, a restart gives every lease a full TTL again.
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(LEASES).map_err(storage)?;
            let mut out = HashMap::new();
            for entry in table.iter().map_err(storage)? {
                let (id, ttl) = entry.map_err(storage)?;
                let ttl = Duration::from_millis(ttl.value());
                out.insert(
                    id.value(),
                    LeaseState {
                        ttl,
                        deadline: now + ttl,
                    },
                );
            }
            out
        };
        let (fanout, _) = broadcast::channel(config.fanout_buffer.max(16));
        let shared = Arc::new(Shared {
            db: db.clone(),
            fanout: Mutex::new(Some(fanout.clone())),
            head: AtomicU64::new(state.revision),
            compacted: AtomicU64::new(state.compacted),
            leases: Mutex::new(leases),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });
        let (ops, rx) = mpsc::channel(config.max_batch.max(1) * 4);
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("skiff-store-writer".into())
            .spawn(move || state.run(&db, rx, fanout, &writer_shared))
            .map_err(storage)?;
        let store = EmbeddedStore {
            shared,
            ops,
            writer: Mutex::new(Some(writer)),
            clock: config.clock.clone(),
        };
        if let Some(tick) = config.lease_tick {
            let ops = store.ops.clone();
            let shared = Arc::downgrade(&store.shared);
            let clock = config.clock.clone();
            runtime.spawn(async move {
                let mut interval = tokio::time::interval(tick);
                loop {
                    interval.tick().await;
                    let Some(shared) = shared.upgrade() else {
                        break;
                    };
                    for lease in due(&shared, clock.now()) {
                        let (reply, _) = oneshot::channel();
                        if ops.send(Op::LeaseRevoke { lease, reply }).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Ok(store)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            writes: self.shared.writes.load(Ordering::Relaxed),
        }
    }

    /// Revokes every lease whose deadline is before `now`; returns how many.
    pub async fn expire_leases(&self) -> Result<usize> {
        let expired = due(&self.shared, self.clock.now());
        for &lease in &expired {
            match self.write(|reply| Op::LeaseRevoke { lease, reply }).await {
                Ok(_) | Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(expired.len())
    }

    /// Finishes queued writes, stops the writer, ends every watch, and
    /// releases the data file.
    pub async fn close(&self) {
        let _ = self.ops.send(Op::Shutdown).await;
        lock(&self.shared.fanout).take();
        let handle = lock(&self.writer).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    async fn write(&self, op: impl FnOnce(Reply) -> Op) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.shared.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(storage)?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        let _ = self.ops.try_send(Op::Shutdown);
    }
}

/// Leases past their deadline, removed from the live set.
fn due(shared: &Shared, now: Instant) -> Vec<LeaseId> {
    let mut leases = lock(&shared.leases);
    let expired: Vec<LeaseId> = leases
        .iter()
        .filter(|(_, l)| l.deadline <= now)
        .map(|(id, _)| *id)
        .collect();
    for id in &expired {
        leases.remove(id);
    }
    expired
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(KV).map_err(storage)?;
            let found = table.get(key.as_str()).map_err(storage)?;
            Ok(found
                .and_then(|v| decode_record(v.value()))
                .map(|r| key_value(key, r)))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(KV).map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            let revision = meta
                .get(META_REVISION)
                .map_err(storage)?
                .map_or(0, |v| v.value());
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..).map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                let r = decode_record(v.value())
                    .ok_or_else(|| StoreError::Storage(format!("corrupt record for {k}")))?;
                out.push(key_value(k.to_string(), r));
            }
            Ok((out, revision))
        })
        .await
    }

    async fn create(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<Revision> {
        let key = key.to_string();
        self.write(|reply| Op::Create {
            key,
            value,
            lease,
            reply,
        })
        .await
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        let key = key.to_string();
        self.write(|reply| Op::Update {
            key,
            value,
            expected,
            reply,
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Revision> {
        let key = key.to_string();
        self.write(|reply| Op::Delete {
            key,
            expected,
            reply,
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        // Subscribe before anything is read, so every batch committed from
        // here on reaches the watch; overlaps with the log are skipped by revision.
        let live = lock(&self.shared.fanout)
            .as_ref()
            .map(broadcast::Sender::subscribe)
            .ok_or(StoreError::Closed)?;
        let compacted = self.shared.compacted.load(Ordering::Acquire);
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        Ok(Watch::new(EmbeddedWatch {
            shared: self.shared.clone(),
            prefix: prefix.to_string(),
            position: after,
            live,
            catching_up: true,
            ended: false,
        }))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = ttl.max(Duration::from_millis(1));
        let id = self.write(|reply| Op::LeaseGrant { ttl, reply }).await?;
        lock(&self.shared.leases).insert(
            id,
            LeaseState {
                ttl,
                deadline: self.clock.now() + ttl,
            },
        );
        Ok(id)
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<()> {
        let now = self.clock.now();
        let mut leases = lock(&self.shared.leases);
        match leases.get_mut(&lease) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        lock(&self.shared.leases).remove(&lease);
        self.write(|reply| Op::LeaseRevoke { lease, reply })
            .await
            .map(|_| ())
    }

    fn revision(&self) -> Revision {
        self.shared.head.load(Ordering::Acquire)
    }
}

fn key_value(key: String, r: Record) -> KeyValue {
    KeyValue {
        key,
        value: r.value,
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        lease: r.lease,
    }
}

/// What only the writer thread touches.
#[derive(Debug)]
struct WriterState {
    revision: Revision,
    compacted: Revision,
    lease_seq: LeaseId,
    /// Keys attached to each lease, rebuilt from the data on open.
    lease_keys: HashMap<LeaseId, BTreeSet<String>>,
    history: u64,
    max_batch: usize,
    /// Set when a commit failed: the state on disk is unknown, so every
    /// later write is refused rather than risk acknowledging a lost one.
    broken: Option<String>,
}

impl WriterState {
    fn load(db: &Database, config: &Config) -> Result<WriterState> {
        let txn = db.begin_write().map_err(storage)?;
        let (revision, compacted, lease_seq, lease_keys) = {
            let meta = txn.open_table(META).map_err(storage)?;
            let get = |k: &str| -> Result<u64> {
                Ok(meta.get(k).map_err(storage)?.map_or(0, |v| v.value()))
            };
            let (revision, compacted, lease_seq) = (
                get(META_REVISION)?,
                get(META_COMPACTED)?,
                get(META_LEASE_SEQ)?,
            );
            txn.open_table(LOG).map_err(storage)?;
            txn.open_table(LEASES).map_err(storage)?;
            let kv = txn.open_table(KV).map_err(storage)?;
            let mut lease_keys: HashMap<LeaseId, BTreeSet<String>> = HashMap::new();
            for entry in kv.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                if let Some(lease) = decode_record(v.value()).and_then(|r| r.lease) {
                    lease_keys
                        .entry(lease)
                        .or_default()
                        .insert(k.value().to_string());
                }
            }
            (revision, compacted, lease_seq, lease_keys)
        };
        txn.commit().map_err(storage)?;
        Ok(WriterState {
            revision,
            compacted,
            lease_seq,
            lease_keys,
            history: config.history.max(1),
            max_batch: config.max_batch.max(1),
            broken: None,
        })
    }

    fn run(
        &mut self,
        db: &Database,
        mut rx: mpsc::Receiver<Op>,
        fanout: broadcast::Sender<Arc<Batch>>,
        shared: &Shared,
    ) {
        let mut ops = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            ops.push(first);
            while ops.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let shutdown = ops.iter().any(|op| matches!(op, Op::Shutdown));
            self.commit_batch(db, std::mem::take(&mut ops), &fanout, shared);
            if shutdown {
                break;
            }
        }
    }

    fn commit_batch(
        &mut self,
        db: &Database,
        ops: Vec<Op>,
        fanout: &broadcast::Sender<Arc<Batch>>,
        shared: &Shared,
    ) {
        if let Some(why) = &self.broken {
            for op in ops {
                reply_to(op, Err(StoreError::Storage(why.clone())));
            }
            return;
        }
        let before = (self.revision, self.compacted, self.lease_seq);
        let mut events = Vec::new();
        let mut replies = Vec::with_capacity(ops.len());
        let mut lease_changes = Vec::new();
        let outcome = (|| -> Result<()> {
            let mut txn = db.begin_write().map_err(storage)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut t = Tables {
                    kv: txn.open_table(KV).map_err(storage)?,
                    log: txn.open_table(LOG).map_err(storage)?,
                    meta: txn.open_table(META).map_err(storage)?,
                    leases: txn.open_table(LEASES).map_err(storage)?,
                };
                for op in ops {
                    let (reply, result) =
                        self.apply(op, &mut t, &mut events, &mut lease_changes)?;
                    if let Some(reply) = reply {
                        replies.push((reply, result));
                    }
                }
                self.compact(&mut t)?;
                t.meta
                    .insert(META_REVISION, self.revision)
                    .map_err(storage)?;
                t.meta
                    .insert(META_LEASE_SEQ, self.lease_seq)
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)
        })();
        match outcome {
            Ok(()) => {
                for (lease, key, attach) in lease_changes {
                    let keys = self.lease_keys.entry(lease).or_default();
                    if attach {
                        keys.insert(key);
                    } else {
                        keys.remove(&key);
                        if keys.is_empty() {
                            self.lease_keys.remove(&lease);
                        }
                    }
                }
                shared.commits.fetch_add(1, Ordering::Relaxed);
                shared
                    .writes
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                shared.head.store(self.revision, Ordering::Release);
                shared.compacted.store(self.compacted, Ordering::Release);
                if !events.is_empty() {
                    // No receivers is fine: nobody is watching.
                    let _ = fanout.send(Arc::new(Batch { events }));
                }
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                (self.revision, self.compacted, self.lease_seq) = before;
                self.broken = Some(format!(
                    "a commit failed ({e}); restart the server to recover from the data file"
                ));
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Applies one op inside the transaction. `Err` aborts the whole batch
    /// (a storage failure); an op's own failure (conflict, …) is its result.
    #[allow(clippy::type_complexity, reason = "a local tuple of reply and result")]
    fn apply(
        &mut self,
        op: Op,
        t: &mut Tables<'_>,
        events: &mut Vec<Arc<Event>>,
        lease_changes: &mut Vec<(LeaseId, String, bool)>,
    ) -> Result<(Option<Reply>, Result<u64>)> {
        Ok(match op {
            Op::Create {
                key,
                value,
                lease,
                reply,
            } => {
                let result = match t.record(&key)? {
                    Some(r) => Err(StoreError::AlreadyExists {
                        key,
                        revision: r.mod_revision,
                    }),
                    None if lease.is_some_and(|l| !t.lease_exists(l).unwrap_or(false)) => {
                        Err(StoreError::LeaseNotFound(lease.unwrap_or(0)))
                    }
                    None => {
                        self.revision += 1;
                        let r = Record {
                            create_revision: self.revision,
                            mod_revision: self.revision,
                            lease,
                            value,
                        };
                        if let Some(l) = lease {
                            lease_changes.push((l, key.clone(), true));
                        }
                        t.put(&key, &r, events)?;
                        Ok(self.revision)
                    }
                };
                (Some(reply), result)
            }
            Op::Update {
                key,
                value,
                expected,
                reply,
            } => {
                let result = match t.record(&key)? {
                    None => Err(StoreError::NotFound { key }),
                    Some(r) if r.mod_revision != expected => Err(StoreError::Conflict {
                        key,
                        expected,
                        actual: r.mod_revision,
                    }),
                    Some(r) => {
                        self.revision += 1;
                        let r = Record {
                            mod_revision: self.revision,
                            value,
                            ..r
                        };
                        t.put(&key, &r, events)?;
                        Ok(self.revision)
                    }
                };
                (Some(reply), result)
            }
            Op::Delete {
                key,
                expected,
                reply,
            } => {
                let result = match t.record(&key)? {
                    None => Err(StoreError::NotFound { key }),
                    Some(r) if expected.is_some_and(|e| e != r.mod_revision) => {
                        Err(StoreError::Conflict {
                            key,
                            expected: expected.unwrap_or(0),
                            actual: r.mod_revision,
                        })
                    }
                    Some(r) => {
                        self.revision += 1;
                        if let Some(l) = r.lease {
                            lease_changes.push((l, key.clone(), false));
                        }
                        t.remove(&key, r, self.revision, events)?;
                        Ok(self.revision)
                    }
                };
                (Some(reply), result)
            }
            Op::LeaseGrant { ttl, reply } => {
                self.lease_seq += 1;
                let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                t.leases.insert(self.lease_seq, ttl_ms).map_err(storage)?;
                (Some(reply), Ok(self.lease_seq))
            }
            Op::LeaseRevoke { lease, reply } => {
                let existed = t.leases.remove(lease).map_err(storage)?.is_some();
                let result = if existed {
                    let keys: Vec<String> = self
                        .lease_keys
                        .get(&lease)
                        .map(|k| k.iter().cloned().collect())
                        .unwrap_or_default();
                    // Keys attached earlier in this same batch are not in
                    // `lease_keys` yet; find them among this batch's changes.
                    let pending: Vec<String> = lease_changes
                        .iter()
                        .filter(|(l, _, attach)| *l == lease && *attach)
                        .map(|(_, k, _)| k.clone())
                        .collect();
                    for key in keys.into_iter().chain(pending) {
                        if let Some(r) = t.record(&key)?.filter(|r| r.lease == Some(lease)) {
                            self.revision += 1;
                            lease_changes.push((lease, key.clone(), false));
                            t.remove(&key, r, self.revision, events)?;
                        }
                    }
                    Ok(self.revision)
                } else {
                    Err(StoreError::LeaseNotFound(lease))
                };
                (Some(reply), result)
            }
            Op::Shutdown => (None, Ok(0)),
        })
    }

    /// Drops log entries older than `history`, in steps so the cost is
    /// spread out rather than paid on every commit.
    fn compact(&mut self, t: &mut Tables<'_>) -> Result<()> {
        let floor = self.revision.saturating_sub(self.history);
        if floor > self.compacted + (self.history / 16).max(1) {
            t.log
                .retain_in((self.compacted + 1)..=floor, |_, _| false)
                .map_err(storage)?;
            self.compacted = floor;
            t.meta.insert(META_COMPACTED, floor).map_err(storage)?;
        }
        Ok(())
    }
}

fn reply_to(op: Op, result: Result<u64>) {
    let reply = match op {
        Op::Create { reply, .. }
        | Op::Update { reply, .. }
        | Op::Delete { reply, .. }
        | Op::LeaseGrant { reply, .. }
        | Op::LeaseRevoke { reply, .. } => reply,
        Op::Shutdown => return,
    };
    let _ = reply.send(result);
}

struct Tables<'txn> {
    kv: redb::Table<'txn, &'static str, &'static [u8]>,
    log: redb::Table<'txn, u64, &'static [u8]>,
    meta: redb::Table<'txn, &'static str, u64>,
    leases: redb::Table<'txn, u64, u64>,
}

impl Tables<'_> {
    fn record(&self, key: &str) -> Result<Option<Record>> {
        Ok(self
            .kv
            .get(key)
            .map_err(storage)?
            .and_then(|v| decode_record(v.value())))
    }

    fn lease_exists(&self, lease: LeaseId) -> Result<bool> {
        Ok(self.leases.get(lease).map_err(storage)?.is_some())
    }

    fn put(&mut self, key: &str, r: &Record, events: &mut Vec<Arc<Event>>) -> Result<()> {
        self.kv
            .insert(key, encode_record(r).as_slice())
            .map_err(storage)?;
        let event = Event::Put(key_value(key.to_string(), r.clone()));
        self.log
            .insert(r.mod_revision, encode_event(&event).as_slice())
            .map_err(storage)?;
        events.push(Arc::new(event));
        Ok(())
    }

    fn remove(
        &mut self,
        key: &str,
        prev: Record,
        revision: Revision,
        events: &mut Vec<Arc<Event>>,
    ) -> Result<()> {
        self.kv.remove(key).map_err(storage)?;
        let event = Event::Delete {
            key: key.to_string(),
            revision,
            prev: key_value(key.to_string(), prev),
        };
        self.log
            .insert(revision, encode_event(&event).as_slice())
            .map_err(storage)?;
        events.push(Arc::new(event));
        Ok(())
    }
}

/// A watch on the embedded store: first the log from `position`, then live
/// batches; after falling behind the live buffer, back to the log.
struct EmbeddedWatch {
    shared: Arc<Shared>,
    prefix: String,
    /// Every revision up to here has been delivered or skipped.
    position: Revision,
    live: broadcast::Receiver<Arc<Batch>>,
    catching_up: bool,
    ended: bool,
}

#[async_trait::async_trait]
impl WatchSource for EmbeddedWatch {
    async fn fill(&mut self, out: &mut VecDeque<Arc<Event>>) -> Option<Result<()>> {
        while !self.ended {
            if self.catching_up {
                let db = self.shared.db.clone();
                let after = self.position;
                let chunk = tokio::task::spawn_blocking(move || read_log(&db, after))
                    .await
                    .map_err(storage)
                    .and_then(|r| r);
                match chunk {
                    Ok(events) => {
                        self.catching_up = events.len() == CATCH_UP_CHUNK;
                        for event in events {
                            self.take(&Arc::new(event), out);
                        }
                    }
                    Err(e) => {
                        self.ended = true;
                        return Some(Err(e));
                    }
                }
            } else {
                match self.live.recv().await {
                    Ok(batch) => {
                        for event in &batch.events {
                            self.take(event, out);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live buffer: subscribe afresh, then
                        // read what was missed from the log.
                        match lock(&self.shared.fanout).as_ref() {
                            Some(sender) => self.live = sender.subscribe(),
                            None => self.ended = true,
                        }
                        self.catching_up = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => self.ended = true,
                }
            }
            if !out.is_empty() {
                return Some(Ok(()));
            }
        }
        None
    }
}

impl EmbeddedWatch {
    /// Delivers `event` if it is new and under the prefix.
    fn take(&mut self, event: &Arc<Event>, out: &mut VecDeque<Arc<Event>>) {
        if event.revision() > self.position {
            self.position = event.revision();
            if event.key().starts_with(self.prefix.as_str()) {
                out.push_back(event.clone());
            }
        }
    }
}

/// Up to [`CATCH_UP_CHUNK`] log entries after `after`.
fn read_log(db: &Database, after: Revision) -> Result<Vec<Event>> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let compacted = meta
        .get(META_COMPACTED)
        .map_err(storage)?
        .map_or(0, |v| v.value());
    if after < compacted {
        return Err(StoreError::Compacted {
            requested: after,
            compacted,
        });
    }
    let log = txn.open_table(LOG).map_err(storage)?;
    let mut out = Vec::new();
    for entry in log
        .range((after + 1)..)
        .map_err(storage)?
        .take(CATCH_UP_CHUNK)
    {
        let (rev, bytes) = entry.map_err(storage)?;
        let rev = rev.value();
        out.push(
            decode_event(rev, bytes.value()).ok_or_else(|| {
                StoreError::Storage(format!("corrupt log entry at revision {rev}"))
            })?,
        );
    }
    Ok(out)
}
