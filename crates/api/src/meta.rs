//! Object metadata and label syntax shared by every kind.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::decode::{Cx, Decode};
use crate::yaml::Node;

/// Labels: `key: value` pairs with Kubernetes syntax.
pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries implicitly, as in Kubernetes.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the store; ignored on create, checked on update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

impl Decode for ObjectMeta {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &["name", "namespace", "labels", "annotations", "revision"],
        )?;
        let name: Option<String> = m.req(cx, "name");
        if let Some(name) = &name {
            m.check(cx, "name", is_dns_subdomain(name), || {
                format!("`{name}` is not a valid name: use lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit")
            });
        }
        let namespace: Option<String> = m.opt(cx, "namespace");
        if let Some(ns) = &namespace {
            m.check(cx, "namespace", is_dns_label(ns), || {
                format!("`{ns}` is not a valid namespace: use lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit")
            });
        }
        let labels = m.opt(cx, "labels").map(|l: Labels| l).unwrap_or_default();
        if let Some(node) = m.raw("labels") {
            cx.at("labels", |cx| check_labels(&labels, node, cx));
        }
        let annotations = m.or_default(cx, "annotations");
        let revision = m.opt(cx, "revision");
        Some(ObjectMeta {
            name: name?,
            namespace,
            labels,
            annotations,
            revision,
        })
    }
}

/// Reports label keys and values that Kubernetes would reject.
pub fn check_labels(labels: &Labels, node: &Node, cx: &mut Cx) {
    for (key, value) in labels {
        let mark = node.get(key).map_or(node.mark, |n| n.mark);
        if let Err(why) = check_label_key(key) {
            cx.at(key, |cx| {
                cx.error(mark, format!("invalid label key `{key}`: {why}"))
            });
        }
        if !is_label_value(value) {
            cx.at(key, |cx| {
                cx.error(mark, format!("invalid label value `{value}`: at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"))
            });
        }
    }
}

/// A label key is `[prefix/]name`: prefix a DNS subdomain, name a qualified name.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        return Err(format!("prefix `{p}` must be a DNS subdomain"));
    }
    if name.is_empty() || name.len() > 63 || !is_label_value(name) {
        return Err("name part must be 1-63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit".to_string());
    }
    Ok(())
}

/// A label value: empty, or up to 63 alphanumerics with `-_.` inside.
pub fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
}

/// RFC 1123 label: lowercase alphanumerics and `-`, at most 63.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The labels of an object as JSON (`metadata.labels`); empty when absent,
/// and values that are not strings are left out.
pub fn labels_in(object: &serde_json::Value) -> Labels {
    object
        .pointer("/metadata/labels")
        .and_then(serde_json::Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_syntax() {
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("kubernetes.io/metadata.name").is_ok());
        assert!(check_label_key("Bad Key").is_err());
        assert!(check_label_key("UPPER/x").is_err());
        assert!(is_label_value(""));
        assert!(is_label_value("v1.2_x"));
        assert!(!is_label_value("-x"));
        assert!(is_dns_label("shop"));
        assert!(!is_dns_label("Shop"));
        assert!(is_dns_subdomain("web.v2"));
    }
}
