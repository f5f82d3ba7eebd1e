//! `skiff bench store`: acknowledged writes per second, write latency, and
//! watch delivery latency of the embedded store under concurrent clients
//! and many watchers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use skiff_store::{Config, EmbeddedStore, Store};

use crate::bench::{ms, percentile, round};

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Concurrent writers.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Total writes (creates of new keys).
    #[arg(long, default_value_t = 100_000)]
    pub writes: usize,
    /// Watchers on the written prefix, each receiving every write.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    #[arg(long, default_value_t = 512)]
    pub value_size: usize,
    /// Data directory (a temporary one, removed after, if unset). Put it on
    /// the disk you want measured.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Also run the same workload against this etcd (its v3 JSON gateway,
    /// e.g. http://127.0.0.1:2379) and report it beside ours.
    #[arg(long)]
    pub etcd: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// Each watcher samples one in this many revisions for delivery latency.
pub(crate) const SAMPLE_EVERY: u64 = 64;

pub fn run(args: &StoreArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        args.clients >= 1 && args.writes >= 1,
        "--clients and --writes must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut out = runtime.block_on(measure(args))?;
    if let Some(url) = &args.etcd {
        out["peer_etcd"] = runtime.block_on(crate::bench_etcd::measure(args, url))?;
    }
    println!("{out}");
    Ok(0)
}

async fn measure(args: &StoreArgs) -> anyhow::Result<serde_json::Value> {
    let tmp;
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let path = dir.join(format!("bench-{}.redb", std::process::id()));
    let store = Arc::new(EmbeddedStore::open(&path, Config::default()).context("open store")?);
    let start = Instant::now();
    let base = store.revision();
    // Per revision: when its write was requested and when it was
    // acknowledged to the writer, in ns since start.
    let requested: Arc<Vec<AtomicU64>> =
        Arc::new((0..=args.writes).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> =
        Arc::new((0..=args.writes).map(|_| AtomicU64::new(0)).collect());

    let mut watchers = Vec::with_capacity(args.watchers);
    for id in 0..args.watchers as u64 {
        let mut watch = store.watch("/bench/", base).await?;
        let total = args.writes;
        watchers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut seen = 0;
            while seen < total {
                let Some(Ok(event)) = watch.next().await else {
                    break;
                };
                seen += 1;
                let rev = event.revision() - base;
                if rev % SAMPLE_EVERY == id % SAMPLE_EVERY {
                    samples.push((rev, start.elapsed().as_nanos() as u64));
                }
            }
            (seen, samples)
        }));
    }

    let value = Bytes::from(vec![b'v'; args.value_size]);
    let per_client = args.writes.div_ceil(args.clients);
    let began = Instant::now();
    let mut clients = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let (store, value, requested, acked) = (
            store.clone(),
            value.clone(),
            requested.clone(),
            acked.clone(),
        );
        let n = per_client.min(args.writes.saturating_sub(c * per_client));
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                let asked = start.elapsed().as_nanos() as u64;
                let rev = store
                    .create(&format!("/bench/{c}/{i}"), value.clone(), None)
                    .await?;
                latencies.push(t.elapsed());
                let slot = (rev - base) as usize;
                if let (Some(r), Some(a)) = (requested.get(slot), acked.get(slot)) {
                    r.store(asked, Ordering::Release);
                    a.store(start.elapsed().as_nanos() as u64, Ordering::Release);
                }
            }
            Ok::<_, skiff_store::StoreError>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(args.writes);
    for c in clients {
        latencies.extend(c.await??);
    }
    let write_secs = began.elapsed().as_secs_f64();

    let mut delivery = Vec::new();
    let mut propagation = Vec::new();
    let mut incomplete = 0;
    for w in watchers {
        // Every writer has its acknowledgement by now, so all samples can be matched.
        let (seen, samples) = tokio::time::timeout(Duration::from_secs(600), w).await??;
        incomplete += usize::from(seen < args.writes);
        for (rev, at) in samples {
            let ack = acked[rev as usize].load(Ordering::Acquire);
            // A watcher can see a change before its writer is scheduled to
            // record the acknowledgement: that counts as zero delay.
            delivery.push(Duration::from_nanos(at.saturating_sub(ack)));
            propagation.push(Duration::from_nanos(
                at.saturating_sub(requested[rev as usize].load(Ordering::Acquire)),
            ));
        }
    }
    let stats = store.stats();
    store.close().await;
    drop(store);
    let _ = std::fs::remove_file(&path);
    Ok(serde_json::json!({
        "bench": "store",
        "backend": "embedded-redb",
        "clients": args.clients,
        "writes": args.writes,
        "watchers": args.watchers,
        "value_bytes": args.value_size,
        "writes_per_s": (args.writes as f64 / write_secs).round(),
        "write_p50_ms": ms(percentile(&mut latencies, 0.50)),
        "write_p99_ms": ms(percentile(&mut latencies, 0.99)),
        "watch_delivery_p50_ms": ms(percentile(&mut delivery, 0.50)),
        "watch_delivery_p99_ms": ms(percentile(&mut delivery, 0.99)),
        "change_propagation_p99_ms": ms(percentile(&mut propagation, 0.99)),
        "watch_samples": delivery.len(),
        "watchers_incomplete": incomplete,
        "commits": stats.commits,
        "writes_per_commit": round(stats.writes as f64 / stats.commits.max(1) as f64, 1),
    }))
}
