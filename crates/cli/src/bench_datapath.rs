//! `skiff bench policy --rules N`: what enforcing N rules costs traffic
//! between two instances on one node (real namespaces, the real datapath),
//! three ways in one run: no policy; Skiff's eBPF datapath with the rules;
//! and the same rules as iptables rules in the receiving namespace (the
//! classic NetworkPolicy implementation), with no Skiff policy. Kept-alive
//! requests per second and new connections per second, each measured with
//! wrk from the client's namespace, in interleaved rounds (median).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};

use crate::bench::round;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[arg(long, default_value_t = 1000)]
    pub rules: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
    /// Interleaved rounds; each figure is the median.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long)]
    pub json: bool,
}

const PORT: u16 = 8080;
/// The rules' other ports start here (none of them is the server's).
const FIRST_OTHER_PORT: u16 = 20000;

pub fn run(args: &PolicyArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench runs a local cluster: run it as root"
    );
    anyhow::ensure!(
        (1..=40_000).contains(&args.rules),
        "--rules must be 1 to 40000"
    );
    for tool in ["wrk", "iptables-restore"] {
        anyhow::ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()?
                .success(),
            "`{tool}` is needed: apt-get install wrk iptables"
        );
    }
    let result = crate::dev::with_cluster(1, 3.0, |c| measure(args, c));
    println!("{}", result?);
    Ok(0)
}

