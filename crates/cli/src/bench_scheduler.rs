//! `skiff bench scheduler`: placements per second and packing quality on a
//! generated heterogeneous cluster.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use skiff_netpol::bench::Rng;

use crate::bench::{percentile, round};
use skiff_scheduler::{
    AntiAffinity, CPU, Config, HOSTNAME, Instance, MEMORY, Node, Res, Sampling, Scheduler, Spread,
};

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    #[arg(long, default_value_t = 5000)]
    pub nodes: usize,
    #[arg(long, default_value_t = 150_000)]
    pub instances: usize,
    /// Hard spread of every service over this node label (e.g. `zone`).
    #[arg(long)]
    pub spread: Option<String>,
    /// Hard anti-affinity on every service: at most 2 instances per node.
    #[arg(long)]
    pub anti_affinity: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also place with a full scan of every node and report its packing.
    #[arg(long)]
    pub compare_full_scan: bool,
    #[arg(long)]
    pub json: bool,
}

const GI: u64 = 1 << 30;

/// Node shapes: (millicores, GiB).
const SHAPES: [(u64, u64); 5] = [
    (4000, 16),
    (8000, 32),
    (16000, 64),
    (32000, 128),
    (8000, 64),
];

/// A cluster and services whose requests add up to 95 % of its capacity,
/// so packing quality decides how much fits.
fn generate(args: &SchedulerArgs) -> (Vec<Node>, Vec<Vec<Instance>>) {
    let mut rng = Rng::new(args.seed);
    let zones = 3 + rng.below(8);
    let nodes: Vec<Node> = (0..args.nodes)
        .map(|i| {
            let (cpu, mem) = SHAPES[rng.below(SHAPES.len())];
            Node {
                name: format!("node-{i}"),
                capacity: Res::new(cpu, mem * GI),
                labels: [("zone".to_string(), format!("zone-{}", i % zones))].into(),
                taints: vec![],
                schedulable: true,
            }
        })
        .collect();
    let cap_cpu: u64 = nodes.iter().map(|n| n.capacity.0[CPU]).sum();
    let cap_mem: u64 = nodes.iter().map(|n| n.capacity.0[MEMORY]).sum();
    // Draw raw shapes, then scale so the total is 95 % of capacity.
    let mut services = Vec::new();
    let mut raw = Vec::new();
    let mut total = 0;
    while total < args.instances {
        // Most services are small; a few have hundreds of replicas.
        let replicas = match rng.below(10) {
            0 => 100 + rng.below(401),
            1..=3 => 10 + rng.below(90),
            _ => 1 + rng.below(10),
        }
        .min(args.instances - total);
        let cpu = [100, 250, 500, 1000, 2000][rng.below(5)];
        let mem = [128u64, 256, 512, 1024, 2048, 4096][rng.below(6)] << 20;
        raw.push((replicas, cpu, mem));
        total += replicas;
    }
    let want_cpu: u64 = raw.iter().map(|(r, c, _)| *r as u64 * c).sum();
    let want_mem: u64 = raw.iter().map(|(r, _, m)| *r as u64 * m).sum();
    let (fc, fm) = (
        0.95 * cap_cpu as f64 / want_cpu as f64,
        0.95 * cap_mem as f64 / want_mem as f64,
    );
    for (s, (replicas, cpu, mem)) in raw.into_iter().enumerate() {
        let requests = Res::new(
            ((cpu as f64 * fc) as u64).max(10),
            ((mem as f64 * fm) as u64).max(1 << 20),
        );
        let batch = (0..replicas)
            .map(|r| {
                let mut i = Instance::new(format!("svc-{s}-{r}"), format!("svc-{s}"), requests);
                if let Some(key) = &args.spread {
                    i.spread.push(Spread {
                        topology_key: key.clone(),
                        max_skew: 1,
                        hard: true,
                    });
                }
                if args.anti_affinity {
                    i.anti_affinity.push(AntiAffinity {
                        topology_key: HOSTNAME.into(),
                        max_per_domain: 2,
                        hard: true,
                    });
                }
                i
            })
            .collect();
        services.push(batch);
    }
    (nodes, services)
}

struct Outcome {
    placed: usize,
    unschedulable: usize,
    secs: f64,
    p99: Duration,
    cpu: f64,
    mem: f64,
    overcommitted: usize,
    max_skew: Option<u32>,
}

fn run_once(
    args: &SchedulerArgs,
    nodes: &[Node],
    services: &[Vec<Instance>],
    sampling: Sampling,
) -> Outcome {
    let mut s = Scheduler::new(
        nodes.to_vec(),
        Config {
            sampling,
            seed: args.seed,
            ..Config::default()
        },
    );
    let mut latencies = Vec::with_capacity(args.instances);
    let (mut placed, mut unschedulable) = (0, 0);
    let started = Instant::now();
    for batch in services {
        for inst in batch {
            let t = Instant::now();
            // The explanation of an unschedulable instance (a look at every
            // node) is left out: a controller asks for it once, not per retry.
            let r = s.try_place(inst);
            latencies.push(t.elapsed());
            match r {
                Some(_) => placed += 1,
                None => unschedulable += 1,
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let p99 = percentile(&mut latencies, 0.99);
    let (mut used, mut cap) = ([0u128; 2], [0u128; 2]);
    let mut overcommitted = 0;
    for (i, n) in s.nodes().iter().enumerate() {
        let u = s.used(i);
        if !u.fits_in(&n.capacity) {
            overcommitted += 1;
        }
        for (k, d) in [CPU, MEMORY].into_iter().enumerate() {
            used[k] += u128::from(u.0[d]);
            cap[k] += u128::from(n.capacity.0[d]);
        }
    }
    let max_skew = args.spread.as_ref().and_then(|key| {
        services
            .iter()
            .filter_map(|b| b.first())
            .filter_map(|i| s.skew(&i.service, key))
            .max()
    });
    Outcome {
        placed,
        unschedulable,
        secs,
        p99,
        cpu: used[0] as f64 / cap[0] as f64,
        mem: used[1] as f64 / cap[1] as f64,
        overcommitted,
        max_skew,
    }
}

/// A fraction as a percentage with one decimal.
fn pct(x: f64) -> f64 {
    round(x * 100.0, 1)
}

pub fn run(args: &SchedulerArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    let (nodes, services) = generate(args);
    let sampled = run_once(args, &nodes, &services, Config::default().sampling);
    let mut out: Value = json!({
        "bench": "scheduler",
        "nodes": args.nodes,
        "instances": args.instances,
        "services": services.len(),
        "spread": args.spread,
        "anti_affinity": args.anti_affinity,
        "placed": sampled.placed,
        "unschedulable": sampled.unschedulable,
        "placements_per_s": ((sampled.placed + sampled.unschedulable) as f64 / sampled.secs).round(),
        "p99_us": sampled.p99.as_micros(),
        "cpu_utilization": pct(sampled.cpu),
        "mem_utilization": pct(sampled.mem),
        "overcommitted_nodes": sampled.overcommitted,
        "max_skew": sampled.max_skew,
        "sampling": "bounded: 100 feasible nodes or 5%",
    });
    if args.compare_full_scan {
        let full = run_once(args, &nodes, &services, Sampling::Full);
        out["full_scan"] = json!({
            "placed": full.placed,
            "placements_per_s": ((full.placed + full.unschedulable) as f64 / full.secs).round(),
            "cpu_utilization": pct(full.cpu),
            "mem_utilization": pct(full.mem),
            "overcommitted_nodes": full.overcommitted,
            "max_skew": full.max_skew,
        });
    }
    println!("{out}");
    Ok(0)
}
