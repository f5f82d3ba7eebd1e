//! `skiff bench proxy`: the latency one proxy hop adds, and what a proxy
//! core can carry, side by side on loopback against one backend: direct;
//! one Skiff proxy; a Skiff client+server pair with mTLS; haproxy; nginx.
//!
//! Latency comes from an open-loop generator: requests are due at fixed
//! times whatever the answers do, and a request delayed by the one before
//! it on its connection is timed from when it was due (no coordinated
//! omission). Throughput per core is wrk's closed-loop maximum divided by
//! the CPU time the proxy's processes used meanwhile.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Seconds of load per rate and path.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of wrk per path for the throughput figure.
    #[arg(long, default_value_t = 5)]
    pub max_seconds: u64,
    /// Open-loop rates (requests/s).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub rates: Vec<u32>,
    /// Measure only these paths besides direct (comma-separated):
    /// skiff, skiff_mtls_pair, haproxy, nginx. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print JSON (the only format; accepted for symmetry).
    #[arg(long)]
    pub json: bool,
}

/// A path under test: where requests go and which processes are the proxy.
struct Target {
    name: &'static str,
    url_addr: SocketAddr,
    children: Vec<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        // The whole tree: killing nginx's master alone orphans its workers.
        for c in &mut self.children {
            for pid in tree(c.id()).into_iter().rev() {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = c.wait();
        }
    }
}

pub fn run(args: &ProxyArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        args.seconds >= 1 && args.max_seconds >= 1,
        "--seconds and --max-seconds: at least 1"
    );
    for tool in ["haproxy", "nginx", "wrk"] {
        anyhow::ensure!(
            which(tool),
            "`{tool}` is needed as a peer or load tool: apt-get install haproxy nginx wrk"
        );
    }
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let backend_addr = free_port()?;
    let mut backend = Command::new(&exe)
        .args([
            "demo-app",
            "--name",
            "backend",
            "--listen",
            &backend_addr.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| {
        wait_http(backend_addr)?;
        let mut paths = serde_json::Map::new();
        let direct = measure(
            args,
            Target {
                name: "direct",
                url_addr: backend_addr,
                children: Vec::new(),
            },
        )?;
        let base = direct.clone();
        paths.insert("direct".into(), direct);
        let all: [(&str, Start); 4] = [
            ("skiff", skiff_one),
            ("skiff_mtls_pair", skiff_pair),
            ("haproxy", haproxy),
            ("nginx", nginx),
        ];
        if let Some(unknown) = args.only.iter().find(|o| !all.iter().any(|(n, _)| n == o)) {
            anyhow::bail!("--only {unknown}: expected skiff, skiff_mtls_pair, haproxy or nginx");
        }
        for (name, start) in all {
            if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
                continue;
            }
            let path = start(&exe, dir.path(), backend_addr)?;
            let name = path.name;
            let mut figures = measure(args, path).map_err(|e| {
                let log = std::fs::read_to_string(dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                anyhow::anyhow!("{name}: {e}\n{log}")
            })?;
            add_overhead(&mut figures, &base, &args.rates);
            eprintln!("{name}: {figures}");
            paths.insert(name.into(), figures);
        }
        Ok::<_, anyhow::Error>(paths)
    })();
    let _ = backend.kill();
    let _ = backend.wait();
    let paths = result?;
    let out = json!({
        "bench": "proxy",
        "backend": "skiff demo-app (one thread)",
        "seconds": args.seconds,
        "paths": paths,
    });
    println!("{out}");
    Ok(0)
}

