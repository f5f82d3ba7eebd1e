//! The REST API: every kind under
//! `/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/status]]`,
//! with list and label selectors, resumable watches (one JSON event per
//! line), optimistic concurrency, and the validation `skiff validate` does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use skiff_api::selector::LabelSelector;
use skiff_api::{KINDS, KindInfo, load_str_in};
use skiff_identity::Principal;
use skiff_store::{EmbeddedStore, Event, KeyValue, Store};
use tokio::sync::watch;
use tracing::Instrument;

use crate::auth::{Peer, Verb, authenticate, authorize};
use crate::error::ApiError;
use crate::metrics::{MethodLabels, Metrics, RequestLabels};

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// How long a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle watch gets a BOOKMARK line (keeps proxies and dead-peer detection honest).
const BOOKMARK_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<EmbeddedStore>,
    pub metrics: Arc<Metrics>,
    pub join_token: String,
    pub shutdown: watch::Receiver<bool>,
    /// A node is lost when its heartbeats stop for this long.
    pub node_grace: Duration,
    /// The store lease behind each node's heartbeat key.
    pub node_leases: std::sync::Mutex<std::collections::HashMap<String, skiff_store::LeaseId>>,
    /// Signs instances' workload certificates.
    pub workload: crate::certificates::WorkloadCa,
}

/// Where a node's liveness lease lives; the node lifecycle controller watches it.
pub const NODE_LEASES: &str = "/leases/nodes/";

/// The part of an object a path names beyond the object itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    None,
    /// `/status`: only the status changes.
    Status,
    /// `/heartbeat` (nodes): renews the node's liveness lease.
    Heartbeat,
    /// `/log` (instances): the instance's output, read from its node's agent.
    Log,
    /// `/certificate` (instances): a workload certificate for a CSR.
    Certificate,
}

/// What a path names.
#[derive(Debug)]
struct Target {
    kind: &'static KindInfo,
    namespace: Option<String>,
    name: Option<String>,
    sub: Sub,
}

impl Target {
    fn key(&self) -> String {
        match (&self.namespace, &self.name) {
            (Some(ns), Some(n)) => format!("/registry/{}/{ns}/{n}", self.kind.plural),
            (None, Some(n)) => format!("/registry/{}/{n}", self.kind.plural),
            _ => self.prefix(),
        }
    }

    fn prefix(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("/registry/{}/{ns}/", self.kind.plural),
            None => format!("/registry/{}/", self.kind.plural),
        }
    }
}

/// Entry point for every request; records metrics around [`dispatch`].
pub async fn handle(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, Infallible> {
    let started = Instant::now();
    let method = req.method().to_string();
    let response = match dispatch(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.clone(),
            code: response.status().as_u16().to_string(),
        })
        .inc();
    state
        .metrics
        .duration
        .get_or_create(&MethodLabels { method })
        .observe(started.elapsed().as_secs_f64());
    Ok(response)
}

async fn dispatch(state: &Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return Ok("ok\n".into_response());
    }
    let who = authenticate(
        req.extensions().get::<Peer>(),
        req.headers(),
        &state.join_token,
    )?;
    let span = tracing::info_span!("request", http.method = %req.method(), http.path = %path, client.principal = %who);
    // Instrumented, not entered: a guard held across `.await` on a
    // multi-threaded runtime corrupts the subscriber's span stacks (log
    // lines nested in other requests' spans, and worse).
    routed(state, req, path, who).instrument(span).await
}

