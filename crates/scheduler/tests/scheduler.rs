//! Each filter and score, explanations, batches, preemption, rebalancing,
//! and property tests against brute force.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use proptest::prelude::*;
use skiff_scheduler::*;

const GI: u64 = 1 << 30;

fn node(name: &str, cpu: u64, mem_gi: u64, zone: &str) -> Node {
    Node {
        name: name.into(),
        capacity: Res::new(cpu, mem_gi * GI),
        labels: [("zone".to_string(), zone.to_string())].into(),
        taints: vec![],
        schedulable: true,
    }
}

fn inst(id: &str, service: &str, cpu: u64, mem_gi: u64) -> Instance {
    Instance::new(id, service, Res::new(cpu, mem_gi * GI))
}

fn full() -> Config {
    Config {
        sampling: Sampling::Full,
        ..Config::default()
    }
}

#[test]
fn resources_must_fit() {
    let mut s = Scheduler::new(
        vec![node("a", 1000, 2, "z1"), node("b", 4000, 8, "z1")],
        full(),
    );
    assert_eq!(s.place(&inst("i1", "svc", 2000, 1)).unwrap(), "b");
    let err = s.place(&inst("i2", "svc", 3000, 1)).unwrap_err();
    assert_eq!(err.to_string(), "0/2 nodes fit: 2 insufficient cpu");
    s.verify().unwrap();
    let mut empty = Scheduler::new(vec![], full());
    assert_eq!(
        empty
            .place(&inst("i", "svc", 1, 1))
            .unwrap_err()
            .to_string(),
        "0/0 nodes fit: no ready nodes"
    );
}

#[test]
fn bin_pack_fills_and_spread_balances() {
    let nodes = vec![node("a", 4000, 8, "z1"), node("b", 4000, 8, "z1")];
    let mut pack = Scheduler::new(nodes.clone(), full());
    let mut even = Scheduler::new(
        nodes,
        Config {
            packing: Packing::Spread,
            ..full()
        },
    );
    for i in 0..4 {
        pack.place(&inst(&format!("p{i}"), "svc", 500, 1)).unwrap();
        even.place(&inst(&format!("e{i}"), "svc", 500, 1)).unwrap();
    }
    assert_eq!(
        (pack.instances_on(0).len(), pack.instances_on(1).len()),
        (4, 0)
    );
    assert_eq!(
        (even.instances_on(0).len(), even.instances_on(1).len()),
        (2, 2)
    );
    // A per-service override beats the cluster setting.
    let mut one = inst("o", "other", 500, 1);
    one.packing = Some(Packing::Spread);
    assert_eq!(pack.place(&one).unwrap(), "b");
}

#[test]
fn balanced_score_prefers_matching_shapes() {
    // A CPU-heavy instance goes where CPU is plentiful relative to memory use.
    let mut s = Scheduler::new(
        vec![
            node("cpu-rich", 8000, 8, "z"),
            node("mem-rich", 2000, 32, "z"),
        ],
        Config {
            packing: Packing::Spread,
            ..full()
        },
    );
    assert_eq!(s.place(&inst("c", "svc", 1500, 1)).unwrap(), "cpu-rich");
}

#[test]
fn node_selector_and_cordon() {
    let mut gpu = node("gpu", 8000, 8, "z1");
    gpu.labels.insert("accel".into(), "gpu".into());
    let mut off = node("off", 8000, 8, "z1");
    off.schedulable = false;
    let mut s = Scheduler::new(vec![node("plain", 8000, 8, "z1"), gpu, off], full());
    let mut i = inst("i", "ml", 1000, 1);
    i.node_selector.insert("accel".into(), "gpu".into());
    assert_eq!(s.place(&i).unwrap(), "gpu");
    let mut j = i.clone();
    j.id = "j".into();
    j.node_selector.insert("accel".into(), "tpu".into());
    assert_eq!(
        s.place(&j).unwrap_err().to_string(),
        "0/3 nodes fit: 2 node selector does not match, 1 node cordoned"
    );
}

