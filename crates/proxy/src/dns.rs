//! Cluster DNS in the sidecar (hickory-server, UDP and TCP): the
//! instance's DNS queries (port 53, to whatever nameserver the host's
//! resolv.conf names) are redirected here. Names of Services,
//! `<svc>.<ns>.svc.<domain>` (also `<svc>.<ns>.svc` and `<svc>.<ns>`), and
//! a bare `<svc>` of the instance's own namespace (the search domain
//! Kubernetes puts in a pod's resolv.conf, which instances sharing the
//! host's file cannot have), are answered from the node's discovery table
//! with the service's virtual address. Anything else is resolved by
//! hickory-resolver with the host's resolv.conf (its nameservers that the
//! instance can reach: not loopback ones).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Header, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};

use crate::transparent::Peers;

/// Seconds a cluster answer may be cached: short, since instances come and go.
const TTL: u32 = 5;
/// How long a TCP client may take with its query.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a query gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answered here: a cluster name (with its address for an A query).
    Answer {
        code: ResponseCode,
        address: Option<Ipv4Addr>,
    },
    /// Not a cluster name: resolve it upstream.
    Relay,
}

/// Decides one query. Pure: the names come from `peers`; `namespace` is
/// the instance's, for bare service names.
pub fn decide(
    name: &str,
    kind: RecordType,
    peers: &Peers,
    domain: &str,
    namespace: Option<&str>,
) -> Decision {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let (service, ns) = match (cluster_name(&name, domain), namespace) {
        (Some(pair), _) => pair,
        (None, Some(ns)) if !name.is_empty() && !name.contains('.') => (name.as_str(), ns),
        (None, _) => return Decision::Relay,
    };
    let found = peers.by_name.get(&format!("{ns}/{service}")).copied();
    let code = match found {
        // The name exists; other record types get an empty answer.
        Some(_) => ResponseCode::NoError,
        None if name.ends_with(&format!(".svc.{domain}")) || name.ends_with(".svc") => {
            ResponseCode::NXDomain
        }
        // `<a>.<b>` or `<a>` that names no service may be an outside name.
        None => return Decision::Relay,
    };
    let address = match (found, kind) {
        (Some(IpAddr::V4(ip)), RecordType::A) => Some(ip),
        _ => None,
    };
    Decision::Answer { code, address }
}

/// `(service, namespace)` when `name` has one of the cluster forms.
fn cluster_name<'a>(name: &'a str, domain: &str) -> Option<(&'a str, &'a str)> {
    let short = name
        .strip_suffix(&format!(".svc.{domain}"))
        .or_else(|| name.strip_suffix(".svc"))
        .unwrap_or(name);
    match short.split('.').collect::<Vec<_>>().as_slice() {
        [service, namespace] if !service.is_empty() && !namespace.is_empty() => {
            Some((service, namespace))
        }
        _ => None,
    }
}

/// The host's resolver configuration without the nameservers an instance
/// cannot reach (loopback ones, such as a local stub resolver); `None`
/// when none is left.
pub fn upstream_config(
    resolv_conf: &[u8],
) -> Option<(ResolverConfig, hickory_resolver::config::ResolverOpts)> {
    let (config, opts) = hickory_resolver::system_conf::parse_resolv_conf(resolv_conf).ok()?;
    let servers: Vec<IpAddr> = config
        .name_servers()
        .iter()
        .map(|s| s.socket_addr.ip())
        .filter(|ip| !ip.is_loopback())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if servers.is_empty() {
        return None;
    }
    let group = NameServerConfigGroup::from_ips_clear(&servers, 53, true);
    Some((
        ResolverConfig::from_parts(config.domain().cloned(), config.search().to_vec(), group),
        opts,
    ))
}

/// Answers redirected queries.
struct Handler {
    peers: Arc<RwLock<Peers>>,
    domain: String,
    namespace: Option<String>,
    upstream: Option<TokioResolver>,
}

