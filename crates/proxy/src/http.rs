//! HTTP forwarding: routing, weighted backend choice, retries under a
//! budget, timeouts, hop-by-hop header handling, upgrades, L7 authorization.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use skiff_identity::SpiffeId;

use crate::balance::Outcome;
use crate::config::{HttpRule, RetryPolicy, Route, RouteMatch, Source};
use crate::metrics::{EndpointLabels, Label, LatencyLabels, Metrics, RequestLabels, ServiceLabels};
use crate::upstream::{Body, BoxError, Pick, Service};

/// Bodies up to this size are kept so the request can be sent again.
pub(crate) const RETRYABLE_BODY: u64 = 64 * 1024;

/// Where one listener's requests go.
#[derive(Debug)]
pub struct Forwarder {
    pub direction: &'static str,
    /// Bytes only, no protocol detection: a destination outside the mesh
    /// reached through a transparent listener, handled as without the
    /// proxy (no detection delay for protocols where the server speaks
    /// first).
    pub passthrough: bool,
    pub services: Vec<Arc<Service>>,
    pub routes: Vec<Route>,
    /// Where requests no route matches go (`None`: 404).
    pub default_route: Option<Route>,
    /// Where opaque (non-HTTP) connections go: an index into `services`.
    pub tcp_service: Option<usize>,
    pub request_timeout: Duration,
    /// L7 authorization (inbound): when present, a request must be
    /// admitted by one rule.
    pub http_rules: Option<Vec<HttpRule>>,
    /// L7 authorization in audit mode: a request these rules would refuse
    /// passes and is recorded as an audit denial.
    pub audit_rules: Option<Vec<HttpRule>>,
    /// Inbound: the port requests arrive for (rules' ports, denial records).
    pub port: u16,
    /// Inbound: sources a policy lets in without mTLS on this port.
    pub plaintext: Vec<Source>,
    /// Bytes only, no protocol detection: the destination port is declared
    /// `tcp` (inside mTLS, on the inbound side).
    pub opaque: bool,
    /// Inbound: never retry (the caller's proxy does).
    pub retries: bool,
    /// Tell the app who called (inbound, and the ingress gateway): the
    /// caller's address appended to `x-forwarded-for`, its verified
    /// identity in `x-skiff-client-id` (any such header from the caller
    /// is replaced, so the app can trust it).
    pub forwarded_for: bool,
    pub metrics: Arc<Metrics>,
}

/// What the connection knows about the caller.
#[derive(Debug, Clone)]
pub struct Peer {
    pub identity: Option<SpiffeId>,
    pub tls: bool,
    /// Where the connection came from (`None` in tests without sockets).
    pub addr: Option<IpAddr>,
    /// The identity, or `none`, for metrics.
    pub label: Label,
    /// What the app is told (`x-skiff-client-id`, `x-forwarded-for`),
    /// made once per connection.
    client_id: Option<HeaderValue>,
    addr_text: Option<HeaderValue>,
}

impl Peer {
    pub fn new(identity: Option<SpiffeId>, tls: bool, addr: Option<IpAddr>) -> Peer {
        let label = Label::new(
            &identity
                .as_ref()
                .map_or_else(|| "none".to_string(), ToString::to_string),
        );
        let header = |s: String| HeaderValue::from_str(&s).ok();
        Peer {
            client_id: identity.as_ref().and_then(|id| header(id.to_string())),
            addr_text: addr.and_then(|a| header(a.to_string())),
            identity,
            tls,
            addr,
            label,
        }
    }

    /// The verified identity as the app is told it.
    pub(crate) fn client_id(&self) -> Option<&HeaderValue> {
        self.client_id.as_ref()
    }
}