async fn routed(
    state: &Arc<AppState>,
    req: Request,
    path: String,
    who: Principal,
) -> Result<Response, ApiError> {
    if path == "/metrics" {
        let stats = state.store.stats();
        let text = state.metrics.render(state.store.revision(), stats.commits);
        return Ok((
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response());
    }
    if path == "/flows" {
        return crate::flows::read(state, &who, req.uri().query().unwrap_or_default()).await;
    }
    let target = parse_path(&path)?;
    let query = Query::parse(req.uri().query().unwrap_or_default())?;
    let method = req.method().clone();
    match (method, &target.name, target.sub) {
        (Method::PUT, Some(node), Sub::Heartbeat) => heartbeat(state, &who, &target, node).await,
        (Method::GET, Some(_), Sub::Log) => {
            crate::logs::read(state, &who, &target.key(), &query).await
        }
        (Method::POST, Some(name), Sub::Certificate) => {
            let body = read_body(req).await?;
            let ns = target.namespace.clone().unwrap_or_default();
            if target.kind.kind == "Service" {
                crate::certificates::for_service(state, &who, &ns, name, &body)
            } else {
                crate::certificates::for_instance(state, &who, &target.key(), &ns, name, &body)
                    .await
            }
        }
        (Method::GET, Some(_), Sub::None) => get(state, &who, &target).await,
        (Method::GET, None, _) if query.watch => watch_stream(state, &who, &target, &query).await,
        (Method::GET, None, _) => list(state, &who, &target, &query).await,
        (Method::POST, None, _) => {
            let body = read_body(req).await?;
            create(state, &who, &target, &body).await
        }
        (Method::PUT, Some(_), sub @ (Sub::None | Sub::Status)) => {
            let body = read_body(req).await?;
            update(state, &who, &target, &body, sub == Sub::Status).await
        }
        (Method::DELETE, Some(_), Sub::None) => delete(state, &who, &target).await,
        (m, _, _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{m} is not supported on {path}"),
        )),
    }
}

fn parse_path(path: &str) -> Result<Target, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = || {
        ApiError::not_found(format!(
            "no such API path {path}; paths look like /apis/skiff.dev/v1/namespaces/NS/services/NAME"
        ))
    };
    let ["apis", group, version, rest @ ..] = segments.as_slice() else {
        return Err(not_found());
    };
    let api_version = format!("{group}/{version}");
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, Sub::None),
        [plural, name] => (*plural, Some(name.to_string()), Sub::None),
        [plural, name, "status"] => (*plural, Some(name.to_string()), Sub::Status),
        [plural, name, "heartbeat"] => (*plural, Some(name.to_string()), Sub::Heartbeat),
        [plural, name, "log"] => (*plural, Some(name.to_string()), Sub::Log),
        [plural, name, "certificate"] => (*plural, Some(name.to_string()), Sub::Certificate),
        _ => return Err(not_found()),
    };
    let Some(kind) = KINDS
        .iter()
        .find(|k| k.plural == plural && k.api_version == api_version)
    else {
        let known: Vec<String> = KINDS
            .iter()
            .map(|k| format!("{}/{}", k.api_version, k.plural))
            .collect();
        return Err(ApiError::not_found(format!(
            "unknown kind `{plural}` in {api_version}; known: {}",
            known.join(", ")
        )));
    };
    if namespace.is_some() && !kind.namespaced {
        return Err(ApiError::not_found(format!(
            "{} is not namespaced: use /apis/{api_version}/{plural}",
            kind.kind
        )));
    }
    if namespace.is_none() && kind.namespaced && name.is_some() {
        return Err(ApiError::not_found(format!(
            "{} is namespaced: use /apis/{api_version}/namespaces/NS/{plural}/NAME",
            kind.kind
        )));
    }
    if sub == Sub::Status && !kind.has_status {
        return Err(ApiError::not_found(format!("{} has no status", kind.kind)));
    }
    if (sub == Sub::Log && kind.kind != "Instance")
        || (sub == Sub::Certificate && !matches!(kind.kind, "Instance" | "Service"))
    {
        return Err(ApiError::not_found(format!(
            "{} has no {}; instances do",
            kind.kind,
            if sub == Sub::Log {
                "log"
            } else {
                "certificate"
            }
        )));
    }
    if sub == Sub::Heartbeat && kind.kind != "Node" {
        return Err(ApiError::not_found(format!(
            "{} has no heartbeat; only nodes do",
            kind.kind
        )));
    }
    Ok(Target {
        kind,
        namespace,
        name,
        sub,
    })
}

#[derive(Debug, Default)]
pub(crate) struct Query {
    /// `/log`: the last this many lines.
    pub tail: Option<usize>,
    /// `/log`: keep streaming what is appended.
    pub follow: bool,
    watch: bool,
    revision: Option<u64>,
    selector: LabelSelector,
}

