//! The proxy's configuration: listeners, services and their endpoints,
//! routes, and the identity files. Read from a YAML or JSON file; a config
//! that exists has been checked: every route names a known service, every
//! identity parses.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use skiff_api::net::Cidr;
use skiff_identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub admin: SocketAddr,
    pub identity: Option<IdentityFiles>,
    pub inbound: Vec<Inbound>,
    pub outbound: Vec<Outbound>,
    /// Services by name; routes refer to them by index.
    pub services: Vec<ServiceConfig>,
    /// Where a transparent outbound listener learns which destination
    /// addresses are meshed and what identity each must prove (re-read
    /// when it changes): `{"peers": {"<ip>": "spiffe://…"}}`.
    pub peers_file: Option<PathBuf>,
    /// The node's discovery stream (a unix socket the agent serves): the
    /// same table as a peers file, as updates.
    pub discovery: Option<PathBuf>,
    /// Cluster DNS for the instance (names from the peers file).
    pub dns: Option<DnsConfig>,
    pub timeouts: Timeouts,
    /// How long connections get to finish after SIGTERM.
    pub drain: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// Address (UDP and TCP) the redirected queries arrive at.
    pub listen: SocketAddr,
    /// Services are `<svc>.<ns>.svc.<domain>`.
    pub domain: String,
    /// The instance's namespace: a bare `<svc>` is a service there.
    pub namespace: Option<String>,
}

#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// Judge each connection from its first bytes.
    Detect,
    Http,
    /// Bytes only, no HTTP handling (server-speaks-first protocols).
    Tcp,
}

/// A port in front of the local application.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub listen: SocketAddr,
    /// Where the app listens; for a transparent listener, the app port is
    /// the connection's original destination port on 127.0.0.1.
    pub app: Option<SocketAddr>,
    /// Connections arrive redirected (iptables/nftables REDIRECT).
    pub transparent: bool,
    pub protocol: ListenerProtocol,
    /// Accept connections without TLS on a meshed proxy.
    pub allow_plaintext: bool,
    /// Peer identities allowed; `None`: any identity the CA issued.
    pub allowed_identities: Option<Vec<IdentityPattern>>,
    /// L7 authorization: when present, a request must match one rule.
    pub http_rules: Option<Vec<HttpRule>>,
}

/// An identity, or every service account in a namespace (`…/sa/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    Exact(SpiffeId),
    Namespace {
        trust_domain: String,
        namespace: String,
    },
}

impl IdentityPattern {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityPattern::Exact(e) => e == id,
            IdentityPattern::Namespace {
                trust_domain,
                namespace,
            } => &id.trust_domain == trust_domain && &id.namespace == namespace,
        }
    }
}

/// One allowing rule of L7 authorization (a `Policy` ingress rule): a
/// request passes when some rule admits its peer, port, method and path.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRule {
    /// The policy this rule came from, named in denials.
    pub policy: String,
    /// Empty: any method.
    pub methods: Vec<String>,
    /// Exact paths, or prefixes ending in `*`; empty: any path.
    pub paths: Vec<String>,
    /// Peers admitted by their verified identity.
    pub identities: Vec<IdentityPattern>,
    /// Peers admitted by their address (a policy's `cidr` peers); with
    /// `identities` empty too, any peer.
    pub sources: Vec<Source>,
    /// Destination port ranges (inclusive); empty: every port.
    pub ports: Vec<(u16, u16)>,
}

impl HttpRule {
    /// Whether the rule speaks for this peer on this port (its method and
    /// path restrictions aside).
    pub fn covers(&self, identity: Option<&SpiffeId>, addr: Option<IpAddr>, port: u16) -> bool {
        let any_peer = self.identities.is_empty() && self.sources.is_empty();
        let by_identity = identity.is_some_and(|id| self.identities.iter().any(|p| p.matches(id)));
        let by_address = addr.is_some_and(|a| self.sources.iter().any(|s| s.contains(a)));
        (any_peer || by_identity || by_address) && self.on_port(port)
    }

