//! Listeners: accepting connections, detecting their protocol, terminating
//! mTLS on the inbound side, and serving HTTP or copying bytes. Every
//! connection watches the drain signal: HTTP/1 connections then close after
//! their current response (`Connection: close`), HTTP/2 ones get GOAWAY.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::balance::Outcome;
use crate::config::{IdentityPattern, ListenerProtocol};
use crate::detect::Protocol;
use crate::http::{Forwarder, Peer};
use crate::io::{Prefixed, sniff};
use crate::metrics::{ConnectionLabels, Metrics};
use crate::tls::{Identity, peer_identity};
use crate::transparent::{Transparent, original_dst};

/// What a listener does with its connections.
#[derive(Debug)]
pub struct Listener {
    pub direction: &'static str,
    pub targets: Targets,
    pub metrics: Arc<Metrics>,
    pub protocol: ListenerProtocol,
    /// Inbound with an identity: mTLS required (unless `allow_plaintext`).
    pub tls: Option<Arc<Identity>>,
    /// TLS toward clients outside the mesh (the gateway's HTTPS).
    pub edge_tls: Option<Arc<rustls::ServerConfig>>,
    pub allow_plaintext: bool,
    pub allowed_identities: Option<Vec<IdentityPattern>>,
    pub detect_timeout: Duration,
}

/// Where a listener's connections go.
#[derive(Debug)]
pub enum Targets {
    /// Every connection to the same routes and services.
    Fixed(Arc<Forwarder>),
    /// Each connection where it was headed before it was redirected.
    Transparent(Transparent),
    /// Every connection to one Service's virtual address and port (the
    /// service is `namespace/name` in the peers file).
    Named {
        via: Transparent,
        service: String,
        port: u16,
    },
}

