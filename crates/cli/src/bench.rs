//! `skiff bench …`: performance measurements that print one JSON line.

use std::hint::black_box;
use std::time::Instant;

use clap::{Args, Subcommand};
use skiff_api::net::Protocol;
use skiff_netpol::Decision;
use skiff_netpol::bench::{Rng, synthetic};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Flow verdicts per second of the policy engine on one core.
    PolicyEval(PolicyEvalArgs),
    /// Time from a node's death to its instances running elsewhere (hollow nodes).
    Failover(crate::bench_cluster::FailoverArgs),
    /// Cost of N policy rules for traffic between two instances: none, Skiff's eBPF, iptables (root).
    Policy(crate::bench_datapath::PolicyArgs),
    /// Time from a policy change to its enforcement on every node (real local cluster, root).
    PolicyPropagation(crate::bench_policy::PropagationArgs),
    /// Latency a proxy hop adds and requests per proxy core: Skiff, the Skiff mTLS pair, haproxy, nginx (loopback).
    Proxy(crate::bench_proxy::ProxyArgs),
    /// What a node pays to make its mesh discovery table after each change, for a large cluster.
    Discovery(crate::bench_discovery::DiscoveryArgs),
    /// Control-plane cost of many hollow nodes and instances.
    Cluster(crate::bench_cluster::ClusterArgs),
    /// Placements per second and packing quality of the scheduler.
    Scheduler(crate::bench_scheduler::SchedulerArgs),
    /// Acknowledged writes per second and watch delivery latency of the embedded store.
    Store(crate::bench_store::StoreArgs),
}

#[derive(Debug, Args)]
pub struct PolicyEvalArgs {
    #[arg(long, default_value_t = 10_000)]
    pub workloads: usize,
    #[arg(long, default_value_t = 2_000)]
    pub policies: usize,
    /// Number of flow verdicts to time.
    #[arg(long, default_value_t = 5_000_000)]
    pub flows: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON (the only format; accepted for symmetry with other commands).
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: &BenchCommand) -> anyhow::Result<u8> {
    match cmd {
        BenchCommand::PolicyEval(a) => policy_eval(a),
        BenchCommand::Store(a) => crate::bench_store::run(a),
        BenchCommand::Scheduler(a) => crate::bench_scheduler::run(a),
        BenchCommand::Failover(a) => crate::bench_cluster::failover(a),
        BenchCommand::PolicyPropagation(a) => crate::bench_policy::propagation(a),
        BenchCommand::Policy(a) => crate::bench_datapath::run(a),
        BenchCommand::Cluster(a) => crate::bench_cluster::cluster(a),
        BenchCommand::Proxy(a) => crate::bench_proxy::run(a),
        BenchCommand::Discovery(a) => crate::bench_discovery::run(a),
    }
}

fn policy_eval(args: &PolicyEvalArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.workloads >= 2, "--workloads must be at least 2");
    let started = Instant::now();
    let s = synthetic(args.workloads, args.policies, args.seed);
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    // Pre-draw flows so the timed loop measures the engine, not the generator.
    let mut rng = Rng::new(args.seed ^ 0x5EED);
    let sample: Vec<_> = (0..65_536)
        .map(|_| {
            (
                s.workloads[rng.below(s.workloads.len())],
                s.workloads[rng.below(s.workloads.len())],
                s.ports[rng.below(s.ports.len())],
            )
        })
        .collect();
    let mut counts = [0u64; 3];
    let started = Instant::now();
    for i in 0..args.flows {
        let (from, to, port) = sample[i % sample.len()];
        let v = s
            .engine
            .decide(black_box(from), black_box(to), port, Protocol::Tcp);
        counts[v.decision as usize] += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let flows = args.flows as f64;
    // Baseline in the same run: the literal semantics, every policy scanned
    // per flow (what the index avoids). Timed over fewer flows: it is slow.
    let policies: Vec<_> = s.engine.policies().cloned().collect();
    let baseline_flows = (args.flows / 200).clamp(1, sample.len());
    let started = Instant::now();
    for &(from, to, port) in &sample[..baseline_flows] {
        black_box(skiff_netpol::reference::decide(
            &policies,
            s.engine.world(),
            s.engine.default_policy(),
            black_box(from),
            black_box(to),
            port,
            Protocol::Tcp,
        ));
    }
    let baseline_per_s = baseline_flows as f64 / started.elapsed().as_secs_f64();
    let out = serde_json::json!({
        "bench": "policy-eval",
        "workloads": args.workloads,
        "policies": args.policies,
        "flows": args.flows,
        "seconds": round(secs, 3),
        "flows_per_s": round(flows / secs, 0),
        "baseline_full_scan_flows_per_s": round(baseline_per_s, 0),
        "compile_ms": round(compile_ms, 1),
        "selections_per_workload": round(s.engine.selection_count() as f64 / args.workloads as f64, 2),
        "allowed": counts[Decision::Allow as usize],
        "denied": counts[Decision::Deny as usize],
        "audit_denied": counts[Decision::AuditDenied as usize],
        "threads": 1,
    });
    println!("{out}");
    Ok(0)
}

/// `x` rounded to `digits` decimals, for readable JSON.
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The `p` quantile (0–1) of `v` (nearest rank); zero for no samples.
pub(crate) fn percentile(v: &mut [std::time::Duration], p: f64) -> std::time::Duration {
    if v.is_empty() {
        return std::time::Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Milliseconds with two decimals.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    round(d.as_secs_f64() * 1e3, 2)
}
