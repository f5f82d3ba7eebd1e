//! `skiff bench failover` and `skiff bench cluster`: the control plane
//! with hollow nodes (`skiff agent --simulate`), all as real processes on
//! this machine. Hollow nodes report instances running without starting
//! them, so these measure the control plane: detection, rescheduling,
//! fan-out, and its cost at scale.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use skiff_client::{Client, ClientConfig, EventType};

use crate::bench::{percentile, round};
use crate::resources::kind;

#[derive(Debug, Args)]
pub struct FailoverArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    #[arg(long, default_value_t = 6)]
    pub replicas: u32,
    /// Seconds without heartbeats before a node is lost.
    #[arg(long, default_value_t = 3.0)]
    pub grace: f64,
    /// Hollow nodes (control plane only, no root needed) instead of a
    /// real `skiff dev` cluster with processes, namespaces and cgroups.
    #[arg(long)]
    pub hollow: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[arg(long, default_value_t = 1000)]
    pub hollow_nodes: usize,
    #[arg(long, default_value_t = 30_000)]
    pub instances: usize,
    #[arg(long)]
    pub json: bool,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    server: Proc,
    dir: tempfile::TempDir,
    url: String,
    client: Client,
}

fn start_server(grace: f64) -> anyhow::Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "server",
            "--no-write-config",
            "--listen",
            "127.0.0.1:0",
            "--node-grace",
            &grace.to_string(),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("SKIFF_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("server stdout")?;
    let server = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("skiff server listening on ")
        .with_context(|| format!("server said {line:?}"))?
        .to_string();
    let client = Client::new(&ClientConfig::load(&dir.path().join("data/admin.config"))?)?;
    Ok(Cluster {
        server,
        dir,
        url,
        client,
    })
}

impl Cluster {
    fn agent(&self, prefix: &str, nodes: usize, cpu: &str, memory: &str) -> anyhow::Result<Proc> {
        let data = self.dir.path().join("data");
        let token = std::fs::read_to_string(data.join("join-token"))?;
        let child = Command::new(std::env::current_exe()?)
            .args([
                "agent",
                "--server",
                &self.url,
                "--join-token",
                token.trim(),
                "--simulate",
                &nodes.to_string(),
                "--node-prefix",
                prefix,
                "--cpu",
                cpu,
                "--memory",
                memory,
                "--ca-file",
            ])
            .arg(data.join("pki/ca.crt"))
            .env("SKIFF_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Proc(child))
    }

    async fn ready_nodes(&self) -> anyhow::Result<usize> {
        Ok(self
            .client
            .list(kind("nodes")?, None, None)
            .await?
            .items
            .iter()
            .filter(|n| n["status"]["ready"] == true)
            .count())
    }

    /// Polls `done` every `every` until it holds (or fails after `limit`).
    async fn wait(
        &self,
        what: &str,
        every: Duration,
        limit: Duration,
        mut done: impl AsyncFnMut(&Cluster) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        while !done(self).await? {
            if started.elapsed() > limit {
                bail!("timed out after {}s waiting for {what}", limit.as_secs());
            }
            tokio::time::sleep(every).await;
        }
        Ok(())
    }
}

fn service(ns: &str, name: &str, replicas: usize, cpu: &str, memory: &str) -> Value {
    json!({
        "apiVersion": "skiff.dev/v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas, "run": {"command": "/bin/app"}, "resources": {"requests": {"cpu": cpu, "memory": memory}},
                 "placement": {"spread": [{"topologyKey": "hostname", "maxSkew": 1, "mode": "soft"}]}},
    })
}

fn running_on(items: &[Value], not_on: Option<&str>) -> usize {
    items
        .iter()
        .filter(|i| {
            i["status"]["phase"] == "running" && not_on.is_none_or(|n| i["spec"]["node"] != n)
        })
        .count()
}