impl Forwarder {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let (route_name, service, response) = self.dispatch(req, &peer).await;
        let status = response.status().as_u16();
        let backend = response
            .extensions()
            .get::<Backend>()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        self.observe(route_name, service, backend, &peer, status, started);
        tracing::debug!(http.method = %method, http.status = status, "Request");
        response
    }

    /// Where an opaque (non-HTTP) connection goes. Bytes have no method,
    /// path or headers, so a route's first rule without matches splits
    /// them by its weights (as a Gateway API TCPRoute would); without such
    /// a rule, the listener's TCP service.
    pub fn opaque_service(&self) -> Option<&Arc<Service>> {
        let catch_all = self
            .routes
            .iter()
            .find(|r| r.matches.is_empty())
            .filter(|r| total_weight(&r.backends) > 0);
        let index = match catch_all {
            Some(r) => pick_weighted(
                &r.backends,
                rand::random_range(0..total_weight(&r.backends)),
            ),
            None => self.tcp_service?,
        };
        self.services.get(index)
    }

    /// Counts a finished request and its latency.
    pub(crate) fn observe(
        &self,
        route: Label,
        service: Label,
        backend: Label,
        peer: &Peer,
        status: u16,
        started: Instant,
    ) {
        let m = &self.metrics;
        m.requests
            .get_or_create(&RequestLabels {
                direction: self.direction,
                route: route.clone(),
                service: service.clone(),
                backend,
                peer: peer.label.clone(),
                tls: if peer.tls { "true" } else { "false" },
                status,
            })
            .inc();
        m.latency
            .get_or_create(&LatencyLabels {
                direction: self.direction,
                route,
                service,
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// What to do with a request, decided from its head alone: L7
    /// authorization, the route, the backend service by weight.
    pub(crate) fn plan<R: RequestView>(&self, req: &R, peer: &Peer) -> Plan {
        if let Some(rules) = &self.http_rules
            && let Err(denial) = authorize(rules, req.method(), req.path(), peer, self.port)
        {
            tracing::info!(peer = %peer.label, http.method = req.method(), url.path = req.path(), policy = %denial.policy, "Request denied by policy");
            self.record_denial(req, peer, &denial, "denied");
            // One label for every denial: the message names the path and
            // peer, which must not become label values.
            return Plan::Answer {
                route: Label::new("denied"),
                service: Label::default(),
                status: StatusCode::FORBIDDEN,
                message: denial.message,
            };
        }
        if let Some(rules) = &self.audit_rules
            && let Err(denial) = authorize(rules, req.method(), req.path(), peer, self.port)
        {
            tracing::info!(peer = %peer.label, http.method = req.method(), url.path = req.path(), policy = %denial.policy, "Request passed; an audit-mode policy would deny it");
            self.record_denial(req, peer, &denial, "audit-denied");
        }
        let Some(route) = pick_route(&self.routes, req).or(self.default_route.as_ref()) else {
            return Plan::Answer {
                route: Label::default(),
                service: Label::default(),
                status: StatusCode::NOT_FOUND,
                message: "no route matches this request".to_string(),
            };
        };
        let backends = route.backends.as_slice();
        let chosen = pick_weighted(
            backends,
            rand::random_range(0..total_weight(backends).max(1)),
        );
        let service = self.services[chosen].clone();
        if service.endpoints.is_empty() {
            return Plan::Answer {
                route: route.label.clone(),
                service: service.label.clone(),
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!("service {} has no ready endpoints", service.name),
            };
        }
        // Inbound never retries: the caller's proxy does.
        let retry = if self.retries {
            route.retry
        } else {
            RetryPolicy {
                attempts: 0,
                non_idempotent: false,
            }
        };
        Plan::Forward {
            route: route.label.clone(),
            service,
            retry,
            timeout: route.timeout.unwrap_or(self.request_timeout),
        }
    }

    /// Keeps a refusal (`denied`), or what an audit-mode policy would
    /// have refused (`audit-denied`), for `/denials`.
    fn record_denial<R: RequestView>(&self, req: &R, peer: &Peer, denial: &Denial, verdict: &str) {
        self.metrics.denials.record(serde_json::json!({
            "peer": peer.identity.as_ref().map(ToString::to_string),
            "address": peer.addr.map(|a| a.to_string()),
            "port": self.port,
            "method": req.method(),
            "path": req.path(),
            "policy": denial.policy,
            "verdict": verdict,
        }));
    }

    /// Ends an attempt in the balancer, counting an ejection it causes.
    pub(crate) fn settle(&self, pick: Pick<'_>, rtt: Duration, outcome: Outcome) {
        let (service, endpoint) = (pick.service, pick.endpoint());
        if pick.finish(rtt, outcome) {
            self.metrics
                .ejections
                .get_or_create(&EndpointLabels {
                    service: service.name.clone(),
                    endpoint: endpoint.addr.to_string(),
                })
                .inc();
            tracing::info!(service.name = %service.name, endpoint = %endpoint.addr, "Endpoint ejected after consecutive failures");
        }
    }

    /// After attempt number `tries` ended with `outcome`: whether to send
    /// the request to another endpoint. Only after a failure, where
    /// sending again is safe, within the route's attempts and the
    /// service's retry budget.
    pub(crate) fn try_again(
        &self,
        service: &Service,
        outcome: Outcome,
        resend_safe: bool,
        tries: usize,
        retry: RetryPolicy,
    ) -> bool {
        outcome == Outcome::Failure
            && resend_safe
            && tries as u32 <= retry.attempts
            && self.may_retry(service)
    }

    /// Whether the service's retry budget allows one more attempt (counted
    /// either way).
    fn may_retry(&self, service: &Service) -> bool {
        let labels = ServiceLabels {
            service: service.name.clone(),
        };
        if service.try_retry() {
            self.metrics.retries.get_or_create(&labels).inc();
            true
        } else {
            self.metrics.retries_refused.get_or_create(&labels).inc();
            false
        }
    }

    /// Returns the route name and service for metrics, and the response.
    async fn dispatch(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
    ) -> (Label, Label, Response<Body>) {
        let (route, service, retry, timeout) = match self.plan(&req, peer) {
            Plan::Answer {
                route,
                service,
                status,
                message,
            } => return (route, service, text(status, &message)),
            Plan::Forward {
                route,
                service,
                retry,
                timeout,
            } => (route, service, retry, timeout),
        };
        if self.forwarded_for {
            tell_app_the_caller(req.headers_mut(), peer);
        }
        let client_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let response = self
            .forward(&service, req, retry, timeout, client_upgrade)
            .await;
        (route, service.label.clone(), response)
    }

    async fn forward(
        &self,
        service: &Service,
        req: Request<Incoming>,
        retry: RetryPolicy,
        timeout: Duration,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let version = parts.version;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers, client_upgrade.is_some());
        if !headers.contains_key(header::HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            headers.insert(header::HOST, v);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        let idempotent = is_idempotent(&parts.method);
        // Keep small bodies so the request can be sent again; stream the rest.
        let (kept, mut streaming) = if fits(&body, &headers) {
            match Limited::new(body, RETRYABLE_BODY as usize).collect().await {
                Ok(c) => (Some(c.to_bytes()), None),
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("reading the request body: {e}"),
                    );
                }
            }
        } else {
            (None, Some(body))
        };
        service.deposit();
        let mut tried = Vec::new();
        loop {
            let Some(pick) = service.pick(&tried) else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("service {} has no endpoints", service.name),
                );
            };
            tried.push(pick.index);
            let endpoint = pick.endpoint();
            let body: Body = match (&kept, streaming.take()) {
                (Some(bytes), _) => Full::new(bytes.clone()).map_err(|e| match e {}).boxed(),
                (None, Some(b)) => b.map_err(|e| Box::new(e) as BoxError).boxed(),
                (None, None) => {
                    unreachable!("a streamed body is sent once: no retry without a kept body")
                }
            };
            let mut builder = Request::builder().method(parts.method.clone()).uri(
                hyper::Uri::builder()
                    .scheme(hyper::http::uri::Scheme::HTTP)
                    .authority(endpoint.authority.clone())
                    .path_and_query(path.clone())
                    .build()
                    .unwrap_or_default(),
            );
            let h2 = version == Version::HTTP_2;
            builder = builder.version(if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            });
            let mut out = match builder.body(body) {
                Ok(r) => r,
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
            };
            *out.headers_mut() = headers.clone();
            let client = if h2 { &endpoint.http2 } else { &endpoint.http1 };
            let sent = Instant::now();
            let result = tokio::time::timeout(timeout, client.request(out)).await;
            let rtt = sent.elapsed();
            // Whether sending again is safe: the request never reached the
            // endpoint, or it is idempotent (or the route opted in).
            let (outcome, resend_safe, response) = match result {
                Ok(Ok(mut resp)) => {
                    let (outcome, resend_safe) =
                        judge(resp.status().as_u16(), idempotent || retry.non_idempotent);
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(client_side) = client_upgrade {
                            splice_upgrade(client_side, hyper::upgrade::on(&mut resp));
                        }
                        self.settle(pick, rtt, Outcome::Success);
                        let mut resp = resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                        resp.extensions_mut()
                            .insert(Backend(endpoint.label.clone()));
                        return resp;
                    }
                    strip_hop_by_hop(resp.headers_mut(), false);
                    let mut resp = resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                    resp.extensions_mut()
                        .insert(Backend(endpoint.label.clone()));
                    (outcome, resend_safe, resp)
                }
                Ok(Err(e)) => {
                    let never_sent = e.is_connect();
                    let msg = format!(
                        "upstream {} ({}): {}",
                        endpoint.addr,
                        service.name,
                        error_chain(&e)
                    );
                    tracing::debug!(error = %msg, "Upstream failed");
                    (
                        Outcome::Failure,
                        never_sent || idempotent || retry.non_idempotent,
                        text(StatusCode::BAD_GATEWAY, &msg),
                    )
                }
                Err(_) => {
                    let msg = format!(
                        "upstream {} ({}): no response in {timeout:?}",
                        endpoint.addr, service.name
                    );
                    (
                        Outcome::Failure,
                        idempotent || retry.non_idempotent,
                        text(StatusCode::GATEWAY_TIMEOUT, &msg),
                    )
                }
            };
            self.settle(pick, rtt, outcome);
            let again =
                kept.is_some() && self.try_again(service, outcome, resend_safe, tried.len(), retry);
            if !again {
                return response;
            }
        }
    }
}

