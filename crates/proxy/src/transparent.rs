//! Transparent listeners: the instance's netfilter rules redirect its
//! connections to the proxy (outbound: everything the app opens; inbound:
//! everything arriving for its ports), and each connection goes where it
//! was headed, read back with `SO_ORIGINAL_DST`. Outbound, a destination
//! the peers table names is a meshed instance and gets mTLS to the identity
//! listed; any other gets plain TCP, as it would without the proxy.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use skiff_identity::SpiffeId;
use tokio::net::TcpStream;

use crate::config::{EndpointConfig, HttpRule, Route, ServiceConfig, Timeouts};
use crate::http::Forwarder;
use crate::metrics::Metrics;
use crate::tls::Identity;
use crate::upstream::Service;

/// Meshed destinations and the identity each must prove, as of `version`
/// (the writer's counter; the admin endpoint's `/peers` shows which
/// version a proxy applied).
#[derive(Debug, Clone, Default)]
pub struct Peers {
    pub version: u64,
    pub table: HashMap<IpAddr, SpiffeId>,
    /// Services' virtual addresses: a connection to one goes to one of the
    /// service's ready instances, on the same port, chosen by the balancer.
    pub services: HashMap<IpAddr, VirtualService>,
    /// `namespace/name` → virtual address, for DNS.
    pub by_name: HashMap<String, IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualService {
    /// `namespace/name`.
    pub name: String,
    /// Ready instances' addresses.
    pub endpoints: Vec<IpAddr>,
}

impl Peers {
    pub fn to_json(&self) -> serde_json::Value {
        let table: serde_json::Map<String, serde_json::Value> = self
            .table
            .iter()
            .map(|(ip, id)| (ip.to_string(), serde_json::Value::String(id.to_string())))
            .collect();
        let services: serde_json::Map<String, serde_json::Value> = self
            .services
            .iter()
            .map(|(ip, s)| {
                let endpoints: Vec<String> = s.endpoints.iter().map(ToString::to_string).collect();
                (
                    ip.to_string(),
                    serde_json::json!({"name": s.name, "endpoints": endpoints}),
                )
            })
            .collect();
        serde_json::json!({ "version": self.version, "peers": table, "services": services })
    }
}

/// Reads a peers file: `{"version": N, "peers": {"<ip>": "spiffe://…", …},
/// "services": {"<virtual ip>": {"name": "ns/svc", "endpoints": ["<ip>", …]}}}`.
/// Errors name the file and the entry.
pub fn load_peers(path: &Path) -> Result<Peers, String> {
    let at = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{at}: {e}"))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{at}: {e}"))?;
    let Some(map) = doc.get("peers").and_then(|p| p.as_object()) else {
        return Err(format!(
            "{at}: expected {{\"peers\": {{\"<ip>\": \"spiffe://…\"}}}}"
        ));
    };
    let version = doc.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    let table = map
        .iter()
        .map(|(ip, id)| {
            let addr: IpAddr = ip.parse().map_err(|e| format!("{at}: peers.{ip}: {e}"))?;
            let id = id
                .as_str()
                .ok_or_else(|| format!("{at}: peers.{ip}: expected a spiffe:// string"))?
                .parse::<SpiffeId>()
                .map_err(|e| format!("{at}: peers.{ip}: {e}"))?;
            Ok((addr, id))
        })
        .collect::<Result<_, String>>()?;
    let mut services = HashMap::new();
    if let Some(map) = doc.get("services").and_then(|s| s.as_object()) {
        for (vip, s) in map {
            let at = format!("{at}: services.{vip}");
            let addr: IpAddr = vip.parse().map_err(|e| format!("{at}: {e}"))?;
            let name = s
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string();
            let endpoints = s
                .get("endpoints")
                .and_then(|e| e.as_array())
                .map(|list| {
                    list.iter()
                        .map(|e| {
                            e.as_str()
                                .and_then(|e| e.parse::<IpAddr>().ok())
                                .ok_or_else(|| format!("{at}.endpoints: {e} is not an address"))
                        })
                        .collect::<Result<Vec<_>, String>>()
                })
                .transpose()?
                .unwrap_or_default();
            services.insert(addr, VirtualService { name, endpoints });
        }
    }
    let by_name = services
        .iter()
        .map(|(vip, s)| (s.name.clone(), *vip))
        .collect();
    Ok(Peers {
        version,
        table,
        services,
        by_name,
    })
}

/// Where a redirected connection was headed.
pub fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    let raw = nix::sys::socket::getsockopt(tcp, nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(raw.sin_port),
    )))
}

/// Destinations whose forwarders (and connection pools) are kept.
const MAX_CACHED: usize = 4096;