    pub fn on_port(&self, port: u16) -> bool {
        self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }

    /// Whether the rule's method and path restrictions admit a request.
    pub fn admits(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| path_matches(p, path)))
    }
}

/// A policy path: exact, or a prefix when it ends in `*`.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == pattern,
    }
}

/// Addresses in `cidr` but in none of `except`.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

impl Source {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

/// A port the local application's outgoing traffic arrives on.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub listen: SocketAddr,
    /// Connections arrive redirected: each goes where it was headed, with
    /// mTLS when the destination is a meshed peer.
    pub transparent: bool,
    /// Everything to one Service of the mesh, by name (`namespace/name`)
    /// and port, through its virtual address from the peers file: the
    /// ingress gateway.
    pub target: Option<(String, u16)>,
    pub protocol: ListenerProtocol,
    pub routes: Vec<Route>,
    /// Where requests no route matches go (and opaque connections).
    pub default_service: Option<usize>,
    /// TLS toward the listener's clients (certificate and key files): the
    /// ingress gateway's HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Gateway API HTTPRoute semantics: the first rule whose match fits wins;
/// its backends share requests in proportion to their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    /// `name`, for metrics.
    pub label: crate::metrics::Label,
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<(usize, u32)>,
    pub retry: RetryPolicy,
    pub timeout: Option<Duration>,
}

impl Route {
    /// Everything to one service: a listener's default.
    pub fn to_service(service: &str, index: usize) -> Route {
        let name = format!("default:{service}");
        Route {
            label: crate::metrics::Label::new(&name),
            name,
            matches: Vec::new(),
            backends: vec![(index, 1)],
            retry: RetryPolicy::default(),
            timeout: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteMatch {
    pub path_prefix: Option<String>,
    pub path_exact: Option<String>,
    pub method: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: never).
    pub attempts: u32,
    /// Retry POST, PATCH and other non-idempotent methods after a response
    /// or a reset. Off by default: such a request may already have acted.
    pub non_idempotent: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            non_idempotent: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    /// When set, the connection is mTLS and the peer must prove this identity.
    pub identity: Option<SpiffeId>,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
    /// How long a client may take to send its first bytes before the
    /// connection is treated as opaque.
    pub detect: Duration,
}

impl Config {
    /// Reads and checks a YAML or JSON file. Errors name the file and the
    /// field.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let invalid = |message: String| ConfigError::Invalid {
            file: file.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        Config::parse(&text).map_err(invalid)
    }

    /// Checks a configuration given as YAML or JSON text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let value: serde_json::Value = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            let docs = skiff_api::yaml::parse(text, skiff_api::yaml::Limits::default())
                .map_err(|e| e.to_string())?;
            match docs.as_slice() {
                [doc] => doc.to_json(),
                _ => return Err("expected exactly one YAML document".into()),
            }
        };
        let raw: RawConfig = serde_path_to_error::deserialize(value)
            .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
        raw.check()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_admin")]
    admin: SocketAddr,
    identity: Option<RawIdentity>,
    #[serde(default)]
    inbound: Vec<RawInbound>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    peers_file: Option<PathBuf>,
    discovery: Option<PathBuf>,
    dns: Option<DnsConfig>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default = "default_drain")]
    drain_seconds: f64,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4191))
}

