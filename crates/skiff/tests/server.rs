//! The API server end to end: the CLI against it, authentication and
//! authorization, optimistic concurrency, hostile clients, metrics, watches,
//! graceful shutdown.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde_json::{Value, json};
use skiff_api::KindInfo;
use skiff_client::{Client, ClientConfig, ClientError, EventType};
use skiff_identity::Principal;
use support::{Server, free_port};
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(86_400);

fn kind(name: &str) -> &'static KindInfo {
    KindInfo::find(name).unwrap()
}

fn skiff(server: &Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .arg("--config")
        .arg(server.admin_config_path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn repo(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

fn policy(name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "skiff.dev/v1", "kind": "Policy",
        "metadata": {"name": name, "namespace": "shop", "labels": {"team": "shop", "app": name}},
        "spec": {"selector": {"matchLabels": {"app": name}}, "ingress": [{"ports": [{"port": port}]}]}
    })
}

/// A client with a certificate for `who`, issued by `ca`, valid from `not_before`.
fn client_as(
    server: &Server,
    ca: &skiff_identity::Ca,
    who: Principal,
    issued_at: OffsetDateTime,
    validity: Duration,
) -> Client {
    let issued = ca.issue_client(&who, issued_at, validity).unwrap();
    let config = ClientConfig {
        client_certificate: Some(issued.cert_pem),
        client_key: Some(issued.key_pem),
        ..server.admin()
    };
    Client::new(&config).unwrap()
}

fn token_client(server: &Server, token: &str, node: Option<&str>) -> Client {
    let config = ClientConfig {
        client_certificate: None,
        client_key: None,
        token: Some(token.into()),
        node: node.map(String::from),
        ..server.admin()
    };
    Client::new(&config).unwrap()
}

#[test]
fn cli_applies_gets_diffs_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let (code, out, err) = skiff(
        &server,
        &["apply", "-f", &repo("policies"), &repo("examples")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Policy shop/checkout created")
            && out.contains("Service shop/checkout created"),
        "{out}"
    );
    let (code, out, _) = skiff(&server, &["apply", "-f", &repo("policies")]);
    assert_eq!(code, 0);
    assert!(out.lines().all(|l| l.ends_with(" unchanged")), "{out}");

    let (code, out, _) = skiff(
        &server,
        &["get", "policies", "-n", "shop", "-l", "app!=nothing"],
    );
    assert_eq!(code, 0);
    assert!(
        out.starts_with("NAME") && out.contains("checkout") && out.contains("app=checkout"),
        "{out}"
    );
    let (_, out, _) = skiff(&server, &["get", "services", "-A", "-o", "wide"]);
    assert!(
        out.contains("NAMESPACE")
            && out.contains("http:8080/http,metrics:9100/http")
            && out.contains("team=shop"),
        "{out}"
    );

    // get -o yaml round-trips through apply; a change shows in diff, then applies.
    let (_, yaml, _) = skiff(
        &server,
        &["get", "policy", "checkout", "-n", "shop", "-o", "yaml"],
    );
    let file = dir.path().join("checkout.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let (code, out, _) = skiff(&server, &["diff", "-f", file.to_str().unwrap()]);
    assert_eq!((code, out.as_str()), (0, ""));
    std::fs::write(&file, yaml.replace("port: 8080", "port: 8081")).unwrap();
    let (code, out, _) = skiff(&server, &["diff", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("-      port: 8080\n+      port: 8081"),
        "{out}"
    );
    let (_, out, _) = skiff(&server, &["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(out.trim(), "Policy shop/checkout configured");

    // Invalid manifests change nothing and say where they are wrong.
    std::fs::write(&file, yaml.replace("mode: enforce", "mode: enforcing")).unwrap();
    let (code, _, err) = skiff(&server, &["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("checkout.yaml:") && err.contains("spec.mode: expected one of enforce, audit"),
        "{err}"
    );

    let (code, out, _) = skiff(&server, &["delete", "policy", "checkout", "-n", "shop"]);
    assert_eq!((code, out.trim()), (0, "Policy shop/checkout deleted"));
    let (code, _, err) = skiff(&server, &["get", "policy", "checkout", "-n", "shop"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let now = OffsetDateTime::now_utc();
    let nodes = kind("nodes");

    // No credential at all: the TLS handshake succeeds, the request does not.
    let anonymous = Client::new(&ClientConfig {
        client_certificate: None,
        client_key: None,
        token: Some(String::new()),
        ..server.admin()
    })
    .unwrap();
    let (status, body) = anonymous
        .raw(Method::GET, "/apis/skiff.dev/v1/nodes", None)
        .await
        .unwrap();
    assert_eq!(status, 401, "{body:?}");
    // /healthz is open.
    assert_eq!(
        anonymous
            .raw(Method::GET, "/healthz", None)
            .await
            .unwrap()
            .0,
        200
    );

    // A certificate from another CA, and an expired one: refused at the handshake.
    let other_ca = skiff_identity::Ca::generate("other", now, 365 * DAY).unwrap();
    let stranger = client_as(
        &server,
        &other_ca,
        Principal::Admin {
            name: "admin".into(),
        },
        now,
        DAY,
    );
    assert!(matches!(
        stranger.list(nodes, None, None).await,
        Err(ClientError::Connect { .. })
    ));
    let expired = client_as(
        &server,
        &server.ca(),
        Principal::Admin {
            name: "admin".into(),
        },
        now - time::Duration::days(3),
        DAY,
    );
    assert!(matches!(
        expired.list(nodes, None, None).await,
        Err(ClientError::Connect { .. })
    ));

    // A wrong token; the right token without naming a node.
    let wrong = token_client(&server, "skiff-not-the-token", Some("n1"));
    assert_eq!(
        wrong.list(nodes, None, None).await.unwrap_err().status(),
        Some(401)
    );
    let unnamed = token_client(&server, &server.join_token(), None);
    assert_eq!(
        unnamed.list(nodes, None, None).await.unwrap_err().status(),
        Some(401)
    );

    // The admin may do anything.
    let admin = server.client();
    admin.create(kind("services"), Some("shop"), &json!({"apiVersion": "skiff.dev/v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"run": {"command": "/bin/web"}}})).await.unwrap();

    // An agent (join token or node certificate) writes its own Node only…
    let agent = token_client(&server, &server.join_token(), Some("n1"));
    let node = |name: &str| json!({"apiVersion": "skiff.dev/v1", "kind": "Node", "metadata": {"name": name}, "spec": {}, "status": {"ready": true}});
    agent.create(nodes, None, &node("n1")).await.unwrap();
    assert_eq!(
        agent
            .create(nodes, None, &node("n2"))
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    let node_cert = client_as(
        &server,
        &server.ca(),
        Principal::Node { name: "n2".into() },
        now,
        DAY,
    );
    node_cert.create(nodes, None, &node("n2")).await.unwrap();
    assert_eq!(
        node_cert
            .update(nodes, None, "n1", &node("n1"))
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    // …its status and heartbeat, never its spec: no lifting its own cordon,
    // no claiming a pod range.
    let mut cordoned = admin.get(nodes, None, "n2").await.unwrap().unwrap();
    cordoned["spec"]["unschedulable"] = json!(true);
    admin.update(nodes, None, "n2", &cordoned).await.unwrap();
    let mut uncordon = admin.get(nodes, None, "n2").await.unwrap().unwrap();
    uncordon["spec"]["unschedulable"] = json!(false);
    assert_eq!(
        node_cert
            .update(nodes, None, "n2", &uncordon)
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    node_cert
        .update_status(nodes, None, "n2", &uncordon)
        .await
        .unwrap();
    node_cert.heartbeat("n2").await.unwrap();
    assert_eq!(
        admin.get(nodes, None, "n2").await.unwrap().unwrap()["spec"]["unschedulable"],
        true,
        "a status write leaves the spec alone"
    );
    let mut claim = node("n3");
    claim["spec"]["podCIDR"] = json!("198.19.7.0/24");
    let n3 = token_client(&server, &server.join_token(), Some("n3"));
    assert_eq!(
        n3.create(nodes, None, &claim).await.unwrap_err().status(),
        Some(403)
    );
    // …never a Service…
    let svc = json!({"apiVersion": "skiff.dev/v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"replicas": 9, "run": {"command": "/bin/evil"}}});
    for client in [&agent, &node_cert] {
        let err = client
            .update(kind("services"), Some("shop"), "web", &svc)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(403), "{err}");
        assert_eq!(
            client
                .delete(kind("services"), Some("shop"), "web")
                .await
                .unwrap_err()
                .status(),
            Some(403)
        );
    }
    assert_eq!(
        admin
            .get(kind("services"), Some("shop"), "web")
            .await
            .unwrap()
            .unwrap()["spec"]["replicas"],
        1
    );
    // …and the status of instances assigned to it, not others'.
    let instance = |name: &str, node: &str| json!({"apiVersion": "skiff.dev/v1", "kind": "Instance", "metadata": {"name": name, "namespace": "shop"}, "spec": {"service": "web", "node": node}, "status": {"phase": "running", "ready": true}});
    admin
        .create(kind("instances"), Some("shop"), &instance("web-1", "n2"))
        .await
        .unwrap();
    admin
        .create(kind("instances"), Some("shop"), &instance("web-2", "n1"))
        .await
        .unwrap();
    node_cert
        .update_status(
            kind("instances"),
            Some("shop"),
            "web-1",
            &instance("web-1", "n2"),
        )
        .await
        .unwrap();
    assert_eq!(
        node_cert
            .update_status(
                kind("instances"),
                Some("shop"),
                "web-2",
                &instance("web-2", "n1")
            )
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    assert_eq!(
        node_cert
            .update(
                kind("instances"),
                Some("shop"),
                "web-1",
                &instance("web-1", "n2")
            )
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );

    // Workload certificates: for the node's own instances only, naming the
    // instance's service, for the key in the CSR.
    let id = skiff_identity::SpiffeId::new("skiff.local", "shop", "anything").unwrap();
    let (_key, csr) = skiff_identity::workload_csr(&id).unwrap();
    let body = Some(bytes::Bytes::from(json!({ "csr": csr }).to_string()));
    let cert_path =
        |name: &str| format!("/apis/skiff.dev/v1/namespaces/shop/instances/{name}/certificate");
    let (status, answer) = node_cert
        .raw(Method::POST, &cert_path("web-1"), body.clone())
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer:?}");
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["identity"], "spiffe://skiff.local/ns/shop/sa/web");
    let der = skiff_identity::certs_from_pem(answer["certificate"].as_str().unwrap()).unwrap();
    assert_eq!(
        skiff_identity::spiffe_id_of(&der[0])
            .unwrap()
            .unwrap()
            .to_string(),
        "spiffe://skiff.local/ns/shop/sa/web"
    );
    let lifetime = answer["notAfter"].as_i64().unwrap() - now.unix_timestamp();
    assert!((86_300..=86_500).contains(&lifetime), "{lifetime}");
    let (status, answer) = node_cert
        .raw(Method::POST, &cert_path("web-2"), body)
        .await
        .unwrap();
    assert_eq!(status, 403, "{answer:?}");
    // A Service identity for a non-instance holder (the gateway): admins only.
    let service_path = "/apis/skiff.dev/v1/namespaces/skiff-system/services/gateway/certificate";
    let gateway_csr = Some(bytes::Bytes::from(json!({ "csr": csr }).to_string()));
    let (status, _) = node_cert
        .raw(Method::POST, service_path, gateway_csr.clone())
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, answer) = admin
        .raw(Method::POST, service_path, gateway_csr)
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer:?}");
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(
        answer["identity"],
        "spiffe://skiff.local/ns/skiff-system/sa/gateway"
    );
    let bad = Some(bytes::Bytes::from(
        json!({ "csr": "not a csr" }).to_string(),
    ));
    let (status, answer) = node_cert
        .raw(Method::POST, &cert_path("web-1"), bad)
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&answer).contains("body.csr"),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_sets_a_node_could_not_hold_are_refused_at_apply_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let admin = server.client();
    admin.create(kind("nodes"), None, &json!({"apiVersion": "skiff.dev/v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": {}, "status": {"ready": true}})).await.unwrap();
    admin.create(kind("services"), Some("shop"), &json!({"apiVersion": "skiff.dev/v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}}, "spec": {"run": {"command": "/bin/web"}, "ports": [{"name": "http", "port": 8080}]}})).await.unwrap();
    for (name, addr) in [("web-1", "198.19.0.2"), ("web-2", "198.19.0.3")] {
        admin.create(kind("instances"), Some("shop"), &json!({"apiVersion": "skiff.dev/v1", "kind": "Instance", "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}}, "spec": {"service": "web", "node": "n1"}, "status": {"phase": "running", "ready": true, "address": addr}})).await.unwrap();
    }
    let policy = |name: &str, end: u16| {
        json!({"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 1, "endPort": end}, {"port": 1, "endPort": end, "protocol": "UDP"}]}]}})
    };
    // Every port, from every peer, both protocols: more than the map holds.
    let err = admin
        .create(kind("policies"), Some("shop"), &policy("wide", 65535))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(422), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(
            "Policy shop/wide: refused, nothing changed: on node n1: the policy map needs"
        ),
        "{text}"
    );
    assert!(
        admin
            .get(kind("policies"), Some("shop"), "wide")
            .await
            .unwrap()
            .is_none(),
        "nothing was written"
    );
    // A set that fits is applied.
    admin
        .create(kind("policies"), Some("shop"), &policy("narrow", 100))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_revisions_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let c = server.client();
    let policies = kind("policies");
    let created = c
        .create(policies, Some("shop"), &policy("a", 80))
        .await
        .unwrap();
    let rev = created["metadata"]["revision"].clone();
    let mut first = policy("a", 81);
    first["metadata"]["revision"] = rev.clone();
    c.update(policies, Some("shop"), "a", &first).await.unwrap();
    let mut stale = policy("a", 82);
    stale["metadata"]["revision"] = rev;
    let err = c
        .update(policies, Some("shop"), "a", &stale)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(
        err.to_string().contains("get it again and reapply"),
        "{err}"
    );
    assert_eq!(
        c.create(policies, Some("shop"), &policy("a", 80))
            .await
            .unwrap_err()
            .status(),
        Some(409)
    );
    let live = c.get(policies, Some("shop"), "a").await.unwrap().unwrap();
    assert_eq!(live["spec"]["ingress"][0]["ports"][0]["port"], 81);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let c = server.client();
    let path = "/apis/skiff.dev/v1/namespaces/shop/policies";
    let send = |body: &str| c.raw(Method::POST, path, Some(Bytes::from(body.to_string())));

    let (status, body) = send("{\"apiVersion\": \"skiff.dev/v1\", \"kind\": ")
        .await
        .unwrap();
    assert_eq!(status, 422);
    assert!(
        String::from_utf8_lossy(&body).contains("request body:2:1: invalid YAML"),
        "{body:?}"
    );
    let (status, body) = send("apiVersion: skiff.dev/v2\nkind: Policy\nmetadata: {name: a}\nspec: {selector: {}, ingress: []}\n").await.unwrap();
    assert_eq!(status, 422);
    assert!(
        String::from_utf8_lossy(&body)
            .contains("request body:1:13: apiVersion: kind Policy has apiVersion skiff.dev/v1"),
        "{body:?}"
    );
    let (status, body) =
        send("apiVersion: skiff.dev/v1\nkind: Deployment\nmetadata: {name: a}\nspec: {}\n")
            .await
            .unwrap();
    assert_eq!(status, 422);
    assert!(
        String::from_utf8_lossy(&body).contains("unknown kind `Deployment`"),
        "{body:?}"
    );
    let (status, body) = send(
        "apiVersion: skiff.dev/v1\nkind: Service\nmetadata: {name: a}\nspec: {run: {command: x}}\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body)
            .contains("the body is a Service, but the path is for Policy"),
        "{body:?}"
    );
    let (status, _) = c
        .raw(
            Method::GET,
            "/apis/skiff.dev/v1/namespaces/shop/deployments",
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, body) = c
        .raw(
            Method::GET,
            "/apis/skiff.dev/v1/namespaces/shop/policies?labelSelector=bad%20key%3Dx",
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body:?}");

    // A flood of malformed requests does not hold up valid ones.
    let mut flood = Vec::new();
    for _ in 0..4 {
        let c = c.clone();
        flood.push(tokio::spawn(async move {
            for _ in 0..200 {
                let (status, _) = c
                    .raw(
                        Method::POST,
                        "/apis/skiff.dev/v1/namespaces/shop/policies",
                        Some(Bytes::from_static(b"{{{ not yaml")),
                    )
                    .await
                    .unwrap();
                assert_eq!(status, 422);
            }
        }));
    }
    for i in 0..50 {
        c.create(
            kind("policies"),
            Some("shop"),
            &policy(&format!("ok{i}"), 80),
        )
        .await
        .unwrap();
    }
    for f in flood {
        f.await.unwrap();
    }
    assert_eq!(
        c.list(kind("policies"), Some("shop"), None)
            .await
            .unwrap()
            .items
            .len(),
        50
    );

    // 50 MB: refused (413) or cut off; either way nothing is stored and others are served.
    let huge = Bytes::from(vec![b' '; 50 * 1024 * 1024]);
    match c.raw(Method::POST, path, Some(huge)).await {
        Ok((status, _)) => assert_eq!(status, 413),
        Err(ClientError::Connect { .. }) => {}
        Err(e) => panic!("{e}"),
    }
    let stored = c.list(kind("policies"), Some("shop"), None).await.unwrap();
    assert_eq!(stored.items.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_do_not_starve_others() {
    rlimit::increase_nofile_limit(8192).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let addr = server.url.trim_start_matches("https://").to_string();

    // A client sending one byte per second never completes a handshake: cut off.
    let slow_addr = addr.clone();
    let slow = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(&slow_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        for byte in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
            .iter()
            .cycle()
        {
            if s.write_all(&[*byte]).is_err() {
                return started.elapsed();
            }
            if let Ok(0) = s.read(&mut buf) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "slow client never cut off"
            );
            std::thread::sleep(Duration::from_millis(800));
        }
        unreachable!()
    });

    // 1000 connections that never say anything.
    let idle: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let c = server.client();
    for i in 0..20 {
        c.create(
            kind("policies"),
            Some("shop"),
            &policy(&format!("p{i}"), 80),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        c.list(kind("policies"), Some("shop"), None)
            .await
            .unwrap()
            .items
            .len(),
        20
    );
    let cut_after = slow.join().unwrap();
    assert!(
        cut_after >= Duration::from_secs(5),
        "cut off after {cut_after:?}"
    );
    // Idle connections are cut off too, after the handshake timeout.
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 1000);
    let (status, body) = c.raw(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    // Only this client's own pooled connections remain open.
    let text = String::from_utf8_lossy(&body);
    let open: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("skiff_api_connections "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=4).contains(&open), "{open} connections still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), 0);
    let c = server.client();
    c.create(kind("policies"), Some("shop"), &policy("a", 80))
        .await
        .unwrap();
    let _ = c.get(kind("policies"), Some("shop"), "missing").await;
    let (status, body) = c.raw(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    for needle in [
        "skiff_api_requests_total{method=\"POST\",code=\"201\"} 1",
        "skiff_store_revision 1",
        "skiff_store_commits_total",
        "skiff_api_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var("SKIFF_E2E").as_deref() == Ok("require") => {
            panic!("promtool is required (SKIFF_E2E=require): {e}")
        }
        Err(e) => println!("skipping promtool check: {e}"),
    }
}

/// The next watch event, failing after a generous timeout.
async fn next(w: &mut skiff_client::WatchStream) -> skiff_client::WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("watch stalled")
        .expect("watch ended")
        .expect("watch error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stream_filter_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Server::start(dir.path(), port);
    let c = server.client();
    let policies = kind("policies");
    c.create(policies, Some("shop"), &policy("a", 80))
        .await
        .unwrap();
    let list = c.list(policies, Some("shop"), None).await.unwrap();
    let mut all = c.watch(policies, Some("shop"), None, list.revision);
    let mut only_b = c.watch(policies, Some("shop"), Some("app=b"), list.revision);
    c.create(policies, Some("shop"), &policy("b", 80))
        .await
        .unwrap();
    let mut a = c.get(policies, Some("shop"), "a").await.unwrap().unwrap();
    a["spec"]["ingress"][0]["ports"][0]["port"] = json!(81);
    c.update(policies, Some("shop"), "a", &a).await.unwrap();
    c.delete(policies, Some("shop"), "b").await.unwrap();
    let kinds: Vec<(EventType, String)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let e = next(&mut all).await;
            v.push((
                e.kind,
                e.object["metadata"]["name"].as_str().unwrap().to_string(),
            ));
        }
        v
    };
    assert_eq!(
        kinds,
        [
            (EventType::Added, "b".into()),
            (EventType::Modified, "a".into()),
            (EventType::Deleted, "b".into())
        ]
    );
    assert_eq!(next(&mut only_b).await.kind, EventType::Added);
    assert_eq!(next(&mut only_b).await.kind, EventType::Deleted);

    // The server dies; changes made after it comes back still arrive, once each.
    server.kill();
    let mut server = Server::start(dir.path(), port);
    let c = server.client();
    c.create(policies, Some("shop"), &policy("c", 80))
        .await
        .unwrap();
    let e = next(&mut all).await;
    assert_eq!(
        (e.kind, e.object["metadata"]["name"].as_str().unwrap()),
        (EventType::Added, "c")
    );
    assert_eq!(e.revision, all.revision());

    // SIGTERM ends watches cleanly and exits 0.
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}
