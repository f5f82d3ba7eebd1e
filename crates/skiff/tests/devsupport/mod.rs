//! Shared by the tests that run a real `skiff dev` cluster (root, network
//! namespaces): whether they can run, the cluster, and ways to wait.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
pub use skiff_cli::dev::{Cluster, Options};

pub const EXE: &str = env!("CARGO_BIN_EXE_skiff");

/// Whether this machine can run a dev cluster. Without root (or `ip`),
/// the test is skipped with the reason printed, unless `SKIFF_E2E=require`
/// (set by CI), where that is a failure.
pub fn can_run(test: &str) -> bool {
    let required = std::env::var("SKIFF_E2E").as_deref() == Ok("require");
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root (network namespaces, cgroups)")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("needs iproute2's `ip`")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if required => {
            panic!("{test}: SKIFF_E2E=require but this machine cannot run it: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// A fresh cluster whose admin config lives in `dir`.
pub fn cluster(dir: &Path, nodes: usize, self_fence: bool) -> Cluster {
    cluster_with(dir, nodes, self_fence, None)
}

/// The same, with the sidecar proxy injected into every instance and
/// workload certificates living `cert_lifetime` seconds.
pub fn mesh_cluster(dir: &Path, nodes: usize, cert_lifetime: f64) -> Cluster {
    cluster_with(dir, nodes, false, Some(cert_lifetime))
}

fn cluster_with(dir: &Path, nodes: usize, self_fence: bool, mesh: Option<f64>) -> Cluster {
    let options = Options {
        nodes,
        node_grace: 3.0,
        self_fence,
        mesh: mesh.is_some(),
        cert_lifetime: mesh,
        config: dir.join("config"),
    };
    Cluster::up(Path::new(EXE), &options).unwrap_or_else(|e| panic!("skiff dev: {e:#}"))
}

/// Runs the skiff CLI against the cluster; returns (success, stdout, stderr).
pub fn skiff(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(EXE)
        .args(args)
        .env("SKIFF_CONFIG", &c.config)
        .output()
        .unwrap_or_else(|e| panic!("running skiff: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Applies manifests given as text; panics with the server log's tail on failure.
pub fn apply(c: &Cluster, dir: &Path, name: &str, yaml: &str) {
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("{e}"));
    let (ok, out, err) = skiff(c, &["apply", "-f", &file.display().to_string()]);
    assert!(
        ok,
        "apply {name} failed:\n{out}{err}\nserver log:\n{}",
        server_log_tail(c)
    );
}

pub fn server_log_tail(c: &Cluster) -> String {
    log_tail(c, "server")
}

/// The last lines of `server` or a node's (`n1`…) log.
pub fn log_tail(c: &Cluster, who: &str) -> String {
    let log = std::fs::read_to_string(c.dir.join(format!("{who}.log"))).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Polls `f` every 100 ms until it gives `Some`, or panics after `within`
/// with `what` and the last state `describe` gives.
pub fn eventually<T>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = f() {
            return t;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not within {}s; last state:\n{}",
                within.as_secs(),
                describe()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The instances of a service, as the API has them.
pub fn instances(c: &Cluster, ns: &str, service: &str) -> Vec<Value> {
    let (ok, out, _) = skiff(c, &["get", "instances", "-n", ns, "-o", "json"]);
    if !ok {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&out).unwrap_or_default();
    let items = v
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .or_else(|| v.as_array().cloned())
        .unwrap_or_default();
    items
        .into_iter()
        .filter(|i| s(i, "/spec/service") == service)
        .collect()
}

pub fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn ready(v: &Value) -> bool {
    v.pointer("/status/ready").and_then(Value::as_bool) == Some(true)
}

/// Pids of one demo app's processes (named uniquely per test).
pub fn pids_with(needle: &str) -> Vec<u32> {
    skiff_cli::dev::app_processes(needle)
}

/// `curl` from inside a network namespace; the body, or why it failed.
pub fn curl_in(netns: &str, url: &str) -> Result<String, String> {
    curl_with(netns, &[], url).map(|(_, body)| body)
}

/// curl in `netns` with extra arguments (method, headers); returns the
/// status and the body.
pub fn curl_with(netns: &str, args: &[&str], url: &str) -> Result<(u16, String), String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-sS",
            "--connect-timeout",
            "1",
        ])
        .args(["--max-time", "3", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// A short random suffix for names that must not collide across runs.
pub fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:05x}", (nanos ^ std::process::id()) & 0xfffff)
}

/// The network namespace of the instance at `address`.
pub fn netns_of(c: &Cluster, address: &str) -> String {
    let a = address.parse().unwrap_or_else(|e| panic!("{address}: {e}"));
    skiff_cli::dev::netns_of(c, a).unwrap_or_else(|| panic!("no instance namespace has {address}"))
}

/// Runs `skiff bench ARGS` and reads its JSON line (panics with stderr on failure).
pub fn bench_json(args: &[&str]) -> Value {
    let out = Command::new(EXE)
        .arg("bench")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
