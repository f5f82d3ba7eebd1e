//! The ingress gateway of a mesh cluster: a `skiff proxy` outside every
//! instance, holding its own identity (`…/ns/skiff-system/sa/gateway`,
//! certified by CSR like an instance's and renewed at half life), following
//! the cluster's discovery itself, and sending every connection it accepts
//! to one Service over mTLS through the Service's virtual address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::json;
use skiff_client::Client;
use skiff_identity::SpiffeId;

/// The gateway's identity: namespace and service account.
const NAMESPACE: &str = "skiff-system";
const ACCOUNT: &str = "gateway";

/// Runs the gateway until `shutdown`: `listen` (plain HTTP or TCP from
/// outside the mesh) to `target` (`<service>.<namespace>:<port>`). Files
/// (key, certificates, the discovery socket) live in `dir`.
pub async fn run(
    client: Client,
    dir: &Path,
    listen: SocketAddr,
    target: &str,
    tls: Option<(PathBuf, PathBuf)>,
    trust_domain: &str,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let id = SpiffeId::new(trust_domain, NAMESPACE, ACCOUNT)?;
    let not_after = issue(&client, dir, &id).await?;
    let peers = dir.join("discovery.sock");
    let cache = skiff_agent::cache::Cache::follow(&client, &["instances", "services", "routes"]);
    let discovery = skiff_agent::runtime::discovery::Discovery::new(peers.clone(), trust_domain);
    tokio::spawn(discovery.follow(cache));
    let renew = {
        let dir = dir.to_path_buf();
        tokio::spawn(skiff_agent::runtime::mesh::renew_at_half_life(
            id.to_string(),
            not_after,
            move || {
                let (client, dir, id) = (client.clone(), dir.clone(), id.clone());
                async move {
                    issue(&client, &dir, &id)
                        .await
                        .map_err(|e| format!("{e:#}"))
                }
            },
        ))
    };
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = json!({
        "admin": admin.to_string(),
        "identity": {
            "caFile": dir.join("ca.crt"),
            "certFile": dir.join("tls.crt"),
            "keyFile": dir.join("tls.key"),
        },
        "outbound": [match &tls {
            Some((cert, key)) => json!({"listen": listen.to_string(), "target": target,
                "tls": {"certFile": cert, "keyFile": key}}),
            None => json!({"listen": listen.to_string(), "target": target}),
        }],
        "discovery": peers,
    });
    let config = skiff_proxy::config::Config::parse(&config.to_string())
        .map_err(|e| anyhow::anyhow!("gateway config: {e}"))?;
    let result = skiff_proxy::run(config, shutdown).await;
    renew.abort();
    result
}

/// A key made here and a certificate for it, written into `dir`; returns
/// its expiry.
async fn issue(client: &Client, dir: &Path, id: &SpiffeId) -> anyhow::Result<i64> {
    let path = format!("/apis/skiff.dev/v1/namespaces/{NAMESPACE}/services/{ACCOUNT}/certificate");
    let (_, not_after) = skiff_agent::runtime::mesh::certify(client, &path, id, dir, None)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(not_after)
}
