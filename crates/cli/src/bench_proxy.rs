//! `skiff bench proxy`: the latency one proxy hop adds, and what a proxy
//! core can carry, side by side on loopback against one backend: direct;
//! one Skiff proxy; a Skiff client+server pair with mTLS; haproxy; nginx.
//!
//! Latency comes from an open-loop generator: requests are due at fixed
//! times whatever the answers do, and a request delayed by the one before
//! it on its connection is timed from when it was due (no coordinated
//! omission). All paths run at once and take turns in one-second slices
//! (see [`SLICE`] and [`SLICES_RUN_PER_KEPT`]). Throughput per core is
//! wrk's closed-loop maximum divided by the CPU time the proxy's processes
//! used meanwhile.

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
    /// Where its processes write what goes wrong.
    logs: Vec<std::path::PathBuf>,
}

impl Target {
    /// `e`, naming this path, with what its processes logged.
    fn failed(&self, e: anyhow::Error) -> anyhow::Error {
        let logs: String = self
            .logs
            .iter()
            .filter_map(|l| std::fs::read_to_string(l).ok())
            .collect();
        anyhow::anyhow!("{}: {e}\n{logs}", self.name)
    }
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
    let all: [(&str, Start); 4] = [
        ("skiff", skiff_one),
        ("skiff_mtls_pair", skiff_pair),
        ("haproxy", haproxy),
        ("nginx", nginx),
    ];
    if let Some(unknown) = args.only.iter().find(|o| !all.iter().any(|(n, _)| n == o)) {
        anyhow::bail!("--only {unknown}: expected skiff, skiff_mtls_pair, haproxy or nginx");
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
        let mut targets = vec![Target {
            name: "direct",
            url_addr: backend_addr,
            children: Vec::new(),
            logs: Vec::new(),
        }];
        for (name, start) in all {
            if args.only.is_empty() || args.only.iter().any(|o| o == name) {
                targets.push(start(&exe, dir.path(), backend_addr)?);
            }
        }
        measure(args, &targets)
    })();
    let _ = backend.kill();
    let _ = backend.wait();
    let paths = result?;
    let out = json!({
        "bench": "proxy",
        "backend": "skiff demo-app (one thread)",
        "seconds": args.seconds,
        "slice_seconds": SLICE.as_secs_f64(),
        "slices_run_per_kept": SLICES_RUN_PER_KEPT,
        "paths": paths,
    });
    println!("{out}");
    Ok(0)
}

/// The load at each rate is given in slices of this length, taking the
/// paths in turn, so that whatever else the machine does meanwhile falls
/// on every path alike rather than on whichever ran at that moment.
const SLICE: Duration = Duration::from_secs(1);

/// Slices run per slice kept. On a virtual machine the host may take the
/// CPU away (steal time, in /proc/stat) for tens of milliseconds at a
/// time; a request caught by that waits whatever the proxy does. Each path
/// runs twice the slices asked for, and the half in which the host stole
/// least is kept. The steal of the kept slices is reported.
const SLICES_RUN_PER_KEPT: usize = 2;

/// Open-loop latency of every path at each rate (interleaved, see
/// [`SLICE`]), then each path's wrk maximum and the CPU it cost.
fn measure(args: &ProxyArgs, targets: &[Target]) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut pids = Vec::new();
    let mut figures = Vec::new();
    for t in targets {
        wait_http(t.url_addr).map_err(|e| t.failed(e))?;
        let p: Vec<u32> = t.children.iter().flat_map(|c| tree(c.id())).collect();
        let mut f = serde_json::Map::new();
        if !p.is_empty() {
            f.insert("idle_rss_mb".into(), json!(mb(rss_kb(&p, "VmRSS"))));
            f.insert("idle_anon_rss_mb".into(), json!(mb(rss_kb(&p, "RssAnon"))));
        }
        pids.push(p);
        figures.push(f);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    for &rate in &args.rates {
        let mut conns: Vec<Connections> = targets.iter().map(|_| Connections::new(rate)).collect();
        // One second of warm-up per path, not counted.
        for (t, c) in targets.iter().zip(&mut conns) {
            runtime
                .block_on(open_loop(t.url_addr, rate, Duration::from_secs(1), c))
                .map_err(|e| t.failed(e))?;
        }
        let kept =
            (Duration::from_secs(args.seconds).as_secs_f64() / SLICE.as_secs_f64()).ceil() as usize;
        let mut slices: Vec<Vec<(u64, Load)>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..kept * SLICES_RUN_PER_KEPT {
            // A different order each round: no path always follows another.
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let stolen = steal_ticks();
                let slice = runtime
                    .block_on(open_loop(targets[i].url_addr, rate, SLICE, &mut conns[i]))
                    .map_err(|e| targets[i].failed(e))?;
                slices[i].push((steal_ticks().saturating_sub(stolen), slice));
            }
        }
        let k = rate_key(rate);
        for ((f, run), p) in figures.iter_mut().zip(slices).zip(&pids) {
            let (mut load, stolen) = least_stolen(run, kept);
            load.latencies.sort_by(f64::total_cmp);
            f.insert(format!("p50_ms_{k}"), json!(round3(load.percentile(0.50))));
            f.insert(format!("p90_ms_{k}"), json!(round3(load.percentile(0.90))));
            f.insert(format!("p99_ms_{k}"), json!(round3(load.percentile(0.99))));
            f.insert(
                format!("p999_ms_{k}"),
                json!(round3(load.percentile(0.999))),
            );
            f.insert(format!("achieved_rps_{k}"), json!(round3(load.achieved())));
            f.insert(format!("errors_{k}"), json!(load.errors));
            f.insert(format!("steal_ms_{k}"), json!(stolen));
            if !p.is_empty() {
                f.insert(format!("rss_mb_{k}"), json!(mb(rss_kb(p, "VmRSS"))));
                f.insert(format!("anon_rss_mb_{k}"), json!(mb(rss_kb(p, "RssAnon"))));
            }
        }
    }
    for ((t, f), p) in targets.iter().zip(&mut figures).zip(&pids) {
        let cpu_before = cpu_seconds(p);
        let started = Instant::now();
        let rps = wrk(t.url_addr, args.max_seconds).map_err(|e| t.failed(e))?;
        let wall = started.elapsed().as_secs_f64();
        let cores = (cpu_seconds(p) - cpu_before) / wall;
        f.insert("max_rps".into(), json!(round3(rps)));
        if p.is_empty() {
            f.insert("max_rps_per_core".into(), Value::Null);
            f.insert("peak_rss_mb".into(), Value::Null);
        } else {
            f.insert("proxy_cores_used".into(), json!(round3(cores)));
            f.insert(
                "max_rps_per_core".into(),
                json!(round3(rps / cores.max(1e-3))),
            );
            f.insert("peak_rss_mb".into(), json!(mb(rss_kb(p, "VmHWM"))));
        }
    }
    let base = Value::Object(figures[0].clone());
    let mut paths = serde_json::Map::new();
    for (t, f) in targets.iter().zip(figures) {
        let mut f = Value::Object(f);
        if t.name != "direct" {
            add_overhead(&mut f, &base, &args.rates);
            eprintln!("{}: {f}", t.name);
        }
        paths.insert(t.name.into(), f);
    }
    Ok(paths)
}

