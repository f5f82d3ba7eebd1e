//! `GET …/instances/NAME/log`: the API server fetches an instance's output
//! from the agent of its node, signing the request with the join token,
//! and streams it back. Clients never talk to agents directly.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use skiff_identity::{Principal, signed};
use skiff_store::Store;

use crate::api::{AppState, Query};
use crate::auth::{Verb, authorize};
use crate::error::ApiError;

fn read_json(kv: Option<skiff_store::KeyValue>) -> Option<Value> {
    kv.and_then(|kv| serde_json::from_slice(&kv.value).ok())
}

/// A signed GET to a node's agent (see `skiff_identity::signed`); the
/// response once its status is a success, else a 502 naming the node.
pub(crate) async fn agent_get(
    state: &AppState,
    node_name: &str,
    node: &Value,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
    let (Some(address), Some(port)) = (
        node.pointer("/status/address").and_then(Value::as_str),
        node.pointer("/status/agentPort").and_then(Value::as_u64),
    ) else {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {node_name} has no agent endpoint (an older or hollow agent)"),
        ));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    };
    let request = hyper::Request::get(format!("http://{host}:{port}{path}"))
        .header(signed::TIME_HEADER, now.to_string())
        .header(
            signed::SIGNATURE_HEADER,
            signed::sign(&state.join_token, "GET", path, now),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {node_name}'s agent at {host}:{port}: {e}"),
        )
    };
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .map_err(|_| unreachable(&"no answer within 5s"))?
        .map_err(|e| unreachable(&e))?;
    let status = response.status();
    if !status.is_success() {
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(unreachable(&format!("{status}: {body}")));
    }
    Ok(response)
}

/// The log of the instance stored at `key`.
pub(crate) async fn read(
    state: &AppState,
    who: &Principal,
    key: &str,
    q: &Query,
) -> Result<Response, ApiError> {
    let instances = skiff_api::KindInfo::find("instances")
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no Instance kind"))?;
    let mut parts = key
        .trim_start_matches("/registry/instances/")
        .splitn(2, '/');
    let (ns, name) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    authorize(who, Verb::Get, instances, Some(ns), Some(name), None)?;
    let Some(instance) = read_json(state.store.get(key).await?) else {
        return Err(ApiError::not_found(format!(
            "Instance {ns}/{name} not found"
        )));
    };
    let Some(node_name) = instance.pointer("/spec/node").and_then(Value::as_str) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("Instance {ns}/{name} is not on a node yet: it has no log"),
        ));
    };
    let node = read_json(
        state
            .store
            .get(&format!("/registry/nodes/{node_name}"))
            .await?,
    )
    .unwrap_or_default();
    let mut path = format!("/logs/{ns}/{name}?follow={}", q.follow);
    if let Some(n) = q.tail {
        path.push_str(&format!("&tail={n}"));
    }
    let response = agent_get(state, node_name, &node, &path).await?;
    Ok((
        [("content-type", "text/plain; charset=utf-8")],
        Body::new(response.into_body()),
    )
        .into_response())
}