/// What a transparent listener needs to make a forwarder per destination.
#[derive(Debug)]
pub struct Transparent {
    pub direction: &'static str,
    pub peers: Arc<RwLock<Peers>>,
    pub identity: Option<Arc<Identity>>,
    pub timeouts: Timeouts,
    pub http_rules: Option<Vec<HttpRule>>,
    pub metrics: Arc<Metrics>,
    /// The listener's own address: a connection made straight to it (not
    /// redirected) would loop.
    pub own: SocketAddr,
    cache: Mutex<HashMap<SocketAddr, Arc<Forwarder>>>,
}

impl Transparent {
    pub fn new(
        direction: &'static str,
        own: SocketAddr,
        peers: Arc<RwLock<Peers>>,
        identity: Option<Arc<Identity>>,
        timeouts: Timeouts,
        http_rules: Option<Vec<HttpRule>>,
        metrics: Arc<Metrics>,
    ) -> Transparent {
        Transparent {
            direction,
            peers,
            identity,
            timeouts,
            http_rules,
            metrics,
            own,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The forwarder for connections headed to `dst`, made on first use and
    /// kept while the destination's identity stays the same.
    pub fn forwarder(&self, dst: SocketAddr) -> Result<Arc<Forwarder>, String> {
        if dst.port() == self.own.port()
            && (dst.ip() == self.own.ip() || self.own.ip().is_unspecified())
        {
            return Err(format!(
                "{dst} is this listener: connections must arrive redirected"
            ));
        }
        let (name, endpoints, passthrough) = if self.direction == "inbound" {
            let app = SocketAddr::from(([127, 0, 0, 1], dst.port()));
            (
                app.to_string(),
                vec![EndpointConfig {
                    addr: app,
                    identity: None,
                }],
                false,
            )
        } else {
            let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
            match peers.services.get(&dst.ip()) {
                // A virtual address: balance over the service's instances.
                Some(vs) => (
                    vs.name.clone(),
                    vs.endpoints
                        .iter()
                        .map(|ip| EndpointConfig {
                            addr: SocketAddr::new(*ip, dst.port()),
                            identity: peers.table.get(ip).cloned(),
                        })
                        .collect(),
                    false,
                ),
                None => {
                    let identity = peers.table.get(&dst.ip()).cloned();
                    let name = identity.as_ref().map_or_else(
                        || dst.to_string(),
                        |id| format!("{}/{}", id.namespace, id.service_account),
                    );
                    let passthrough = identity.is_none();
                    (
                        name,
                        vec![EndpointConfig {
                            addr: dst,
                            identity,
                        }],
                        passthrough,
                    )
                }
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&dst)
            && same_endpoints(&f.services[0], &endpoints)
        {
            return Ok(f.clone());
        }
        let service = Service::new(
            &ServiceConfig {
                name: name.clone(),
                endpoints,
            },
            self.identity.as_ref(),
            self.timeouts.connect,
        )?;
        let forwarder = Arc::new(Forwarder {
            direction: self.direction,
            passthrough,
            services: vec![Arc::new(service)],
            routes: Vec::new(),
            default_route: Some(Route::to_service(&name, 0)),
            request_timeout: self.timeouts.request,
            http_rules: self.http_rules.clone(),
            retries: self.direction == "outbound",
            metrics: self.metrics.clone(),
        });
        // Bounded: a proxy whose app calls many outside addresses must not
        // grow without end. Dropping the cache drops only idle pools.
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(dst, forwarder.clone());
        Ok(forwarder)
    }
}

/// Whether a cached service still has exactly these endpoints (a change
/// makes a new one: fresh balancer statistics and pools).
fn same_endpoints(service: &Service, endpoints: &[EndpointConfig]) -> bool {
    service.endpoints.len() == endpoints.len()
        && service
            .endpoints
            .iter()
            .zip(endpoints)
            .all(|(have, want)| have.addr == want.addr && have.identity == want.identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_file_is_read_and_bad_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        std::fs::write(
            &path,
            r#"{"peers": {"198.19.16.2": "spiffe://td/ns/shop/sa/web"}}"#,
        )
        .unwrap();
        let peers = load_peers(&path).unwrap();
        assert_eq!(
            peers
                .table
                .get(&"198.19.16.2".parse::<IpAddr>().unwrap())
                .map(ToString::to_string),
            Some("spiffe://td/ns/shop/sa/web".into())
        );
        std::fs::write(&path, r#"{"peers": {"198.19.16.2": "web"}}"#).unwrap();
        let err = load_peers(&path).unwrap_err();
        assert!(err.contains("peers.198.19.16.2"), "{err}");
    }
}