/// Open-loop latency at each rate, then wrk's maximum and the CPU it cost.
fn measure(args: &ProxyArgs, path: Target) -> anyhow::Result<Value> {
    wait_http(path.url_addr)?;
    let pids: Vec<u32> = path.children.iter().flat_map(|c| tree(c.id())).collect();
    let idle_rss = rss_kb(&pids, "VmRSS");
    let mut figures = serde_json::Map::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    for &rate in &args.rates {
        // One second of warm-up at the rate, not counted.
        runtime.block_on(open_loop(path.url_addr, rate, Duration::from_secs(1)))?;
        let load = runtime.block_on(open_loop(
            path.url_addr,
            rate,
            Duration::from_secs(args.seconds),
        ))?;
        let k = if rate % 1000 == 0 {
            format!("{}k", rate / 1000)
        } else {
            rate.to_string()
        };
        figures.insert(format!("p50_ms_{k}"), json!(round3(load.percentile(0.50))));
        figures.insert(format!("p99_ms_{k}"), json!(round3(load.percentile(0.99))));
        figures.insert(format!("achieved_rps_{k}"), json!(round3(load.achieved)));
        figures.insert(format!("errors_{k}"), json!(load.errors));
        if !pids.is_empty() {
            figures.insert(format!("rss_mb_{k}"), json!(mb(rss_kb(&pids, "VmRSS"))));
        }
    }
    let cpu_before = cpu_seconds(&pids);
    let started = Instant::now();
    let rps = wrk(path.url_addr, args.max_seconds)?;
    let wall = started.elapsed().as_secs_f64();
    let cores = (cpu_seconds(&pids) - cpu_before) / wall;
    figures.insert("max_rps".into(), json!(round3(rps)));
    if pids.is_empty() {
        figures.insert("max_rps_per_core".into(), Value::Null);
        figures.insert("peak_rss_mb".into(), Value::Null);
    } else {
        figures.insert("proxy_cores_used".into(), json!(round3(cores)));
        figures.insert(
            "max_rps_per_core".into(),
            json!(round3(rps / cores.max(1e-3))),
        );
        figures.insert("idle_rss_mb".into(), json!(mb(idle_rss)));
        figures.insert("peak_rss_mb".into(), json!(mb(rss_kb(&pids, "VmHWM"))));
    }
    drop(path);
    Ok(Value::Object(figures))
}

fn add_overhead(figures: &mut Value, base: &Value, rates: &[u32]) {
    for &rate in rates {
        let k = if rate % 1000 == 0 {
            format!("{}k", rate / 1000)
        } else {
            rate.to_string()
        };
        for q in ["p50", "p99"] {
            let key = format!("{q}_ms_{k}");
            if let (Some(a), Some(b)) = (figures[&key].as_f64(), base[&key].as_f64()) {
                figures[format!("added_{key}")] = json!(round3(a - b));
            }
        }
    }
}

struct Load {
    /// Latencies in milliseconds, sorted.
    latencies: Vec<f64>,
    errors: u64,
    achieved: f64,
}

impl Load {
    fn percentile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i =
            ((self.latencies.len() as f64 * q).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i]
    }
}