/// Accepts until `drain` turns true.
pub async fn serve(socket: TcpListener, listener: Arc<Listener>, mut drain: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = socket.accept() => a,
            _ = drained(&mut drain) => return,
        };
        match accepted {
            Ok((tcp, client)) => {
                let _ = tcp.set_nodelay(true);
                let listener = listener.clone();
                let drain = drain.clone();
                tokio::spawn(async move {
                    let dst = match &listener.targets {
                        Targets::Fixed(_) => None,
                        Targets::Named { via, service, port } => {
                            let vip = via
                                .peers
                                .read()
                                .unwrap_or_else(|p| p.into_inner())
                                .by_name
                                .get(service)
                                .copied();
                            let Some(vip) = vip else {
                                tracing::info!(client.addr = %client, service = %service, "No such service in the mesh (yet); connection refused");
                                return;
                            };
                            Some(SocketAddr::new(vip, *port))
                        }
                        Targets::Transparent(_) => match original_dst(&tcp) {
                            Ok(dst) => Some(dst),
                            Err(e) => {
                                tracing::info!(client.addr = %client, error = %e, "Redirected connection refused");
                                return;
                            }
                        },
                    };
                    let forwarder = match listener.forwarder(dst) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::info!(client.addr = %client, error = %e, "Connection refused");
                            return;
                        }
                    };
                    if let Err(e) = listener
                        .connection(tcp, client, dst, &forwarder, drain)
                        .await
                    {
                        tracing::debug!(client.addr = %client, error = %e, "Connection ended with an error");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "Accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Listener {
    /// Where connections (or requests) headed to `dst` go now: per
    /// destination for transparent and named targets, kept while the
    /// peers table leaves it unchanged.
    fn forwarder(&self, dst: Option<SocketAddr>) -> Result<Arc<Forwarder>, String> {
        match (&self.targets, dst) {
            (Targets::Fixed(f), _) => Ok(f.clone()),
            (Targets::Transparent(via) | Targets::Named { via, .. }, Some(dst)) => {
                via.forwarder(dst)
            }
            (_, None) => Err("no destination".to_string()),
        }
    }

    /// The forwarder for a request on a connection headed to `dst` that
    /// began with `first`.
    fn current(&self, dst: Option<SocketAddr>, first: &Arc<Forwarder>) -> Arc<Forwarder> {
        match dst {
            Some(_) => self.forwarder(dst).unwrap_or_else(|_| first.clone()),
            None => first.clone(),
        }
    }

    async fn connection(
        self: &Arc<Self>,
        mut tcp: TcpStream,
        client: SocketAddr,
        dst: Option<SocketAddr>,
        forwarder: &Arc<Forwarder>,
        drain: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let direction = self.direction;
        if let Some(edge) = &self.edge_tls {
            let mut tls = match tokio_rustls::TlsAcceptor::from(edge.clone())
                .accept(tcp)
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    self.count(direction, "refused", true, "none");
                    tracing::info!(client.addr = %client, error = %e, "TLS handshake failed");
                    return Ok(());
                }
            };
            let (protocol, prefix) = sniff(&mut tls, self.detect_timeout).await?;
            let peer = Peer::new(None, true, Some(client.ip()));
            return self
                .application(
                    Prefixed::new(prefix, tls),
                    protocol,
                    peer,
                    dst,
                    forwarder,
                    drain,
                )
                .await;
        }
        let (protocol, prefix) = match self.protocol {
            _ if forwarder.passthrough => (Protocol::Opaque, bytes::Bytes::new()),
            // Declared `tcp` (outbound; inbound still tells TLS apart).
            _ if forwarder.opaque && self.tls.is_none() => (Protocol::Opaque, bytes::Bytes::new()),
            ListenerProtocol::Tcp if self.tls.is_none() => (Protocol::Opaque, bytes::Bytes::new()),
            _ => sniff(&mut tcp, self.detect_timeout).await?,
        };
        let io = Prefixed::new(prefix, tcp);
        let plain = Peer::new(None, false, Some(client.ip()));
        let Some(identity) = &self.tls else {
            return self
                .application(io, protocol, plain, dst, forwarder, drain)
                .await;
        };
        if protocol != Protocol::Tls {
            // Plaintext only where the config or a policy's `cidr` peer
            // says so.
            if self.allow_plaintext || forwarder.plaintext.iter().any(|s| s.contains(client.ip())) {
                return self
                    .application(io, protocol, plain, dst, forwarder, drain)
                    .await;
            }
            self.count(direction, "refused", false, "none");
            tracing::info!("Plaintext connection to a meshed port refused");
            let mut io = io;
            if protocol == Protocol::Http1 {
                let body = "this port accepts only mTLS from the Skiff mesh\n";
                let reply = format!(
                    "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = io.write_all(reply.as_bytes()).await;
            }
            return Ok(());
        }
        let config = identity
            .server_config()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let tls = match tokio_rustls::TlsAcceptor::from(config).accept(io).await {
            Ok(t) => t,
            Err(e) => {
                self.count(direction, "refused", true, "none");
                tracing::info!(error = %e, "mTLS handshake refused");
                return Ok(());
            }
        };
        let peer_id = peer_identity(tls.get_ref().1);
        let allowed = match (&peer_id, &self.allowed_identities) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(id), Some(patterns)) => patterns.iter().any(|p| p.matches(id)),
        };
        if !allowed {
            let who = peer_id
                .as_ref()
                .map_or_else(|| "none".to_string(), ToString::to_string);
            self.count(direction, "refused", true, &who);
            tracing::info!(peer = %who, "Peer identity not allowed on this port");
            return Ok(());
        }
        let mut tls = tls;
        let said_opaque = tls.get_ref().1.alpn_protocol() == Some(crate::tls::OPAQUE_ALPN);
        let (inner, prefix) = match self.protocol {
            ListenerProtocol::Tcp => (Protocol::Opaque, bytes::Bytes::new()),
            _ if forwarder.opaque || said_opaque => (Protocol::Opaque, bytes::Bytes::new()),
            _ => sniff(&mut tls, self.detect_timeout).await?,
        };
        let peer = Peer::new(peer_id, true, Some(client.ip()));
        self.application(
            Prefixed::new(prefix, tls),
            inner,
            peer,
            dst,
            forwarder,
            drain,
        )
        .await
    }

    /// The decrypted (or plain) application stream.
    async fn application<T>(
        self: &Arc<Self>,
        io: T,
        protocol: Protocol,
        peer: Peer,
        dst: Option<SocketAddr>,
        forwarder: &Arc<Forwarder>,
        drain: watch::Receiver<bool>,
    ) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let direction = self.direction;
        let http = matches!(protocol, Protocol::Http1 | Protocol::Http2)
            || self.protocol == ListenerProtocol::Http;
        let name = match (http, protocol) {
            (true, Protocol::Http2) => "http2",
            (true, _) => "http1",
            (false, _) => "opaque",
        };
        self.count(direction, name, peer.tls, &peer.label.to_string());
        // Shared by the connection's requests: made once, never copied.
        let peer = Arc::new(peer);
        if http && protocol == Protocol::Http1 {
            let mut drain = drain;
            let current = || self.current(dst, forwarder);
            match crate::h1::serve(io, &peer, current, &mut drain).await {
                crate::h1::Ended::Closed => {}
                crate::h1::Ended::Handoff(read, io) => {
                    let io = Prefixed::new(read, io);
                    serve_http(io, self.clone(), dst, forwarder.clone(), peer, drain).await;
                }
            }
            Ok(())
        } else if http {
            serve_http(io, self.clone(), dst, forwarder.clone(), peer, drain).await;
            Ok(())
        } else {
            opaque(io, forwarder).await
        }
    }

    fn count(&self, direction: &'static str, protocol: &'static str, tls: bool, peer: &str) {
        self.metrics
            .connections
            .get_or_create(&ConnectionLabels {
                direction,
                protocol,
                tls: if tls { "true" } else { "false" },
                peer: peer.to_string(),
            })
            .inc();
    }
}

