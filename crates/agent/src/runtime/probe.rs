//! Health checks of one instance: an HTTP GET, a TCP connect, or a command
//! run inside the instance (its namespace, cgroup and user).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use skiff_api::net::PortRef;
use skiff_api::service::{Check, ServicePort};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How to reach into the instance for a command check.
#[derive(Debug, Clone)]
pub struct Inside {
    /// `skiff internal-exec` arguments up to (not including) the command.
    pub exec_prefix: Vec<String>,
    pub exe: std::path::PathBuf,
}

/// Runs one check; `Err` says why it failed.
pub async fn check(
    check: &Check,
    address: Ipv4Addr,
    ports: &[ServicePort],
    timeout: Duration,
    inside: &Inside,
) -> Result<(), String> {
    let outcome = tokio::time::timeout(timeout, async {
        match check {
            Check::Http { path, port } => {
                http(SocketAddr::new(address.into(), resolve(port, ports)?), path).await
            }
            Check::Tcp { port } => {
                let to = SocketAddr::new(address.into(), resolve(port, ports)?);
                TcpStream::connect(to)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("TCP connect to {to}: {e}"))
            }
            Check::Command(argv) => command(argv, inside).await,
        }
    })
    .await;
    match outcome {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs_f64())),
    }
}

fn resolve(port: &PortRef, ports: &[ServicePort]) -> Result<u16, String> {
    match port {
        PortRef::Number(n) => Ok(*n),
        PortRef::Name(name) => ports
            .iter()
            .find(|p| &p.name == name)
            .map(|p| p.port)
            .ok_or_else(|| format!("the service has no port named `{name}`")),
    }
}

/// A GET that passes on any 2xx or 3xx status, as Kubernetes' httpGet does.
pub(crate) async fn http(to: SocketAddr, path: &str) -> Result<(), String> {
    let mut s = send_get(to, path).await?;
    let mut head = vec![0u8; 256];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("HTTP GET {path} on {to}: {e}")),
        }
    }
    match status_of(&head[..n]) {
        Some(c) if (200..400).contains(&c) => Ok(()),
        Some(c) => Err(format!("HTTP GET {path} on {to}: status {c}")),
        None => Err(format!("HTTP GET {path} on {to}: not an HTTP answer")),
    }
}

/// A GET whose whole answer is read: the status and the body.
pub(crate) async fn get(to: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = send_get(to, path).await?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .await
        .map_err(|e| format!("HTTP GET {path} on {to}: {e}"))?;
    let not_http = || format!("HTTP GET {path} on {to}: not an HTTP answer");
    let status = status_of(&answer).ok_or_else(not_http)?;
    let at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(not_http)?;
    Ok((status, answer.split_off(at + 4)))
}

/// Connects and sends `GET path` (HTTP/1.1, the connection closed after).
async fn send_get(to: SocketAddr, path: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(to)
        .await
        .map_err(|e| format!("HTTP GET {path} on {to}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: skiff-probe\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("HTTP GET {path} on {to}: {e}"))?;
    Ok(s)
}

/// The status code of an HTTP/1 answer's first bytes.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = String::from_utf8_lossy(&head[..head.len().min(12)]);
    line.strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
}

async fn command(argv: &[String], inside: &Inside) -> Result<(), String> {
    let out = tokio::process::Command::new(&inside.exe)
        .args(&inside.exec_prefix)
        .arg("--")
        .args(argv)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run the check command: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    })
    .lines()
    .last()
    .unwrap_or_default()
    .to_string();
    Err(format!(
        "command {:?} failed ({}){}",
        argv.join(" "),
        out.status,
        if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_checks_pass_on_2xx_and_3xx_only() {
        let ok = server("HTTP/1.1 204 No Content\r\n\r\n").await;
        let moved = server("HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n").await;
        let bad = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let junk = server("SSH-2.0-OpenSSH\r\n").await;
        assert_eq!(http(ok, "/ready").await, Ok(()));
        assert_eq!(http(moved, "/ready").await, Ok(()));
        assert!(
            http(bad, "/ready")
                .await
                .unwrap_err()
                .contains("status 503")
        );
        assert!(
            http(junk, "/")
                .await
                .unwrap_err()
                .contains("not an HTTP answer")
        );
    }

    #[test]
    fn named_ports_resolve_against_the_service() {
        use skiff_api::service::AppProtocol;
        let ports = vec![ServicePort {
            name: "http".into(),
            port: 8080,
            protocol: AppProtocol::Http,
        }];
        assert_eq!(resolve(&PortRef::Name("http".into()), &ports), Ok(8080));
        assert_eq!(resolve(&PortRef::Number(9), &ports), Ok(9));
        assert!(resolve(&PortRef::Name("grpc".into()), &ports).is_err());
    }
}
