//! The ingress gateway of a mesh cluster: a `skiff proxy` outside every
//! instance, holding its own identity (`…/ns/skiff-system/sa/gateway`,
//! certified by CSR like an instance's and renewed at half life), following
//! the cluster's discovery itself, and sending every connection it accepts
//! to one Service over mTLS through the Service's virtual address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use skiff_client::{Client, Method};
use skiff_identity::SpiffeId;

/// The gateway's identity: namespace and service account.
const NAMESPACE: &str = "skiff-system";
const ACCOUNT: &str = "gateway";

/// Runs the gateway until `shutdown`: `listen` (plain HTTP or TCP from
/// outside the mesh) to `target` (`<service>.<namespace>:<port>`). Files
/// (key, certificates, the peers table) live in `dir`.
pub async fn run(
    client: Client,
    dir: &Path,
    listen: SocketAddr,
    target: &str,
    trust_domain: &str,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let id = SpiffeId::new(trust_domain, NAMESPACE, ACCOUNT)?;
    let not_after = issue(&client, dir, &id).await?;
    let peers = dir.join("peers.json");
    tokio::spawn(skiff_agent::runtime::mesh::follow_discovery(
        client.clone(),
        peers.clone(),
        trust_domain.to_string(),
    ));
    let renew = tokio::spawn(renew(client, dir.to_path_buf(), id, not_after));
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = json!({
        "admin": admin.to_string(),
        "identity": {
            "caFile": dir.join("ca.crt"),
            "certFile": dir.join("tls.crt"),
            "keyFile": dir.join("tls.key"),
        },
        "outbound": [{"listen": listen.to_string(), "target": target}],
        "peersFile": peers,
    });
    let config = skiff_proxy::config::Config::parse(&config.to_string())
        .map_err(|e| anyhow::anyhow!("gateway config: {e}"))?;
    let result = skiff_proxy::run(config, shutdown).await;
    renew.abort();
    result
}

/// A key made here and a certificate for it; returns its expiry.
async fn issue(client: &Client, dir: &Path, id: &SpiffeId) -> anyhow::Result<i64> {
    use std::os::unix::fs::PermissionsExt;
    let (key, csr) = skiff_identity::workload_csr(id)?;
    let path = format!("/apis/skiff.dev/v1/namespaces/{NAMESPACE}/services/{ACCOUNT}/certificate");
    let answer = client
        .call(Method::POST, &path, Some(&json!({ "csr": csr })))
        .await?;
    let field = |k: &str| {
        answer
            .get(k)
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| anyhow::anyhow!("certificate answer lacks {k}"))
    };
    std::fs::write(dir.join("ca.crt"), field("caCertificate")?)?;
    let key_path = dir.join("tls.key");
    std::fs::write(&key_path, key)?;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(dir.join("tls.crt"), field("certificate")?)?;
    answer
        .get("notAfter")
        .and_then(Value::as_i64)
        .ok_or_else(|| anyhow::anyhow!("certificate answer lacks notAfter"))
}

/// Renews at half the remaining lifetime; retries every 5 s on failure.
async fn renew(client: Client, dir: PathBuf, id: SpiffeId, mut not_after: i64) {
    loop {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        tokio::time::sleep(Duration::from_secs(((not_after - now).max(2) as u64) / 2)).await;
        loop {
            match issue(&client, &dir, &id).await {
                Ok(t) => {
                    not_after = t;
                    break;
                }
                Err(e) => {
                    eprintln!("gateway: certificate renewal failed ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}