impl Handler {
    /// The response code and records for one query.
    async fn resolve(&self, name: &Name, kind: RecordType) -> (ResponseCode, bool, Vec<Record>) {
        let decision = {
            let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
            decide(
                &name.to_ascii(),
                kind,
                &peers,
                &self.domain,
                self.namespace.as_deref(),
            )
        };
        match decision {
            Decision::Answer { code, address } => {
                let records = address
                    .map(|ip| Record::from_rdata(name.clone(), TTL, RData::A(A(ip))))
                    .into_iter()
                    .collect();
                (code, true, records)
            }
            Decision::Relay => {
                let Some(upstream) = &self.upstream else {
                    return (ResponseCode::ServFail, false, Vec::new());
                };
                match upstream.lookup(name.clone(), kind).await {
                    Ok(found) => (ResponseCode::NoError, false, found.records().to_vec()),
                    Err(e) if e.is_nx_domain() => (ResponseCode::NXDomain, false, Vec::new()),
                    Err(e) if e.is_no_records_found() => (ResponseCode::NoError, false, Vec::new()),
                    Err(e) => {
                        tracing::debug!(name = %name, error = %e, "Upstream DNS failed");
                        (ResponseCode::ServFail, false, Vec::new())
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        header.set_recursion_available(true);
        let Ok(info) = request.request_info() else {
            header.set_response_code(ResponseCode::FormErr);
            let reply = builder.error_msg(request.header(), ResponseCode::FormErr);
            return response.send_response(reply).await.unwrap_or(header.into());
        };
        let name = Name::from(info.query.name());
        let (code, authoritative, records) = self.resolve(&name, info.query.query_type()).await;
        header.set_response_code(code);
        header.set_authoritative(authoritative);
        let reply = builder.build(header, records.iter(), [], [], []);
        response.send_response(reply).await.unwrap_or(header.into())
    }
}

/// Serves redirected queries on `listen` (UDP and TCP) until the task
/// ends. `namespace` is the instance's, for bare service names.
pub async fn serve(
    listen: SocketAddr,
    peers: Arc<RwLock<Peers>>,
    domain: String,
    namespace: Option<String>,
) -> anyhow::Result<()> {
    let udp = tokio::net::UdpSocket::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("dns {listen}: cannot listen (UDP): {e}"))?;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("dns {listen}: cannot listen (TCP): {e}"))?;
    let upstream = std::fs::read("/etc/resolv.conf")
        .ok()
        .and_then(|conf| upstream_config(&conf))
        .map(|(config, opts)| {
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build()
        });
    if upstream.is_none() {
        tracing::warn!(
            "No nameserver in /etc/resolv.conf that an instance can reach: only cluster names will resolve"
        );
    }
    let mut server = ServerFuture::new(Handler {
        peers,
        domain,
        namespace,
        upstream,
    });
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT);
    tokio::spawn(async move {
        if let Err(e) = server.block_until_done().await {
            tracing::warn!(error = %e, "DNS server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Peers {
        let mut p = Peers::default();
        p.by_name
            .insert("shop/web".into(), "198.18.128.1".parse().unwrap());
        p
    }

    fn decide_a(name: &str, namespace: Option<&str>) -> Decision {
        decide(name, RecordType::A, &peers(), "skiff.local", namespace)
    }

    #[test]
    fn service_names_resolve_to_their_virtual_address() {
        let web = Decision::Answer {
            code: ResponseCode::NoError,
            address: Some(Ipv4Addr::new(198, 18, 128, 1)),
        };
        for name in ["web.shop.svc.skiff.local.", "web.shop.svc.", "WEB.shop."] {
            assert_eq!(decide_a(name, None), web, "{name}");
        }
        // A bare name is a service of the instance's own namespace.
        assert_eq!(decide_a("web.", Some("shop")), web);
        assert_eq!(decide_a("web.", Some("other")), Decision::Relay);
        assert_eq!(decide_a("web.", None), Decision::Relay);
    }

    #[test]
    fn unknown_cluster_names_do_not_exist_and_others_are_relayed() {
        assert_eq!(
            decide_a("db.shop.svc.skiff.local.", None),
            Decision::Answer {
                code: ResponseCode::NXDomain,
                address: None
            }
        );
        assert_eq!(
            decide(
                "web.shop.svc.skiff.local.",
                RecordType::AAAA,
                &peers(),
                "skiff.local",
                None
            ),
            Decision::Answer {
                code: ResponseCode::NoError,
                address: None
            }
        );
        assert_eq!(decide_a("example.com.", None), Decision::Relay);
        assert_eq!(decide_a("debian.org.", Some("shop")), Decision::Relay);
    }

    #[test]
    fn the_upstream_is_the_hosts_reachable_nameservers() {
        let conf = b"nameserver 127.0.0.53\nnameserver 198.18.0.53\nnameserver 198.18.0.53\nsearch corp.example\noptions ndots:2\n";
        let (config, opts) = upstream_config(conf).unwrap();
        let servers: Vec<SocketAddr> = config
            .name_servers()
            .iter()
            .map(|s| s.socket_addr)
            .collect();
        // UDP and TCP to the one reachable server.
        assert_eq!(servers, vec!["198.18.0.53:53".parse().unwrap(); 2]);
        assert_eq!(config.search()[0].to_ascii(), "corp.example");
        assert_eq!(opts.ndots, 2);
        assert!(upstream_config(b"nameserver 127.0.0.53\n").is_none());
    }

    /// A stand-in upstream nameserver on loopback: `example.com` has
    /// 192.0.2.7, every other name does not exist.
    async fn fake_upstream() -> SocketAddr {
        use hickory_proto::op::{Message, MessageType};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::new();
                r.set_id(q.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_available(true);
                r.add_queries(q.queries().to_vec());
                let name = q.queries()[0].name().clone();
                if name.to_ascii() == "example.com." {
                    r.add_answer(Record::from_rdata(name, 60, RData::A(A::new(192, 0, 2, 7))));
                } else {
                    r.set_response_code(ResponseCode::NXDomain);
                }
                let _ = socket.send_to(&r.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn other_names_are_resolved_upstream() {
        use std::str::FromStr;
        let upstream = fake_upstream().await;
        let config = ResolverConfig::from_parts(
            None,
            Vec::new(),
            NameServerConfigGroup::from_ips_clear(&[upstream.ip()], upstream.port(), true),
        );
        let handler = Handler {
            peers: Arc::new(RwLock::new(peers())),
            domain: "skiff.local".into(),
            namespace: Some("shop".into()),
            upstream: Some(
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                    .build(),
            ),
        };
        let (code, authoritative, records) = handler
            .resolve(&Name::from_str("example.com.").unwrap(), RecordType::A)
            .await;
        assert_eq!((code, authoritative), (ResponseCode::NoError, false));
        let ips: Vec<String> = records.iter().map(|r| r.data().to_string()).collect();
        assert_eq!(ips, vec!["192.0.2.7"]);
        let (code, _, records) = handler
            .resolve(&Name::from_str("nowhere.example.").unwrap(), RecordType::A)
            .await;
        assert_eq!((code, records.len()), (ResponseCode::NXDomain, 0));
        // Cluster names never leave the proxy.
        let (code, authoritative, _) = handler
            .resolve(&Name::from_str("web.").unwrap(), RecordType::A)
            .await;
        assert_eq!((code, authoritative), (ResponseCode::NoError, true));
    }

    /// The server itself, over UDP and TCP, with no upstream.
    #[tokio::test]
    async fn the_server_answers_over_udp_and_tcp() {
        use hickory_proto::op::{Message, Query};
        use std::str::FromStr;
        let listen: SocketAddr = {
            let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let mut server = ServerFuture::new(Handler {
            peers: Arc::new(RwLock::new(peers())),
            domain: "skiff.local".into(),
            namespace: Some("shop".into()),
            upstream: None,
        });
        server.register_socket(tokio::net::UdpSocket::bind(listen).await.unwrap());
        server.register_listener(
            tokio::net::TcpListener::bind(listen).await.unwrap(),
            TCP_TIMEOUT,
        );
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_str("web.").unwrap(), RecordType::A));
        let query = m.to_vec().unwrap();
        // UDP.
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&query, listen).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(reply.id(), 7);
        let ips: Vec<String> = reply
            .answers()
            .iter()
            .map(|r| r.data().to_string())
            .collect();
        assert_eq!(ips, vec!["198.18.128.1"]);
        // TCP: two-byte length, then the message.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        tcp.write_all(&framed).await.unwrap();
        let len = tcp.read_u16().await.unwrap() as usize;
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).await.unwrap();
        assert_eq!(Message::from_vec(&body).unwrap().answers().len(), 1);
        // Not a cluster name, and no upstream: SERVFAIL, not silence.
        let mut m = Message::new();
        m.set_id(8);
        m.add_query(Query::query(
            Name::from_str("example.com.").unwrap(),
            RecordType::A,
        ));
        client.send_to(&m.to_vec().unwrap(), listen).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(
            Message::from_vec(&buf[..n]).unwrap().response_code(),
            ResponseCode::ServFail
        );
    }
}