#[test]
fn taints_need_tolerations() {
    let mut tainted = node("t", 8000, 8, "z1");
    tainted.taints.push(Taint {
        key: "dedicated".into(),
        value: "gpu".into(),
        effect: Effect::NoSchedule,
    });
    let mut soft = node("soft", 8000, 8, "z1");
    soft.taints.push(Taint {
        key: "spot".into(),
        value: String::new(),
        effect: Effect::PreferNoSchedule,
    });
    let mut s = Scheduler::new(vec![tainted.clone()], full());
    assert_eq!(
        s.place(&inst("a", "svc", 100, 1)).unwrap_err().to_string(),
        "0/1 nodes fit: 1 taint dedicated=gpu not tolerated"
    );
    let mut tolerant = inst("b", "svc2", 100, 1);
    tolerant.tolerations.push(Toleration {
        key: "dedicated".into(),
        exists: false,
        value: "gpu".into(),
        effect: Some(Effect::NoSchedule),
    });
    assert_eq!(s.place(&tolerant).unwrap(), "t");
    let mut any = inst("c", "svc3", 100, 1);
    any.tolerations.push(Toleration {
        key: String::new(),
        exists: true,
        value: String::new(),
        effect: None,
    });
    assert_eq!(s.place(&any).unwrap(), "t");
    // PreferNoSchedule never filters.
    let mut s = Scheduler::new(vec![soft], full());
    assert_eq!(s.place(&inst("d", "svc", 100, 1)).unwrap(), "soft");
}

#[test]
fn hard_anti_affinity_caps_per_domain() {
    let nodes = vec![
        node("a", 8000, 8, "z1"),
        node("b", 8000, 8, "z1"),
        node("c", 8000, 8, "z2"),
    ];
    let mut s = Scheduler::new(nodes, full());
    let mk = |i: usize| {
        let mut x = inst(&format!("i{i}"), "web", 100, 1);
        x.anti_affinity.push(AntiAffinity {
            topology_key: "zone".into(),
            max_per_domain: 2,
            hard: true,
        });
        x
    };
    let placed: Vec<String> = (0..4).map(|i| s.place(&mk(i)).unwrap()).collect();
    let z1 = placed.iter().filter(|n| *n != "c").count();
    assert_eq!(z1, 2, "{placed:?}");
    let err = s.place(&mk(4)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "0/3 nodes fit: 3 anti-affinity: zone already has the maximum"
    );
    s.verify().unwrap();
}

#[test]
fn hard_spread_holds_within_max_skew() {
    let nodes = vec![
        node("a", 64000, 64, "z1"),
        node("b", 64000, 64, "z2"),
        node("c", 64000, 64, "z3"),
    ];
    let mut s = Scheduler::new(nodes, full());
    let batch: Vec<Instance> = (0..30)
        .map(|i| {
            let mut x = inst(&format!("i{i}"), "web", 100, 1);
            x.spread.push(Spread {
                topology_key: "zone".into(),
                max_skew: 1,
                hard: true,
            });
            x
        })
        .collect();
    assert!(s.place_batch(&batch).iter().all(Result::is_ok));
    assert_eq!(s.skew("web", "zone"), Some(0));
    // A node without the topology label is never used by a hard spread.
    let mut s = Scheduler::new(
        vec![Node {
            labels: Default::default(),
            ..node("bare", 64000, 64, "")
        }],
        full(),
    );
    assert!(
        s.place(&batch[0])
            .unwrap_err()
            .to_string()
            .contains("spread over node has no zone label would exceed maxSkew")
    );
}

#[test]
fn soft_spread_prefers_emptier_domains_but_never_refuses() {
    let nodes = vec![node("a", 1000, 64, "z1"), node("b", 64000, 64, "z2")];
    let mut s = Scheduler::new(nodes, full());
    let mk = |i: usize| {
        let mut x = inst(&format!("i{i}"), "web", 400, 1);
        x.spread.push(Spread {
            topology_key: "zone".into(),
            max_skew: 1,
            hard: false,
        });
        x
    };
    let placed: Vec<String> = (0..6).map(|i| s.place(&mk(i)).unwrap()).collect();
    // z1 holds only two (CPU); the rest go to z2 even though the skew grows.
    assert_eq!(placed.iter().filter(|n| *n == "a").count(), 2, "{placed:?}");
    assert_eq!(placed.len(), 6);
}

#[test]
fn soft_anti_affinity_prefers_nodes_without_the_service() {
    let mut s = Scheduler::new(
        vec![node("a", 8000, 16, "z1"), node("b", 8000, 16, "z1")],
        full(),
    );
    let mk = |i: usize| {
        let mut x = inst(&format!("i{i}"), "web", 100, 1);
        x.anti_affinity.push(AntiAffinity {
            topology_key: HOSTNAME.into(),
            max_per_domain: 1,
            hard: false,
        });
        x
    };
    // Bin-packing alone would stack both on one node.
    let first = s.place(&mk(0)).unwrap();
    let second = s.place(&mk(1)).unwrap();
    assert_ne!(first, second);
    // Soft: a third still places.
    assert!(s.place(&mk(2)).is_ok());
}

