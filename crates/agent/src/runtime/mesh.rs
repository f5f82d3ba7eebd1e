//! Sidecar injection: every instance gets a `skiff proxy` in its network
//! namespace, in its own cgroup leaf, as its own user, started and ready
//! before the app. The instance's netfilter rules redirect the app's
//! outgoing TCP to the proxy's outbound port and TCP arriving for it to
//! the inbound port; the proxy's own sockets (its uid) are exempt, and so is
//! what the node itself sends (health checks, from the gateway address).
//!
//! The proxy's key is made here and never leaves the node; the control
//! plane signs a CSR for the identity of the instance's Service. Key and
//! certificates live in tmpfs (`/run`), readable only by the proxy's user,
//! and are renewed at half their lifetime; the proxy picks up the new files
//! without dropping connections. One peers file per node, written from one
//! watch of Instances, tells every local proxy which addresses are meshed
//! and what identity each must prove.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use skiff_api::KindInfo;
use skiff_client::Client;
use skiff_identity::SpiffeId;

use super::discovery::{ClusterAcks, Discovery};
use super::instance::Plan;

/// The proxy's user: its sockets are not redirected.
pub const PROXY_UID: u32 = 1337;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// Where the instance's DNS queries are redirected (the proxy answers).
pub const DNS_PORT: u16 = 15053;
/// `/ready`, `/live`, `/metrics`, on every address of the instance.
pub const ADMIN_PORT: u16 = 4191;

/// The node's mesh: where sidecar files live and the trust domain.
#[derive(Debug)]
pub struct Mesh {
    dir: PathBuf,
    pub trust_domain: String,
    /// The node's peers file and the local instances it covers.
    pub discovery: Arc<Discovery>,
    /// Every node's acknowledgements, for instances leaving.
    pub acks: Arc<ClusterAcks>,
}

/// A prepared sidecar: its config and when its certificate expires.
#[derive(Debug)]
pub struct Sidecar {
    pub config: PathBuf,
    pub identity: SpiffeId,
    pub not_after_unix: i64,
}

impl Mesh {
    /// Clears what an earlier run of this agent left and starts an empty
    /// peers table.
    pub fn new(tag: &str, trust_domain: &str, client: &Client) -> Result<Mesh, String> {
        SpiffeId::new(trust_domain, "ns", "sa").map_err(|e| format!("--trust-domain: {e}"))?;
        let dir = PathBuf::from("/run/skiff-mesh").join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        create_dir(&dir)?;
        let socket = dir.join("discovery.sock");
        Ok(Mesh {
            dir,
            trust_domain: trust_domain.to_string(),
            discovery: Discovery::new(socket, trust_domain),
            acks: ClusterAcks::new(client.clone()),
        })
    }

    fn instance_dir(&self, plan: &Plan) -> PathBuf {
        self.dir.join(&plan.namespace).join(&plan.name)
    }

    /// Certificate, proxy config and interception rules for one instance.
    pub async fn prepare(&self, client: &Client, plan: &Plan) -> Result<Sidecar, String> {
        let dir = self.instance_dir(plan);
        create_dir(&dir)?;
        let (identity, not_after_unix) = self.issue(client, plan).await?;
        let config = dir.join("proxy.json");
        let text = json!({
            "admin": format!("0.0.0.0:{ADMIN_PORT}"),
            "identity": {
                "caFile": dir.join("ca.crt"),
                "certFile": dir.join("tls.crt"),
                "keyFile": dir.join("tls.key"),
            },
            "inbound": [{"listen": format!("0.0.0.0:{INBOUND_PORT}"), "transparent": true}],
            "outbound": [{"listen": format!("127.0.0.1:{OUTBOUND_PORT}"), "transparent": true}],
            "discovery": self.discovery.path(),
            "dns": {
                "listen": format!("127.0.0.1:{DNS_PORT}"),
                "domain": self.trust_domain,
                "namespace": plan.namespace,
            },
            "drainSeconds": 5,
        });
        write_atomic(&config, text.to_string().as_bytes(), 0o644, None)?;
        self.discovery
            .admit(&plan.id(), plan.net.address, Duration::from_secs(5))
            .await?;
        intercept(plan).await?;
        Ok(Sidecar {
            config,
            identity,
            not_after_unix,
        })
    }

    /// A key made here, a certificate for it from the control plane; both
    /// written for the proxy. Returns the identity and expiry.
    pub async fn issue(&self, client: &Client, plan: &Plan) -> Result<(SpiffeId, i64), String> {
        let id = SpiffeId::new(&self.trust_domain, &plan.namespace, &plan.service)
            .map_err(|e| format!("identity: {e}"))?;
        let instances = KindInfo::find("instances").ok_or("no Instance kind")?;
        let path = format!(
            "{}/certificate",
            skiff_client::path(instances, Some(&plan.namespace), Some(&plan.name))
        );
        certify(
            client,
            &path,
            &id,
            &self.instance_dir(plan),
            Some(PROXY_UID),
        )
        .await
    }

    /// Removes an instance's sidecar files.
    pub fn remove(&self, plan: &Plan) {
        self.discovery.release(&plan.id(), plan.net.address);
        let _ = std::fs::remove_dir_all(self.instance_dir(plan));
    }
}

