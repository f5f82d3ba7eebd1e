//! Transparent listeners: the instance's netfilter rules redirect its
//! connections to the proxy (outbound: everything the app opens; inbound:
//! everything arriving for its ports), and each connection goes where it
//! was headed, read back with `SO_ORIGINAL_DST`. Outbound, a destination
//! the peers table names is a meshed instance and gets mTLS to the identity
//! listed; any other gets plain TCP, as it would without the proxy.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use skiff_identity::SpiffeId;
use tokio::net::TcpStream;

use crate::config::{
    EndpointConfig, HttpRule, RawHttpRule, RawRoute, Route, ServiceConfig, Source, Timeouts,
};
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
    /// Routes (the `Route` kind) by the service (`namespace/name`) whose
    /// virtual address they govern.
    pub routes: HashMap<String, ServiceRoutes>,
    /// Network policy the inbound side enforces, by local instance address.
    pub inbound: HashMap<IpAddr, InboundPolicy>,
    /// The control plane's revision of each kind this table reflects.
    pub revisions: BTreeMap<String, u64>,
}

/// One service's routes; their backends number into `backends`, whose
/// first entry is the service itself (for opaque connections).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRoutes {
    pub backends: Vec<String>,
    pub routes: Vec<Route>,
}

/// What policy asks of one local instance's inbound side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundPolicy {
    /// L7 authorization, when some policy selecting the instance has
    /// `http` rules: then every request must be admitted by a rule.
    pub http: Option<Vec<HttpRule>>,
    /// What L7 authorization would be were the audit-mode policies
    /// selecting the instance enforced (present when one has `http`
    /// rules): requests it would refuse pass and are reported as
    /// audit denials.
    pub audit: Option<Vec<HttpRule>>,
    /// Sources policy lets in (a `cidr` peer): they may connect without
    /// mTLS, on the rules' ports.
    pub plaintext: Vec<HttpRule>,
    /// The instance's ports declared `tcp`: no protocol detection.
    pub opaque_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualService {
    /// `namespace/name`.
    pub name: String,
    /// Ready instances' addresses.
    pub endpoints: Vec<IpAddr>,
    /// Ports declared `tcp`: bytes only, no protocol detection (no delay
    /// for protocols where the server speaks first).
    pub opaque_ports: Vec<u16>,
}

impl Peers {
    /// Whether `dst` (a virtual address, or a meshed instance's address)
    /// is a port its Service declares `tcp`.
    pub fn is_opaque(&self, dst: SocketAddr) -> bool {
        let service = self.services.get(&dst.ip()).or_else(|| {
            let id = self.table.get(&dst.ip())?;
            let vip = self
                .by_name
                .get(&format!("{}/{}", id.namespace, id.service_account))?;
            self.services.get(vip)
        });
        service.is_some_and(|s| s.opaque_ports.contains(&dst.port()))
    }
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
        serde_json::json!({
            "version": self.version,
            "revisions": self.revisions,
            "peers": table,
            "services": services,
            "routes": self.routes.len(),
            "inbound": self.inbound.len(),
        })
    }
}

/// The sections of the peers table, as files and the discovery stream
/// name them.
pub const SECTIONS: [&str; 4] = ["peers", "services", "routes", "inbound"];

