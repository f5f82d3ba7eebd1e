//! Upstream services: endpoints with their connection pools, a balancer and
//! a retry budget each. Connecting to an endpoint with an identity is mTLS
//! to its proxy; one without is plain TCP (the local app, or a peer outside
//! the mesh).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use skiff_identity::SpiffeId;
use tokio::net::TcpStream;

use crate::balance::{BalanceConfig, Balancer, Outcome};
use crate::budget::{BudgetConfig, RetryBudget};
use crate::config::{EndpointConfig, ServiceConfig};
use crate::io::{Conn, Stream};
use crate::tls::Identity;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// One upstream address and how to reach it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr`, for metrics.
    pub label: crate::metrics::Label,
    /// `addr`, for request URIs.
    pub authority: hyper::http::uri::Authority,
    pub identity: Option<SpiffeId>,
    pub connector: Connector,
    pub http1: Client<Connector, Body>,
    pub http2: Client<Connector, Body>,
    /// Idle HTTP/1 connections of the fast path, the newest last.
    idle: Mutex<Vec<(Stream, Instant)>>,
}

/// How long an idle connection is kept, as hyper's pool does.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 1024;

/// A service: endpoints, the balancer over them, and a retry budget.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    /// `name`, for metrics.
    pub label: crate::metrics::Label,
    pub endpoints: Vec<Endpoint>,
    balancer: Mutex<Balancer>,
    budget: Mutex<RetryBudget>,
}

impl Service {
    /// Fails when an endpoint needs mTLS and this proxy has no identity.
    pub fn new(
        config: &ServiceConfig,
        identity: Option<&Arc<Identity>>,
        connect_timeout: Duration,
    ) -> Result<Service, String> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| Endpoint::new(e, identity, connect_timeout))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("service {}: {e}", config.name))?;
        Ok(Service {
            name: config.name.clone(),
            label: crate::metrics::Label::new(&config.name),
            balancer: Mutex::new(Balancer::new(BalanceConfig::default(), endpoints.len())),
            budget: Mutex::new(RetryBudget::new(BudgetConfig::default())),
            endpoints,
        })
    }

    /// Picks an endpoint not in `tried` and counts the request as pending on it.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let mut balancer = crate::lock(&self.balancer);
        let i = balancer.pick(Instant::now(), tried, |n| rand::random_range(0..n))?;
        balancer.start(i);
        Some(i)
    }

    /// Ends what [`pick`](Self::pick) started. Returns whether this
    /// failure ejected the endpoint.
    pub fn finish(&self, i: usize, rtt: Duration, outcome: Outcome) -> bool {
        let now = Instant::now();
        let mut balancer = crate::lock(&self.balancer);
        let before = balancer.is_ejected(i, now);
        balancer.finish(i, now, rtt, outcome);
        !before && balancer.is_ejected(i, now)
    }

    pub fn deposit(&self) {
        crate::lock(&self.budget).deposit(Instant::now());
    }

    pub fn try_retry(&self) -> bool {
        crate::lock(&self.budget).try_withdraw(Instant::now())
    }
}

impl Endpoint {
    fn new(
        config: &EndpointConfig,
        identity: Option<&Arc<Identity>>,
        connect_timeout: Duration,
    ) -> Result<Endpoint, String> {
        let tls = match (&config.identity, identity) {
            (None, _) => None,
            (Some(peer), Some(own)) => Some((own.clone(), peer.clone())),
            (Some(peer), None) => {
                return Err(format!(
                    "endpoint {} is {peer}, which takes mTLS, and this proxy has no identity",
                    config.addr
                ));
            }
        };
        let connector = Connector {
            addr: config.addr,
            tls,
            timeout: connect_timeout,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .set_host(false);
        let http1 = builder.build(connector.clone());
        let http2 = builder.http2_only(true).build(connector.clone());
        Ok(Endpoint {
            addr: config.addr,
            label: crate::metrics::Label::new(&config.addr.to_string()),
            authority: config
                .addr
                .to_string()
                .parse()
                .map_err(|e| format!("endpoint {}: {e}", config.addr))?,
            identity: config.identity.clone(),
            connector,
            http1,
            http2,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The newest idle connection that is still open, if any.
    pub fn checkout(&self) -> Option<Stream> {
        let mut idle = crate::lock(&self.idle);
        drop_expired(&mut idle);
        while let Some((mut conn, _)) = idle.pop() {
            if still_open(&mut conn) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection that ended a response cleanly for the next request.
    pub fn checkin(&self, conn: Stream) {
        let mut idle = crate::lock(&self.idle);
        drop_expired(&mut idle);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }
}

/// Closes idle connections kept longer than [`IDLE_TIMEOUT`] (the oldest
/// come first).
fn drop_expired(idle: &mut Vec<(Stream, Instant)>) {
    let expired = idle
        .iter()
        .take_while(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
        .count();
    idle.drain(..expired);
}

/// Whether an idle connection is still open: the peer has neither closed
/// it nor sent anything unasked (which would spoil the next response).
fn still_open(conn: &mut Stream) -> bool {
    use futures_util::FutureExt as _;
    use tokio::io::AsyncReadExt as _;
    let mut probe = [0u8; 1];
    conn.read(&mut probe).now_or_never().is_none()
}

/// Opens connections to one endpoint, whatever URI hyper asks for.
#[derive(Debug, Clone)]
pub struct Connector {
    addr: SocketAddr,
    tls: Option<(Arc<Identity>, SpiffeId)>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0}: timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("mTLS to {0}: {1}")]
    Tls(SocketAddr, String),
}

impl Connector {
    pub async fn connect(&self) -> Result<Stream, ConnectError> {
        self.connect_as(false).await
    }

    /// Connects; `opaque`: for bytes, not HTTP (the peer proxy is told by
    /// ALPN and does not wait to detect a protocol).
    pub async fn connect_as(&self, opaque: bool) -> Result<Stream, ConnectError> {
        let addr = self.addr;
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| ConnectError::Io(addr, e))?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(Stream::Plain(tcp)),
                Some((own, peer)) => {
                    let config = own
                        .client_config(peer, opaque)
                        .map_err(|e| ConnectError::Tls(addr, e.to_string()))?;
                    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                    let tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                        .map_err(|e| ConnectError::Tls(addr, e.to_string()))?;
                    Ok(Stream::Tls(Box::new(tls)))
                }
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(ConnectError::Timeout(addr)))
    }
}

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect().await.map(|s| Conn(TokioIo::new(s))) })
    }
}