pub fn failover(args: &FailoverArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    if !args.hollow {
        return failover_real(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = runtime.block_on(async {
        let c = start_server(args.grace)?;
        let mut agents: Vec<Option<Proc>> = Vec::new();
        for i in 0..args.nodes {
            agents.push(Some(c.agent(&format!("node-{i}-"), 1, "8", "32Gi")?));
        }
        let n = args.nodes;
        c.wait(
            "nodes",
            Duration::from_millis(100),
            Duration::from_secs(60),
            async |c| Ok(c.ready_nodes().await? == n),
        )
        .await?;
        let instances = kind("instances")?;
        c.client
            .create(
                kind("services")?,
                Some("bench"),
                &service("bench", "web", args.replicas as usize, "100m", "64Mi"),
            )
            .await?;
        let r = args.replicas as usize;
        c.wait(
            "replicas running",
            Duration::from_millis(50),
            Duration::from_secs(60),
            async |c| {
                Ok(running_on(
                    &c.client.list(instances, Some("bench"), None).await?.items,
                    None,
                ) == r)
            },
        )
        .await?;

        // Count instance objects from here on, from the watch.
        let list = c.client.list(instances, Some("bench"), None).await?;
        let mut live = list.items.len() as i64;
        let mut watch = c
            .client
            .watch(instances, Some("bench"), None, list.revision);
        let (tx, mut peak_rx) = tokio::sync::watch::channel(live);
        tokio::spawn(async move {
            let mut peak = live;
            while let Some(Ok(e)) = watch.next().await {
                match e.kind {
                    EventType::Added => live += 1,
                    EventType::Deleted => live -= 1,
                    _ => continue,
                }
                peak = peak.max(live);
                let _ = tx.send(peak);
            }
        });

        let victim = "node-0-0";
        let killed = Instant::now();
        agents[0] = None;
        let nodes = kind("nodes")?;
        c.wait(
            "the lost node",
            Duration::from_millis(20),
            Duration::from_secs(60),
            async |c| {
                Ok(c.client
                    .get(nodes, None, victim)
                    .await?
                    .is_some_and(|n| n["status"]["ready"] == false))
            },
        )
        .await?;
        let detect = killed.elapsed();
        c.wait(
            "replacements running",
            Duration::from_millis(20),
            Duration::from_secs(60),
            async |c| {
                Ok(running_on(
                    &c.client.list(instances, Some("bench"), None).await?.items,
                    Some(victim),
                ) == r)
            },
        )
        .await?;
        let replaced = killed.elapsed();
        let peak = *peak_rx.borrow_and_update();
        drop(c.server);
        anyhow::Ok(failover_json(
            args,
            detect,
            replaced,
            peak as usize,
            "hollow nodes (control plane only)",
        ))
    })?;
    println!("{out}");
    Ok(0)
}

/// The failover bench's JSON line.
fn failover_json(
    args: &FailoverArgs,
    detect: Duration,
    replaced: Duration,
    peak: usize,
    runtime: &str,
) -> Value {
    json!({
        "bench": "failover",
        "nodes": args.nodes,
        "replicas": args.replicas,
        "grace_s": args.grace,
        "detect_s": round(detect.as_secs_f64(), 3),
        "replaced_ready_s": round(replaced.as_secs_f64(), 3),
        "max_instances": peak,
        "runtime": runtime,
    })
}

/// Failover on a real local cluster: node 0's agent and instances are
/// killed and its link cut; times until the control plane declares it lost
/// and until every replica is ready elsewhere; the most copies of the app
/// that ran at once (processes, sampled every 10 ms).
fn failover_real(args: &FailoverArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the real failover bench runs a local cluster: run it as root, or pass --hollow"
    );
    let (detect, replaced, peak) =
        crate::dev::with_cluster(args.nodes, args.grace, |c| measure_failover(args, c))?;
    println!(
        "{}",
        failover_json(
            args,
            detect,
            replaced,
            peak,
            "real (skiff dev: namespaces, cgroups, processes)"
        )
    );
    Ok(0)
}

/// Times one node's death on a running cluster: (detected, all replaced and ready, peak copies).
fn measure_failover(
    args: &FailoverArgs,
    c: &mut crate::dev::Cluster,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let app = format!("bench-failover-{}", std::process::id());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = c.client()?;
    let instances = kind("instances")?;
    let r = args.replicas as usize;
    let ready_off = |items: &[Value], off: Option<&str>| {
        items
            .iter()
            .filter(|i| i.pointer("/status/ready").and_then(Value::as_bool) == Some(true))
            .filter(|i| {
                off.is_none_or(|o| i.pointer("/spec/node").and_then(Value::as_str) != Some(o))
            })
            .count()
    };
    runtime.block_on(async {
        let mut svc = service("bench", "web", r, "100m", "32Mi");
        svc["spec"]["run"] = json!({"command": "skiff", "args": ["demo-app", "--name", app, "--listen", "0.0.0.0:8080"]});
        svc["spec"]["ports"] = json!([{"name": "http", "port": 8080}]);
        svc["spec"]["health"] = json!({"readiness": {"http": {"path": "/ready", "port": "http"}, "period": "1s"}});
        client.create(kind("services")?, Some("bench"), &svc).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready_off(&client.list(instances, Some("bench"), None).await?.items, None) < r {
            anyhow::ensure!(Instant::now() < deadline, "replicas did not become ready within 60s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, app) = (stop.clone(), app.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(crate::dev::app_processes(&app).len());
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let victim = c.nodes[0].clone();
    let killed = Instant::now();
    c.kill_agent(0);
    skiff_agent::runtime::cgroup::remove_agent_dirs(&victim.tag);
    crate::dev::ip(&["-n", &c.lan, "link", "set", &victim.lan_if, "down"])?;
    let nodes = kind("nodes")?;
    let (detect, replaced) = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut detect = None;
        loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "replicas were not replaced within 60s"
            );
            if detect.is_none()
                && client
                    .get(nodes, None, &victim.name)
                    .await?
                    .is_some_and(|n| n["status"]["ready"] == false)
            {
                detect = Some(killed.elapsed());
            }
            let items = client.list(instances, Some("bench"), None).await?.items;
            if detect.is_some() && ready_off(&items, Some(&victim.name)) >= r {
                return Ok((detect.unwrap_or_default(), killed.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    Ok((detect, replaced, peak))
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kb / 1024.0).round())
}

pub fn cluster(args: &ClusterArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        args.hollow_nodes >= 1 && args.instances >= 1,
        "--hollow-nodes and --instances must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = runtime.block_on(async {
        let c = start_server(3.0)?;
        let _agent = c.agent("hollow-", args.hollow_nodes, "32", "128Gi")?;
        let n = args.hollow_nodes;
        c.wait(
            "hollow nodes",
            Duration::from_millis(200),
            Duration::from_secs(300),
            async |c| Ok(c.ready_nodes().await? == n),
        )
        .await?;
        let (services, instances) = (kind("services")?, kind("instances")?);
        // API latency while the cluster fills: a GET every 50 ms.
        let probe = c.client.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let prober = tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !*stop_rx.borrow_and_update() {
                let t = Instant::now();
                let _ = probe.list(services, Some("bench"), None).await;
                latencies.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            latencies
        });
        // Count instances reaching "running" from a watch, not by listing
        // 30,000 objects again and again (which would load the server itself).
        let mut watch = c.client.watch(
            instances,
            Some("bench"),
            None,
            c.client
                .list(instances, Some("bench"), None)
                .await?
                .revision,
        );
        let total = args.instances;
        let counter = tokio::spawn(async move {
            let mut running = std::collections::HashSet::new();
            while running.len() < total {
                match watch.next().await {
                    Some(Ok(e))
                        if e.kind == EventType::Modified
                            && e.object["status"]["phase"] == "running" =>
                    {
                        running.insert(
                            e.object["metadata"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        );
                    }
                    Some(Ok(e)) if e.kind == EventType::Deleted => {
                        running.remove(e.object["metadata"]["name"].as_str().unwrap_or_default());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    None => bail!("watch ended"),
                }
            }
            anyhow::Ok(Instant::now())
        });
        let started = Instant::now();
        let per = 100;
        let mut remaining = args.instances;
        let mut i = 0;
        while remaining > 0 {
            let replicas = per.min(remaining);
            c.client
                .create(
                    services,
                    Some("bench"),
                    &service("bench", &format!("svc-{i}"), replicas, "100m", "128Mi"),
                )
                .await?;
            remaining -= replicas;
            i += 1;
        }
        let done = tokio::time::timeout(Duration::from_secs(600), counter)
            .await
            .context("timed out waiting for all instances to run")???;
        let all_running = done - started;
        let _ = stop_tx.send(true);
        let mut latencies = prober.await?;
        let p99 = percentile(&mut latencies, 0.99);
        let rss = peak_rss_mb(c.server.0.id());
        anyhow::Ok(json!({
            "bench": "cluster",
            "nodes": args.hollow_nodes,
            "instances": args.instances,
            "all_running_s": round(all_running.as_secs_f64(), 1),
            "server_rss_mb": rss,
            "api_p99_ms": round(p99.as_secs_f64() * 1e3, 1),
            "api_samples": latencies.len(),
            "runtime": "hollow nodes (control plane only)",
        }))
    })?;
    println!("{out}");
    Ok(0)
}