fn default_drain() -> f64 {
    10.0
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIdentity {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawInbound {
    listen: SocketAddr,
    app: Option<SocketAddr>,
    #[serde(default)]
    transparent: bool,
    #[serde(default = "detect")]
    protocol: ListenerProtocol,
    #[serde(default)]
    allow_plaintext: bool,
    allowed_identities: Option<Vec<String>>,
    http: Option<Vec<RawHttpRule>>,
}

fn detect() -> ListenerProtocol {
    ListenerProtocol::Detect
}

/// An L7 rule as files give it (the proxy config's `inbound[].http`, and
/// the peers file's per-instance policy).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawHttpRule {
    policy: String,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    sources: Vec<RawSource>,
    /// `[first, last]` port ranges.
    #[serde(default)]
    ports: Vec<[u16; 2]>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSource {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

impl RawHttpRule {
    /// The checked rule; errors name the field under `at`.
    pub(crate) fn check(&self, at: &str) -> Result<HttpRule, String> {
        let cidr = |field: String, s: &str| {
            s.parse::<Cidr>()
                .map_err(|e| format!("{field}: {s:?} is not an address range: {e}"))
        };
        let sources = self
            .sources
            .iter()
            .enumerate()
            .map(|(k, s)| {
                Ok(Source {
                    cidr: cidr(format!("{at}.sources[{k}].cidr"), &s.cidr)?,
                    except: s
                        .except
                        .iter()
                        .enumerate()
                        .map(|(n, e)| cidr(format!("{at}.sources[{k}].except[{n}]"), e))
                        .collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<_, String>>()?;
        for (k, p) in self.paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(format!("{at}.paths[{k}]: {p:?} must start with '/'"));
            }
        }
        for (k, [lo, hi]) in self.ports.iter().enumerate() {
            if lo > hi {
                return Err(format!("{at}.ports[{k}]: {lo} is above {hi}"));
            }
        }
        Ok(HttpRule {
            policy: self.policy.clone(),
            methods: self
                .methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            paths: self.paths.clone(),
            identities: self
                .identities
                .iter()
                .enumerate()
                .map(|(k, s)| pattern(s).map_err(|e| format!("{at}.identities[{k}]: {e}")))
                .collect::<Result<_, String>>()?,
            sources,
            ports: self.ports.iter().map(|[lo, hi]| (*lo, *hi)).collect(),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOutbound {
    listen: SocketAddr,
    #[serde(default)]
    transparent: bool,
    /// `<service>.<namespace>:<port>`.
    target: Option<String>,
    #[serde(default = "detect")]
    protocol: ListenerProtocol,
    service: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    tls: Option<RawEdgeTls>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEdgeTls {
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl RawRoute {
    /// The checked route, its backends numbered by `index` (which names
    /// the field when a service is unknown); errors name fields under `at`.
    pub(crate) fn check(
        &self,
        at: &str,
        mut index: impl FnMut(&str, &str) -> Result<usize, String>,
    ) -> Result<Route, String> {
        if self.backends.is_empty() {
            return Err(format!("{at}.backends: a route needs at least one backend"));
        }
        let backends = self
            .backends
            .iter()
            .enumerate()
            .map(|(k, b)| {
                Ok((
                    index(&format!("{at}.backends[{k}].service"), &b.service)?,
                    b.weight,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if backends.iter().all(|(_, w)| *w == 0) {
            return Err(format!("{at}.backends: every weight is 0"));
        }
        let matches = self
            .matches
            .iter()
            .map(|m| RouteMatch {
                path_prefix: m.path_prefix.clone(),
                path_exact: m.path.clone(),
                method: m.method.as_ref().map(|s| s.to_ascii_uppercase()),
                headers: m
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect(),
            })
            .collect();
        let retry = self
            .retry
            .as_ref()
            .map(|r| RetryPolicy {
                attempts: r.attempts,
                non_idempotent: r.non_idempotent,
            })
            .unwrap_or_default();
        Ok(Route {
            name: self.name.clone(),
            label: crate::metrics::Label::new(&self.name),
            matches,
            backends,
            retry,
            timeout: self.timeout_ms.map(Duration::from_millis),
        })
    }
}

/// A route as files give it (the proxy config's `outbound[].routes`, and
/// the peers file's Routes per service).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawRoute {
    name: String,
    #[serde(default)]
    matches: Vec<RawMatch>,
    backends: Vec<RawBackendRef>,
    retry: Option<RawRetry>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMatch {
    path_prefix: Option<String>,
    path: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBackendRef {
    service: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRetry {
    #[serde(default = "two")]
    attempts: u32,
    #[serde(default)]
    non_idempotent: bool,
}

fn two() -> u32 {
    2
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEndpoint {
    addr: SocketAddr,
    identity: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default = "connect_ms")]
    connect_ms: u64,
    #[serde(default = "request_ms")]
    request_ms: u64,
    #[serde(default = "detect_ms")]
    detect_ms: u64,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            connect_ms: connect_ms(),
            request_ms: request_ms(),
            detect_ms: detect_ms(),
        }
    }
}

fn connect_ms() -> u64 {
    1_000
}
fn request_ms() -> u64 {
    15_000
}
fn detect_ms() -> u64 {
    1_000
}

impl RawConfig {
    fn check(self) -> Result<Config, String> {
        let names: Vec<String> = self.services.keys().cloned().collect();
        let index = |field: &str, name: &str| {
            names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| format!("{field}: no service {name:?} under services"))
        };
        let mut services = Vec::new();
        for (name, raw) in &self.services {
            let endpoints = raw
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let identity = e
                        .identity
                        .as_deref()
                        .map(|s| {
                            s.parse::<SpiffeId>().map_err(|err| {
                                format!("services.{name}.endpoints[{i}].identity: {err}")
                            })
                        })
                        .transpose()?;
                    Ok(EndpointConfig {
                        addr: e.addr,
                        identity,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            services.push(ServiceConfig {
                name: name.clone(),
                endpoints,
            });
        }
        let mut outbound = Vec::new();
        for (i, o) in self.outbound.iter().enumerate() {
            let default_service = o
                .service
                .as_deref()
                .map(|s| index(&format!("outbound[{i}].service"), s))
                .transpose()?;
            let mut routes = Vec::new();
            for (j, r) in o.routes.iter().enumerate() {
                let at = format!("outbound[{i}].routes[{j}]");
                routes.push(r.check(&at, |field, name| index(field, name))?);
            }
            let target = o
                .target
                .as_deref()
                .map(|t| {
                    let bad = || {
                        format!("outbound[{i}].target: {t:?} is not <service>.<namespace>:<port>")
                    };
                    let (name, port) = t.rsplit_once(':').ok_or_else(bad)?;
                    let (service, namespace) = name.split_once('.').ok_or_else(bad)?;
                    let port: u16 = port.parse().map_err(|_| bad())?;
                    Ok::<_, String>((format!("{namespace}/{service}"), port))
                })
                .transpose()?;
            if target.is_some()
                && (o.transparent || default_service.is_some() || !routes.is_empty())
            {
                return Err(format!(
                    "outbound[{i}]: a target listener takes no service, routes or transparent"
                ));
            }
            if default_service.is_none() && routes.is_empty() && !o.transparent && target.is_none()
            {
                return Err(format!("outbound[{i}]: needs a service or routes"));
            }
            if o.transparent && (default_service.is_some() || !routes.is_empty()) {
                return Err(format!(
                    "outbound[{i}]: a transparent listener sends each connection where it was headed; drop service and routes"
                ));
            }
            outbound.push(Outbound {
                listen: o.listen,
                transparent: o.transparent,
                target,
                protocol: o.protocol,
                routes,
                default_service,
                tls: o
                    .tls
                    .as_ref()
                    .map(|t| (t.cert_file.clone(), t.key_file.clone())),
            });
        }
        let mut inbound = Vec::new();
        for (i, raw) in self.inbound.into_iter().enumerate() {
            let patterns = |field: String, list: &[String]| {
                list.iter()
                    .enumerate()
                    .map(|(k, s)| pattern(s).map_err(|e| format!("{field}[{k}]: {e}")))
                    .collect::<Result<Vec<_>, String>>()
            };
            let allowed_identities = raw
                .allowed_identities
                .as_deref()
                .map(|l| patterns(format!("inbound[{i}].allowedIdentities"), l))
                .transpose()?;
            let http_rules = raw
                .http
                .as_deref()
                .map(|rules| {
                    rules
                        .iter()
                        .enumerate()
                        .map(|(k, r)| r.check(&format!("inbound[{i}].http[{k}]")))
                        .collect::<Result<Vec<_>, String>>()
                })
                .transpose()?;
            if raw.app.is_none() != raw.transparent {
                return Err(format!(
                    "inbound[{i}]: give either app (where the app listens) or transparent: true"
                ));
            }
            inbound.push(Inbound {
                listen: raw.listen,
                app: raw.app,
                transparent: raw.transparent,
                protocol: raw.protocol,
                allow_plaintext: raw.allow_plaintext,
                allowed_identities,
                http_rules,
            });
        }
        if !(0.0..=3600.0).contains(&self.drain_seconds) {
            return Err("drainSeconds: between 0 and 3600".into());
        }
        Ok(Config {
            admin: self.admin,
            identity: self.identity.map(|i| IdentityFiles {
                ca: i.ca_file,
                cert: i.cert_file,
                key: i.key_file,
            }),
            inbound,
            outbound,
            services,
            peers_file: self.peers_file,
            discovery: self.discovery,
            dns: self.dns,
            timeouts: Timeouts {
                connect: Duration::from_millis(self.timeouts.connect_ms),
                request: Duration::from_millis(self.timeouts.request_ms),
                detect: Duration::from_millis(self.timeouts.detect_ms),
            },
            drain: Duration::from_secs_f64(self.drain_seconds),
        })
    }
}

fn pattern(s: &str) -> Result<IdentityPattern, String> {
    if let Some(ns) = s.strip_suffix("/sa/*") {
        let id: SpiffeId = format!("{ns}/sa/any").parse().map_err(|e| format!("{e}"))?;
        return Ok(IdentityPattern::Namespace {
            trust_domain: id.trust_domain,
            namespace: id.namespace,
        });
    }
    s.parse()
        .map(IdentityPattern::Exact)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_is_read_from_yaml() {
        let config = Config::parse(
            "admin: 127.0.0.1:5000
outbound:
  - listen: 127.0.0.1:9000
    service: web
    routes:
      - name: canary
        matches: [{pathPrefix: /v2, headers: {X-Canary: '1'}}]
        backends: [{service: web-v2, weight: 10}, {service: web, weight: 90}]
        retry: {attempts: 1, nonIdempotent: true}
services:
  web:
    endpoints: [{addr: 127.0.0.1:8080, identity: spiffe://td/ns/shop/sa/web}]
  web-v2:
    endpoints: []
inbound:
  - listen: 0.0.0.0:4143
    app: 127.0.0.1:8080
    allowedIdentities: [spiffe://td/ns/shop/sa/*]
",
        )
        .unwrap();
        let route = &config.outbound[0].routes[0];
        assert_eq!(route.backends, vec![(1, 10), (0, 90)]);
        assert_eq!(
            route.matches[0].headers,
            vec![("x-canary".into(), "1".into())]
        );
        assert!(route.retry.non_idempotent);
        let any_in_shop = &config.inbound[0].allowed_identities.as_ref().unwrap()[0];
        assert!(any_in_shop.matches(&"spiffe://td/ns/shop/sa/x".parse().unwrap()));
        assert!(!any_in_shop.matches(&"spiffe://td/ns/other/sa/x".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "outbound: [{listen: 127.0.0.1:1, service: nope}]",
                "outbound[0].service: no service \"nope\"",
            ),
            (
                "outbound: [{listen: 127.0.0.1:1, srvice: a}]",
                "outbound[0].srvice: unknown field `srvice`",
            ),
            ("timeouts: {connectMs: soon}", "timeouts.connectMs"),
            (
                "services: {a: {endpoints: [{addr: 127.0.0.1:1, identity: web}]}}",
                "services.a.endpoints[0].identity",
            ),
            (
                "inbound: [{listen: 127.0.0.1:1, app: nowhere}]",
                "inbound[0].app",
            ),
        ];
        for (text, expected) in cases {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