/// Which endpoint answered, for metrics.
#[derive(Debug, Clone)]
struct Backend(Label);

/// What [`Forwarder::plan`] decided.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Send it to `service`.
    Forward {
        route: Label,
        service: Arc<Service>,
        retry: RetryPolicy,
        timeout: Duration,
    },
    /// The proxy answers itself (denied, no route, no endpoints).
    Answer {
        route: Label,
        service: Label,
        status: StatusCode,
        message: String,
    },
}

/// How an upstream's answer with `status` counts: a failure when 5xx;
/// safe to send again elsewhere when a gateway error and
/// `resend_allowed` (an idempotent request, or a route that opted in).
pub(crate) fn judge(status: u16, resend_allowed: bool) -> (Outcome, bool) {
    let outcome = if status >= 500 {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    (outcome, matches!(status, 502..=504) && resend_allowed)
}

/// What routing and authorization read of a request's head: hyper's
/// requests and the HTTP/1 fast path's parsed heads alike.
pub trait RequestView {
    fn method(&self) -> &str;
    /// Without the query.
    fn path(&self) -> &str;
    /// The first value of a header (`name` in lower case).
    fn header(&self, name: &str) -> Option<&str>;
    /// The target's authority (HTTP/2, absolute-form HTTP/1).
    fn authority(&self) -> Option<&str>;
}

impl<B> RequestView for Request<B> {
    fn method(&self) -> &str {
        self.method().as_str()
    }
    fn path(&self) -> &str {
        self.uri().path()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers().get(name).and_then(|h| h.to_str().ok())
    }
    fn authority(&self) -> Option<&str> {
        self.uri().authority().map(|a| a.as_str())
    }
}

/// The first route with a match that fits the request (Gateway API order:
/// rules in the order given).
pub fn pick_route<'a, R: RequestView>(routes: &'a [Route], req: &R) -> Option<&'a Route> {
    routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| fits_match(m, req)))
}

