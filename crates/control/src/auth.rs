//! Who is calling, and whether they may do what they ask.
//!
//! Admins (client certificate in `skiff:admins`) may do everything. Node
//! agents (certificate in `skiff:nodes`, or the join token with an
//! `X-Skiff-Node` header) may read everything but write only their own
//! Node and the status of instances assigned to them.

use hyper::HeaderMap;
use serde_json::Value;
use skiff_api::KindInfo;
use skiff_identity::{Principal, token_matches};

use crate::error::ApiError;

/// What the TLS layer learned about the connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The verified client certificate's principal, or why it names none.
    pub certificate: Option<Result<Principal, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    UpdateStatus,
    Delete,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::UpdateStatus => "update the status of",
            Verb::Delete => "delete",
        }
    }
}

/// The caller's principal: the client certificate, else the join token.
pub fn authenticate(
    peer: Option<&Peer>,
    headers: &HeaderMap,
    join_token: &str,
) -> Result<Principal, ApiError> {
    if let Some(cert) = peer.and_then(|p| p.certificate.as_ref()) {
        return cert.clone().map_err(|why| {
            ApiError::unauthorized(format!("client certificate not accepted: {why}"))
        });
    }
    let Some(auth) = headers.get("authorization") else {
        return Err(ApiError::unauthorized(
            "no credential: present a client certificate or `Authorization: Bearer <token>`",
        ));
    };
    let token = auth
        .to_str()
        .ok()
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim();
    if !token_matches(token, join_token) {
        return Err(ApiError::unauthorized("invalid token"));
    }
    let node = headers
        .get("x-skiff-node")
        .and_then(|n| n.to_str().ok())
        .unwrap_or_default();
    if !skiff_api::meta::is_dns_subdomain(node) {
        return Err(ApiError::unauthorized(
            "the join token acts for a node: name it in the X-Skiff-Node header",
        ));
    }
    Ok(Principal::Node {
        name: node.to_string(),
    })
}

/// Whether `who` may apply `verb` to the object. `stored` is the current
/// object, when there is one (instance status checks its assigned node),
/// or for a create the object being created.
///
/// Agents may register their own Node (without a pod range: the control
/// plane assigns those), renew its heartbeat and write its status, and
/// write the status of instances assigned to them; nothing else. They
/// cannot change a Node's spec, so a node cannot lift its own cordon.
pub fn authorize(
    who: &Principal,
    verb: Verb,
    kind: &KindInfo,
    namespace: Option<&str>,
    name: Option<&str>,
    stored: Option<&Value>,
) -> Result<(), ApiError> {
    let allowed = match who {
        Principal::Admin { .. } => true,
        Principal::Node { name: node } => match verb {
            Verb::Get | Verb::List | Verb::Watch => true,
            Verb::Create => {
                kind.kind == "Node"
                    && name == Some(node.as_str())
                    && stored
                        .and_then(|o| o.pointer("/spec/podCIDR"))
                        .is_none_or(Value::is_null)
            }
            Verb::UpdateStatus => {
                (kind.kind == "Node" && name == Some(node.as_str()))
                    || (kind.kind == "Instance"
                        && stored
                            .and_then(|o| o.pointer("/spec/node"))
                            .and_then(Value::as_str)
                            == Some(node.as_str()))
            }
            Verb::Update => false,
            Verb::Delete => false,
        },
    };
    if allowed {
        return Ok(());
    }
    let what = match (namespace, name) {
        (Some(ns), Some(n)) => format!("{} {ns}/{n}", kind.kind),
        (None, Some(n)) => format!("{} {n}", kind.kind),
        _ => format!("{} objects", kind.kind),
    };
    Err(ApiError::forbidden(format!(
        "{who} may not {} {what}",
        verb.as_str()
    )))
}
