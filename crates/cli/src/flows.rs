//! `skiff flows`: what network policy denied or audited, on every node,
//! each line with both ends, the port and the deciding policy.

use std::io::Write;

use clap::Args;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::resources::{Connection, runtime};

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Only flows with an end in this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only flows with an end in this service.
    #[arg(long)]
    pub service: Option<String>,
    /// `denied` or `audit-denied`.
    #[arg(long, value_parser = ["denied", "audit-denied"])]
    pub verdict: Option<String>,
    /// Keep printing flows as they happen.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// One JSON object per line, as the nodes report them.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: Connection,
}

pub fn run(args: &FlowsArgs) -> anyhow::Result<u8> {
    let client = args.connection.client()?;
    let mut query = format!("/flows?follow={}", args.follow);
    for (k, v) in [
        ("namespace", &args.namespace),
        ("service", &args.service),
        ("verdict", &args.verdict),
    ] {
        if let Some(v) = v {
            query.push_str(&format!("&{k}={v}"));
        }
    }
    runtime()?.block_on(async {
        let mut body = client.stream(&query).await?;
        let mut out = std::io::stdout().lock();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(at) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=at).collect();
                if args.json {
                    out.write_all(&line)?;
                } else if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    writeln!(out, "{}", render(&v))?;
                }
                out.flush()?;
            }
        }
        Ok(0)
    })
}

/// One flow as a line of text.
pub fn render(v: &Value) -> String {
    let t = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default();
    if let Some(n) = v.get("lost") {
        return format!(
            "{} {n} flow report(s) lost on node {} (reader too slow)",
            t("/time"),
            t("/node")
        );
    }
    if v.get("error").is_some() {
        return format!(
            "node {}: cannot read its flows: {}",
            t("/node"),
            t("/error")
        );
    }
    let end = |e: &str| {
        let name = match (t(&format!("/{e}/namespace")), t(&format!("/{e}/instance"))) {
            ("", _) | (_, "") => "(outside)".to_string(),
            (ns, name) => format!("{ns}/{name}"),
        };
        let id = v
            .pointer(&format!("/{e}/identity"))
            .map(Value::to_string)
            .unwrap_or_default();
        format!("{name} ({}, id {id})", t(&format!("/{e}/address")))
    };
    // An L7 denial names the request, and the caller's identity.
    let request = match v.get("http") {
        Some(h) => {
            let peer = h.get("peer").and_then(Value::as_str);
            format!(
                " ({} {}{})",
                t("/http/method"),
                t("/http/path"),
                peer.map(|p| format!(" by {p}")).unwrap_or_default()
            )
        }
        None => String::new(),
    };
    format!(
        "{} {:<12} {} -> {} {}/{} {}: {}{request} [node {}]",
        t("/time"),
        t("/verdict"),
        end("src"),
        end("dst"),
        v.get("port").map(Value::to_string).unwrap_or_default(),
        t("/protocol"),
        t("/direction"),
        t("/policy"),
        t("/node"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_flow_reads_as_one_line_naming_both_ends_and_the_policy() {
        let v = json!({"time": "2026-11-28T13:00:00Z", "node": "n2", "verdict": "denied", "direction": "ingress", "protocol": "TCP", "port": 8080,
            "src": {"address": "198.19.16.3", "identity": 257, "namespace": "demo", "instance": "bad-x", "service": "bad"},
            "dst": {"address": "198.19.17.2", "identity": 256, "namespace": "demo", "instance": "server-y", "service": "server"},
            "policy": "no policy allows"});
        assert_eq!(
            render(&v),
            "2026-11-28T13:00:00Z denied       demo/bad-x (198.19.16.3, id 257) -> demo/server-y (198.19.17.2, id 256) 8080/TCP ingress: no policy allows [node n2]"
        );
        let l7 = json!({"time": "t", "node": "n1", "verdict": "denied", "direction": "ingress", "protocol": "HTTP", "port": 8080,
            "src": {"address": "198.19.16.3", "identity": 0, "namespace": "demo", "instance": "web-x", "service": "web"},
            "dst": {"address": "198.19.17.2", "identity": 0, "namespace": "demo", "instance": "db-y", "service": "db"},
            "policy": "Policy demo/db-read", "http": {"method": "POST", "path": "/admin", "peer": "spiffe://skiff.local/ns/demo/sa/web"}});
        assert!(
            render(&l7).ends_with("8080/HTTP ingress: Policy demo/db-read (POST /admin by spiffe://skiff.local/ns/demo/sa/web) [node n1]"),
            "{}",
            render(&l7)
        );
        let outside = json!({"verdict": "denied", "src": {"address": "203.0.113.7", "identity": 2}, "dst": {}, "policy": "x"});
        assert!(render(&outside).contains("(outside) (203.0.113.7, id 2)"));
    }
}
