//! Typed client for Skiff's HTTPS API: requests with the client config's
//! credentials, and watches that resume after disconnects.

pub mod config;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::Value;
use skiff_api::KindInfo;

pub use config::ClientConfig;
pub use hyper::Method;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client setup: {0}")]
    Setup(String),
    #[error("cannot reach {server}: {message}")]
    Connect { server: String, message: String },
    /// The server answered with an error.
    #[error("{status}: {message}{}", details.iter().map(|d| format!("; {d}")).collect::<String>())]
    Api {
        status: u16,
        message: String,
        details: Vec<String>,
    },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The error body the API sends.
#[derive(Debug, Deserialize)]
struct ApiError {
    message: String,
    #[serde(default)]
    details: Vec<String>,
}

/// A list response: the objects and the revision to watch from.
#[derive(Debug, Clone, Deserialize)]
pub struct List {
    pub items: Vec<Value>,
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
    Error,
}

/// One line of a watch stream.
#[derive(Debug, Clone, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub revision: u64,
    #[serde(default)]
    pub object: Value,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub code: u16,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A connection pool to one API server with one identity.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<Https, Full<Bytes>>,
    server: String,
    token: Option<(String, String)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(config: &ClientConfig) -> Result<Client> {
        let setup = |e: &dyn std::fmt::Display| ClientError::Setup(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            skiff_identity::certs_from_pem(&config.certificate_authority).map_err(|e| setup(&e))?
        {
            roots.add(cert).map_err(|e| setup(&e))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&e))?
        .with_root_certificates(roots);
        let tls = match (&config.client_certificate, &config.client_key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    skiff_identity::certs_from_pem(cert).map_err(|e| setup(&e))?,
                    skiff_identity::key_from_pem(key).map_err(|e| setup(&e))?,
                )
                .map_err(|e| setup(&e))?,
            _ => builder.with_no_client_auth(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        let token = match (&config.token, &config.node) {
            (Some(t), Some(n)) => Some((t.clone(), n.clone())),
            (Some(t), None) => Some((t.clone(), String::new())),
            _ => None,
        };
        Ok(Client {
            http,
            server: config.server.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// The same connection pool, acting for another node (join-token clients).
    pub fn with_node(&self, node: &str) -> Client {
        let mut c = self.clone();
        if let Some((_, n)) = &mut c.token {
            *n = node.to_string();
        }
        c
    }

    /// Sends a request; returns the status and body of any answer.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes)> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.connect_error(&e))?
            .to_bytes();
        Ok((status, body))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some((token, node)) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
            if !node.is_empty() {
                req = req.header("x-skiff-node", node);
            }
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        self.http
            .request(req)
            .await
            .map_err(|e| self.connect_error(&e))
    }

    /// An instance's output, as the server streams it from the instance's
    /// node: the last `tail` lines (all without), then, with `follow`, what
    /// is written after, until the connection ends.
    pub async fn logs(
        &self,
        namespace: &str,
        name: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<hyper::body::Incoming> {
        let instances = KindInfo::find("instances")
            .ok_or_else(|| ClientError::Setup("no Instance kind".into()))?;
        let mut p = format!(
            "{}/log?follow={follow}",
            path(instances, Some(namespace), Some(name))
        );
        if let Some(n) = tail {
            p.push_str(&format!("&tail={n}"));
        }
        self.stream(&p).await
    }

    /// A GET whose body is read as it arrives (logs, flows); non-2xx
    /// answers become [`ClientError::Api`].
    pub async fn stream(&self, path: &str) -> Result<hyper::body::Incoming> {
        let response = self.send(Method::GET, path, None).await?;
        if !response.status().is_success() {
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.connect_error(&e))?
                .to_bytes();
            return Err(api_error(status, &bytes));
        }
        Ok(response.into_body())
    }

    fn connect_error(&self, e: &dyn std::error::Error) -> ClientError {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        ClientError::Connect {
            server: self.server.clone(),
            message,
        }
    }

    /// Sends a request and decodes a JSON answer; non-2xx become [`ClientError::Api`].
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `None` when the object does not exist.
    pub async fn get(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>> {
        match self
            .call(Method::GET, &path(kind, namespace, Some(name)), None)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Objects of a kind (in a namespace, or all), filtered by a label selector.
    pub async fn list(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        selector: Option<&str>,
    ) -> Result<List> {
        let mut p = path(kind, namespace, None);
        if let Some(s) = selector {
            p.push_str(&format!("?labelSelector={}", encode(s)));
        }
        let v = self.call(Method::GET, &p, None).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn create(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        object: &Value,
    ) -> Result<Value> {
        self.call(Method::POST, &path(kind, namespace, None), Some(object))
            .await
    }

    /// Replaces an object; with `metadata.revision` set, only if unchanged since (409 otherwise).
    pub async fn update(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        object: &Value,
    ) -> Result<Value> {
        self.call(
            Method::PUT,
            &path(kind, namespace, Some(name)),
            Some(object),
        )
        .await
    }

    pub async fn update_status(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
        object: &Value,
    ) -> Result<Value> {
        self.call(
            Method::PUT,
            &format!("{}/status", path(kind, namespace, Some(name))),
            Some(object),
        )
        .await
    }

    /// Tells the server the node is alive (renews its lease); answers with
    /// the node's fencing generation.
    pub async fn heartbeat(&self, node: &str) -> Result<Value> {
        let nodes =
            KindInfo::find("nodes").ok_or_else(|| ClientError::Setup("no Node kind".into()))?;
        self.call(
            Method::PUT,
            &format!("{}/heartbeat", path(nodes, None, Some(node))),
            None,
        )
        .await
    }

    pub async fn delete(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value> {
        self.call(Method::DELETE, &path(kind, namespace, Some(name)), None)
            .await
    }

    /// Changes after `revision`. The stream reconnects by itself after a
    /// dropped connection, resuming from the last revision it delivered.
    pub fn watch(
        &self,
        kind: &KindInfo,
        namespace: Option<&str>,
        selector: Option<&str>,
        revision: u64,
    ) -> WatchStream {
        let mut base = path(kind, namespace, None);
        base.push_str("?watch=true");
        if let Some(s) = selector {
            base.push_str(&format!("&labelSelector={}", encode(s)));
        }
        WatchStream {
            client: self.clone(),
            base,
            revision,
            body: None,
            buf: BytesMut::new(),
            failures: 0,
            ended: false,
        }
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            message: e.message,
            details: e.details,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            message: String::from_utf8_lossy(body).trim().to_string(),
            details: vec![],
        },
    }
}

/// The API path of a kind, optionally in a namespace, optionally one object.
pub fn path(kind: &KindInfo, namespace: Option<&str>, name: Option<&str>) -> String {
    let group = if kind.api_version.contains('/') {
        format!("/apis/{}", kind.api_version)
    } else {
        format!("/api/{}", kind.api_version)
    };
    let mut p = match (kind.namespaced, namespace) {
        (true, Some(ns)) => format!("{group}/namespaces/{ns}/{}", kind.plural),
        _ => format!("{group}/{}", kind.plural),
    };
    if let Some(n) = name {
        p.push('/');
        p.push_str(n);
    }
    p
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A resumable watch; see [`Client::watch`].
pub struct WatchStream {
    client: Client,
    base: String,
    revision: u64,
    body: Option<hyper::body::Incoming>,
    buf: BytesMut,
    failures: u32,
    ended: bool,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("path", &self.base)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl WatchStream {
    /// The last revision delivered (or the starting one).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The next event. Errors end the stream only when resuming cannot
    /// help: the history is compacted (410: list again), or the request is
    /// refused (401, 403, 404).
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let event: WatchEvent = match serde_json::from_slice(&line) {
                    Ok(e) => e,
                    Err(e) => {
                        return Some(Err(ClientError::Protocol(format!("bad watch event: {e}"))));
                    }
                };
                match event.kind {
                    EventType::Error => {
                        self.ended = true;
                        return Some(Err(ClientError::Api {
                            status: event.code,
                            message: event.message,
                            details: vec![],
                        }));
                    }
                    EventType::Bookmark => {
                        self.revision = event.revision;
                        continue;
                    }
                    _ => {
                        self.revision = event.revision;
                        self.failures = 0;
                        return Some(Ok(event));
                    }
                }
            }
            let Some(body) = &mut self.body else {
                if self.failures > 0 {
                    // Back off 100 ms, 200 ms, … up to 5 s between reconnects.
                    let wait = Duration::from_millis(100u64 << self.failures.min(6))
                        .min(Duration::from_secs(5));
                    tokio::time::sleep(wait).await;
                }
                let path = format!("{}&revision={}", self.base, self.revision);
                match self.client.send(Method::GET, &path, None).await {
                    Ok(resp) if resp.status().is_success() => {
                        self.buf.clear();
                        self.body = Some(resp.into_body());
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        let bytes = resp
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if status.is_server_error() {
                            self.failures += 1;
                            continue;
                        }
                        self.ended = true;
                        return Some(Err(api_error(status, &bytes)));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "Watch reconnect failed");
                        self.failures += 1;
                    }
                }
                continue;
            };
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
                // The connection ended or broke: resume from the last revision.
                Some(Err(_)) | None => {
                    self.body = None;
                    self.failures += 1;
                }
            }
        }
    }
}
