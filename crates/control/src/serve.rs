//! The HTTPS listener: TLS with optional client certificates, per
//! connection limits and timeouts, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::ServerError;
use crate::auth::Peer;
use crate::metrics::Metrics;
use crate::pki::Pki;

/// Connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 8192;
/// A client must finish the TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// …and send each request's headers within this (slowloris).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, in-flight requests get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS 1.2/1.3 with the server certificate; client certificates are
/// verified against the cluster CA when presented (tokens are the other way in).
pub fn tls_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let setup = |e: &dyn std::fmt::Display| ServerError::Setup(format!("TLS: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in skiff_identity::certs_from_pem(pki.ca.cert_pem()).map_err(|e| setup(&e))? {
        roots.add(cert).map_err(|e| setup(&e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| setup(&e))?;
    let certs = skiff_identity::certs_from_pem(&pki.server.cert_pem).map_err(|e| setup(&e))?;
    let key = skiff_identity::key_from_pem(&pki.server.key_pem).map_err(|e| setup(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| setup(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn internal_error() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        hyper::StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(serde_json::json!({
            "kind": "Status", "code": 500,
            "message": "internal error in the API server (a bug; the server log has the details): check with `skiff get` whether the change was made",
        })),
    )
        .into_response()
}

/// Accepts and serves connections until `shutdown` turns true, then waits
/// (bounded) for open requests to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client.addr = %remote, "Too many connections; closing");
            continue;
        };
        let (acceptor, app, metrics, watcher) = (
            acceptor.clone(),
            app.clone(),
            metrics.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            metrics.connections.inc();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let peer = Peer {
                        certificate: stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| skiff_identity::principal_of(c).map_err(|e| e.to_string())),
                    };
                    let service = hyper::service::service_fn(
                        move |mut req: hyper::Request<Incoming>| {
                            req.extensions_mut().insert(peer.clone());
                            let (method, uri) = (req.method().clone(), req.uri().clone());
                            // Its own task, so a bug that panics in a handler
                            // answers 500 instead of dropping the connection
                            // (and every request multiplexed on it).
                            let handler =
                                tokio::spawn(app.clone().oneshot(req.map(axum::body::Body::new)));
                            async move {
                                match handler.await {
                                    Ok(response) => response,
                                    Err(e) => {
                                        tracing::error!(http.method = %method, http.uri = %uri, error = %e, "Request handler panicked");
                                        Ok(internal_error())
                                    }
                                }
                            }
                        },
                    );
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT);
                    builder
                        .http2()
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Some(Duration::from_secs(30)));
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(client.addr = %remote, error = %e, "Connection ended with an error");
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(client.addr = %remote, error = %e, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(client.addr = %remote, "TLS handshake timed out"),
            }
            metrics.connections.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("Some connections did not finish within the drain timeout");
    }
}
