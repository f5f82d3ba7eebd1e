//! Skiff's revisioned key-value store: the trait every backend implements
//! (revisions, compare-and-swap, prefix watches, leases) and the embedded
//! redb backend.
//!
//! Every change gets the next store-wide revision. A write is acknowledged
//! only once it is durable. A watch delivers every change under its prefix
//! after a given revision, in revision order, exactly once; when that is no
//! longer possible (history compacted past it) it says so with
//! [`StoreError::Compacted`] instead of skipping.

mod codec;
pub mod embedded;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use embedded::{Config, EmbeddedStore};

/// A store-wide, strictly increasing change number. 0 means "before anything".
pub type Revision = u64;

/// A lease: keys attached to it are deleted when it expires or is revoked.
pub type LeaseId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// The revision that created the key (reset when it is deleted and created again).
    pub create_revision: Revision,
    /// The revision of the last change; what compare-and-swap compares.
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// One change, as watches deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// `prev` is the key's last value before the deletion.
    Delete {
        key: String,
        revision: Revision,
        prev: KeyValue,
    },
}

impl Event {
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists (revision {revision})")]
    AlreadyExists { key: String, revision: Revision },
    #[error("key {key} changed: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    #[error("key {key} not found")]
    NotFound { key: String },
    /// The changes after `requested` are no longer kept: list again, then
    /// watch from the list's revision.
    #[error(
        "revision {requested} is compacted (history starts after {compacted}); relist and watch from the new revision"
    )]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("the store is shut down")]
    Closed,
    #[error("storage failure: {0}")]
    Storage(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A revisioned key-value store. Keys are UTF-8 paths; values are bytes.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key under `prefix`, sorted, and the revision of that snapshot:
    /// watching from it misses nothing.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Creates a key that must not exist. Returns the new revision.
    async fn create(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<Revision>;

    /// Replaces a key whose `mod_revision` must equal `expected`.
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision>;

    /// Deletes a key; with `expected`, only if its `mod_revision` matches.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Revision>;

    /// Changes under `prefix` with revision greater than `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch>;

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId>;

    /// Restarts a lease's TTL.
    async fn lease_keepalive(&self, lease: LeaseId) -> Result<()>;

    /// Ends a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()>;

    /// The latest committed revision.
    fn revision(&self) -> Revision;
}

/// A stream of changes; see [`Store::watch`].
pub struct Watch {
    inner: Box<dyn WatchSource>,
    ready: std::collections::VecDeque<Arc<Event>>,
    ended: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

impl Watch {
    pub fn new(source: impl WatchSource + 'static) -> Self {
        Watch {
            inner: Box::new(source),
            ready: std::collections::VecDeque::new(),
            ended: false,
        }
    }

    /// The next change, in revision order. `Err(Compacted)` ends the watch:
    /// relist. `None` when the store shuts down.
    pub async fn next(&mut self) -> Option<Result<Arc<Event>>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            if self.ended {
                return None;
            }
            match self.inner.fill(&mut self.ready).await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    self.ended = true;
                    return Some(Err(e));
                }
                None => self.ended = true,
            }
        }
    }
}

/// What a backend implements to feed a [`Watch`]: changes arrive in
/// chunks (a commit's worth), so a watch costs one wake-up per chunk, not
/// per change.
#[async_trait::async_trait]
pub trait WatchSource: Send {
    /// Appends the next changes, in revision order, to `out`; `None` when
    /// the store shut down, `Err` when the watch cannot go on.
    async fn fill(
        &mut self,
        out: &mut std::collections::VecDeque<Arc<Event>>,
    ) -> Option<Result<()>>;
}
