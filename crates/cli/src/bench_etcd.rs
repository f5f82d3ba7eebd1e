//! The peer for `skiff bench store --etcd URL`: the same writes and
//! watchers against etcd, through its v3 JSON gateway.
//!
//! The gateway adds HTTP/JSON/base64 work that etcd's native gRPC clients
//! do not pay, so these figures are a lower bound for etcd; `etcdctl check
//! perf` gives its native-client figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::bench::{ms, percentile};
use crate::bench_store::{SAMPLE_EVERY, StoreArgs};

type Http = Client<HttpConnector, Full<Bytes>>;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

async fn post(http: &Http, url: &str, body: &Value) -> anyhow::Result<Value> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = http.request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "etcd answered {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(serde_json::from_slice(&bytes)?)
}

/// etcd's JSON encodes 64-bit numbers as strings.
fn number(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or(0)
}

pub async fn measure(args: &StoreArgs, url: &str) -> anyhow::Result<Value> {
    let url = url.trim_end_matches('/').to_string();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.clients.max(args.watchers) + 8)
        .build(connector);
    let prefix = format!("/skiff-bench/{}/", std::process::id());
    let status = post(
        &http,
        &format!("{url}/v3/kv/range"),
        &json!({"key": b64(b"/"), "limit": 1}),
    )
    .await
    .with_context(|| format!("cannot reach etcd at {url}"))?;
    let base = number(&status["header"]["revision"]);
    let start = Instant::now();
    let acked: Arc<Vec<AtomicU64>> =
        Arc::new((0..=args.writes).map(|_| AtomicU64::new(0)).collect());

    let mut watchers = Vec::with_capacity(args.watchers);
    for id in 0..args.watchers as u64 {
        let (http, url, total) = (http.clone(), url.clone(), args.writes);
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = json!({"create_request": {"key": b64(prefix.as_bytes()), "range_end": b64(&end), "start_revision": (base + 1).to_string()}});
        watchers.push(tokio::spawn(async move {
            let req = hyper::Request::post(format!("{url}/v3/watch"))
                .body(Full::new(Bytes::from(body.to_string())))?;
            let mut resp = http.request(req).await?.into_body();
            let (mut seen, mut samples, mut buf) = (0usize, Vec::new(), Vec::new());
            while seen < total {
                let Some(frame) = resp.frame().await else {
                    break;
                };
                if let Some(data) = frame?.data_ref() {
                    buf.extend_from_slice(data);
                }
                // The gateway streams one JSON object per message; split on newlines.
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    let now = start.elapsed().as_nanos() as u64;
                    for e in msg["result"]["events"].as_array().into_iter().flatten() {
                        seen += 1;
                        let rev = number(&e["kv"]["mod_revision"]).saturating_sub(base);
                        if rev % SAMPLE_EVERY == id % SAMPLE_EVERY {
                            samples.push((rev, now));
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>((seen, samples))
        }));
    }
    // Let the watch streams be established before writing.
    tokio::time::sleep(Duration::from_millis(200 + args.watchers as u64)).await;

    let value = b64(&vec![b'v'; args.value_size]);
    let per_client = args.writes.div_ceil(args.clients);
    let began = Instant::now();
    let mut clients = Vec::new();
    for c in 0..args.clients {
        let (http, url, value, acked, prefix) = (
            http.clone(),
            url.clone(),
            value.clone(),
            acked.clone(),
            prefix.clone(),
        );
        let n = per_client.min(args.writes.saturating_sub(c * per_client));
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                let resp = post(
                    &http,
                    &format!("{url}/v3/kv/put"),
                    &json!({"key": b64(format!("{prefix}{c}/{i}").as_bytes()), "value": value}),
                )
                .await?;
                latencies.push(t.elapsed());
                let rev = number(&resp["header"]["revision"]).saturating_sub(base) as usize;
                if let Some(slot) = acked.get(rev) {
                    slot.store(start.elapsed().as_nanos() as u64, Ordering::Release);
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for c in clients {
        latencies.extend(c.await??);
    }
    let secs = began.elapsed().as_secs_f64();
    let mut delivery = Vec::new();
    let mut incomplete = 0;
    for w in watchers {
        match tokio::time::timeout(Duration::from_secs(120), w).await {
            Ok(Ok(Ok((seen, samples)))) => {
                incomplete += usize::from(seen < args.writes);
                for (rev, at) in samples {
                    if let Some(ack) = acked.get(rev as usize) {
                        delivery.push(Duration::from_nanos(
                            at.saturating_sub(ack.load(Ordering::Acquire)),
                        ));
                    }
                }
            }
            _ => incomplete += 1,
        }
    }
    // Leave etcd as we found it.
    let mut end = prefix.clone().into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let _ = post(
        &http,
        &format!("{url}/v3/kv/deleterange"),
        &json!({"key": b64(prefix.as_bytes()), "range_end": b64(&end)}),
    )
    .await;
    Ok(json!({
        "backend": "etcd (v3 JSON gateway)",
        "writes_per_s": (args.writes as f64 / secs).round(),
        "write_p50_ms": ms(percentile(&mut latencies, 0.50)),
        "write_p99_ms": ms(percentile(&mut latencies, 0.99)),
        "watch_delivery_p99_ms": ms(percentile(&mut delivery, 0.99)),
        "watch_samples": delivery.len(),
        "watchers_incomplete": incomplete,
    }))
}