/// The `kept` slices of a path's run in which the host stole least (among
/// equals, the earlier), merged, and the milliseconds stolen in them.
fn least_stolen(mut run: Vec<(u64, Load)>, kept: usize) -> (Load, u64) {
    run.sort_by_key(|(steal, _)| *steal);
    let mut load = Load::default();
    let mut ticks = 0;
    for (steal, slice) in run.into_iter().take(kept) {
        ticks += steal;
        load.add(slice);
    }
    (load, ticks * 10)
}

/// How a rate is named in the figures' keys: 1000 is `1k`.
fn rate_key(rate: u32) -> String {
    if rate.is_multiple_of(1000) {
        format!("{}k", rate / 1000)
    } else {
        rate.to_string()
    }
}

/// `added_*`: each latency figure less the direct path's.
fn add_overhead(figures: &mut Value, base: &Value, rates: &[u32]) {
    for &rate in rates {
        let k = rate_key(rate);
        for q in ["p50", "p99"] {
            let key = format!("{q}_ms_{k}");
            if let (Some(a), Some(b)) = (figures[&key].as_f64(), base[&key].as_f64()) {
                figures[format!("added_{key}")] = json!(round3(a - b));
            }
        }
    }
}

#[derive(Default)]
struct Load {
    /// Latencies in milliseconds.
    latencies: Vec<f64>,
    errors: u64,
    /// Seconds the load ran.
    seconds: f64,
}

impl Load {
    fn add(&mut self, other: Load) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.seconds += other.seconds;
    }

    fn achieved(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds.max(1e-9)
    }

    /// Of `latencies` once sorted.
    fn percentile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i =
            ((self.latencies.len() as f64 * q).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i]
    }
}

/// A path's keep-alive connections for one rate, kept from slice to
/// slice so that no slice's first requests pay for connecting.
struct Connections(Vec<Option<Sender>>);

impl Connections {
    /// Enough connections that each has several ms between requests.
    fn new(rate: u32) -> Connections {
        Connections((0..(rate / 200).clamp(4, 64)).map(|_| None).collect())
    }
}

/// `rate` requests per second for `duration`, each due at a fixed time,
/// spread over `conns`, each carrying every n-th request.
async fn open_loop(
    addr: SocketAddr,
    rate: u32,
    duration: Duration,
    conns: &mut Connections,
) -> anyhow::Result<Load> {
    let connections = conns.0.len();
    let interval = Duration::from_secs_f64(connections as f64 / f64::from(rate));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + duration;
    let mut workers = Vec::new();
    for (w, mut sender) in conns.0.iter_mut().map(Option::take).enumerate() {
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
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
            (latencies, errors, sender)
        }));
    }
    let mut load = Load::default();
    for (w, slot) in workers.into_iter().zip(&mut conns.0) {
        let (latencies, errors, sender) = w.await?;
        load.latencies.extend(latencies);
        load.errors += errors;
        *slot = sender;
    }
    load.seconds = (tokio::time::Instant::now() - start).as_secs_f64();
    Ok(load)
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
        logs: vec![dir.join("skiff-one.log")],
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
        logs: vec![dir.join("skiff-server.log"), dir.join("skiff-client.log")],
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
        logs: vec![dir.join("haproxy.log")],
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
        logs: vec![dir.join("nginx.log"), prefix.join("logs/error.log")],
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

/// Clock ticks (10 ms) the host has stolen from this machine's CPUs.
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            // cpu user nice system idle iowait irq softirq steal ...
            s.lines().next()?.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0)
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