fn fits_match<R: RequestView>(m: &RouteMatch, req: &R) -> bool {
    let path = req.path();
    if let Some(p) = &m.path_exact
        && path != p
    {
        return false;
    }
    if let Some(prefix) = &m.path_prefix {
        // Gateway API: a prefix matches whole path segments.
        let trimmed = prefix.trim_end_matches('/');
        let ok = path == trimmed
            || trimmed.is_empty()
            || path
                .strip_prefix(trimmed)
                .is_some_and(|rest| rest.starts_with('/'));
        if !ok {
            return false;
        }
    }
    if let Some(method) = &m.method
        && req.method() != method
    {
        return false;
    }
    m.headers.iter().all(|(k, v)| {
        let value = req.header(k);
        // `host`: HTTP/2 carries it as the request's authority.
        let value = match value {
            None if k == "host" => req.authority(),
            other => other,
        };
        // Host names compare without case; other values exactly.
        value.is_some_and(|h| {
            if k == "host" {
                without_port(h).eq_ignore_ascii_case(v)
            } else {
                h == v
            }
        })
    })
}

/// A host without its `:port`.
fn without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

pub fn total_weight(backends: &[(usize, u32)]) -> u32 {
    backends.iter().map(|(_, w)| *w).sum()
}

/// The backend `draw` (in `0..total_weight`) falls on: weights are proportions.
pub fn pick_weighted(backends: &[(usize, u32)], draw: u32) -> usize {
    let mut left = draw;
    for (service, weight) in backends {
        if left < *weight {
            return *service;
        }
        left -= weight;
    }
    backends.last().map_or(0, |(s, _)| *s)
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The policies whose rules speak for the peer on this port (none of
    /// which admits the request), or `no policy allows`.
    pub policy: String,
    /// For the 403 body.
    pub message: String,
}

/// L7 authorization: allowed when some rule covering the peer and port
/// admits the method and path.
pub fn authorize(
    rules: &[HttpRule],
    method: &str,
    path: &str,
    peer: &Peer,
    port: u16,
) -> Result<(), Denial> {
    let covers = |r: &&HttpRule| r.covers(peer.identity.as_ref(), peer.addr, port);
    if rules.iter().filter(covers).any(|r| r.admits(method, path)) {
        return Ok(());
    }
    // Refused: name the policies that speak for this peer.
    let covering: Vec<&HttpRule> = rules.iter().filter(covers).collect();
    let who = match (&peer.identity, peer.addr) {
        (Some(id), _) => id.to_string(),
        (None, Some(addr)) => format!("unauthenticated {addr}"),
        (None, None) => "an unauthenticated peer".to_string(),
    };
    let mut policies: Vec<&str> = covering.iter().map(|r| r.policy.as_str()).collect();
    policies.dedup();
    let policy = if policies.is_empty() {
        "no policy allows".to_string()
    } else {
        policies.join(", ")
    };
    Err(Denial {
        message: format!("denied by {policy}: {method} {path} from {who}\n"),
        policy,
    })
}

/// The header carrying the caller's verified SPIFFE identity.
pub const CLIENT_ID: &str = "x-skiff-client-id";

/// Appends the caller's address to `x-forwarded-for` and sets (or clears)
/// `x-skiff-client-id` from its verified identity.
fn tell_app_the_caller(headers: &mut HeaderMap, peer: &Peer) {
    headers.remove(CLIENT_ID);
    if let Some(id) = &peer.client_id {
        headers.insert(CLIENT_ID, id.clone());
    }
    let earlier = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    if let Some(v) = forwarded_for(earlier, peer) {
        headers.insert("x-forwarded-for", v);
    }
}

/// `x-forwarded-for` with the caller's address after the `earlier` hops.
pub(crate) fn forwarded_for(earlier: Option<&str>, peer: &Peer) -> Option<HeaderValue> {
    let addr = peer.addr_text.as_ref()?;
    match earlier {
        Some(earlier) => {
            HeaderValue::from_str(&format!("{earlier}, {}", addr.to_str().unwrap_or_default())).ok()
        }
        None => Some(addr.clone()),
    }
}

/// Methods RFC 9110 calls idempotent: sending them twice does no harm.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a body is small and known-length enough to keep for a retry.
fn fits(body: &Incoming, headers: &HeaderMap) -> bool {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return true;
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    declared
        .or(body.size_hint().exact())
        .is_some_and(|n| n <= RETRYABLE_BODY)
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Removes headers that describe one connection, not the message (RFC 9110
/// section 7.6.1), including those the Connection header names. An upgrade
/// keeps `Upgrade` and `Connection: upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Once both sides switched protocols, copies bytes between them.
fn splice_upgrade(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, server) {
            Ok((c, s)) => {
                let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
            }
            Err(e) => tracing::debug!(error = %e, "Upgrade failed"),
        }
    });
}

