//! The node's discovery stream, as a proxy follows it: a unix socket where
//! the agent sends the peers table as updates (JSON lines). The proxy
//! says which version it has (`since N`), gets what it misses (the updates
//! after N, or a snapshot), then every update as it is made. Updates are
//! numbered consecutively: a gap, a bad update or a lost connection makes
//! the proxy subscribe again from the version it has.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::transparent::Peers;

/// How long the first update may take to arrive.
const FIRST_UPDATE: Duration = Duration::from_secs(10);

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

/// Subscribes, applies the first update (so the proxy is never ready
/// without its table), then follows the stream in the background for as
/// long as the runtime runs.
pub async fn follow(path: PathBuf, peers: Arc<RwLock<Peers>>) -> Result<(), String> {
    let first = async {
        // The agent may be (re)starting its socket: try again meanwhile.
        loop {
            let attempt = async {
                let mut lines = subscribe(&path, 0).await?;
                next_update(&mut lines, &peers).await?;
                Ok::<_, String>(lines)
            };
            match attempt.await {
                Ok(lines) => return lines,
                Err(e) => tracing::debug!(error = %e, "Discovery not there yet"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let lines = tokio::time::timeout(FIRST_UPDATE, first)
        .await
        .map_err(|_| format!("{}: no discovery update in 10 s", path.display()))?;
    tokio::spawn(keep_following(path, peers, lines));
    Ok(())
}

async fn keep_following(path: PathBuf, peers: Arc<RwLock<Peers>>, mut lines: Lines) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match next_update(&mut lines, &peers).await {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                continue;
            }
            Err(e) => tracing::info!(error = %e, "Discovery stream interrupted; subscribing again"),
        }
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            let have = peers.read().unwrap_or_else(|p| p.into_inner()).version;
            match subscribe(&path, have).await {
                Ok(l) => {
                    lines = l;
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "Cannot reach mesh discovery"),
            }
        }
    }
}

async fn subscribe(path: &Path, since: u64) -> Result<Lines, String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("since {since}\n").as_bytes())
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // The write half stays open only as long as needed; the agent reads
    // one line.
    drop(write);
    Ok(BufReader::new(read).lines())
}

/// Reads and applies one update; an error means: subscribe again.
async fn next_update(lines: &mut Lines, peers: &RwLock<Peers>) -> Result<(), String> {
    let line = lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the agent closed the stream")?;
    let update: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("bad update: {e}"))?;
    apply(peers, &update)
}

/// Applies an update if it follows the version held (or is a snapshot).
pub fn apply(peers: &RwLock<Peers>, update: &serde_json::Value) -> Result<(), String> {
    let version = update.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    let snapshot = update.get("snapshot").and_then(|v| v.as_bool()) == Some(true);
    let mut table = peers.write().unwrap_or_else(|p| p.into_inner());
    if !snapshot && version != table.version + 1 {
        return Err(format!(
            "update {version} does not follow {}",
            table.version
        ));
    }
    table.apply(update, "discovery: ")?;
    tracing::debug!(
        version,
        peers = table.table.len(),
        services = table.services.len(),
        "Discovery update applied"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn updates_apply_in_order_and_a_gap_is_refused() {
        let peers = RwLock::new(Peers::default());
        let snapshot = json!({"version": 4, "revisions": {"instances": 10}, "snapshot": true, "set": {
            "peers": {"198.19.16.2": "spiffe://td/ns/shop/sa/db"},
            "services": {"198.18.128.1": {"name": "shop/db", "endpoints": ["198.19.16.2"]}},
        }});
        apply(&peers, &snapshot).unwrap();
        let gap = json!({"version": 6, "set": {}, "remove": {}});
        assert!(
            apply(&peers, &gap)
                .unwrap_err()
                .contains("does not follow 4")
        );
        let next = json!({"version": 5, "revisions": {"instances": 12}, "set": {
            "services": {"198.18.128.2": {"name": "shop/web", "endpoints": []}},
        }, "remove": {"peers": ["198.19.16.2"]}});
        apply(&peers, &next).unwrap();
        let p = peers.read().unwrap();
        assert_eq!(p.version, 5);
        assert!(p.table.is_empty());
        assert_eq!(p.by_name.len(), 2);
        assert_eq!(p.revisions.get("instances"), Some(&12));
    }

    #[test]
    fn a_bad_entry_changes_nothing() {
        let peers = RwLock::new(Peers::default());
        let bad = json!({"version": 1, "set": {
            "services": {"198.18.128.2": {"name": "shop/web", "endpoints": []}},
            "peers": {"198.19.16.2": "not an id"},
        }});
        let err = apply(&peers, &bad).unwrap_err();
        assert!(err.contains("peers.198.19.16.2"), "{err}");
        assert_eq!(peers.read().unwrap().version, 0);
        assert!(peers.read().unwrap().services.is_empty());
    }
}
