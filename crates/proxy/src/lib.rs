//! `skiff proxy`: the sidecar next to every instance and the ingress
//! gateway. Protocol detection, power-of-two-choices balancing over
//! peak-EWMA latency, retries under a budget, outlier ejection, weighted
//! routes, mTLS with SPIFFE identities, L7 authorization, metrics, drain.

pub mod balance;
pub mod budget;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod dns;
mod h1;
pub mod http;
pub mod io;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod transparent;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, Route};
use crate::http::Forwarder;
use crate::metrics::Metrics;
use crate::server::{Listener, Targets};
use crate::tls::Identity;
use crate::transparent::Transparent;

/// A mutex's guard; a panic elsewhere while it was held does not poison
/// the proxy.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
use crate::upstream::Service;

/// How often the identity files are checked for a renewed certificate.
const IDENTITY_POLL: Duration = Duration::from_secs(1);

/// Calls `reload` every [`IDENTITY_POLL`]: it re-reads a certificate's
/// files and says whether a renewed one is now in use.
fn watch_certificate(
    what: &'static str,
    reload: impl Fn() -> Result<bool, tls::TlsError> + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(IDENTITY_POLL).await;
            match reload() {
                Ok(true) => tracing::info!(certificate = what, "Certificate renewed"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(certificate = what, error = %e, "Renewed certificate unusable; keeping the current one")
                }
            }
        }
    });
}

