//! `skiff demo-app`: the demo shop's services. A small HTTP server that
//! answers who it is, checks its upstreams on `/`, and has health endpoints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct DemoAppArgs {
    /// The service's name, shown in answers.
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Services this one calls on `/` (repeatable): `name=http://host:port/path`.
    #[arg(long = "upstream")]
    pub upstreams: Vec<String>,
    /// Instead of HTTP: echo on these ports (comma-separated), TCP (each
    /// line back) and UDP (each datagram back). Policy tests use it.
    #[arg(long, value_delimiter = ',')]
    pub echo: Vec<u16>,
}

pub fn run(args: &DemoAppArgs) -> anyhow::Result<u8> {
    let upstreams: Vec<(String, String)> = args
        .upstreams
        .iter()
        .map(|u| {
            u.split_once('=')
                .map(|(n, url)| (n.to_string(), url.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--upstream {u:?}: expected name=url"))
        })
        .collect::<anyhow::Result<_>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if !args.echo.is_empty() {
        return runtime.block_on(echo(&args.name, &args.echo));
    }
    runtime.block_on(serve(args.name.clone(), args.listen, upstreams))
}

/// TCP and UDP echo on every port, until the process ends.
async fn echo(name: &str, ports: &[u16]) -> anyhow::Result<u8> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    for &port in ports {
        let tcp = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .map_err(|e| anyhow::anyhow!("listen on TCP {port}: {e}"))?;
        let udp = tokio::net::UdpSocket::bind(("0.0.0.0", port))
            .await
            .map_err(|e| anyhow::anyhow!("listen on UDP {port}: {e}"))?;
        tokio::spawn(async move {
            while let Ok((s, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], from).await;
            }
        });
    }
    println!("{name} echoing on {ports:?} (TCP and UDP)");
    std::future::pending::<()>().await;
    Ok(0)
}

async fn serve(
    name: String,
    listen: SocketAddr,
    upstreams: Vec<(String, String)>,
) -> anyhow::Result<u8> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {listen}: {e}"))?;
    println!("{name} listening on {listen}");
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let (tcp, _) = listener.accept().await?;
        let local = tcp.local_addr().ok();
        let (name, upstreams, client) = (name.clone(), upstreams.clone(), client.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (name, upstreams, client) = (name.clone(), upstreams.clone(), client.clone());
                async move {
                    Ok::<_, Infallible>(
                        answer(&name, local, &upstreams, &client, req.uri().path()).await,
                    )
                }
            });
            // HTTP/1.1 and HTTP/2 (prior knowledge), like most real services.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(
    name: &str,
    local: Option<SocketAddr>,
    upstreams: &[(String, String)],
    client: &Client<HttpConnector, Full<Bytes>>,
    path: &str,
) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" | "/ready" => (StatusCode::OK, json!({"ok": true})),
        "/" => {
            let mut calls = serde_json::Map::new();
            let mut all_ok = true;
            for (upstream, url) in upstreams {
                let got = call(client, url).await;
                all_ok &= got.is_ok();
                calls.insert(
                    upstream.clone(),
                    match got {
                        Ok(v) => v,
                        Err(e) => json!({"error": e}),
                    },
                );
            }
            let body = json!({
                "service": name,
                "address": local.map(|a| a.ip().to_string()),
                "upstreams": calls,
            });
            (
                if all_ok {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_GATEWAY
                },
                body,
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            json!({"error": format!("no route {path}")}),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<serde_json::Value, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(2), client.request(req))
        .await
        .map_err(|_| format!("{url}: no answer within 2s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{url}: status {status}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{url}: {e}"))
}
