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
    /// Idle HTTP/1 connections of the fast path.
    idle: Arc<Mutex<Idle>>,
}

/// An endpoint's idle connections, the newest last, each with when it
/// went idle.
#[derive(Debug, Default)]
struct Idle {
    conns: Vec<(Stream, tokio::time::Instant)>,
    /// A task is sweeping these (see [`sweep`]).
    swept: bool,
}

/// How long an idle connection is kept, as hyper's pool does.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 1024;
/// How often idle connections are checked while there are any.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

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

    /// Picks an endpoint not in `tried` and counts the request as pending
    /// on it until the [`Pick`] ends.
    pub fn pick(&self, tried: &[usize]) -> Option<Pick<'_>> {
        let mut balancer = crate::lock(&self.balancer);
        let index = balancer.pick(Instant::now(), tried, |n| rand::random_range(0..n))?;
        balancer.start(index);
        Some(Pick {
            service: self,
            index,
            picked: Instant::now(),
            finished: false,
        })
    }

    /// Returns whether this failure ejected the endpoint.
    fn finish(&self, i: usize, rtt: Duration, outcome: Outcome) -> bool {
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

/// A request pending on one endpoint of a service, from
/// [`Service::pick`] until [`Pick::finish`]. One dropped unfinished (its
/// caller went away mid-request: a client that disconnected, an HTTP/2
/// stream reset, a cancelled task) ends as [`Outcome::Abandoned`], so the
/// endpoint's pending count, which the balancer weighs, never leaks.
#[derive(Debug)]
pub struct Pick<'s> {
    pub service: &'s Service,
    pub index: usize,
    picked: Instant,
    finished: bool,
}

impl<'s> Pick<'s> {
    pub fn endpoint(&self) -> &'s Endpoint {
        &self.service.endpoints[self.index]
    }

    /// Ends the request after `rtt` with `outcome`. Returns whether this
    /// failure ejected the endpoint.
    pub fn finish(mut self, rtt: Duration, outcome: Outcome) -> bool {
        self.finished = true;
        self.service.finish(self.index, rtt, outcome)
    }
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.service
                .finish(self.index, self.picked.elapsed(), Outcome::Abandoned);
        }
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
            idle: Arc::default(),
        })
    }

    /// The newest idle connection that is still open, if any.
    pub fn checkout(&self) -> Option<Stream> {
        let mut idle = crate::lock(&self.idle);
        drop_expired(&mut idle.conns);
        while let Some((mut conn, _)) = idle.conns.pop() {
            if still_open(&mut conn) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection that ended a response cleanly for the next request.
    /// A task sweeps the idle connections while there are any, so those
    /// of an endpoint that gets no more requests are closed too.
    pub fn checkin(&self, conn: Stream) {
        let mut idle = crate::lock(&self.idle);
        drop_expired(&mut idle.conns);
        if idle.conns.len() < MAX_IDLE {
            idle.conns.push((conn, tokio::time::Instant::now()));
        }
        if !idle.swept {
            idle.swept = true;
            tokio::spawn(sweep(Arc::downgrade(&self.idle)));
        }
    }

    /// Idle connections kept (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        crate::lock(&self.idle).conns.len()
    }
}

/// Every [`SWEEP_EVERY`], closes the idle connections that expired or
/// that the peer closed (a socket left in CLOSE_WAIT holds a descriptor on
/// both sides). Ends when none are left, or when the endpoint is gone
/// (its connections close with it).
async fn sweep(idle: std::sync::Weak<Mutex<Idle>>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        let mut idle = crate::lock(&idle);
        drop_expired(&mut idle.conns);
        idle.conns.retain_mut(|(conn, _)| still_open(conn));
        if idle.conns.is_empty() {
            idle.swept = false;
            return;
        }
    }
}

/// Closes idle connections kept longer than [`IDLE_TIMEOUT`] (the oldest
/// come first).
fn drop_expired(idle: &mut Vec<(Stream, tokio::time::Instant)>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An endpoint on a local listener.
    async fn endpoint() -> (Endpoint, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = EndpointConfig {
            addr: listener.local_addr().unwrap(),
            identity: None,
        };
        let endpoint = Endpoint::new(&config, None, Duration::from_secs(1)).unwrap();
        (endpoint, listener)
    }

    /// `n` connections to `endpoint`, checked in idle; returns the
    /// listener's ends of them.
    async fn idle_connections(
        endpoint: &Endpoint,
        listener: &tokio::net::TcpListener,
        n: usize,
    ) -> Vec<TcpStream> {
        let mut accepted = Vec::new();
        for _ in 0..n {
            let conn = endpoint.connector.connect().await.unwrap();
            accepted.push(listener.accept().await.unwrap().0);
            endpoint.checkin(conn);
        }
        accepted
    }

    /// Reads until the peer closes; panics if it sends anything.
    async fn closed(mut tcp: TcpStream) {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
            .await
            .expect("the idle connection was not closed")
            .unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_of_an_endpoint_with_no_traffic_are_closed() {
        let (endpoint, listener) = endpoint().await;
        let mut accepted = idle_connections(&endpoint, &listener, 3).await;
        assert_eq!(endpoint.idle_count(), 3);
        // One the app closes is let go at the next sweep, not at 90 s.
        drop(accepted.pop());
        tokio::time::sleep(SWEEP_EVERY + Duration::from_secs(1)).await;
        assert_eq!(endpoint.idle_count(), 2);
        // The others are closed once idle for the timeout, with no request
        // to prune them.
        tokio::time::sleep(IDLE_TIMEOUT).await;
        assert_eq!(endpoint.idle_count(), 0);
        for tcp in accepted {
            closed(tcp).await;
        }
        // The sweeping task ended with the pool; the next idle connection
        // starts another.
        let accepted = idle_connections(&endpoint, &listener, 1).await;
        tokio::time::sleep(IDLE_TIMEOUT + SWEEP_EVERY).await;
        assert_eq!(endpoint.idle_count(), 0);
        closed(accepted.into_iter().next().unwrap()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_caller_went_away_is_no_longer_pending() {
        let config = ServiceConfig {
            name: "s".into(),
            endpoints: vec![EndpointConfig {
                addr: "127.0.0.1:9".parse().unwrap(),
                identity: None,
            }],
        };
        let service = Service::new(&config, None, Duration::from_secs(1)).unwrap();
        let pending = || crate::lock(&service.balancer).pending(0);
        // As hyper drops a request's future when its client disconnects.
        let waiting = async {
            let _pick = service.pick(&[]).unwrap();
            std::future::pending::<()>().await;
        };
        let cancelled = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(cancelled.is_err());
        assert_eq!(pending(), 0);
        // One that finishes is counted once.
        let pick = service.pick(&[]).unwrap();
        assert_eq!(pending(), 1);
        pick.finish(Duration::from_millis(1), Outcome::Success);
        assert_eq!(pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_with_their_endpoint() {
        let (endpoint, listener) = endpoint().await;
        let accepted = idle_connections(&endpoint, &listener, 2).await;
        drop(endpoint);
        for tcp in accepted {
            closed(tcp).await;
        }
    }
}