/// `rate` requests per second for `duration`, each due at a fixed time,
/// spread over keep-alive connections that each carry every n-th request.
async fn open_loop(addr: SocketAddr, rate: u32, duration: Duration) -> anyhow::Result<Load> {
    // Enough connections that each has several ms between requests.
    let connections = (rate / 200).clamp(4, 64) as usize;
    let interval = Duration::from_secs_f64(connections as f64 / f64::from(rate));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + duration;
    let mut workers = Vec::new();
    for w in 0..connections {
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut sender = None;
            let mut due = start + interval.mul_f64(w as f64 / connections as f64);
            let mut previous_done = start;
            while due < end {
                tokio::time::sleep_until(due).await;
                let sent = tokio::time::Instant::now();
                // Late because our previous request had not come back: the
                // server delayed this one, so time it from when it was due.
                // Late by the timer alone: the generator's fault, not counted.
                let from = if previous_done > due { due } else { sent };
                // A peer may close a keep-alive connection between requests
                // (nginx after `keepalive_requests`): not a failed request.
                if sender.as_ref().is_none_or(|s: &Sender| s.is_closed()) {
                    sender = connect(addr).await.ok();
                }
                let ok = match sender.as_mut() {
                    Some(s) => get(s, addr).await.is_ok(),
                    None => false,
                };
                let done = tokio::time::Instant::now();
                if ok {
                    latencies.push((done - from).as_secs_f64() * 1e3);
                } else {
                    errors += 1;
                    sender = None;
                }
                previous_done = done;
                due += interval;
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = (tokio::time::Instant::now() - start).as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok(Load {
        achieved: all.len() as f64 / elapsed,
        latencies: all,
        errors,
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(sender: &mut Sender, addr: SocketAddr) -> anyhow::Result<()> {
    sender.ready().await?;
    let req = Request::get("/")
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    resp.into_body().collect().await?;
    Ok(())
}

/// Starts one path in front of the backend.
type Start = fn(&Path, &Path, SocketAddr) -> anyhow::Result<Target>;

fn skiff_one(exe: &Path, dir: &Path, backend: SocketAddr) -> anyhow::Result<Target> {
    let listen = free_port()?;
    let config = dir.join("skiff-one.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {}\noutbound: [{{listen: {listen}, service: backend}}]\nservices: {{backend: {{endpoints: [{{addr: {backend}}}]}}}}\n",
            free_port()?
        ),
    )?;
    Ok(Target {
        name: "skiff",
        url_addr: listen,
        children: vec![spawn_proxy(exe, &config, "skiff-one", dir)?],
    })
}

fn skiff_pair(exe: &Path, dir: &Path, backend: SocketAddr) -> anyhow::Result<Target> {
    let now = time::OffsetDateTime::now_utc();
    let ca = skiff_identity::Ca::generate("bench", now, Duration::from_secs(86_400))?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
    for sa in ["client", "server"] {
        let id = skiff_identity::SpiffeId::new("bench.local", "bench", sa)?;
        let (key, csr) = skiff_identity::workload_csr(&id)?;
        std::fs::write(dir.join(format!("{sa}.key")), key)?;
        std::fs::write(
            dir.join(format!("{sa}.crt")),
            ca.sign_workload(&csr, &id, now, Duration::from_secs(86_400))?,
        )?;
    }
    let identity = |sa: &str| {
        format!(
            "identity: {{caFile: {}, certFile: {}, keyFile: {}}}\n",
            dir.join("ca.crt").display(),
            dir.join(format!("{sa}.crt")).display(),
            dir.join(format!("{sa}.key")).display()
        )
    };
    let inbound = free_port()?;
    let server = dir.join("skiff-server.yaml");
    std::fs::write(
        &server,
        format!(
            "admin: {}\n{}inbound: [{{listen: {inbound}, app: {backend}}}]\n",
            free_port()?,
            identity("server")
        ),
    )?;
    let listen = free_port()?;
    let client = dir.join("skiff-client.yaml");
    std::fs::write(
        &client,
        format!(
            "admin: {}\n{}outbound: [{{listen: {listen}, service: backend}}]\nservices: {{backend: {{endpoints: [{{addr: {inbound}, identity: spiffe://bench.local/ns/bench/sa/server}}]}}}}\n",
            free_port()?,
            identity("client")
        ),
    )?;
    let server = spawn_proxy(exe, &server, "skiff-server", dir)?;
    let client = spawn_proxy(exe, &client, "skiff-client", dir)?;
    Ok(Target {
        name: "skiff_mtls_pair",
        url_addr: listen,
        children: vec![server, client],
    })
}

fn spawn_proxy(exe: &Path, config: &Path, name: &str, dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(Command::new(exe)
        .args(["proxy", "--config"])
        .arg(config)
        .env("SKIFF_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

fn haproxy(_exe: &Path, dir: &Path, backend: SocketAddr) -> anyhow::Result<Target> {
    let listen = free_port()?;
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\nfrontend fe\n  bind {listen}\n  default_backend be\nbackend be\n  http-reuse always\n  server s1 {backend}\n"
        ),
    )?;
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log"))?)
        .spawn()?;
    Ok(Target {
        name: "haproxy",
        url_addr: listen,
        children: vec![child],
    })
}

fn nginx(_exe: &Path, dir: &Path, backend: SocketAddr) -> anyhow::Result<Target> {
    let listen = free_port()?;
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let config = prefix.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\nerror_log {p}/logs/error.log;\npid {p}/nginx.pid;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  upstream be {{ server {backend}; keepalive 64; keepalive_requests 1000000; }}\n  keepalive_requests 1000000;\n  server {{\n    listen {listen};\n    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            p = prefix.display()
        ),
    )?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nginx.log"))?)
        .spawn()?;
    Ok(Target {
        name: "nginx",
        url_addr: listen,
        children: vec![child],
    })
}

/// Requests per second wrk reaches (1 thread, 64 connections).
fn wrk(addr: SocketAddr, seconds: u64) -> anyhow::Result<f64> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            "-c64",
            &format!("-d{seconds}s"),
            &format!("http://{addr}/"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("wrk printed no rate: {text}"))
}

fn wait_http(addr: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut last = String::new();
        for _ in 0..300 {
            match connect(addr).await {
                Ok(mut s) => match get(&mut s, addr).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("{addr} did not answer in 6 s: {last}")
    })
}

/// A process and its descendants (nginx's workers).
fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if ppid(child) == Some(parent) && !out.contains(&child) {
                    out.push(child);
                }
            }
        }
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(String::from).collect())
}

fn ppid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// User plus system CPU seconds of `pids`.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // Clock ticks are 100 per second on Linux x86-64 and arm64.
    pids.iter()
        .filter_map(|&p| {
            let f = stat_fields(p)?;
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .sum()
}

fn rss_kb(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

fn mb(kb: u64) -> f64 {
    round3(kb as f64 / 1024.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .any(|d| d.join(tool).is_file() || Path::new("/usr/sbin").join(tool).is_file())
    })
}