pub fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|e| match e {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        HeaderName::from_static("x-skiff-proxy-error"),
        HeaderValue::from_static("1"),
    );
    resp
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdentityPattern;

    fn route(name: &str, m: RouteMatch) -> Route {
        Route {
            name: name.into(),
            label: Label::new(name),
            matches: vec![m],
            backends: vec![(0, 1)],
            retry: RetryPolicy::default(),
            timeout: None,
        }
    }

    #[test]
    fn routes_match_by_path_segment_method_and_header_in_order() {
        let routes = vec![
            route(
                "canary",
                RouteMatch {
                    headers: vec![("x-canary".into(), "1".into())],
                    ..Default::default()
                },
            ),
            route(
                "v2",
                RouteMatch {
                    path_prefix: Some("/v2".into()),
                    method: Some("GET".into()),
                    ..Default::default()
                },
            ),
        ];
        let req = |method: &str, path: &str, canary: bool| {
            let mut b = Request::builder().method(method).uri(path);
            if canary {
                b = b.header("x-canary", "1");
            }
            b.body(()).unwrap()
        };
        let name = |r: Request<()>| pick_route(&routes, &r).map(|r| r.name.clone());
        assert_eq!(name(req("GET", "/v2/items", true)), Some("canary".into()));
        assert_eq!(name(req("GET", "/v2/items", false)), Some("v2".into()));
        assert_eq!(name(req("GET", "/v2", false)), Some("v2".into()));
        assert_eq!(name(req("GET", "/v20", false)), None);
        assert_eq!(name(req("POST", "/v2", false)), None);
    }

    #[test]
    fn a_host_match_reads_the_host_header_or_the_http2_authority() {
        let routes = vec![route(
            "api",
            RouteMatch {
                headers: vec![("host".into(), "api.example".into())],
                ..Default::default()
            },
        )];
        let name = |r: Request<()>| pick_route(&routes, &r).map(|r| r.name.clone());
        let h1 = Request::builder()
            .uri("/")
            .header("host", "API.example:8000")
            .body(())
            .unwrap();
        assert_eq!(name(h1), Some("api".into()));
        let h2 = Request::builder()
            .uri("http://api.example/x")
            .body(())
            .unwrap();
        assert_eq!(name(h2), Some("api".into()));
        let other = Request::builder()
            .uri("/")
            .header("host", "web.example")
            .body(())
            .unwrap();
        assert_eq!(name(other), None);
    }

    #[test]
    fn weights_are_proportions() {
        let backends = [(7, 10), (8, 0), (9, 30)];
        let total = total_weight(&backends);
        let mut counts = std::collections::HashMap::new();
        for draw in 0..total {
            *counts.entry(pick_weighted(&backends, draw)).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&7), Some(&10));
        assert_eq!(counts.get(&8), None);
        assert_eq!(counts.get(&9), Some(&30));
    }

    #[test]
    fn authorization_needs_a_rule_admitting_method_path_and_peer() {
        let web: SpiffeId = "spiffe://td/ns/shop/sa/web".parse().unwrap();
        let rules = vec![
            HttpRule {
                policy: "Policy shop/read-only".into(),
                methods: vec!["GET".into()],
                paths: vec!["/items/*".into(), "/health".into()],
                identities: vec![IdentityPattern::Exact(web.clone())],
                sources: Vec::new(),
                ports: vec![(8080, 8080)],
            },
            HttpRule {
                policy: "Policy shop/probes".into(),
                methods: vec!["GET".into()],
                paths: vec!["/health".into()],
                identities: Vec::new(),
                sources: vec![Source {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.9.0.0/16".parse().unwrap()],
                }],
                ports: Vec::new(),
            },
        ];
        let from_web = Peer::new(Some(web.clone()), true, None);
        let ok = |m: &Method, path: &str, peer: &Peer, port: u16| {
            authorize(&rules, m.as_str(), path, peer, port)
        };
        assert!(ok(&Method::GET, "/items/1", &from_web, 8080).is_ok());
        let denied = ok(&Method::POST, "/items/1", &from_web, 8080).unwrap_err();
        assert_eq!(denied.policy, "Policy shop/read-only");
        assert!(
            denied.message.contains("POST /items/1"),
            "{}",
            denied.message
        );
        // Exact paths are exact; prefixes end in `*`.
        assert!(ok(&Method::GET, "/health", &from_web, 8080).is_ok());
        assert!(ok(&Method::GET, "/health/deep", &from_web, 8080).is_err());
        assert!(ok(&Method::GET, "/items", &from_web, 8080).is_err());
        // Another port: no rule speaks for web there.
        let elsewhere = ok(&Method::GET, "/items/1", &from_web, 9090).unwrap_err();
        assert_eq!(elsewhere.policy, "no policy allows");
        // Without an identity, only the address can admit a peer.
        assert!(
            ok(
                &Method::GET,
                "/items/1",
                &Peer::new(None, false, None),
                8080
            )
            .is_err()
        );
        let probe = Peer::new(None, false, Some("10.1.2.3".parse().unwrap()));
        assert!(ok(&Method::GET, "/health", &probe, 9090).is_ok());
        assert!(ok(&Method::GET, "/items/1", &probe, 8080).is_err());
        let excepted = Peer::new(None, false, Some("10.9.0.1".parse().unwrap()));
        assert!(ok(&Method::GET, "/health", &excepted, 9090).is_err());
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn only_idempotent_methods_are_resent_by_default() {
        assert!(is_idempotent(&Method::GET) && is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }
}