impl Query {
    fn parse(q: &str) -> Result<Query, ApiError> {
        let mut out = Query::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| {
                ApiError::bad_request(format!("bad percent-encoding in `{pair}`"))
            })?;
            match k {
                "watch" => out.watch = matches!(v.as_str(), "true" | "1"),
                "revision" => {
                    out.revision = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!("revision must be a number, found {v:?}"))
                    })?)
                }
                "tail" => {
                    out.tail = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!(
                            "tail must be a number of lines, found {v:?}"
                        ))
                    })?)
                }
                "follow" => out.follow = matches!(v.as_str(), "true" | "1"),
                "labelSelector" => {
                    out.selector = LabelSelector::parse(&v)
                        .map_err(|e| ApiError::bad_request(format!("labelSelector: {e}")))?
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter `{k}`; known: watch, revision, labelSelector, tail, follow"
                    )));
                }
            }
        }
        Ok(out)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    let body = req.into_body();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {}s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"))
                || e.to_string().contains("length limit");
            if too_large {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body is larger than {} MiB",
                        MAX_BODY / (1024 * 1024)
                    ),
                ))
            } else {
                Err(ApiError::bad_request(format!(
                    "cannot read the request body: {e}"
                )))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

/// The stored JSON of an object, with its revision filled in.
fn object(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("corrupt object at {}: {e}", kv.key)))?;
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("revision".into(), json!(kv.mod_revision));
    }
    Ok(v)
}

async fn get(state: &AppState, who: &Principal, t: &Target) -> Result<Response, ApiError> {
    authorize(
        who,
        Verb::Get,
        t.kind,
        t.namespace.as_deref(),
        t.name.as_deref(),
        None,
    )?;
    match state.store.get(&t.key()).await? {
        Some(kv) => Ok(axum::Json(object(&kv)?).into_response()),
        None => Err(not_found(t)),
    }
}

fn not_found(t: &Target) -> ApiError {
    let name = t.name.as_deref().unwrap_or_default();
    match &t.namespace {
        Some(ns) => ApiError::not_found(format!("{} {ns}/{name} not found", t.kind.kind)),
        None => ApiError::not_found(format!("{} {name} not found", t.kind.kind)),
    }
}

async fn list(
    state: &AppState,
    who: &Principal,
    t: &Target,
    q: &Query,
) -> Result<Response, ApiError> {
    authorize(who, Verb::List, t.kind, t.namespace.as_deref(), None, None)?;
    let (kvs, revision) = state.store.list(&t.prefix()).await?;
    let mut items = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        let o = object(kv)?;
        if q.selector.matches(&skiff_api::meta::labels_in(&o)) {
            items.push(o);
        }
    }
    Ok(axum::Json(json!({
        "apiVersion": t.kind.api_version,
        "kind": format!("{}List", t.kind.kind),
        "revision": revision,
        "items": items,
    }))
    .into_response())
}

/// Decodes a request body as exactly one object of the target's kind.
fn decode_body(t: &Target, body: &[u8]) -> Result<skiff_api::Resource, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8"))?;
    let default_ns = t.namespace.as_deref().unwrap_or("default");
    let loaded = load_str_in("request body", text, default_ns).map_err(|errors| {
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{} error(s) in the request body", errors.len()),
        );
        e.details = errors.iter().map(ToString::to_string).collect();
        e
    })?;
    let [one] = <[skiff_api::Loaded; 1]>::try_from(loaded).map_err(|l| {
        ApiError::bad_request(format!(
            "expected exactly one object in the request body, found {}",
            l.len()
        ))
    })?;
    let r = one.resource;
    if r.kind() != t.kind.kind {
        return Err(ApiError::bad_request(format!(
            "the body is a {}, but the path is for {}",
            r.kind(),
            t.kind.kind
        )));
    }
    if t.kind.namespaced && r.metadata().namespace.as_deref() != t.namespace.as_deref() {
        return Err(ApiError::bad_request(format!(
            "the body's namespace {:?} does not match the path's {:?}",
            r.metadata().namespace.as_deref().unwrap_or_default(),
            t.namespace.as_deref().unwrap_or_default()
        )));
    }
    if let Some(name) = &t.name
        && &r.metadata().name != name
    {
        return Err(ApiError::bad_request(format!(
            "the body names {:?}, the path {name:?}",
            r.metadata().name
        )));
    }
    Ok(r)
}

