//! Cluster DNS in the sidecar: the instance's DNS queries (UDP port 53, to
//! whatever nameserver the host's resolv.conf names) are redirected here.
//! Names of Services, `<svc>.<ns>.svc.<domain>` (also `<svc>.<ns>.svc` and
//! `<svc>.<ns>`), are answered from the node's discovery table with the
//! service's virtual address; anything else is relayed to the nameserver
//! it was sent to, unchanged.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

use crate::transparent::Peers;

/// Seconds a cluster answer may be cached: short, since instances come and go.
const TTL: u32 = 5;
/// How long a relayed query may take.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a query gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A reply made here.
    Local(Vec<u8>),
    /// Not a cluster name: relay the query as it is.
    Relay,
}

/// Answers one query (the bytes of a DNS message). Pure: the names come
/// from `peers`. Unparseable bytes are answered FORMERR when they carry an
/// id, and otherwise dropped (`Local` with no bytes).
pub fn answer(query: &[u8], peers: &Peers, domain: &str) -> Answer {
    let Ok(request) = Message::from_vec(query) else {
        return Answer::Local(Vec::new());
    };
    let Some(q) = request.queries().first() else {
        return Answer::Local(reply(&request, ResponseCode::FormErr, None));
    };
    let name = q
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let Some((service, namespace)) = cluster_name(&name, domain) else {
        return Answer::Relay;
    };
    let found = peers
        .by_name
        .get(&format!("{namespace}/{service}"))
        .copied();
    let record = match (found, q.query_type()) {
        (Some(IpAddr::V4(ip)), RecordType::A) => {
            Some(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))))
        }
        _ => None,
    };
    let code = match found {
        // The name exists; other record types get an empty answer.
        Some(_) => ResponseCode::NoError,
        None if name.ends_with(&format!(".svc.{domain}")) || name.ends_with(".svc") => {
            ResponseCode::NXDomain
        }
        // `<a>.<b>` that names no service may be an outside name.
        None => return Answer::Relay,
    };
    Answer::Local(reply(&request, code, record))
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

fn reply(request: &Message, code: ResponseCode, record: Option<Record>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .set_response_code(code);
    m.add_queries(request.queries().to_vec());
    if let Some(r) = record {
        m.add_answer(r);
    }
    m.to_vec().unwrap_or_default()
}

/// Serves redirected queries until the task ends. A relayed query goes to
/// the address it was sent to (its original destination).
pub async fn serve(socket: UdpSocket, peers: Arc<RwLock<Peers>>, domain: String) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let query = buf[..n].to_vec();
        let decision = {
            let peers = peers.read().unwrap_or_else(|p| p.into_inner());
            answer(&query, &peers, &domain)
        };
        match decision {
            Answer::Local(bytes) if !bytes.is_empty() => {
                let _ = socket.send_to(&bytes, client).await;
            }
            Answer::Local(_) => {}
            Answer::Relay => {
                let socket = socket.clone();
                tokio::spawn(async move {
                    if let Some(reply) = relay(&query).await {
                        let _ = socket.send_to(&reply, client).await;
                    }
                });
            }
        }
    }
}

/// Sends a query to the first nameserver in /etc/resolv.conf that is not a
/// loopback address (the instance cannot reach the host's loopback).
async fn relay(query: &[u8]) -> Option<Vec<u8>> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    let server: IpAddr = conf
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .find(|a| !a.is_loopback())?;
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .ok()?;
    let upstream = UdpSocket::bind(local).await.ok()?;
    upstream.send_to(query, (server, 53)).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(RELAY_TIMEOUT, upstream.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_str(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    fn peers() -> Peers {
        let mut p = Peers::default();
        p.by_name
            .insert("shop/web".into(), "198.18.128.1".parse().unwrap());
        p
    }

    fn local(a: Answer) -> Message {
        match a {
            Answer::Local(bytes) => Message::from_vec(&bytes).unwrap(),
            Answer::Relay => panic!("relayed"),
        }
    }

    #[test]
    fn service_names_resolve_to_their_virtual_address() {
        for name in ["web.shop.svc.skiff.local.", "web.shop.svc.", "WEB.shop."] {
            let m = local(answer(&query(name, RecordType::A), &peers(), "skiff.local"));
            assert_eq!(m.id(), 7);
            assert_eq!(m.response_code(), ResponseCode::NoError, "{name}");
            let ips: Vec<String> = m.answers().iter().map(|r| r.data().to_string()).collect();
            assert_eq!(ips, vec!["198.18.128.1"], "{name}");
        }
    }

    #[test]
    fn unknown_cluster_names_do_not_exist_and_others_are_relayed() {
        let m = local(answer(
            &query("db.shop.svc.skiff.local.", RecordType::A),
            &peers(),
            "skiff.local",
        ));
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        let m = local(answer(
            &query("web.shop.svc.skiff.local.", RecordType::AAAA),
            &peers(),
            "skiff.local",
        ));
        assert_eq!(
            (m.response_code(), m.answers().len()),
            (ResponseCode::NoError, 0)
        );
        assert_eq!(
            answer(
                &query("example.com.", RecordType::A),
                &peers(),
                "skiff.local"
            ),
            Answer::Relay
        );
        assert_eq!(
            answer(
                &query("debian.org.", RecordType::A),
                &peers(),
                "skiff.local"
            ),
            Answer::Relay
        );
        assert_eq!(
            answer(b"\x00garbage", &peers(), "skiff.local"),
            Answer::Local(Vec::new())
        );
    }
}
