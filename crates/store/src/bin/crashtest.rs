//! Crash-test helper: opens the store in DIR, watches `/crash/` from
//! revision AFTER, and writes from 16 tasks until killed, printing one line
//! per acknowledged write and per watched event:
//!
//! ```text
//! ack create <revision> <key>
//! ack counter <writer> <value> <revision>
//! event <revision> <key>
//! ```
//!
//! `tests/crash.rs` kills it with SIGKILL at random points and checks that
//! everything acknowledged survived and watches resume exactly once.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use skiff_store::{Config, EmbeddedStore, Store, StoreError};

const WRITERS: usize = 16;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(after)) = (args.next(), args.next().and_then(|a| a.parse::<u64>().ok()))
    else {
        eprintln!("usage: skiff-store-crashtest DIR AFTER_REVISION");
        std::process::exit(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(PathBuf::from(dir), after)) {
        eprintln!("crashtest: {e}");
        std::process::exit(1);
    }
}

async fn run(dir: PathBuf, after: u64) -> Result<(), StoreError> {
    let store = Arc::new(EmbeddedStore::open(
        &dir.join("store.redb"),
        Config::default(),
    )?);
    let mut watch = store.watch("/crash/", after).await?;
    tokio::spawn(async move {
        while let Some(Ok(event)) = watch.next().await {
            println!("event {} {}", event.revision(), event.key());
        }
    });
    let pid = std::process::id();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let counter = format!("/crash/counter/{w}");
            for i in 0u64.. {
                let key = format!("/crash/data/{pid}-{w}-{i}");
                let rev = store
                    .create(&key, Bytes::from(vec![b'x'; 200]), None)
                    .await?;
                println!("ack create {rev} {key}");
                // A compare-and-swap counter per writer: its value only grows.
                let (value, rev) = match store.get(&counter).await? {
                    None => (1, store.create(&counter, Bytes::from("1"), None).await?),
                    Some(kv) => {
                        let next: u64 = std::str::from_utf8(&kv.value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0)
                            + 1;
                        (
                            next,
                            store
                                .update(&counter, Bytes::from(next.to_string()), kv.mod_revision)
                                .await?,
                        )
                    }
                };
                println!("ack counter {w} {value} {rev}");
            }
            Ok::<(), StoreError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| StoreError::Storage(e.to_string()))??;
    }
    Ok(())
}