impl Peers {
    /// Applies one update from the discovery stream: `{"version": N,
    /// "revisions": {…}, "snapshot": bool, "set": {section: {key: entry}},
    /// "remove": {section: [key, …]}}`. A snapshot replaces everything.
    /// Every entry is checked before anything changes (errors name the
    /// entry, under `at`, and leave the table as it was); the work is the
    /// size of the update, not of the table.
    pub fn apply(&mut self, update: &serde_json::Value, at: &str) -> Result<(), String> {
        let empty = serde_json::Map::new();
        let set = update
            .get("set")
            .and_then(|v| v.as_object())
            .unwrap_or(&empty);
        let remove = update
            .get("remove")
            .and_then(|v| v.as_object())
            .unwrap_or(&empty);
        let mut entries = Vec::new();
        for section in SECTIONS {
            for (key, entry) in set
                .get(section)
                .and_then(|v| v.as_object())
                .into_iter()
                .flatten()
            {
                entries.push(Entry::parse(
                    section,
                    key,
                    entry,
                    &format!("{at}{section}.{key}"),
                )?);
            }
        }
        if update.get("snapshot").and_then(|v| v.as_bool()) == Some(true) {
            *self = Peers::default();
        }
        for section in SECTIONS {
            for key in remove
                .get(section)
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str())
            {
                self.remove(section, key);
            }
        }
        for entry in entries {
            self.insert(entry);
        }
        self.version = update.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if let Some(r) = update.get("revisions") {
            self.revisions = serde_json::from_value(r.clone()).unwrap_or_default();
        }
        Ok(())
    }

    fn remove(&mut self, section: &str, key: &str) {
        let ip = key.parse::<IpAddr>().ok();
        match (section, ip) {
            ("routes", _) => {
                self.routes.remove(key);
            }
            ("peers", Some(ip)) => {
                self.table.remove(&ip);
            }
            ("services", Some(ip)) => {
                if let Some(vs) = self.services.remove(&ip) {
                    self.by_name.remove(&vs.name);
                }
            }
            ("inbound", Some(ip)) => {
                self.inbound.remove(&ip);
            }
            _ => {}
        }
    }

    fn insert(&mut self, entry: Entry) {
        match entry {
            Entry::Peer(ip, id) => {
                self.table.insert(ip, id);
            }
            Entry::Service(vip, vs) => {
                if let Some(old) = self.services.get(&vip)
                    && old.name != vs.name
                {
                    self.by_name.remove(&old.name);
                }
                self.by_name.insert(vs.name.clone(), vip);
                self.services.insert(vip, vs);
            }
            Entry::Routes(service, routes) => {
                self.routes.insert(service, routes);
            }
            Entry::Inbound(ip, policy) => {
                self.inbound.insert(ip, policy);
            }
        }
    }
}

/// One checked entry of the table.
enum Entry {
    Peer(IpAddr, SpiffeId),
    Service(IpAddr, VirtualService),
    Routes(String, ServiceRoutes),
    Inbound(IpAddr, InboundPolicy),
}

impl Entry {
    /// Checks one entry of `section`; `at` names it in errors.
    fn parse(
        section: &str,
        key: &str,
        entry: &serde_json::Value,
        at: &str,
    ) -> Result<Entry, String> {
        let addr = || key.parse::<IpAddr>().map_err(|e| format!("{at}: {e}"));
        let ports = |entry: &serde_json::Value| -> Result<Vec<u16>, String> {
            entry
                .get("opaquePorts")
                .map(|p| serde_json::from_value(p.clone()))
                .transpose()
                .map(Option::unwrap_or_default)
                .map_err(|e| format!("{at}.opaquePorts: {e}"))
        };
        Ok(match section {
            "peers" => {
                let id = entry
                    .as_str()
                    .ok_or_else(|| format!("{at}: expected a spiffe:// string"))?
                    .parse::<SpiffeId>()
                    .map_err(|e| format!("{at}: {e}"))?;
                Entry::Peer(addr()?, id)
            }
            "services" => {
                let name = entry
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or_default()
                    .to_string();
                let endpoints = entry
                    .get("endpoints")
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        e.as_str()
                            .and_then(|e| e.parse::<IpAddr>().ok())
                            .ok_or_else(|| format!("{at}.endpoints: {e} is not an address"))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Entry::Service(
                    addr()?,
                    VirtualService {
                        name,
                        endpoints,
                        opaque_ports: ports(entry)?,
                    },
                )
            }
            "routes" => {
                let raw: Vec<RawRoute> =
                    serde_json::from_value(entry.clone()).map_err(|e| format!("{at}: {e}"))?;
                let mut backends = vec![key.to_string()];
                let mut routes = Vec::new();
                for (i, r) in raw.iter().enumerate() {
                    routes.push(r.check(&format!("{at}[{i}]"), |_, name| {
                        Ok(match backends.iter().position(|b| b == name) {
                            Some(k) => k,
                            None => {
                                backends.push(name.to_string());
                                backends.len() - 1
                            }
                        })
                    })?);
                }
                Entry::Routes(key.to_string(), ServiceRoutes { backends, routes })
            }
            "inbound" => {
                let rules = |field: &str| -> Result<Option<Vec<HttpRule>>, String> {
                    let Some(list) = entry.get(field).filter(|v| !v.is_null()) else {
                        return Ok(None);
                    };
                    let raw: Vec<RawHttpRule> = serde_json::from_value(list.clone())
                        .map_err(|e| format!("{at}.{field}: {e}"))?;
                    raw.iter()
                        .enumerate()
                        .map(|(k, r)| r.check(&format!("{at}.{field}[{k}]")))
                        .collect::<Result<Vec<_>, String>>()
                        .map(Some)
                };
                let policy = InboundPolicy {
                    http: rules("http")?,
                    audit: rules("audit")?,
                    plaintext: rules("plaintext")?.unwrap_or_default(),
                    opaque_ports: ports(entry)?,
                };
                Entry::Inbound(addr()?, policy)
            }
            other => return Err(format!("{at}: unknown section {other:?}")),
        })
    }
}