/// Runs the proxy until `shutdown` resolves, then drains: readiness turns
/// false, listeners close, open connections get `config.drain` to finish.
/// Fails before serving anything when a listener cannot bind or the
/// identity files are unusable.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let identity = match &config.identity {
        Some(files) => {
            let identity = Identity::load(files)?;
            metrics.cert_expiry.set(identity.not_after_unix());
            tracing::info!(identity = %identity.id(), "Identity loaded");
            let watched = identity.clone();
            let files = files.clone();
            let gauge = metrics.cert_expiry.clone();
            watch_certificate("workload", move || {
                let renewed = watched.reload(&files)?;
                if renewed {
                    gauge.set(watched.not_after_unix());
                }
                Ok(renewed)
            });
            Some(identity)
        }
        None => None,
    };
    let services = config
        .services
        .iter()
        .map(|s| Service::new(s, identity.as_ref(), config.timeouts.connect).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;

    let (drain_tx, drain_rx) = watch::channel(false);
    let peers = Arc::new(std::sync::RwLock::new(transparent::Peers::default()));
    if let Some(path) = &config.peers_file {
        spawn_peers_reload(path.clone(), peers.clone());
    }
    if let Some(path) = &config.discovery {
        discovery::follow(path.clone(), peers.clone())
            .await
            .map_err(anyhow::Error::msg)?;
    }
    if let Some(dns) = &config.dns {
        dns::serve(
            dns.listen,
            peers.clone(),
            dns.domain.clone(),
            dns.namespace.clone(),
        )
        .await?;
    }
    let (ready_tx, ready_rx) = watch::channel(false);
    let admin = server::bind(config.admin, "admin")
        .await
        .map_err(anyhow::Error::msg)?;
    tokio::spawn(server::serve_admin(
        admin,
        ready_rx,
        metrics.clone(),
        peers.clone(),
    ));
    let mut listeners = Vec::new();
    for o in &config.outbound {
        // Per-destination forwarding, for transparent and target listeners.
        let via = || {
            Transparent::new(
                "outbound",
                o.listen,
                peers.clone(),
                identity.clone(),
                config.timeouts,
                None,
                metrics.clone(),
            )
        };
        let targets = if let Some((service, port)) = &o.target {
            Targets::Named {
                via: {
                    let mut t = via();
                    t.gateway = true;
                    t
                },
                service: service.clone(),
                port: *port,
            }
        } else if o.transparent {
            Targets::Transparent(via())
        } else {
            Targets::Fixed(Arc::new(Forwarder {
                direction: "outbound",
                passthrough: false,
                services: services.clone(),
                routes: o.routes.clone(),
                default_route: o
                    .default_service
                    .map(|s| Route::to_service(&config.services[s].name, s)),
                tcp_service: o.default_service,
                request_timeout: config.timeouts.request,
                http_rules: None,
                audit_rules: None,
                port: o.listen.port(),
                plaintext: Vec::new(),
                opaque: false,
                retries: true,
                forwarded_for: false,
                metrics: metrics.clone(),
            }))
        };
        let listener = Listener {
            direction: "outbound",
            targets,
            metrics: metrics.clone(),
            protocol: o.protocol,
            tls: None,
            edge_tls: o
                .tls
                .as_ref()
                .map(|(cert, key)| {
                    let edge = tls::EdgeCert::load(cert, key)?;
                    let watched = edge.clone();
                    watch_certificate("edge", move || watched.reload());
                    edge.server_config()
                })
                .transpose()
                .map_err(|e| anyhow::anyhow!("outbound[{}].tls: {e}", o.listen))?,
            allow_plaintext: true,
            allowed_identities: None,
            detect_timeout: config.timeouts.detect,
        };
        listeners.push((
            server::bind(o.listen, "outbound")
                .await
                .map_err(anyhow::Error::msg)?,
            listener,
        ));
    }
    for (k, i) in config.inbound.iter().enumerate() {
        let targets = match i.app {
            None => Targets::Transparent(Transparent::new(
                "inbound",
                i.listen,
                peers.clone(),
                None,
                config.timeouts,
                i.http_rules.clone(),
                metrics.clone(),
            )),
            Some(app_addr) => {
                let app = config::ServiceConfig {
                    name: format!("inbound-{}", i.listen.port()),
                    endpoints: vec![config::EndpointConfig {
                        addr: app_addr,
                        identity: None,
                    }],
                };
                let service = Arc::new(
                    Service::new(&app, None, config.timeouts.connect)
                        .map_err(anyhow::Error::msg)?,
                );
                Targets::Fixed(Arc::new(Forwarder {
                    direction: "inbound",
                    passthrough: false,
                    services: vec![service],
                    routes: Vec::new(),
                    default_route: Some(Route::to_service(&app.name, 0)),
                    tcp_service: Some(0),
                    request_timeout: config.timeouts.request,
                    http_rules: i.http_rules.clone(),
                    audit_rules: None,
                    port: app_addr.port(),
                    plaintext: Vec::new(),
                    opaque: false,
                    retries: false,
                    forwarded_for: true,
                    metrics: metrics.clone(),
                }))
            }
        };
        let listener = Listener {
            direction: "inbound",
            targets,
            metrics: metrics.clone(),
            protocol: i.protocol,
            tls: identity.clone(),
            edge_tls: None,
            allow_plaintext: i.allow_plaintext,
            allowed_identities: i.allowed_identities.clone(),
            detect_timeout: config.timeouts.detect,
        };
        let socket = server::bind(i.listen, &format!("inbound[{k}]"))
            .await
            .map_err(anyhow::Error::msg)?;
        listeners.push((socket, listener));
    }
    for (socket, listener) in listeners {
        tokio::spawn(server::serve(socket, Arc::new(listener), drain_rx.clone()));
    }
    drop(drain_rx);
    let _ = ready_tx.send(true);
    tracing::info!("Proxy ready");

    shutdown.await;
    tracing::info!(drain = ?config.drain, "Draining");
    let _ = ready_tx.send(false);
    let _ = drain_tx.send(true);
    // Every connection holds a receiver; closed() resolves when all are gone.
    if tokio::time::timeout(config.drain, drain_tx.closed())
        .await
        .is_err()
    {
        tracing::info!(
            open = drain_tx.receiver_count(),
            "Drain period over with connections still open; closing them"
        );
    }
    Ok(())
}

/// How often the peers file is checked for changes (its size and mtime).
const PEERS_POLL: Duration = Duration::from_millis(200);

/// Keeps `peers` equal to the file's contents: loads it now (so the
/// proxy is never ready without the policy its peers file gives), then
/// whenever it changes. A file that does not parse leaves the table as it
/// was.
fn spawn_peers_reload(path: std::path::PathBuf, peers: Arc<std::sync::RwLock<transparent::Peers>>) {
    let mut last = reload_peers(&path, &peers, None);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PEERS_POLL).await;
            last = reload_peers(&path, &peers, last);
        }
    });
}

/// The file's size and modification time, which say whether it changed.
type Stamp = Option<(u64, Option<std::time::SystemTime>)>;

/// Loads the peers file into `peers` if its stamp differs from `last`;
/// returns the stamp seen.
fn reload_peers(
    path: &std::path::Path,
    peers: &std::sync::RwLock<transparent::Peers>,
    last: Stamp,
) -> Stamp {
    let stamp = std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    if stamp != last {
        match transparent::load_peers(path) {
            Ok(table) => {
                tracing::info!(
                    peers = table.table.len(),
                    version = table.version,
                    "Peers table loaded"
                );
                *peers.write().unwrap_or_else(|p| p.into_inner()) = table;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Peers file unusable; keeping the previous table")
            }
        }
    }
    stamp
}
