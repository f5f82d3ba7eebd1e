//! The agent's endpoint, on the node's address: `GET /logs/{namespace}/{instance}?tail=N&follow=true`
//! (an instance's output) and `GET /flows?follow=true` (what network
//! policy denied or audited, as JSON lines) for the API server, which signs
//! each request with the join token (see `skiff_identity::signed`); and
//! `GET /metrics` (Prometheus text, no secrets in it) for anyone.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use skiff_identity::signed;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

/// Serves logs under `logs` (and flows and metrics, where policy is
/// enforced) until the process ends.
pub async fn serve(
    listener: TcpListener,
    logs: PathBuf,
    token: String,
    enforcer: Option<std::sync::Arc<crate::policy::Enforcer>>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (logs, token, enforcer) = (logs.clone(), token.clone(), enforcer.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (logs, token, enforcer) = (logs.clone(), token.clone(), enforcer.clone());
                async move {
                    Ok::<_, Infallible>(answer(&logs, &token, enforcer.as_deref(), &req).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

async fn answer(
    logs: &Path,
    token: &str,
    enforcer: Option<&crate::policy::Enforcer>,
    req: &Request<hyper::body::Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/metrics" {
        let text = enforcer.map(|e| e.metrics()).unwrap_or_default();
        let mut r = plain(StatusCode::OK, text);
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return r;
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let sent: u64 = header(signed::TIME_HEADER).parse().unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if !signed::verify(
        token,
        req.method().as_str(),
        path_and_query,
        sent,
        now,
        header(signed::SIGNATURE_HEADER),
    ) {
        return plain(
            StatusCode::UNAUTHORIZED,
            "not signed by the control plane\n".into(),
        );
    }
    if req.uri().path() == "/flows" {
        let follow = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .any(|p| p == "follow=true");
        return match enforcer {
            Some(e) => flows(e, follow),
            None => plain(
                StatusCode::NOT_FOUND,
                "network policy is not enforced on this node\n".into(),
            ),
        };
    }
    let segments: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let ["logs", ns, name] = segments.as_slice() else {
        return plain(
            StatusCode::NOT_FOUND,
            "paths look like /logs/NAMESPACE/INSTANCE\n".into(),
        );
    };
    if !skiff_api::meta::is_dns_subdomain(ns) || !skiff_api::meta::is_dns_subdomain(name) {
        return plain(
            StatusCode::BAD_REQUEST,
            "bad namespace or instance name\n".into(),
        );
    }
    let (mut tail, mut follow) = (None, false);
    for pair in req.uri().query().unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("tail", n)) => tail = n.parse::<usize>().ok(),
            Some(("follow", v)) => follow = v == "true",
            _ => {}
        }
    }
    let file = logs.join(ns).join(name).join("output.log");
    let text = match tokio::fs::read(&file).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return plain(
                StatusCode::NOT_FOUND,
                format!("no log for {ns}/{name} on this node\n"),
            );
        }
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    let start = tail.map_or(0, |n| tail_start(&text, n));
    let first = Bytes::copy_from_slice(&text[start..]);
    if !follow {
        return Response::new(Full::new(first).map_err(|e| match e {}).boxed());
    }
    // Following: what is there, then whatever is appended, polled; a
    // rotation (the file got shorter) starts over on the new file.
    let state = (Some(first), file, text.len() as u64);
    let stream = futures_util::stream::unfold(state, |(pending, file, mut offset)| async move {
        if let Some(b) = pending {
            return Some((Ok(Frame::data(b)), (None, file, offset)));
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let len = tokio::fs::metadata(&file)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            if len < offset {
                offset = 0;
            }
            if len > offset {
                let mut f = match tokio::fs::File::open(&file).await {
                    Ok(f) => f,
                    Err(e) => return Some((Err(e), (None, file, offset))),
                };
                if let Err(e) = f.seek(std::io::SeekFrom::Start(offset)).await {
                    return Some((Err(e), (None, file, offset)));
                }
                let mut buf = vec![0u8; (len - offset).min(1 << 20) as usize];
                let n = match f.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => return Some((Err(e), (None, file, offset))),
                };
                buf.truncate(n);
                return Some((
                    Ok(Frame::data(Bytes::from(buf))),
                    (None, file, offset + n as u64),
                ));
            }
        }
    });
    Response::new(StreamBody::new(stream).boxed())
}

/// The recent flows as JSON lines; with `follow`, then each new one (and a
/// `{"lost": n}` line when this reader fell behind and missed some).
fn flows(enforcer: &crate::policy::Enforcer, follow: bool) -> Response<Body> {
    let (recent, rx) = enforcer.flows();
    let mut text = String::new();
    for f in &recent {
        text.push_str(&serde_json::to_string(f).unwrap_or_default());
        text.push('\n');
    }
    if !follow {
        return Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    }
    let first = futures_util::stream::once(async move {
        Ok::<_, std::io::Error>(Frame::data(Bytes::from(text)))
    });
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = match rx.recv().await {
            Ok(f) => serde_json::to_string(&f).unwrap_or_default(),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => format!("{{\"lost\":{n}}}"),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Frame::data(Bytes::from(line + "\n"))), rx))
    });
    let both = futures_util::StreamExt::chain(first, rest);
    Response::new(StreamBody::new(both).boxed())
}

/// Where the last `n` lines of `text` begin.
fn tail_start(text: &[u8], n: usize) -> usize {
    if n == 0 {
        return text.len();
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::tail_start;

    #[test]
    fn tail_counts_lines_from_the_end() {
        let t = b"a\nb\nc\n";
        assert_eq!(&t[tail_start(t, 1)..], b"c\n");
        assert_eq!(&t[tail_start(t, 2)..], b"b\nc\n");
        assert_eq!(&t[tail_start(t, 9)..], t);
        assert_eq!(&t[tail_start(t, 0)..], b"");
        assert_eq!(&b"x\ny"[tail_start(b"x\ny", 1)..], b"y");
    }
}
