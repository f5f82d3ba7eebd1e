//! `skiff bench discovery`: what one node pays to make its mesh discovery
//! table for a large cluster, the work it redoes after each change while
//! the cluster changes (a rollout, a failover).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skiff_agent::cache::{LocalInstances, State};
use skiff_agent::runtime::discovery::{delta, render};

#[derive(Debug, clap::Args)]
pub struct DiscoveryArgs {
    /// Instances in the cluster.
    #[arg(long, default_value_t = 30_000)]
    pub instances: usize,
    /// Services they belong to (spread over 50 namespaces).
    #[arg(long, default_value_t = 5_000)]
    pub services: usize,
    /// Instances on this node (each gets its inbound policy rendered).
    #[arg(long, default_value_t = 20)]
    pub local: usize,
    /// Tables made, one instance changing before each.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Print JSON (the only format; accepted for symmetry).
    #[arg(long)]
    pub json: bool,
}

fn instance(i: usize, services: usize, ready: bool) -> Value {
    let svc = i % services;
    json!({
        "apiVersion": "skiff.dev/v1", "kind": "Instance",
        "metadata": {"name": format!("svc{svc}-{i}"), "namespace": format!("ns{}", svc % 50),
                     "labels": {"app": format!("svc{svc}"), "tier": if svc.is_multiple_of(2) { "web" } else { "data" }}},
        "spec": {"service": format!("svc{svc}")},
        "status": {"address": Ipv4Addr::from(0x0a00_0000 + i as u32).to_string(), "ready": ready},
    })
}

pub fn run(args: &DiscoveryArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        args.services >= 1 && args.instances >= args.local && args.rounds >= 1,
        "need --services ≥ 1, --instances ≥ --local, --rounds ≥ 1"
    );
    let mut s = State::default();
    for i in 0..args.services {
        let vip = Ipv4Addr::from(0xc612_8000 + i as u32);
        s.virtual_addresses
            .insert(format!("ns{}/svc{i}", i % 50), vip.to_string());
    }
    for i in 0..args.instances {
        s.put_instance(instance(i, args.services, true));
    }
    // Every workload of a tier may GET from the other tier: each local
    // instance's inbound rules name the identities of half the cluster.
    let policy = json!({
        "apiVersion": "skiff.dev/v1", "kind": "Policy",
        "metadata": {"name": "tiers", "namespace": "ns0"},
        "spec": {"selector": {}, "ingress": [
            {"from": [{"namespaces": {}, "workloads": {"matchLabels": {"tier": "web"}}}],
             "http": {"methods": ["GET"]}}]},
    });
    let rule = skiff_netpol::cluster::policy(&policy)
        .ok_or_else(|| anyhow::anyhow!("the bench's policy does not decode"))?;
    s.policies.insert("policies:ns0/tiers".into(), rule);
    let local: BTreeMap<String, Ipv4Addr> = (0..args.local)
        .map(|i| {
            let svc = i % args.services;
            (
                format!("ns{}/svc{svc}-{i}", svc % 50),
                Ipv4Addr::from(0x0a00_0000 + i as u32),
            )
        })
        .collect();
    let mut known = LocalInstances::default();
    known.update(&s, local.keys());
    let mut table = render(&s, &known, "bench.local", &local, 0);
    let snapshot_bytes = table.to_string().len();
    let mut times = Vec::new();
    let mut update_bytes = 0;
    for round in 1..=args.rounds {
        // An instance turns unready and back, as in a rolling update.
        let i = (round * 7919) % args.instances;
        s.put_instance(instance(i, args.services, round.is_multiple_of(2)));
        let started = Instant::now();
        known.update(&s, local.keys());
        let next = render(&s, &known, "bench.local", &local, round as u64);
        let line = format!("{}\n", delta(&table, &next));
        times.push(started.elapsed());
        update_bytes = update_bytes.max(line.len());
        table = next;
    }
    times.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let out = json!({
        "bench": "discovery",
        "instances": args.instances,
        "services": args.services,
        "local": args.local,
        "rounds": args.rounds,
        "table_ms_p50": ms(times[times.len() / 2]),
        "table_ms_max": ms(times[times.len() - 1]),
        "snapshot_bytes": snapshot_bytes,
        "largest_update_bytes": update_bytes,
    });
    println!("{out}");
    Ok(0)
}