/// Reads a peers file: the table's sections at the top level,
/// `{"version": N, "peers": {"<ip>": "spiffe://…"}, "services": {"<virtual
/// ip>": {"name": "ns/svc", "endpoints": ["<ip>"]}}, "routes": {…},
/// "inbound": {…}}`. Errors name the file and the entry.
pub fn load_peers(path: &Path) -> Result<Peers, String> {
    let at = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{at}: {e}"))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{at}: {e}"))?;
    if doc.get("peers").and_then(|p| p.as_object()).is_none() {
        return Err(format!(
            "{at}: expected {{\"peers\": {{\"<ip>\": \"spiffe://…\"}}}}"
        ));
    }
    let set: serde_json::Map<String, serde_json::Value> = SECTIONS
        .iter()
        .filter_map(|s| Some((s.to_string(), doc.get(*s)?.clone())))
        .collect();
    let update = serde_json::json!({
        "version": doc.get("version").cloned().unwrap_or_default(),
        "revisions": doc.get("revisions").cloned().unwrap_or_default(),
        "snapshot": true,
        "set": set,
    });
    let mut peers = Peers::default();
    peers.apply(&update, &format!("{at}: "))?;
    Ok(peers)
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
    /// L7 rules from the proxy's own config, for destinations the peers
    /// table has no policy for.
    pub http_rules: Option<Vec<HttpRule>>,
    pub metrics: Arc<Metrics>,
    /// The listener's own address: a connection made straight to it (not
    /// redirected) would loop.
    pub own: SocketAddr,
    /// An ingress listener: callers come from outside the mesh, and the
    /// app is told who they are.
    pub gateway: bool,
    cache: Mutex<HashMap<SocketAddr, Cached>>,
}

/// A destination's forwarder, the plan it was made from, and the peers
/// version the plan was checked against.
#[derive(Debug)]
struct Cached {
    version: u64,
    plan: Plan,
    forwarder: Arc<Forwarder>,
}