/// Bytes to an endpoint of the listener's default service, chosen per
/// connection.
async fn opaque<T: AsyncRead + AsyncWrite + Unpin>(
    mut io: T,
    forwarder: &Forwarder,
) -> std::io::Result<()> {
    let Some(service) = forwarder.opaque_service() else {
        return Ok(());
    };
    let mut tried = Vec::new();
    let mut upstream = loop {
        let Some(pick) = service.pick(&tried) else {
            return Ok(());
        };
        tried.push(pick.index);
        let started = Instant::now();
        match pick.endpoint().connector.connect_as(true).await {
            Ok(s) => {
                pick.finish(started.elapsed(), Outcome::Success);
                break s;
            }
            Err(e) => {
                pick.finish(started.elapsed(), Outcome::Failure);
                tracing::debug!(error = %e, "Opaque upstream failed");
                // A connection not yet made is safe to try elsewhere.
                if tried.len() >= service.endpoints.len().min(3) {
                    return Err(std::io::Error::other(e.to_string()));
                }
            }
        }
    };
    tokio::io::copy_bidirectional(&mut io, &mut upstream)
        .await
        .map(|_| ())
}

/// Serves HTTP on a connection. Each request goes to the destination's
/// forwarder as it is when the request arrives, so a kept-alive connection
/// follows routes and policy as they change.
async fn serve_http<T>(
    io: T,
    listener: Arc<Listener>,
    dst: Option<SocketAddr>,
    first: Arc<Forwarder>,
    peer: Arc<Peer>,
    mut drain: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let forwarder = listener.current(dst, &first);
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(forwarder.handle(req, peer).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        _ = drained(&mut drain) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Resolves once draining starts (or the proxy is going away).
pub(crate) async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// The admin endpoint: `/live`, `/ready`, `/metrics`, `/peers` (the
/// peers table this proxy applied: its version and the control plane
/// revisions it reflects, which the agent reports as acknowledgements),
/// and `/denials?after=N` (L7 denials numbered after N, for `skiff flows`).
pub async fn serve_admin(
    socket: TcpListener,
    ready: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
    peers: Arc<std::sync::RwLock<crate::transparent::Peers>>,
) {
    loop {
        let Ok((tcp, _)) = socket.accept().await else {
            continue;
        };
        let ready = ready.clone();
        let metrics = metrics.clone();
        let peers = peers.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let ready = *ready.borrow();
                let metrics = metrics.clone();
                let peers = peers.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/live" => (200, "live\n".to_string()),
                        "/ready" if ready => (200, "ready\n".to_string()),
                        "/ready" => (503, "not ready\n".to_string()),
                        "/metrics" => (200, metrics.encode()),
                        "/peers" => (
                            200,
                            peers
                                .read()
                                .unwrap_or_else(|p| p.into_inner())
                                .to_json()
                                .to_string(),
                        ),
                        "/denials" => {
                            let after = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("after="))
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0);
                            (200, metrics.denials.after(after).to_string())
                        }
                        _ => (
                            404,
                            "not found: try /live, /ready, /metrics, /peers or /denials\n"
                                .to_string(),
                        ),
                    };
                    let mut resp =
                        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// Binds a listener, naming the address on failure.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{what} {addr}: cannot listen: {e}"))
}
