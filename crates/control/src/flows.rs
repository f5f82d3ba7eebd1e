//! `GET /flows?namespace=NS&service=S&verdict=V&follow=true`: what network
//! policy denied (or audited) on every node, merged. The server asks each
//! node's agent (a signed request), filters the JSON lines, and streams
//! them on: without `follow`, each node's recent flows in time order; with
//! it, then every new one as it happens. A node that cannot be reached is
//! reported in the stream (`{"node": …, "error": …}`), never skipped
//! silently, and so are flows an agent's reader missed (`{"lost": n}`).

use std::convert::Infallible;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::StatusCode;
use serde_json::{Value, json};
use skiff_identity::Principal;
use skiff_store::Store;

use crate::api::AppState;
use crate::auth::{Verb, authorize};
use crate::error::ApiError;

/// What a client asked to see.
#[derive(Debug, Default, Clone)]
struct Filter {
    namespace: Option<String>,
    service: Option<String>,
    verdict: Option<String>,
    follow: bool,
}

impl Filter {
    fn parse(query: &str) -> Result<Filter, ApiError> {
        let mut f = Filter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.to_string();
            match k {
                "namespace" => f.namespace = Some(v),
                "service" => f.service = Some(v),
                "verdict" => {
                    if !matches!(v.as_str(), "denied" | "audit-denied") {
                        return Err(ApiError::bad_request(format!(
                            "verdict must be denied or audit-denied, found {v:?}"
                        )));
                    }
                    f.verdict = Some(v)
                }
                "follow" => f.follow = matches!(v.as_str(), "true" | "1"),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter `{k}`; known: namespace, service, verdict, follow"
                    )));
                }
            }
        }
        Ok(f)
    }

    /// Whether a flow line passes; lines that are not flows (lost, errors) always do.
    fn keeps(&self, v: &Value) -> bool {
        if v.get("verdict").is_none() {
            return true;
        }
        let either = |field: &str, want: &Option<String>| {
            want.as_ref().is_none_or(|w| {
                ["src", "dst"].iter().any(|end| {
                    v.pointer(&format!("/{end}/{field}"))
                        .and_then(Value::as_str)
                        == Some(w)
                })
            })
        };
        either("namespace", &self.namespace)
            && either("service", &self.service)
            && self
                .verdict
                .as_ref()
                .is_none_or(|w| v.get("verdict").and_then(Value::as_str) == Some(w))
    }
}

pub(crate) async fn read(
    state: &AppState,
    who: &Principal,
    query: &str,
) -> Result<Response, ApiError> {
    let instances = skiff_api::KindInfo::find("instances")
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no Instance kind"))?;
    authorize(who, Verb::List, instances, None, None, None)?;
    let filter = Filter::parse(query)?;
    let (nodes, _) = state.store.list("/registry/nodes/").await?;
    let nodes: Vec<(String, Value)> = nodes
        .iter()
        .filter_map(|kv| {
            let v: Value = serde_json::from_slice(&kv.value).ok()?;
            let name = v.pointer("/metadata/name")?.as_str()?.to_string();
            v.pointer("/status/agentPort")?;
            Some((name, v))
        })
        .collect();
    let path = format!("/flows?follow={}", filter.follow);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut readers = Vec::new();
    for (name, node) in nodes {
        let response = crate::logs::agent_get(state, &name, &node, &path).await;
        let (tx, filter) = (tx.clone(), filter.clone());
        readers.push(tokio::spawn(async move {
            let mut body = match response {
                Ok(r) => r.into_body(),
                Err(e) => {
                    let _ = tx
                        .send(line(&json!({"node": name, "error": e.message})))
                        .await;
                    return;
                }
            };
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(at) = buf.iter().position(|&b| b == b'\n') {
                    let text: Vec<u8> = buf.drain(..=at).collect();
                    let Ok(mut v) = serde_json::from_slice::<Value>(&text) else {
                        continue;
                    };
                    if v.get("lost").is_some() {
                        v["node"] = json!(name);
                    }
                    if filter.keeps(&v) && tx.send(line(&v)).await.is_err() {
                        return;
                    }
                }
            }
        }));
    }
    drop(tx);
    if filter.follow {
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        });
        return Ok((
            [("content-type", "application/x-ndjson")],
            Body::from_stream(stream),
        )
            .into_response());
    }
    // Without follow: everything, in time order.
    let mut lines: Vec<(String, Bytes)> =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
            .map(|b| {
                let time = serde_json::from_slice::<Value>(&b)
                    .ok()
                    .and_then(|v| v.get("time").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default();
                (time, b)
            })
            .collect()
            .await;
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    let body: Vec<u8> = lines.into_iter().flat_map(|(_, b)| b.to_vec()).collect();
    Ok(([("content-type", "application/x-ndjson")], body).into_response())
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_either_end_and_the_verdict() {
        let f = Filter::parse("namespace=shop&verdict=denied")
            .unwrap_or_else(|e| panic!("{}", e.message));
        let flow = json!({"verdict": "denied", "src": {"namespace": "other"}, "dst": {"namespace": "shop", "service": "db"}});
        assert!(f.keeps(&flow));
        assert!(
            !f.keeps(&json!({"verdict": "audit-denied", "src": {"namespace": "shop"}, "dst": {}}))
        );
        assert!(f.keeps(&json!({"lost": 3})), "reports of loss always pass");
        let s = Filter::parse("service=web").unwrap_or_else(|e| panic!("{}", e.message));
        assert!(!s.keeps(&flow));
        assert!(Filter::parse("verdict=maybe").is_err());
        assert!(Filter::parse("colour=red").is_err());
    }
}