/// What a destination's forwarder is made from. While the plan stays the
/// same (across peers versions), so does the forwarder, with its pools
/// and balancer statistics.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    passthrough: bool,
    services: Vec<ServiceConfig>,
    routes: Vec<Route>,
    default_route: Option<Route>,
    http_rules: Option<Vec<HttpRule>>,
    audit_rules: Option<Vec<HttpRule>>,
    plaintext: Vec<Source>,
    /// Bytes only: the port is declared `tcp`.
    opaque: bool,
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
            gateway: false,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The forwarder for connections headed to `dst`, made on first use and
    /// kept while what it is made from stays the same.
    pub fn forwarder(&self, dst: SocketAddr) -> Result<Arc<Forwarder>, String> {
        if dst.port() == self.own.port()
            && (dst.ip() == self.own.ip() || self.own.ip().is_unspecified())
        {
            return Err(format!(
                "{dst} is this listener: connections must arrive redirected"
            ));
        }
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&dst)
            && c.version == peers.version
        {
            return Ok(c.forwarder.clone());
        }
        let plan = if self.direction == "inbound" {
            self.inbound_plan(&peers, dst)
        } else {
            outbound_plan(&peers, dst)
        };
        if let Some(c) = cache.get_mut(&dst)
            && c.plan == plan
        {
            c.version = peers.version;
            return Ok(c.forwarder.clone());
        }
        let services = plan
            .services
            .iter()
            .map(|s| Service::new(s, self.identity.as_ref(), self.timeouts.connect).map(Arc::new))
            .collect::<Result<Vec<_>, String>>()?;
        let forwarder = Arc::new(Forwarder {
            direction: self.direction,
            passthrough: plan.passthrough,
            services,
            routes: plan.routes.clone(),
            default_route: plan.default_route.clone(),
            tcp_service: Some(0),
            request_timeout: self.timeouts.request,
            http_rules: plan.http_rules.clone(),
            audit_rules: plan.audit_rules.clone(),
            port: dst.port(),
            plaintext: plan.plaintext.clone(),
            opaque: plan.opaque,
            retries: self.direction == "outbound",
            forwarded_for: self.direction == "inbound" || self.gateway,
            metrics: self.metrics.clone(),
        });
        // Bounded: a proxy whose app calls many outside addresses must not
        // grow without end. Dropping the cache drops only idle pools.
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            dst,
            Cached {
                version: peers.version,
                plan,
                forwarder: forwarder.clone(),
            },
        );
        Ok(forwarder)
    }

    /// To the app on 127.0.0.1 at the original port, under the policy
    /// the peers table gives for the instance's address (else the
    /// config's rules).
    fn inbound_plan(&self, peers: &Peers, dst: SocketAddr) -> Plan {
        let app = SocketAddr::from(([127, 0, 0, 1], dst.port()));
        let policy = peers.inbound.get(&dst.ip());
        let on_port = |rules: &[HttpRule]| -> Vec<HttpRule> {
            rules
                .iter()
                .filter(|r| r.on_port(dst.port()))
                .cloned()
                .collect()
        };
        let http_rules = match policy {
            Some(p) => p.http.as_deref().map(on_port),
            None => self.http_rules.clone(),
        };
        let audit_rules = policy.and_then(|p| p.audit.as_deref().map(on_port));
        let plaintext = policy
            .map(|p| {
                on_port(&p.plaintext)
                    .into_iter()
                    .flat_map(|r| r.sources)
                    .collect()
            })
            .unwrap_or_default();
        Plan {
            passthrough: false,
            services: vec![ServiceConfig {
                name: app.to_string(),
                endpoints: vec![EndpointConfig {
                    addr: app,
                    identity: None,
                }],
            }],
            routes: Vec::new(),
            default_route: Some(Route::to_service(&app.to_string(), 0)),
            http_rules,
            audit_rules,
            plaintext,
            opaque: policy.is_some_and(|p| p.opaque_ports.contains(&dst.port())),
        }
    }
}

