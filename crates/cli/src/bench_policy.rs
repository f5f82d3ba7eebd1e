//! `skiff bench policy-propagation`: how long a policy change takes to be
//! enforced on every node of a real local cluster. A client instance
//! probes one target instance per node with TCP connects from its own
//! namespace; each change (a Policy allowing the client, then its
//! deletion) is timed from the API's acknowledgement of the write until
//! every target answers accordingly.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};

use crate::bench::{ms, percentile};

#[derive(Debug, Args)]
pub struct PropagationArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Changes to time (half allow, half revoke).
    #[arg(long, default_value_t = 20)]
    pub changes: usize,
    #[arg(long)]
    pub json: bool,
}

/// How long a refused connect is waited for: the resolution of "denied".
const PROBE_TIMEOUT: Duration = Duration::from_millis(50);

pub fn propagation(args: &PropagationArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench runs a local cluster: run it as root"
    );
    anyhow::ensure!(
        args.nodes >= 1 && args.changes >= 2,
        "--nodes ≥ 1 and --changes ≥ 2"
    );
    let result = crate::dev::with_cluster(args.nodes, 3.0, |c| measure(args, c));
    let mut times = result?;
    let max = times.iter().max().copied().unwrap_or_default();
    println!(
        "{}",
        json!({
            "bench": "policy-propagation",
            "nodes": args.nodes,
            "changes": times.len(),
            "p50_ms": ms(percentile(&mut times, 0.50)),
            "p99_ms": ms(percentile(&mut times, 0.99)),
            "max_ms": ms(max),
            "deny_resolution_ms": PROBE_TIMEOUT.as_millis() as u64,
        })
    );
    Ok(0)
}

fn measure(args: &PropagationArgs, c: &crate::dev::Cluster) -> anyhow::Result<Vec<Duration>> {
    let (runtime, client, [services, instances, policies]) = crate::dev::bench_on(c)?;
    let service = |name: &str, replicas: usize| {
        crate::dev::bench_service(
            name,
            json!({"replicas": replicas, "run": {"command": "skiff", "args": ["demo-app", "--name", name, "--echo", "8080"]},
            "placement": {"spread": [{"topologyKey": "hostname", "maxSkew": 1, "mode": "hard"}]}}),
        )
    };
    let isolate = json!({"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": "isolate", "namespace": "bench"},
        "spec": {"selector": {"matchLabels": {"app": "target"}}, "ingress": []}});
    let allow = json!({"apiVersion": "skiff.dev/v1", "kind": "Policy", "metadata": {"name": "allow-client", "namespace": "bench"},
        "spec": {"selector": {"matchLabels": {"app": "target"}},
                 "ingress": [{"from": [{"workloads": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 8080}]}]}});
    let (targets, client_addr) = runtime.block_on(async {
        client
            .create(services, Some("bench"), &service("target", args.nodes))
            .await?;
        client
            .create(services, Some("bench"), &service("client", 1))
            .await?;
        client.create(policies, Some("bench"), &isolate).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let items = client.list(instances, Some("bench"), None).await?.items;
            let ready = |svc: &str| -> Vec<Ipv4Addr> {
                items
                    .iter()
                    .filter(|i| i.pointer("/spec/service").and_then(Value::as_str) == Some(svc))
                    .filter(|i| i.pointer("/status/ready").and_then(Value::as_bool) == Some(true))
                    .filter_map(|i| i.pointer("/status/address")?.as_str()?.parse().ok())
                    .collect()
            };
            let (t, cl) = (ready("target"), ready("client"));
            if t.len() == args.nodes && cl.len() == 1 {
                return anyhow::Ok((t, cl[0]));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the bench's instances were not ready within 60s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })?;
    let netns = crate::dev::netns_of(c, client_addr)
        .ok_or_else(|| anyhow::anyhow!("no namespace for the client"))?;
    let mut times = Vec::new();
    for change in 0..args.changes {
        let allowing = change % 2 == 0;
        let acked = runtime.block_on(async {
            if allowing {
                client.create(policies, Some("bench"), &allow).await?;
            } else {
                client
                    .delete(policies, Some("bench"), "allow-client")
                    .await?;
            }
            anyhow::Ok(Instant::now())
        })?;
        let done = wait_all(&netns, &targets, allowing, Duration::from_secs(10))?;
        times.push(done.duration_since(acked));
    }
    Ok(times)
}

/// Probes every target from `netns` until all answer (or all refuse);
/// returns when the last one did.
fn wait_all(
    netns: &str,
    targets: &[Ipv4Addr],
    open: bool,
    within: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    let done = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = targets
        .iter()
        .map(|&t| {
            let (ns, done) = (netns.to_string(), done.clone());
            std::thread::spawn(move || -> Option<Instant> {
                let file = std::fs::File::open(format!("/run/netns/{ns}")).ok()?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
                while Instant::now() < deadline && !done.load(Ordering::Relaxed) {
                    let ok =
                        TcpStream::connect_timeout(&SocketAddr::from((t, 8080)), PROBE_TIMEOUT)
                            .is_ok();
                    if ok == open {
                        return Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                None
            })
        })
        .collect();
    let mut last = Instant::now();
    for h in handles {
        match h.join().ok().flatten() {
            Some(t) => last = last.max(t),
            None => {
                done.store(true, Ordering::Relaxed);
                anyhow::bail!(
                    "a node did not enforce the change within {}s",
                    within.as_secs()
                );
            }
        }
    }
    Ok(last)
}
