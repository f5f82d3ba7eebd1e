//! The proxy end to end on loopback: real sockets, real TLS, backends and
//! proxies in this process. Each test picks its own ports.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions: a failed unwrap is the test failing"
)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// A backend that answers its name, counts requests, and can be killed
/// (listener and every open connection) at once.
struct Backend {
    addr: SocketAddr,
    posts: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Backend {
    /// `fail_posts`: answer every POST with 503 (as an overloaded app would).
    async fn start(name: &'static str, fail_posts: bool) -> Backend {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let posts = Arc::new(AtomicUsize::new(0));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (p, t) = (posts.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = socket.accept().await else {
                    return;
                };
                let posts = p.clone();
                let conn = tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let posts = posts.clone();
                            async move {
                                let post = req.method() == hyper::Method::POST;
                                // `/headers`: what the app was told about its caller.
                                let told = if req.uri().path() == "/headers" {
                                    ["x-forwarded-for", "x-skiff-client-id"]
                                        .iter()
                                        .map(|h| {
                                            let v =
                                                req.headers().get(*h).and_then(|v| v.to_str().ok());
                                            format!("\n{h}: {}", v.unwrap_or("-"))
                                        })
                                        .collect::<String>()
                                } else {
                                    String::new()
                                };
                                let _ = req.into_body().collect().await;
                                let mut resp =
                                    Response::new(Full::new(Bytes::from(format!("{name}{told}"))));
                                if post {
                                    posts.fetch_add(1, Ordering::SeqCst);
                                    if fail_posts {
                                        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
                t.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Backend { addr, posts, tasks }
    }

    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct Proxy {
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Proxy {
    async fn start(yaml: &str) -> Proxy {
        let admin = free_port();
        let config = skiff_proxy::config::Config::parse(&format!("admin: {admin}\n{yaml}"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = tokio::spawn(skiff_proxy::run(config, async move {
            let _ = rx.await;
        }));
        let proxy = Proxy {
            admin,
            stop: Some(tx),
            done,
        };
        let client = client();
        for _ in 0..200 {
            if let Ok(r) = client
                .get(format!("http://{admin}/ready").parse().unwrap())
                .await
                && r.status() == StatusCode::OK
            {
                return proxy;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("proxy not ready");
    }

    async fn metrics(&self) -> String {
        let r = client()
            .get(format!("http://{}/metrics", self.admin).parse().unwrap())
            .await
            .unwrap();
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
) -> Result<(StatusCode, String), String> {
    call_with(client, method, url, &[]).await
}

async fn call_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, String), String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from_static(b"x"))).unwrap();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A proxy's config: `listen` sends to service `name`, whose one endpoint
/// is `addr`.
fn outbound_to(listen: SocketAddr, name: &str, addr: SocketAddr) -> String {
    format!(
        "outbound: [{{listen: {listen}, service: {name}}}]\nservices: {{{name}: {{endpoints: [{{addr: {addr}}}]}}}}\n"
    )
}

fn endpoints(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| format!("{{addr: {}}}", b.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_cross_one_proxy_to_every_backend() {
    let a = Backend::start("a", false).await;
    let b = Backend::start("b", false).await;
    let listen = free_port();
    let proxy = Proxy::start(&format!(
        "outbound: [{{listen: {listen}, service: web}}]\nservices: {{web: {{endpoints: [{}]}}}}\n",
        endpoints(&[&a, &b])
    ))
    .await;
    let h1 = client();
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let c = if i % 2 == 0 { &h1 } else { &h2 };
        let (status, body) = call(c, "GET", &format!("http://{listen}/")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        seen.insert(body);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["a", "b"]);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("skiff_proxy_requests_total{direction=\"outbound\""),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_retried_unless_its_route_opts_in() {
    let failing = Backend::start("failing", true).await;
    let listen = free_port();
    let proxy = Proxy::start(&format!(
        "outbound: [{{listen: {listen}, service: web}}]\nservices: {{web: {{endpoints: [{}]}}}}\n",
        endpoints(&[&failing])
    ))
    .await;
    let c = client();
    let (status, _) = call(&c, "POST", &format!("http://{listen}/order"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        failing.posts.load(Ordering::SeqCst),
        1,
        "the POST reached the app more than once"
    );
    proxy.stop().await;

    // A route that opts in retries POSTs.
    let listen = free_port();
    let proxy = Proxy::start(&format!(
        "outbound: [{{listen: {listen}, routes: [{{name: orders, backends: [{{service: web}}], retry: {{attempts: 2, nonIdempotent: true}}}}]}}]\nservices: {{web: {{endpoints: [{}]}}}}\n",
        endpoints(&[&failing])
    ))
    .await;
    failing.posts.store(0, Ordering::SeqCst);
    let (status, _) = call(&c, "POST", &format!("http://{listen}/order"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failing.posts.load(Ordering::SeqCst), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_backends_under_load_fails_no_get() {
    let backends = [
        Backend::start("a", false).await,
        Backend::start("b", false).await,
        Backend::start("c", false).await,
    ];
    let listen = free_port();
    let proxy = Proxy::start(&format!(
        "outbound: [{{listen: {listen}, service: web}}]\nservices: {{web: {{endpoints: [{}]}}}}\n",
        endpoints(&backends.iter().collect::<Vec<_>>())
    ))
    .await;
    let load = Load::start(8, listen, false);
    load.wait_ok(500).await;
    backends[1].kill();
    let at_kill = load.ok();
    load.wait_ok(at_kill + 2000).await;
    assert_eq!(load.finish().await, Vec::<String>::new());
    let metrics = proxy.metrics().await;
    let retries = metric_sum(&metrics, "skiff_proxy_retries_total");
    assert!(
        retries >= 1.0,
        "the kill was survived without any retry?\n{metrics}"
    );
    proxy.stop().await;
}

/// Two proxies with identities from one CA: client side (outbound) and
/// server side (inbound, in front of the backend).
struct Mesh {
    _dir: tempfile::TempDir,
    ca: skiff_identity::Ca,
    client_files: (std::path::PathBuf, std::path::PathBuf),
    server_files: (std::path::PathBuf, std::path::PathBuf),
    ca_file: std::path::PathBuf,
}

impl Mesh {
    fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = skiff_identity::Ca::generate("test", now, Duration::from_secs(86_400)).unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let files = |n: &str| {
            (
                dir.path().join(format!("{n}.crt")),
                dir.path().join(format!("{n}.key")),
            )
        };
        let mesh = Mesh {
            client_files: files("client"),
            server_files: files("server"),
            ca_file,
            ca,
            _dir: dir,
        };
        mesh.issue("web", Duration::from_secs(3600));
        mesh.issue("db", Duration::from_secs(3600));
        mesh
    }

    /// Writes a fresh certificate for `web` (client) or `db` (server).
    fn issue(&self, sa: &str, validity: Duration) {
        let id = skiff_identity::SpiffeId::new("td", "shop", sa).unwrap();
        let (key, csr) = skiff_identity::workload_csr(&id).unwrap();
        let cert = self
            .ca
            .sign_workload(&csr, &id, time::OffsetDateTime::now_utc(), validity)
            .unwrap();
        let (c, k) = if sa == "web" {
            &self.client_files
        } else {
            &self.server_files
        };
        // Key first, then certificate: a reader between the two writes sees
        // a mismatched pair, refuses it and keeps the old one.
        std::fs::write(k, key).unwrap();
        std::fs::write(c, cert).unwrap();
    }

    /// A client-side proxy on `outbound` calling the server proxy on
    /// `inbound`, which must prove `…/sa/db`.
    fn client_config(&self, outbound: SocketAddr, inbound: SocketAddr) -> String {
        format!(
            "{}outbound: [{{listen: {outbound}, service: db}}]\nservices: {{db: {{endpoints: [{{addr: {inbound}, identity: spiffe://td/ns/shop/sa/db}}]}}}}\n",
            self.identity(&self.client_files)
        )
    }

    fn identity(&self, files: &(std::path::PathBuf, std::path::PathBuf)) -> String {
        format!(
            "identity: {{caFile: {}, certFile: {}, keyFile: {}}}\n",
            self.ca_file.display(),
            files.0.display(),
            files.1.display()
        )
    }
}

/// A protocol where the server speaks first (SMTP, MySQL) through the
/// mTLS pair: the client's proxy carries it as bytes (`protocol: tcp`) and
/// tells the server's proxy so by ALPN, which then does not wait for the
/// client's first bytes (its detection timeout here is 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_crosses_the_mtls_pair_without_waiting() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let banner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = banner.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = banner.accept().await {
            let _ = tcp.write_all(b"220 ready\r\n").await;
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
        }
    });
    let mesh = Mesh::new();
    let inbound = free_port();
    let _server = Proxy::start(&format!(
        "{}inbound: [{{listen: {inbound}, app: {app}}}]\ntimeouts: {{detectMs: 60000}}\n",
        mesh.identity(&mesh.server_files),
    ))
    .await;
    let outbound = free_port();
    let _client = Proxy::start(
        &mesh
            .client_config(outbound, inbound)
            .replace("service: db}", "service: db, protocol: tcp}"),
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let mut greeting = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut greeting))
        .await
        .expect("the banner never came: the server's proxy waited for the client")
        .unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_pair_carries_identity_and_refuses_plaintext() {
    let backend = Backend::start("db", false).await;
    let mesh = Mesh::new();
    let inbound = free_port();
    let server = Proxy::start(&format!(
        "{}inbound: [{{listen: {inbound}, app: {}, allowedIdentities: [spiffe://td/ns/shop/sa/web], http: [{{policy: shop/read-only, methods: [GET]}}]}}]\n",
        mesh.identity(&mesh.server_files),
        backend.addr
    ))
    .await;
    let outbound = free_port();
    let client_proxy = Proxy::start(&mesh.client_config(outbound, inbound)).await;
    let c = client();
    assert_eq!(
        call(&c, "GET", &format!("http://{outbound}/"))
            .await
            .unwrap(),
        (StatusCode::OK, "db".into())
    );
    // The app learns who called: the verified identity (a forged header
    // is replaced) and the caller's address.
    let headers = call_with(
        &c,
        "GET",
        &format!("http://{outbound}/headers"),
        &[("x-skiff-client-id", "spiffe://td/ns/shop/sa/admin")],
    )
    .await
    .unwrap();
    assert_eq!(
        headers,
        (
            StatusCode::OK,
            "db\nx-forwarded-for: 127.0.0.1\nx-skiff-client-id: spiffe://td/ns/shop/sa/web".into()
        )
    );
    // L7 policy: the inbound side refuses POST from this identity.
    let (status, body) = call(&c, "POST", &format!("http://{outbound}/"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("shop/read-only"), "{body}");
    // The denial is kept for the agent to collect, with who asked what.
    let (status, denials) = call(
        &c,
        "GET",
        &format!("http://{}/denials?after=0", server.admin),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    let denials: serde_json::Value = serde_json::from_str(&denials).unwrap();
    let d = &denials["denials"][0];
    assert_eq!(
        (
            d["method"].as_str(),
            d["path"].as_str(),
            d["policy"].as_str(),
            d["peer"].as_str()
        ),
        (
            Some("POST"),
            Some("/"),
            Some("shop/read-only"),
            Some("spiffe://td/ns/shop/sa/web")
        )
    );
    assert_eq!(denials["next"], 1);
    // Plaintext straight to the meshed port: refused, with a reason.
    let (status, body) = call(&c, "GET", &format!("http://{inbound}/"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("only mTLS"), "{body}");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("peer=\"spiffe://td/ns/shop/sa/web\",tls=\"true\",status=\"200\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("skiff_proxy_identity_cert_expiry_timestamp_seconds"),
        "{metrics}"
    );

    // A client whose certificate comes from another CA gets nothing.
    let other = Mesh::new();
    let outbound2 = free_port();
    let impostor = Proxy::start(&other.client_config(outbound2, inbound)).await;
    let (status, body) = call(&c, "GET", &format!("http://{outbound2}/"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    impostor.stop().await;
    client_proxy.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_with_no_failed_request() {
    let backend = Backend::start("db", false).await;
    let mesh = Mesh::new();
    mesh.issue("web", Duration::from_secs(120));
    mesh.issue("db", Duration::from_secs(120));
    let inbound = free_port();
    let server = Proxy::start(&format!(
        "{}inbound: [{{listen: {inbound}, app: {}}}]\n",
        mesh.identity(&mesh.server_files),
        backend.addr
    ))
    .await;
    let outbound = free_port();
    let client_proxy = Proxy::start(&mesh.client_config(outbound, inbound)).await;
    let expiry = |m: &str| metric_sum(m, "skiff_proxy_identity_cert_expiry_timestamp_seconds");
    let before = (
        expiry(&client_proxy.metrics().await),
        expiry(&server.metrics().await),
    );

    // Half the callers open a new connection per request, so new
    // connections keep arriving throughout the rotation.
    let load = Load::start(4, outbound, true);
    load.wait_ok(200).await;
    mesh.issue("web", Duration::from_secs(7200));
    mesh.issue("db", Duration::from_secs(7200));
    let mut rotated = false;
    for _ in 0..100 {
        let now = (
            expiry(&client_proxy.metrics().await),
            expiry(&server.metrics().await),
        );
        if now.0 > before.0 + 3000.0 && now.1 > before.1 + 3000.0 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rotated,
        "the proxies did not pick up the renewed certificates"
    );
    let at_rotation = load.ok();
    load.wait_ok(at_rotation + 300).await;
    assert_eq!(load.finish().await, Vec::<String>::new());
    client_proxy.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_with_no_endpoints_answers_503_and_weights_split() {
    let a = Backend::start("a", false).await;
    let b = Backend::start("b", false).await;
    let listen = free_port();
    let proxy = Proxy::start(&format!(
        "outbound: [{{listen: {listen}, routes: [
  {{name: empty, matches: [{{pathPrefix: /empty}}], backends: [{{service: none}}]}},
  {{name: split, backends: [{{service: a, weight: 1}}, {{service: b, weight: 3}}]}}]}}]
services: {{none: {{endpoints: []}}, a: {{endpoints: [{}]}}, b: {{endpoints: [{}]}}}}\n",
        endpoints(&[&a]),
        endpoints(&[&b])
    ))
    .await;
    let c = client();
    let (status, body) = call(&c, "GET", &format!("http://{listen}/empty/x"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("service none has no ready endpoints"),
        "{body}"
    );
    let mut to_b = 0;
    for _ in 0..400 {
        if call(&c, "GET", &format!("http://{listen}/"))
            .await
            .unwrap()
            .1
            == "b"
        {
            to_b += 1;
        }
    }
    // 3/4 expected; 400 draws put this outside 240..360 with odds below 1e-6.
    assert!((240..=360).contains(&to_b), "{to_b} of 400 went to b");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_and_websocket_upgrades_pass_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo server that first answers an HTTP upgrade, or echoes raw bytes.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET /ws") {
                    let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n").await;
                } else {
                    let _ = s.write_all(&buf[..n]).await;
                }
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let listen = free_port();
    let proxy = Proxy::start(&outbound_to(listen, "echo", echo_addr)).await;
    // Opaque: a binary protocol's bytes come back unchanged.
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    s.write_all(b"\x00\x01binary\xff").await.unwrap();
    let mut got = [0u8; 9];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"\x00\x01binary\xff");
    // WebSocket: after 101 the connection carries frames both ways.
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"frame").await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"frame");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_finishes_requests_in_flight_and_closes_keepalive() {
    // A slow backend: answers after 300 ms.
    let slow = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = slow.accept().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"done"),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    let listen = free_port();
    let proxy = Proxy::start(&format!(
        "{}drainSeconds: 5\n",
        outbound_to(listen, "slow", slow_addr)
    ))
    .await;
    let c = client();
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { call(&c, "GET", &format!("http://{listen}/")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(proxy.stop());
    let result = in_flight.await.unwrap().unwrap();
    assert_eq!(result, (StatusCode::OK, "done".into()));
    stopping.await.unwrap();
}

/// Callers sending GETs in a loop until finished; any answer but 200 is a
/// failure.
struct Load {
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    callers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `fresh_connections`: every other caller opens a connection per request.
    fn start(callers: usize, to: SocketAddr, fresh_connections: bool) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let callers = (0..callers)
            .map(|k| {
                let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                tokio::spawn(async move {
                    let c = if fresh_connections && k % 2 == 1 {
                        Client::builder(TokioExecutor::new())
                            .pool_max_idle_per_host(0)
                            .build_http()
                    } else {
                        client()
                    };
                    while !stop.load(Ordering::SeqCst) {
                        match call(&c, "GET", &format!("http://{to}/")).await {
                            Ok((StatusCode::OK, _)) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            other => failures.lock().unwrap().push(format!("{other:?}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            ok,
            failures,
            stop,
            callers,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    async fn wait_ok(&self, n: usize) {
        wait_for(|| self.ok() >= n).await;
    }

    /// Stops the callers; returns the failures they saw.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.callers {
            c.await.unwrap();
        }
        self.failures.lock().unwrap().clone()
    }
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met in 30 s");
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A backend written byte by byte: it answers each request head with the
/// canned response its path names, framed as real apps frame them, and
/// counts the connections it accepted. `/early` sends a 103 and holds its
/// final response until the returned `Notify` is notified.
async fn raw_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<tokio::sync::Notify>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let release = Arc::new(tokio::sync::Notify::new());
    let released = release.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = socket.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let released = released.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    if path == "/early" {
                        let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n";
                        if tcp.write_all(hints).await.is_err() {
                            return;
                        }
                        released.notified().await;
                    }
                    let (reply, then_close): (&[u8], bool) = match path.as_str() {
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
                            false,
                        ),
                        "/early" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly", false),
                        "/hints" => (
                            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints",
                            false,
                        ),
                        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", false),
                        "/close" => (
                            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose",
                            true,
                        ),
                        "/eof" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
                        // Answers, then drops the idle connection soon after
                        // (a short keep-alive timeout).
                        "/brief" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nbrief", true),
                        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
                    };
                    if tcp.write_all(reply).await.is_err() {
                        return;
                    }
                    if then_close {
                        if path == "/brief" {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted, release)
}

/// Writes `request` on a new connection and reads until the proxy closes it.
async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("the proxy did not close the connection: {request:?}"))
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_bodies_cross_as_framed_and_upstream_connections_are_reused() {
    let (backend, accepted, release) = raw_backend().await;
    let listen = free_port();
    let proxy = Proxy::start(&outbound_to(listen, "raw", backend)).await;
    // Pipelined requests on one connection, answered in order: a chunked
    // body with trailers (its bogus content-length dropped), a 1xx before
    // the final response, a HEAD whose content-length has no body.
    let got = raw_exchange(
        listen,
        "GET /chunked HTTP/1.1\r\nHost: raw\r\n\r\nGET /hints HTTP/1.1\r\nHost: raw\r\n\r\nHEAD /head HTTP/1.1\r\nHost: raw\r\n\r\nGET / HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        got,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n\
         HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints\
         HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok"
    );
    // All four went over one upstream connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // A body that ends when the upstream closes ends the client's
    // connection too; an upstream `Connection: close` does not.
    let got = raw_exchange(listen, "GET /eof HTTP/1.1\r\nHost: raw\r\n\r\n").await;
    assert_eq!(
        got,
        "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end"
    );
    let h1 = client();
    for _ in 0..3 {
        let (status, body) = call(&h1, "GET", &format!("http://{listen}/close"))
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "close"));
    }
    // An idle upstream connection the app dropped is not used again: each
    // request after the app's keep-alive timeout still succeeds, POSTs too.
    for method in ["GET", "POST", "GET", "POST"] {
        let (status, body) = call(&h1, method, &format!("http://{listen}/brief"))
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "brief"),
            "{method}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A 1xx reaches the client as it arrives, ahead of the final response
    // the app still holds.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        tcp.write_all(b"GET /early HTTP/1.1\r\nHost: raw\r\n\r\n")
            .await
            .unwrap();
        let hints = "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n";
        let mut got = vec![0u8; hints.len()];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut got))
            .await
            .expect("the 103 was held back until the final response")
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&got), hints);
        release.notify_one();
        let last = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly";
        let mut got = vec![0u8; last.len()];
        tcp.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), last);
    }
    // A request is counted once its response is written: the client may
    // have read the last one before the proxy's task gets to count it.
    let expected = 4.0 + 1.0 + 3.0 + 4.0 + 1.0;
    let mut metrics = proxy.metrics().await;
    for _ in 0..500 {
        if metric_sum(&metrics, "skiff_proxy_requests_total") >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        metrics = proxy.metrics().await;
    }
    assert_eq!(
        metric_sum(&metrics, "skiff_proxy_requests_total"),
        expected,
        "{metrics}"
    );
    proxy.stop().await;
}

/// The client gives up while the app still holds the response: the proxy
/// closes its upstream connection at once, so the app sees it (and a
/// connection is not held for the request timeout), on the HTTP/1.1 fast
/// path and through hyper.
/// Events from [`silent_app`]: bytes read, and connections closed.
type Heard = (
    tokio::sync::mpsc::UnboundedReceiver<usize>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
);

/// An app that reads and never answers, and tells how many bytes it read
/// and when a connection of its closes.
async fn silent_app() -> (SocketAddr, Heard) {
    use tokio::io::AsyncReadExt;
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    let (got_tx, got) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = app.accept().await {
            let (closed, got) = (closed_tx.clone(), got_tx.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    let _ = got.send(n);
                }
                let _ = closed.send(());
            });
        }
    });
    (addr, (got, closed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_the_upstream_connection_at_once() {
    use tokio::io::AsyncWriteExt;
    let (app_addr, (mut got, mut closed)) = silent_app().await;
    let listen = free_port();
    let proxy = Proxy::start(&format!(
        "timeouts: {{requestMs: {}}}\n{}",
        60000,
        outbound_to(listen, "app", app_addr)
    ))
    .await;
    let within = Duration::from_secs(5);

    // The request reaches the app, then the client closes. A chunked body
    // is not the fast path's: that one goes through hyper.
    let requests: [(&str, &[u8]); 2] = [
        ("fast path", b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n"),
        (
            "hyper",
            b"POST /slow HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        ),
    ];
    for (path, request) in requests {
        while got.try_recv().is_ok() {}
        let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        tcp.write_all(request).await.unwrap();
        tokio::time::timeout(within, got.recv()).await.unwrap();
        drop(tcp);
        tokio::time::timeout(within, closed.recv())
            .await
            .unwrap_or_else(|_| panic!("{path}: the app's connection outlived the client"));
    }
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("status=\"499\""), "{metrics}");
    proxy.stop().await;
}

/// No response head by the request timeout: 504, on the fast path,
/// whether the timeout is shorter than the wait before the client is
/// watched or longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_answered_in_time_gets_504() {
    let (app_addr, _heard) = silent_app().await;
    for timeout_ms in [5, 300] {
        let listen = free_port();
        let proxy = Proxy::start(&format!(
            "timeouts: {{requestMs: {}}}\n{}",
            timeout_ms,
            outbound_to(listen, "app", app_addr)
        ))
        .await;
        let got = raw_exchange(
            listen,
            "POST /slow HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 504 "), "{timeout_ms} ms: {got}");
        proxy.stop().await;
    }
}