/// A virtual address: balanced over the service's ready instances, under
/// its Routes when it has some. A meshed instance's address: mTLS to it.
/// Anything else: passed through.
fn outbound_plan(peers: &Peers, dst: SocketAddr) -> Plan {
    let endpoints = |name: &str| -> Vec<EndpointConfig> {
        let Some(vs) = peers
            .by_name
            .get(name)
            .and_then(|vip| peers.services.get(vip))
        else {
            return Vec::new();
        };
        vs.endpoints
            .iter()
            .map(|ip| EndpointConfig {
                addr: SocketAddr::new(*ip, dst.port()),
                identity: peers.table.get(ip).cloned(),
            })
            .collect()
    };
    let opaque = peers.is_opaque(dst);
    let plan = |passthrough, services, routes, default_route| Plan {
        passthrough,
        services,
        routes,
        default_route,
        http_rules: None,
        audit_rules: None,
        plaintext: Vec::new(),
        opaque,
    };
    if let Some(vs) = peers.services.get(&dst.ip()) {
        if let Some(r) = peers.routes.get(&vs.name) {
            let services = r
                .backends
                .iter()
                .map(|name| ServiceConfig {
                    name: name.clone(),
                    endpoints: endpoints(name),
                })
                .collect();
            // Gateway API: a request no rule matches gets 404.
            return plan(false, services, r.routes.clone(), None);
        }
        let service = ServiceConfig {
            name: vs.name.clone(),
            endpoints: endpoints(&vs.name),
        };
        let default = Route::to_service(&vs.name, 0);
        return plan(false, vec![service], Vec::new(), Some(default));
    }
    let identity = peers.table.get(&dst.ip()).cloned();
    let name = identity.as_ref().map_or_else(
        || dst.to_string(),
        |id| format!("{}/{}", id.namespace, id.service_account),
    );
    let passthrough = identity.is_none();
    let service = ServiceConfig {
        name: name.clone(),
        endpoints: vec![EndpointConfig {
            addr: dst,
            identity,
        }],
    };
    plan(
        passthrough,
        vec![service],
        Vec::new(),
        Some(Route::to_service(&name, 0)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(text: serde_json::Value) -> Peers {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        std::fs::write(&path, text.to_string()).unwrap();
        load_peers(&path).unwrap()
    }

    fn shop(version: u64, canary_weight: u32) -> Peers {
        peers(serde_json::json!({
            "version": version,
            // No identities: this proxy has none to speak mTLS with.
            "peers": {},
            "services": {
                "198.18.128.2": {"name": "shop/web", "endpoints": ["198.19.17.2"]},
                "198.18.128.3": {"name": "shop/web-v2", "endpoints": ["198.19.17.4"]},
            },
            "routes": {"shop/web": [{"name": "shop/web-canary", "backends": [
                {"service": "shop/web", "weight": 100 - canary_weight},
                {"service": "shop/web-v2", "weight": canary_weight}]}]},
            "inbound": {"198.19.16.2": {
                "http": [{"policy": "Policy shop/db", "methods": ["GET"], "ports": [[8080, 8080]],
                          "identities": ["spiffe://td/ns/shop/sa/web"]}],
                "plaintext": [{"policy": "Policy shop/db", "sources": [{"cidr": "10.0.0.0/8"}], "ports": [[9090, 9090]]}],
            }},
        }))
    }

    fn transparent(direction: &'static str, peers: Peers) -> Transparent {
        Transparent::new(
            direction,
            "127.0.0.1:15001".parse().unwrap(),
            Arc::new(RwLock::new(peers)),
            None,
            Timeouts {
                connect: std::time::Duration::from_secs(1),
                request: std::time::Duration::from_secs(1),
                detect: std::time::Duration::from_secs(1),
            },
            None,
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn a_virtual_address_with_routes_is_split_across_its_backends() {
        let t = transparent("outbound", shop(1, 10));
        let f = t.forwarder("198.18.128.2:80".parse().unwrap()).unwrap();
        let names: Vec<&str> = f.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["shop/web", "shop/web-v2"]);
        assert_eq!(
            f.services[1].endpoints[0].addr,
            "198.19.17.4:80".parse().unwrap()
        );
        assert_eq!(f.routes[0].backends, vec![(0, 90), (1, 10)]);
        // Unmatched requests: 404, as Gateway API asks.
        assert!(f.default_route.is_none());
        // Opaque connections follow the rule without matches by weight.
        let mut v2 = 0;
        for _ in 0..1000 {
            if f.opaque_service().unwrap().name == "shop/web-v2" {
                v2 += 1;
            }
        }
        assert!((40..=200).contains(&v2), "{v2} of 1000 to a 10 % backend");
        let all_v2 = transparent("outbound", shop(1, 100));
        let f = all_v2
            .forwarder("198.18.128.2:80".parse().unwrap())
            .unwrap();
        assert!((0..100).all(|_| f.opaque_service().unwrap().name == "shop/web-v2"));
        // Without routes, everything goes to the service itself.
        let plain = t.forwarder("198.18.128.3:80".parse().unwrap()).unwrap();
        assert!(plain.routes.is_empty() && plain.default_route.is_some());
    }

    #[test]
    fn a_forwarder_is_kept_while_its_plan_is_unchanged_and_remade_when_it_changes() {
        let t = transparent("outbound", shop(1, 10));
        let dst = "198.18.128.2:80".parse().unwrap();
        let first = t.forwarder(dst).unwrap();
        // A new version that changes nothing for this destination.
        *t.peers.write().unwrap() = shop(2, 10);
        assert!(Arc::ptr_eq(&first, &t.forwarder(dst).unwrap()));
        // The canary's weight moves: a new forwarder.
        *t.peers.write().unwrap() = shop(3, 50);
        let moved = t.forwarder(dst).unwrap();
        assert!(!Arc::ptr_eq(&first, &moved));
        assert_eq!(moved.routes[0].backends, vec![(0, 50), (1, 50)]);
    }

    #[test]
    fn ports_declared_tcp_skip_protocol_detection() {
        let t = transparent(
            "outbound",
            peers(serde_json::json!({
                "version": 1,
                "peers": {"198.19.16.2": "spiffe://td/ns/shop/sa/db"},
                "services": {"198.18.128.1": {"name": "shop/db", "endpoints": [], "opaquePorts": [5432]}},
            })),
        );
        let opaque = |dst: &str| t.forwarder(dst.parse().unwrap()).unwrap().opaque;
        // Through the virtual address, or straight to an instance of db.
        assert!(opaque("198.18.128.1:5432") && !opaque("198.18.128.1:8080"));
        let inbound = transparent(
            "inbound",
            peers(serde_json::json!({"version": 1, "peers": {},
                "inbound": {"198.19.16.2": {"http": null, "plaintext": [], "opaquePorts": [5432]}}})),
        );
        let f = inbound
            .forwarder("198.19.16.2:5432".parse().unwrap())
            .unwrap();
        assert!(f.opaque && f.http_rules.is_none());
        assert!(
            !inbound
                .forwarder("198.19.16.2:8080".parse().unwrap())
                .unwrap()
                .opaque
        );
    }

    #[test]
    fn inbound_policy_applies_per_port() {
        let t = transparent("inbound", shop(1, 10));
        let http = t.forwarder("198.19.16.2:8080".parse().unwrap()).unwrap();
        assert_eq!(http.http_rules.as_ref().map(Vec::len), Some(1));
        assert!(http.plaintext.is_empty());
        let other = t.forwarder("198.19.16.2:9090".parse().unwrap()).unwrap();
        // Under L7 policy, but no rule for this port: nothing is admitted.
        assert_eq!(other.http_rules.as_ref().map(Vec::len), Some(0));
        assert!(other.plaintext[0].contains("10.2.3.4".parse().unwrap()));
        // An address the table has no policy for: the config's (none).
        let elsewhere = t.forwarder("198.19.16.9:8080".parse().unwrap()).unwrap();
        assert!(elsewhere.http_rules.is_none());
    }

    #[test]
    fn audit_rules_let_requests_pass_and_record_what_they_would_refuse() {
        let t = transparent(
            "inbound",
            peers(serde_json::json!({"version": 1, "peers": {},
                "inbound": {"198.19.16.2": {"http": null, "plaintext": [],
                    "audit": [{"policy": "Policy shop/watch", "methods": ["GET"], "ports": [[8080, 8080]]}]}}})),
        );
        let f = t.forwarder("198.19.16.2:8080".parse().unwrap()).unwrap();
        assert!(f.http_rules.is_none());
        let peer = crate::http::Peer::new(None, true, Some("198.19.17.2".parse().unwrap()));
        let plan = |method: &str| {
            let req = hyper::Request::builder()
                .method(method)
                .uri("/items")
                .body(())
                .unwrap();
            f.plan(&req, &peer)
        };
        assert!(matches!(plan("GET"), crate::http::Plan::Forward { .. }));
        assert!(matches!(plan("POST"), crate::http::Plan::Forward { .. }));
        let recorded = f.metrics.denials.after(0);
        let denials = recorded["denials"].as_array().unwrap();
        assert_eq!(denials.len(), 1, "{recorded}");
        assert_eq!(denials[0]["method"], "POST");
        assert_eq!(denials[0]["verdict"], "audit-denied");
        assert_eq!(denials[0]["policy"], "Policy shop/watch");
    }

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