/// Makes a key for `id`, has the control plane certify it (a POST of the
/// CSR to `api_path`, an instance's or a Service's `/certificate`), and
/// writes `ca.crt`, `tls.key` (0600) and `tls.crt` into `dir`, owned by
/// `owner` when given. Returns the identity granted and the expiry.
pub async fn certify(
    client: &Client,
    api_path: &str,
    id: &SpiffeId,
    dir: &Path,
    owner: Option<u32>,
) -> Result<(SpiffeId, i64), String> {
    let (key, csr) = skiff_identity::workload_csr(id).map_err(|e| e.to_string())?;
    let answer = client
        .call(Method::POST, api_path, Some(&json!({ "csr": csr })))
        .await
        .map_err(|e| format!("certificate for {id}: {e}"))?;
    let field = |k: &str| {
        answer
            .get(k)
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| format!("certificate answer lacks {k}"))
    };
    let granted: SpiffeId = field("identity")?.parse().map_err(|e| format!("{e}"))?;
    write_atomic(
        &dir.join("ca.crt"),
        field("caCertificate")?.as_bytes(),
        0o644,
        owner,
    )?;
    // Key before certificate: a reader between the two sees a pair that
    // does not match, refuses it and keeps the previous one.
    write_atomic(&dir.join("tls.key"), key.as_bytes(), 0o600, owner)?;
    write_atomic(
        &dir.join("tls.crt"),
        field("certificate")?.as_bytes(),
        0o644,
        owner,
    )?;
    let not_after = answer
        .get("notAfter")
        .and_then(Value::as_i64)
        .ok_or("certificate answer lacks notAfter")?;
    Ok((granted, not_after))
}

/// Renews a certificate expiring at `not_after` (seconds since the epoch)
/// at half its remaining life, and again each time; `issue` gets a new one
/// and returns its expiry. A failed renewal is retried every 5 s. Runs
/// until the task is aborted.
pub async fn renew_at_half_life<F, Fut>(what: String, mut not_after: i64, mut issue: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<i64, String>>,
{
    loop {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let wait = ((not_after - now).max(2) as u64) / 2;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        loop {
            match issue().await {
                Ok(t) => {
                    tracing::info!(holder = %what, not_after = t, "Certificate renewed");
                    not_after = t;
                    break;
                }
                Err(e) => {
                    tracing::warn!(holder = %what, error = %e, "Certificate renewal failed; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}

/// The instance's redirect rules, applied atomically with
/// `iptables-restore` inside its namespace.
async fn intercept(plan: &Plan) -> Result<(), String> {
    let rules = interception_rules(plan.net.gateway);
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &plan.net.netns, "iptables-restore"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("iptables-restore: {e} (install iptables)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin
            .write_all(rules.as_bytes())
            .await
            .map_err(|e| format!("iptables-restore: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iptables-restore in {}: {}",
            plan.net.netns,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// NAT rules for one instance namespace: inbound TCP to the inbound port
/// except from the node (`gateway`) and to the proxy's admin port; the
/// app's outbound TCP to the outbound port except loopback and the
/// proxy's own; the app's DNS queries to the proxy's DNS port.
pub fn interception_rules(gateway: Ipv4Addr) -> String {
    format!(
        "*nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         -A PREROUTING -p tcp -s {gateway}/32 -j RETURN\n\
         -A PREROUTING -p tcp --dport {ADMIN_PORT} -j RETURN\n\
         -A PREROUTING -p tcp -j REDIRECT --to-ports {INBOUND_PORT}\n\
         -A OUTPUT -p tcp -m owner --uid-owner {PROXY_UID} -j RETURN\n\
         -A OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports {DNS_PORT}\n\
         -A OUTPUT -p tcp -o lo -j RETURN\n\
         -A OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}\n\
         -A OUTPUT -p udp --dport 53 -m owner ! --uid-owner {PROXY_UID} -j REDIRECT --to-ports {DNS_PORT}\n\
         COMMIT\n"
    )
}

fn create_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes through a temporary file and a rename, so a reader sees the old
/// contents or the new, never a part.
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<u32>,
) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(fail)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    if let Some(uid) = owner {
        nix::unistd::chown(
            &tmp,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(uid)),
        )
        .map_err(|e| format!("{}: chown: {e}", path.display()))?;
    }
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_and_the_proxy_itself_are_not_redirected() {
        let rules = interception_rules(Ipv4Addr::new(198, 19, 16, 1));
        let lines: Vec<&str> = rules.lines().collect();
        let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
        // Exemptions come before the redirects they exempt from.
        assert!(at("-s 198.19.16.1/32 -j RETURN") < at("--to-ports 15006"));
        assert!(at("--dport 4191 -j RETURN") < at("--to-ports 15006"));
        assert!(at("--uid-owner 1337 -j RETURN") < at("--to-ports 15001"));
        assert!(at("-o lo -j RETURN") < at("--to-ports 15001"));
        // DNS over TCP too, whatever nameserver (even a loopback one) it
        // was sent to; the proxy's own queries go out.
        assert!(at("--uid-owner 1337 -j RETURN") < at("--dport 53 -j REDIRECT --to-ports 15053"));
        assert!(at("-p tcp --dport 53") < at("-o lo -j RETURN"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }
}