/// The JSON to store: the object without its revision (the store keeps that).
fn stored_json(v: &mut Value) -> Result<Bytes, ApiError> {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("revision");
    }
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn create(
    state: &AppState,
    who: &Principal,
    t: &Target,
    body: &[u8],
) -> Result<Response, ApiError> {
    let r = decode_body(t, body)?;
    let name = r.metadata().name.clone();
    let t = Target {
        kind: t.kind,
        namespace: t
            .namespace
            .clone()
            .or_else(|| r.metadata().namespace.clone())
            .filter(|_| t.kind.namespaced),
        name: Some(name),
        sub: Sub::None,
    };
    if t.kind.namespaced && t.namespace.is_none() {
        return Err(ApiError::bad_request(format!(
            "{} is namespaced: POST to /apis/{}/namespaces/NS/{}",
            t.kind.kind, t.kind.api_version, t.kind.plural
        )));
    }
    let mut v = serde_json::to_value(&r).map_err(|e| ApiError::internal(e.to_string()))?;
    authorize(
        who,
        Verb::Create,
        t.kind,
        t.namespace.as_deref(),
        t.name.as_deref(),
        Some(&v),
    )?;
    if crate::policy_capacity::applies_to(t.kind.kind) {
        crate::policy_capacity::check(&state.store, &t.key(), &v, &r.display_name()).await?;
    }
    let bytes = stored_json(&mut v)?;
    let revision = state.store.create(&t.key(), bytes, None).await?;
    tracing::info!(object.kind = t.kind.kind, object.name = ?t.name, revision, "Created");
    set_revision(&mut v, revision);
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

fn set_revision(v: &mut Value, revision: u64) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("revision".into(), json!(revision));
    }
}

async fn update(
    state: &AppState,
    who: &Principal,
    t: &Target,
    body: &[u8],
    status: bool,
) -> Result<Response, ApiError> {
    let r = decode_body(t, body)?;
    let Some(current) = state.store.get(&t.key()).await? else {
        return Err(not_found(t));
    };
    let stored = object(&current)?;
    let verb = if status {
        Verb::UpdateStatus
    } else {
        Verb::Update
    };
    authorize(
        who,
        verb,
        t.kind,
        t.namespace.as_deref(),
        t.name.as_deref(),
        Some(&stored),
    )?;
    let expected = r.metadata().revision.unwrap_or(current.mod_revision);
    let incoming = serde_json::to_value(&r).map_err(|e| ApiError::internal(e.to_string()))?;
    // The main path changes everything but status; /status changes only status.
    let mut v = if status {
        let mut v = stored.clone();
        match (v.as_object_mut(), incoming.get("status")) {
            (Some(o), Some(s)) => {
                o.insert("status".into(), s.clone());
            }
            (Some(o), None) => {
                o.remove("status");
            }
            _ => {}
        }
        v
    } else {
        let mut v = incoming;
        if t.kind.has_status
            && let Some(o) = v.as_object_mut()
        {
            match stored.get("status") {
                Some(s) => o.insert("status".into(), s.clone()),
                None => o.remove("status"),
            };
        }
        v
    };
    if !status && crate::policy_capacity::applies_to(t.kind.kind) {
        crate::policy_capacity::check(&state.store, &t.key(), &v, &r.display_name()).await?;
    }
    let bytes = stored_json(&mut v)?;
    let revision = state.store.update(&t.key(), bytes, expected).await?;
    tracing::info!(object.kind = t.kind.kind, object.name = ?t.name, revision, "Updated");
    set_revision(&mut v, revision);
    Ok(axum::Json(v).into_response())
}

async fn delete(state: &AppState, who: &Principal, t: &Target) -> Result<Response, ApiError> {
    authorize(
        who,
        Verb::Delete,
        t.kind,
        t.namespace.as_deref(),
        t.name.as_deref(),
        None,
    )?;
    let revision = match state.store.delete(&t.key(), None).await {
        Err(skiff_store::StoreError::NotFound { .. }) => return Err(not_found(t)),
        other => other?,
    };
    tracing::info!(object.kind = t.kind.kind, object.name = ?t.name, revision, "Deleted");
    Ok(axum::Json(
        json!({"kind": "Status", "code": 200, "message": "deleted", "revision": revision}),
    )
    .into_response())
}