#[test]
fn extended_resources_are_counted() {
    let mut gpu_node = node("gpu", 8000, 16, "z1");
    gpu_node.capacity = gpu_node.capacity.with_extended(0, 2);
    let mut s = Scheduler::new(vec![node("plain", 8000, 16, "z1"), gpu_node], full());
    let mk = |id: &str| Instance::new(id, "train", Res::new(100, GI).with_extended(0, 1));
    assert_eq!(s.place(&mk("t1")).unwrap(), "gpu");
    assert_eq!(s.place(&mk("t2")).unwrap(), "gpu");
    assert_eq!(
        s.place(&mk("t3")).unwrap_err().to_string(),
        "0/2 nodes fit: 2 insufficient extended resource 0"
    );
}

#[test]
fn batch_reserves_and_places_big_first() {
    let mut s = Scheduler::new(
        vec![node("a", 4000, 8, "z"), node("b", 4000, 8, "z")],
        full(),
    );
    let mut batch: Vec<Instance> = (0..6)
        .map(|i| inst(&format!("s{i}"), "small", 1000, 1))
        .collect();
    batch.push(inst("big", "big", 4000, 2));
    let out = s.place_batch(&batch);
    // Big first means it gets a whole node; the six small fill the rest... only four fit.
    assert!(out[6].is_ok());
    assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 5);
    s.verify().unwrap();
}

#[test]
fn preemption_evicts_the_fewest_lowest_priority() {
    let mut s = Scheduler::new(
        vec![node("a", 4000, 8, "z"), node("b", 4000, 8, "z")],
        full(),
    );
    let with = |id: &str, cpu: u64, prio: i32| {
        let mut x = inst(id, id, cpu, 1);
        x.priority = prio;
        x
    };
    s.add_existing("a", &with("a-low1", 2000, 1)).unwrap();
    s.add_existing("a", &with("a-low2", 2000, 1)).unwrap();
    s.add_existing("b", &with("b-low", 1000, 0)).unwrap();
    s.add_existing("b", &with("b-mid", 3000, 5)).unwrap();
    let urgent = with("urgent", 2000, 10);
    assert!(s.place(&urgent.clone()).is_err());
    // On a: one victim of priority 1 suffices. On b: evicting b-low is not
    // enough, b-mid (priority 5) would be needed: worse.
    let p = s.preempt(&urgent).unwrap();
    assert_eq!(p.node, "a");
    assert_eq!(p.victims.len(), 1);
    // Nothing of lower priority to take: no preemption.
    assert_eq!(s.preempt(&with("humble", 2000, 0)), None);
}

#[test]
fn rebalance_restores_spread_and_defragments() {
    let nodes = vec![
        node("a", 8000, 16, "z1"),
        node("b", 8000, 16, "z2"),
        node("c", 8000, 16, "z2"),
    ];
    let mut s = Scheduler::new(nodes, full());
    let web = |i: usize| {
        let mut x = inst(&format!("w{i}"), "web", 1000, 1);
        x.spread.push(Spread {
            topology_key: "zone".into(),
            max_skew: 1,
            hard: true,
        });
        x
    };
    // Drift: four in z1, none in z2 (e.g. z2 was down during a rollout).
    for i in 0..4 {
        s.add_existing("a", &web(i)).unwrap();
    }
    s.add_existing("c", &inst("lonely", "misc", 500, 1))
        .unwrap();
    s.add_existing("b", &inst("filler", "misc2", 4000, 8))
        .unwrap();
    let plan = s.rebalance(10);
    let spread_moves = plan
        .iter()
        .filter(|m| m.reason.starts_with("spread"))
        .count();
    assert_eq!(spread_moves, 2, "{plan:?}");
    assert!(
        plan.iter()
            .any(|m| m.instance == "lonely" && m.reason.starts_with("defragment")),
        "{plan:?}"
    );
    // Bounded.
    assert!(s.rebalance(1).len() <= 1);
    // The plan is only a proposal.
    assert_eq!(s.node_of("lonely"), Some("c"));
}

// ---- Properties ----

fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
    prop::collection::vec(
        (
            1u64..16,
            1u64..32,
            0..3usize,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.9),
        ),
        1..8,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (cpu, mem, zone, tainted, schedulable))| Node {
                name: format!("n{i}"),
                capacity: Res::new(cpu * 1000, mem * GI),
                labels: [("zone".to_string(), format!("z{zone}"))].into(),
                taints: if tainted {
                    vec![Taint {
                        key: "dedicated".into(),
                        value: "x".into(),
                        effect: Effect::NoSchedule,
                    }]
                } else {
                    vec![]
                },
                schedulable,
            })
            .collect()
    })
}