fn measure(args: &PolicyArgs, c: &crate::dev::Cluster) -> anyhow::Result<Value> {
    let (runtime, client, [services, instances, policies]) = crate::dev::bench_on(c)?;
    let service = |name: &str, run: Value| {
        crate::dev::bench_service(
            name,
            json!({"run": run, "resources": {"limits": {"memory": "512Mi"}}}),
        )
    };
    let (server, client_addr) = runtime.block_on(async {
        client
            .create(services, Some("bench"), &service("server", json!({"command": "skiff", "args": ["demo-app", "--name", "server", "--listen", format!("0.0.0.0:{PORT}")]})))
            .await?;
        client.create(services, Some("bench"), &service("client", json!({"command": "sleep", "args": ["100000"]}))).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let items = client.list(instances, Some("bench"), None).await?.items;
            let addr = |svc: &str| -> Option<Ipv4Addr> {
                items
                    .iter()
                    .find(|i| i.pointer("/spec/service").and_then(Value::as_str) == Some(svc) && i.pointer("/status/phase").and_then(Value::as_str) == Some("running"))
                    .and_then(|i| i.pointer("/status/address")?.as_str()?.parse().ok())
            };
            if let (Some(s), Some(cl)) = (addr("server"), addr("client")) {
                return anyhow::Ok((s, cl));
            }
            anyhow::ensure!(Instant::now() < deadline, "the bench's instances did not start within 60s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })?;
    let client_ns = crate::dev::netns_of(c, client_addr)
        .ok_or_else(|| anyhow::anyhow!("no namespace for the client"))?;
    let server_ns = crate::dev::netns_of(c, server)
        .ok_or_else(|| anyhow::anyhow!("no namespace for the server"))?;
    // Many short connections: give the client the whole ephemeral range and
    // let it reuse ports whose TIME_WAIT is over, so runs measure the
    // datapath rather than port exhaustion.
    for (ns, key, value) in [
        (&client_ns, "ip_local_port_range", "1024 65000"),
        (&client_ns, "tcp_tw_reuse", "1"),
        (&server_ns, "tcp_max_tw_buckets", "4096"),
    ] {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                &format!("echo {value} > /proc/sys/net/ipv4/{key}"),
            ])
            .status();
    }
    let url = format!("http://{server}:{PORT}/healthz");
    wait_answer(&client_ns, &url)?;

    // N rules: the server's port from the client, and N-1 other ports from it.
    let ports: Vec<Value> = std::iter::once(PORT)
        .chain((0..args.rules.saturating_sub(1)).map(|i| FIRST_OTHER_PORT + i as u16))
        .map(|p| json!({"port": p}))
        .collect();
    let policy = json!({"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": "bench-rules", "namespace": "bench"},
        "spec": {"selector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"from": [{"workloads": {"matchLabels": {"app": "client"}}}], "ports": ports}]}});
    let iptables = iptables_rules(client_addr, args.rules);

    let mut samples: [[Vec<f64>; 2]; 3] = Default::default();
    for _ in 0..args.rounds {
        for (mode, sample) in samples.iter_mut().enumerate() {
            match mode {
                1 => {
                    runtime.block_on(client.create(policies, Some("bench"), &policy))?;
                    // Enforced once a port the rules do not allow is refused.
                    wait_refused(&client_ns, server, FIRST_OTHER_PORT - 1)?;
                }
                2 => restore(&server_ns, &iptables)?,
                _ => {}
            }
            wait_answer(&client_ns, &url)?;
            sample[0].push(wrk(&client_ns, &url, args.seconds, false)?);
            sample[1].push(wrk(&client_ns, &url, args.seconds, true)?);
            match mode {
                1 => {
                    runtime.block_on(client.delete(policies, Some("bench"), "bench-rules"))?;
                    wait_answer_port(&client_ns, server, FIRST_OTHER_PORT - 1)?;
                }
                2 => restore(&server_ns, "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")?,
                _ => {}
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let [mut base, mut skiff, mut ipt] = samples;
    let (base_rps, base_cps) = (median(&mut base[0]), median(&mut base[1]));
    let (skiff_rps, skiff_cps) = (median(&mut skiff[0]), median(&mut skiff[1]));
    let (ipt_rps, ipt_cps) = (median(&mut ipt[0]), median(&mut ipt[1]));
    let ratio = |x: f64, b: f64| if b > 0.0 { round(x / b, 3) } else { 0.0 };
    Ok(json!({
        "bench": "policy",
        "rules": args.rules,
        "baseline_rps": round(base_rps, 0),
        "skiff_rps": round(skiff_rps, 0),
        "iptables_rps": round(ipt_rps, 0),
        "skiff_ratio": ratio(skiff_rps, base_rps),
        "iptables_ratio": ratio(ipt_rps, base_rps),
        "baseline_conn_per_s": round(base_cps, 0),
        "skiff_conn_per_s": round(skiff_cps, 0),
        "iptables_conn_per_s": round(ipt_cps, 0),
        "skiff_conn_ratio": ratio(skiff_cps, base_cps),
        "iptables_conn_ratio": ratio(ipt_cps, base_cps),
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
    }))
}

/// The rules as kube-proxy-era NetworkPolicy implementations write them:
/// established flows first, then one ACCEPT per (peer, port), then DROP.
fn iptables_rules(client: Ipv4Addr, rules: usize) -> String {
    let mut s = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n",
    );
    for i in 0..rules.saturating_sub(1) {
        s.push_str(&format!(
            "-A INPUT -s {client}/32 -p tcp --dport {} -j ACCEPT\n",
            FIRST_OTHER_PORT + i as u16
        ));
    }
    s.push_str(&format!(
        "-A INPUT -s {client}/32 -p tcp --dport {PORT} -j ACCEPT\n-A INPUT -p tcp -j DROP\nCOMMIT\n"
    ));
    s
}

fn restore(netns: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "iptables-restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Requests per second from wrk (2 threads, 32 connections), kept alive or
/// one connection per request.
fn wrk(netns: &str, url: &str, seconds: u64, close: bool) -> anyhow::Result<f64> {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        "wrk",
        "-t2",
        "-c32",
        &format!("-d{seconds}s"),
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "wrk printed no rate: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn connects(netns: &str, to: Ipv4Addr, port: u16) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{to}/{port}"),
        ])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn wait_answer(netns: &str, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "curl",
                "-sf",
                "--max-time",
                "1",
                url,
            ])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{url} did not answer from the client within 15s")
}

/// Waits until a connect to a port nobody listens on is dropped (not reset).
fn wait_refused(netns: &str, to: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let started = Instant::now();
        let reset = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "timeout",
                "0.3",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{to}/{port}"),
            ])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.code() == Some(1))
            .unwrap_or(false);
        if !reset && started.elapsed() >= Duration::from_millis(250) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("the policy was not enforced within 30s")
}

/// Waits until a closed port answers with a reset again (policy gone).
fn wait_answer_port(netns: &str, to: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let started = Instant::now();
        let _ = connects(netns, to, port);
        if started.elapsed() < Duration::from_millis(200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("the policy was not removed within 30s")
}
