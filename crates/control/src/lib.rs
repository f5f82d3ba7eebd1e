//! Skiff's control plane: the HTTPS API server over the store, with its
//! PKI bootstrap, authentication, authorization and metrics.

pub mod api;
pub mod auth;
pub mod certificates;
pub mod controllers;
pub mod error;
mod flows;
pub mod ipam;
mod logs;
pub mod metrics;
pub mod pki;
mod policy_capacity;
mod serve;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use skiff_store::{Config, EmbeddedStore, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Setup(String),
    #[error("store: {0}")]
    Store(#[from] skiff_store::StoreError),
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Names and addresses clients use to reach the server (certificate SANs;
    /// the first goes into the written client config).
    pub advertise: Vec<String>,
    /// Where to also write the admin client config (the CLI's default).
    pub write_config: Option<PathBuf>,
    /// A node is declared lost when its heartbeats stop for this long.
    pub node_grace: std::time::Duration,
    /// Each real node gets a /24 of this range for its instances.
    pub pod_cidr_range: skiff_api::net::Cidr,
    /// Services' virtual addresses come from here.
    pub service_cidr: skiff_api::net::Cidr,
    /// Workload identities are `spiffe://<trust_domain>/ns/<ns>/sa/<service>`.
    pub trust_domain: String,
    /// Lifetime of workload certificates (agents renew them at half).
    pub workload_cert_lifetime: std::time::Duration,
}

/// Serves the API until `shutdown` resolves; then stops accepting, ends
/// watches, lets in-flight requests finish, and closes the store.
pub async fn run(
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| ServerError::Setup(format!("{what}: {e}"));
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| setup(&opts.data_dir.display().to_string(), &e))?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| setup(&format!("listen on {}", opts.listen), &e))?;
    let addr = listener.local_addr().map_err(|e| setup("listen", &e))?;
    let mut hosts: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
    hosts.extend(opts.advertise.iter().cloned());
    if !addr.ip().is_unspecified() {
        hosts.push(addr.ip().to_string());
    }
    hosts.dedup();
    let pki = pki::load_or_create(&opts.data_dir, &hosts, time::OffsetDateTime::now_utc())?;
    let host = opts.advertise.first().cloned().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            "127.0.0.1".into()
        } else {
            addr.ip().to_string()
        }
    });
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let url = format!("https://{host}:{}", addr.port());
    pki::write_admin_config(&pki, &opts.data_dir, &url, opts.write_config.as_deref())?;
    if pki.created {
        tracing::info!(data_dir = %opts.data_dir.display(), "Created a new cluster: CA, admin credentials and join token");
    }
    let store = Arc::new(EmbeddedStore::open(
        &opts.data_dir.join("store.redb"),
        Config::default(),
    )?);
    let tls = serve::tls_config(&pki)?;
    let (stop, stopped) = watch::channel(false);
    let metrics = Arc::new(metrics::Metrics::new());
    let state = Arc::new(api::AppState {
        store: store.clone(),
        metrics: metrics.clone(),
        join_token: pki.join_token.clone(),
        node_grace: opts.node_grace,
        node_leases: std::sync::Mutex::new(std::collections::HashMap::new()),
        shutdown: stopped.clone(),
        workload: certificates::WorkloadCa {
            ca: skiff_identity::Ca::from_pem(pki.ca.cert_pem(), &pki.ca.key_pem())
                .map_err(|e| ServerError::Setup(format!("CA: {e}")))?,
            trust_domain: opts.trust_domain.clone(),
            lifetime: opts.workload_cert_lifetime,
        },
    });
    controllers::spawn(
        store.clone(),
        controllers::Ranges {
            pods: opts.pod_cidr_range,
            services: opts.service_cidr,
        },
        stopped.clone(),
    );
    let app = axum::Router::new().fallback(api::handle).with_state(state);
    tracing::info!(url = %url, revision = store.revision(), "Listening");
    // The line tests and scripts wait for.
    println!("skiff server listening on {url}");
    let signal = async move {
        shutdown.await;
        tracing::info!("Shutting down: finishing in-flight requests");
        let _ = stop.send(true);
    };
    tokio::join!(serve::serve(listener, tls, app, stopped, metrics), signal);
    store.close().await;
    tracing::info!("Stopped");
    Ok(())
}