/// A node agent says it is alive: its lease is renewed (or created again
/// after it was lost). Answers with the node's fencing generation.
async fn heartbeat(
    state: &AppState,
    who: &Principal,
    t: &Target,
    node: &str,
) -> Result<Response, ApiError> {
    authorize(who, Verb::UpdateStatus, t.kind, None, Some(node), None)?;
    let Some(kv) = state.store.get(&t.key()).await? else {
        return Err(ApiError::not_found(format!(
            "Node {node} not found: register it (POST the Node) first"
        )));
    };
    let lease = state
        .node_leases
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(node)
        .copied();
    let key = format!("{NODE_LEASES}{node}");
    // After a server restart the map is empty but the store kept the
    // lease (with a fresh TTL): adopt it rather than replace the key,
    // which would look like the node was lost and fence it.
    let lease = match lease {
        Some(l) => Some(l),
        None => state.store.get(&key).await?.and_then(|kv| kv.lease),
    };
    let alive = match lease {
        Some(l) => state.store.lease_keepalive(l).await.is_ok(),
        None => false,
    };
    if alive && let Some(l) = lease {
        state
            .node_leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), l);
    }
    if !alive {
        let lease = state.store.lease_grant(state.node_grace).await?;
        match state
            .store
            .create(&key, Bytes::from_static(b"alive"), Some(lease))
            .await
        {
            Ok(_) => {}
            // The old key outlived its lease by a tick: replace it.
            Err(skiff_store::StoreError::AlreadyExists { .. }) => {
                let _ = state.store.delete(&key, None).await;
                state
                    .store
                    .create(&key, Bytes::from_static(b"alive"), Some(lease))
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
        state
            .node_leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), lease);
    }
    let generation = object(&kv)?
        .pointer("/status/generation")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(axum::Json(json!({
        "node": node,
        "generation": generation,
        "graceSeconds": state.node_grace.as_secs_f64(),
    }))
    .into_response())
}

/// One line of a watch stream.
fn event_line(kind: &str, revision: u64, object: Option<Value>) -> Bytes {
    let mut v = json!({"type": kind, "revision": revision});
    if let Some(o) = object {
        v["object"] = o;
    }
    let mut line = v.to_string();
    line.push('\n');
    Bytes::from(line)
}

async fn watch_stream(
    state: &Arc<AppState>,
    who: &Principal,
    t: &Target,
    q: &Query,
) -> Result<Response, ApiError> {
    authorize(who, Verb::Watch, t.kind, t.namespace.as_deref(), None, None)?;
    // Without a revision: the current objects as ADDED, then changes (like `kubectl get -w`).
    let (initial, from) = match q.revision {
        Some(r) => (Vec::new(), r),
        None => {
            let (kvs, rev) = state.store.list(&t.prefix()).await?;
            let mut lines = Vec::new();
            for kv in &kvs {
                let o = object(kv)?;
                if q.selector.matches(&skiff_api::meta::labels_in(&o)) {
                    lines.push(event_line("ADDED", kv.mod_revision, Some(o)));
                }
            }
            (lines, rev)
        }
    };
    let mut watch = state.store.watch(&t.prefix(), from).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let selector = q.selector.clone();
    let mut shutdown = state.shutdown.clone();
    let metrics = state.metrics.clone();
    let store = state.store.clone();
    metrics.watches.inc();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                metrics.watches.dec();
                return;
            }
        }
        let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
        bookmark.tick().await;
        loop {
            let line = tokio::select! {
                _ = shutdown.changed() => break,
                _ = tx.closed() => break,
                _ = bookmark.tick() => Some(event_line("BOOKMARK", store.revision(), None)),
                next = watch.next() => match next {
                    None => break,
                    Some(Err(e)) => {
                        let err = ApiError::from(e);
                        let mut v = json!({"type": "ERROR", "revision": 0, "code": err.status.as_u16(), "message": err.message});
                        v["object"] = err.body();
                        let _ = tx.send(Ok(Bytes::from(format!("{v}\n")))).await;
                        break;
                    }
                    Some(Ok(event)) => watch_line(&event, &selector),
                },
            };
            if let Some(line) = line
                && tx.send(Ok(line)).await.is_err()
            {
                break;
            }
        }
        metrics.watches.dec();
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// A store event as a watch line, or `None` if the selector filters it out.
fn watch_line(event: &Event, selector: &LabelSelector) -> Option<Bytes> {
    let (kind, kv) = match event {
        Event::Put(kv) if kv.create_revision == kv.mod_revision => ("ADDED", kv),
        Event::Put(kv) => ("MODIFIED", kv),
        Event::Delete { prev, .. } => ("DELETED", prev),
    };
    let mut o = object(kv).ok()?;
    set_revision(&mut o, event.revision());
    selector
        .matches(&skiff_api::meta::labels_in(&o))
        .then(|| event_line(kind, event.revision(), Some(o)))
}