fn arb_instances() -> impl Strategy<Value = Vec<Instance>> {
    prop::collection::vec((0..4usize, 1u64..8, 1u64..8, 0..3i32), 1..40).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (svc, cpu, mem, prio))| {
                let mut x = Instance::new(
                    format!("i{i}"),
                    format!("s{svc}"),
                    Res::new(cpu * 500, mem * GI / 2),
                );
                x.priority = prio;
                // Constraints by service, so instances of one service agree.
                match svc {
                    0 => x.spread.push(Spread {
                        topology_key: "zone".into(),
                        max_skew: 1,
                        hard: true,
                    }),
                    1 => x.anti_affinity.push(AntiAffinity {
                        topology_key: HOSTNAME.into(),
                        max_per_domain: 1,
                        hard: true,
                    }),
                    2 => x.tolerations.push(Toleration {
                        key: "dedicated".into(),
                        exists: true,
                        value: String::new(),
                        effect: None,
                    }),
                    _ => {}
                }
                x
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Never overcommits, and every hard constraint holds, after any batch.
    #[test]
    fn never_overcommits_and_hard_constraints_hold(nodes in arb_nodes(), batch in arb_instances(), sampled in any::<bool>(), seed in any::<u64>()) {
        let sampling = if sampled { Sampling::Bounded { min_feasible: 2, percent: 10 } } else { Sampling::Full };
        let mut s = Scheduler::new(nodes, Config { sampling, seed, ..Config::default() });
        s.place_batch(&batch);
        prop_assert!(s.verify().is_ok(), "{:?}", s.verify());
        if let Some(skew) = s.skew("s0", "zone") {
            prop_assert!(skew <= 1, "spread skew {skew}");
        }
        for n in 0..s.nodes().len() {
            let s1 = s.instances_on(n).iter().filter(|id| batch.iter().any(|b| &b.id == *id && b.service == "s1")).count();
            prop_assert!(s1 <= 1);
        }
    }

    /// The same seed and input give the same placements.
    #[test]
    fn deterministic(nodes in arb_nodes(), batch in arb_instances(), seed in any::<u64>()) {
        let run = || {
            let mut s = Scheduler::new(nodes.clone(), Config { seed, ..Config::default() });
            s.place_batch(&batch).into_iter().map(|r| r.ok()).collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }

    /// An instance reported unschedulable fits nowhere, by brute force over
    /// every node with every constraint recomputed from the placements.
    #[test]
    fn unschedulable_really_fits_nowhere(nodes in arb_nodes(), batch in arb_instances()) {
        let mut s = Scheduler::new(nodes.clone(), Config { sampling: Sampling::Bounded { min_feasible: 1, percent: 1 }, ..Config::default() });
        let mut placed: Vec<(usize, String)> = Vec::new(); // (node, service)
        for inst in &batch {
            let base_ok = |n: usize, s: &Scheduler| {
                let node = &nodes[n];
                node.schedulable
                    && inst.requests.fits_in(&node.capacity.sub(&s.used(n)))
                    && node.taints.iter().all(|t| inst.tolerations.iter().any(|tol| tol.tolerates(t)))
            };
            let zone = |n: usize| nodes[n].labels["zone"].clone();
            let mine = |n: &usize| placed.iter().filter(|(pn, svc)| pn == n && *svc == inst.service).count();
            let fits = |n: usize, s: &Scheduler| {
                if !base_ok(n, s) {
                    return false;
                }
                if !inst.anti_affinity.is_empty() && mine(&n) >= 1 {
                    return false;
                }
                if !inst.spread.is_empty() {
                    // Eligible zones: those with a node the service may use at all.
                    let eligible: std::collections::BTreeSet<String> = (0..nodes.len())
                        .filter(|m| nodes[*m].schedulable && nodes[*m].taints.iter().all(|t| inst.tolerations.iter().any(|tol| tol.tolerates(t))))
                        .map(zone)
                        .collect();
                    let count = |z: &String| placed.iter().filter(|(pn, svc)| *svc == inst.service && zone(*pn) == *z).count();
                    let min = eligible.iter().map(count).min().unwrap_or(0);
                    if count(&zone(n)) + 1 > min + 1 {
                        return false;
                    }
                }
                true
            };
            let fit_before: Vec<bool> = (0..nodes.len()).map(|n| fits(n, &s)).collect();
            let could = fit_before.iter().any(|f| *f);
            match s.place(inst) {
                Ok(name) => {
                    let n = nodes.iter().position(|x| x.name == name).unwrap();
                    prop_assert!(fit_before[n], "{} placed on {name}, where it did not fit", inst.id);
                    placed.push((n, inst.service.clone()));
                }
                Err(e) => prop_assert!(!could, "{} reported unschedulable ({e}) but fits somewhere", inst.id),
            }
        }
    }
}
