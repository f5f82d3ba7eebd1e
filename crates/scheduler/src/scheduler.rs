//! Placement: filters, scores, batch placement with reservations,
//! explanations, preemption and rebalancing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::domains::DomainCounts;
use crate::index::FreeIndex;
use crate::model::{CPU, DIMS, Effect, HOSTNAME, Instance, MEMORY, Node, Packing, Res};

/// How many nodes a placement looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// Every node, every time.
    Full,
    /// Stop once this many feasible nodes are found (at least
    /// `min_feasible`, or `percent` of the nodes), scanning from where the
    /// last placement stopped. A placement that finds none scans all nodes
    /// before it reports the instance unschedulable.
    Bounded { min_feasible: usize, percent: usize },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub packing: Packing,
    pub sampling: Sampling,
    /// Where the first scan starts; the only source of variation.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            packing: Packing::BinPack,
            sampling: Sampling::Bounded {
                min_feasible: 100,
                percent: 5,
            },
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchedulerError {
    UnknownNode(String),
    DuplicateInstance(String),
    UnknownInstance(String),
    /// More extended resource kinds, or shared-service constraints that differ.
    Invalid(String),
}

impl fmt::Display for SchedulerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchedulerError::UnknownNode(n) => write!(f, "no node named {n}"),
            SchedulerError::DuplicateInstance(i) => write!(f, "instance {i} is already placed"),
            SchedulerError::UnknownInstance(i) => write!(f, "no placed instance {i}"),
            SchedulerError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for SchedulerError {}

/// Why an instance fits nowhere: how many nodes failed for each reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub instance: String,
    pub nodes: usize,
    /// Reason → number of nodes it ruled out (each node counts once, for
    /// its first failing check; resource shortages list every short resource).
    pub reasons: BTreeMap<String, usize>,
}

impl fmt::Display for Unschedulable {
    /// `0/5000 nodes fit: 4200 insufficient memory, 800 taint dedicated=gpu not tolerated`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut reasons: Vec<(&String, &usize)> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        if self.nodes == 0 {
            return f.write_str("0/0 nodes fit: no ready nodes");
        }
        let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        write!(f, "0/{} nodes fit: {}", self.nodes, parts.join(", "))
    }
}

/// Lower-priority instances whose eviction lets an instance in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub node: String,
    pub victims: Vec<String>,
}

/// One proposed move of a rebalance plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub instance: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Placed {
    node: usize,
    instance: Instance,
    service: usize,
}

/// A topology key's domains: node → domain index (`None` without the label).
#[derive(Debug, Clone)]
struct Topology {
    key: String,
    of_node: Vec<Option<usize>>,
    names: Vec<String>,
}

/// A service's constraints, resolved to topology ids, and its counts.
#[derive(Debug, Clone)]
struct ServiceState {
    /// (topology, max skew, hard)
    spread: Vec<(usize, u32, bool)>,
    /// (topology, max per domain, hard)
    anti: Vec<(usize, u32, bool)>,
    /// Counts per topology the service constrains.
    counts: HashMap<usize, DomainCounts>,
}

/// The cluster as the scheduler sees it, and the placements it makes.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: Config,
    nodes: Vec<Node>,
    by_name: HashMap<String, usize>,
    used: Vec<Res>,
    topologies: Vec<Topology>,
    topology_ids: HashMap<String, usize>,
    services: Vec<ServiceState>,
    service_ids: HashMap<String, usize>,
    placed: HashMap<String, Placed>,
    on_node: Vec<Vec<String>>,
    cursor: usize,
    index: FreeIndex,
}

/// Why one node cannot take an instance; `None` means it can.
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// Cheap to make (no strings): placement asks this of many nodes; only
/// [`Scheduler::explain`] turns refusals into words.
enum Refusal {
    Cordoned,
    Selector,
    /// Index of the untolerated taint in the node's taints.
    Taint(usize),
    /// Bit `d` set for each resource dimension that is short.
    Resources(u8),
    /// The topology whose domain is full.
    AntiAffinity(usize),
    /// The topology, and whether the node lacks its label altogether.
    Spread {
        topology: usize,
        unlabelled: bool,
    },
}

const RESOURCE_NAMES: [&str; DIMS] = [
    "cpu",
    "memory",
    "extended resource 0",
    "extended resource 1",
];

impl Scheduler {
    pub fn new(nodes: Vec<Node>, config: Config) -> Scheduler {
        let by_name = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let n = nodes.len();
        let cursor = if n == 0 {
            0
        } else {
            (config.seed % n as u64) as usize
        };
        // Cordoned nodes offer nothing to the index.
        let free: Vec<Res> = nodes
            .iter()
            .map(|n| {
                if n.schedulable {
                    n.capacity
                } else {
                    Res::default()
                }
            })
            .collect();
        Scheduler {
            config,
            index: FreeIndex::new(&free),
            used: vec![Res::default(); n],
            on_node: vec![Vec::new(); n],
            nodes,
            by_name,
            topologies: Vec::new(),
            topology_ids: HashMap::new(),
            services: Vec::new(),
            service_ids: HashMap::new(),
            placed: HashMap::new(),
            cursor,
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Resources in use on a node.
    pub fn used(&self, node: usize) -> Res {
        self.used[node]
    }

    /// Where an instance is placed.
    pub fn node_of(&self, instance: &str) -> Option<&str> {
        self.placed
            .get(instance)
            .map(|p| self.nodes[p.node].name.as_str())
    }

    pub fn instances_on(&self, node: usize) -> &[String] {
        &self.on_node[node]
    }

    fn topology(&mut self, key: &str) -> usize {
        if let Some(id) = self.topology_ids.get(key) {
            return *id;
        }
        let mut names: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let of_node = self
            .nodes
            .iter()
            .map(|n| {
                let value = if key == HOSTNAME {
                    Some(n.name.clone())
                } else {
                    n.labels.get(key).cloned()
                };
                value.map(|v| {
                    *index.entry(v.clone()).or_insert_with(|| {
                        names.push(v);
                        names.len() - 1
                    })
                })
            })
            .collect();
        let id = self.topologies.len();
        self.topologies.push(Topology {
            key: key.to_string(),
            of_node,
            names,
        });
        self.topology_ids.insert(key.to_string(), id);
        id
    }

    /// The service's state, created from its first instance.
    fn service(&mut self, inst: &Instance) -> usize {
        if let Some(id) = self.service_ids.get(&inst.service) {
            return *id;
        }
        let spread: Vec<(usize, u32, bool)> = inst
            .spread
            .iter()
            .map(|s| (self.topology(&s.topology_key), s.max_skew.max(1), s.hard))
            .collect();
        let anti: Vec<(usize, u32, bool)> = inst
            .anti_affinity
            .iter()
            .map(|a| {
                (
                    self.topology(&a.topology_key),
                    a.max_per_domain.max(1),
                    a.hard,
                )
            })
            .collect();
        let mut counts = HashMap::new();
        for &(topo, ..) in spread.iter().chain(anti.iter()) {
            counts.entry(topo).or_insert_with(|| {
                // Eligible domains: those with a node the service may use
                // at all (selector and taints), as Kubernetes counts them.
                let t = &self.topologies[topo];
                let mut eligible = vec![false; t.names.len()];
                for (n, node) in self.nodes.iter().enumerate() {
                    if let Some(d) = t.of_node[n]
                        && static_fit(node, inst).is_none()
                    {
                        eligible[d] = true;
                    }
                }
                DomainCounts::new(eligible)
            });
        }
        let id = self.services.len();
        self.services.push(ServiceState {
            spread,
            anti,
            counts,
        });
        self.service_ids.insert(inst.service.clone(), id);
        id
    }

    /// Why `node` cannot take `inst` now, or `None`.
    fn refusal(&self, node: usize, inst: &Instance, service: &ServiceState) -> Option<Refusal> {
        let n = &self.nodes[node];
        if let Some(r) = static_fit(n, inst) {
            return Some(r);
        }
        let free = n.capacity.sub(&self.used[node]);
        if !inst.requests.fits_in(&free) {
            let short = (0..DIMS)
                .filter(|&d| inst.requests.0[d] > free.0[d])
                .fold(0u8, |bits, d| bits | (1 << d));
            return Some(Refusal::Resources(short));
        }
        for &(topo, max, hard) in &service.anti {
            if !hard {
                continue;
            }
            if let Some(d) = self.topologies[topo].of_node[node]
                && service.counts[&topo].counts[d] >= max
            {
                return Some(Refusal::AntiAffinity(topo));
            }
        }
        for &(topo, max_skew, hard) in &service.spread {
            if !hard {
                continue;
            }
            let Some(d) = self.topologies[topo].of_node[node] else {
                return Some(Refusal::Spread {
                    topology: topo,
                    unlabelled: true,
                });
            };
            let c = &service.counts[&topo];
            if c.counts[d] + 1 > c.min + max_skew {
                return Some(Refusal::Spread {
                    topology: topo,
                    unlabelled: false,
                });
            }
        }
        None
    }

    fn topology_key(&self, topo: usize) -> &str {
        &self.topologies[topo].key
    }

    /// Higher is better, 0–600.
    fn score(&self, node: usize, inst: &Instance, service: &ServiceState) -> u64 {
        let cap = &self.nodes[node].capacity;
        let after = self.used[node].add(&inst.requests);
        let frac = |d: usize| {
            if cap.0[d] == 0 {
                1.0
            } else {
                after.0[d] as f64 / cap.0[d] as f64
            }
        };
        let (cpu, mem) = (frac(CPU), frac(MEMORY));
        let allocated = (cpu + mem) / 2.0;
        let resources = match inst.packing.unwrap_or(self.config.packing) {
            Packing::BinPack => allocated,
            Packing::Spread => 1.0 - allocated,
        };
        let balanced = 1.0 - (cpu - mem).abs();
        let mut score = 100.0 * resources + 100.0 * balanced;
        for &(topo, max_skew, _) in &service.spread {
            if let Some(d) = self.topologies[topo].of_node[node] {
                let c = &service.counts[&topo];
                let over = f64::from(c.counts[d].saturating_sub(c.min));
                score += 200.0 * (1.0 - (over / f64::from(max_skew + 1)).min(1.0));
            }
        }
        for &(topo, max, _) in &service.anti {
            let count =
                self.topologies[topo].of_node[node].map_or(0, |d| service.counts[&topo].counts[d]);
            score += if count >= max {
                0.0
            } else {
                200.0 * (1.0 - f64::from(count) / f64::from(max))
            };
        }
        (score * 1000.0) as u64
    }

    /// Places one instance, reserving its resources; errs with an
    /// explanation when no node can take it.
    pub fn place(&mut self, inst: &Instance) -> Result<String, Unschedulable> {
        match self.try_place(inst) {
            Some(node) => Ok(node),
            None => Err(self.explain(inst)),
        }
    }

    /// [`Scheduler::place`] without the explanation when nothing fits (the
    /// explanation needs a look at every node; ask [`Scheduler::explain`]).
    ///
    /// Candidates come from the free-resource index in scan order from
    /// where the last placement stopped, so full nodes are never looked at;
    /// under [`Sampling::Bounded`] the scan stops after enough feasible
    /// nodes. It only reports "nothing fits" after every node the index
    /// offers was checked.
    pub fn try_place(&mut self, inst: &Instance) -> Option<String> {
        let service = self.service(inst);
        let n = self.nodes.len();
        if n == 0 || !self.index.anywhere(&inst.requests) {
            return None;
        }
        let want = match self.config.sampling {
            Sampling::Full => usize::MAX,
            Sampling::Bounded {
                min_feasible,
                percent,
            } => min_feasible.max(n * percent / 100),
        };
        let start = self.cursor;
        let (mut best, mut feasible, mut last): (Option<(u64, usize)>, usize, usize) =
            (None, 0, start);
        {
            let state = &self.services[service];
            let mut visit = |node: usize| {
                last = node;
                if self.refusal(node, inst, state).is_none() {
                    feasible += 1;
                    let s = self.score(node, inst, state);
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, node));
                    }
                }
                feasible < want
            };
            if self
                .index
                .each_fitting(start, n, &inst.requests, &mut visit)
            {
                self.index
                    .each_fitting(0, start, &inst.requests, &mut visit);
            }
        }
        self.cursor = (last + 1) % n;
        let (_, node) = best?;
        self.commit(node, inst.clone(), service);
        Some(self.nodes[node].name.clone())
    }

    /// Places a batch: higher priority first, then larger requests first;
    /// each placement reserves before the next is decided, so the batch as
    /// a whole never overcommits and keeps its spread. Results are in input order.
    pub fn place_batch(&mut self, batch: &[Instance]) -> Vec<Result<String, Unschedulable>> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&batch[a], &batch[b]);
            y.priority
                .cmp(&x.priority)
                .then_with(|| size(&y.requests).cmp(&size(&x.requests)))
                .then(a.cmp(&b))
        });
        let mut out: Vec<Option<Result<String, Unschedulable>>> = vec![None; batch.len()];
        for i in order {
            out[i] = Some(self.place(&batch[i]));
        }
        out.into_iter().flatten().collect()
    }

    /// Records an instance already running on `node` (current allocations).
    pub fn add_existing(&mut self, node: &str, inst: &Instance) -> Result<(), SchedulerError> {
        let &idx = self
            .by_name
            .get(node)
            .ok_or_else(|| SchedulerError::UnknownNode(node.to_string()))?;
        if self.placed.contains_key(&inst.id) {
            return Err(SchedulerError::DuplicateInstance(inst.id.clone()));
        }
        let service = self.service(inst);
        self.commit(idx, inst.clone(), service);
        Ok(())
    }

    /// Keeps the free-resource index in step with `used[node]`.
    fn reindex(&mut self, node: usize) {
        let n = &self.nodes[node];
        let free = if n.schedulable {
            n.capacity.sub(&self.used[node])
        } else {
            Res::default()
        };
        self.index.set(node, &free);
    }

    fn commit(&mut self, node: usize, inst: Instance, service: usize) {
        self.used[node] = self.used[node].add(&inst.requests);
        self.reindex(node);
        for (topo, counts) in self.services[service].counts.iter_mut() {
            if let Some(d) = self.topologies[*topo].of_node[node] {
                counts.add(d);
            }
        }
        self.on_node[node].push(inst.id.clone());
        self.placed.insert(
            inst.id.clone(),
            Placed {
                node,
                instance: inst,
                service,
            },
        );
    }

    /// Removes a placed instance (stopped, evicted or moved).
    pub fn remove(&mut self, id: &str) -> Result<Instance, SchedulerError> {
        let p = self
            .placed
            .remove(id)
            .ok_or_else(|| SchedulerError::UnknownInstance(id.to_string()))?;
        self.used[p.node] = self.used[p.node].sub(&p.instance.requests);
        self.reindex(p.node);
        for (topo, counts) in self.services[p.service].counts.iter_mut() {
            if let Some(d) = self.topologies[*topo].of_node[p.node] {
                counts.remove(d);
            }
        }
        self.on_node[p.node].retain(|i| i != id);
        Ok(p.instance)
    }

    /// Why `inst` fits on no node, checking every node.
    pub fn explain(&mut self, inst: &Instance) -> Unschedulable {
        let service = self.service(inst);
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for node in 0..self.nodes.len() {
            let why = match self.refusal(node, inst, &self.services[service]) {
                None => continue,
                Some(Refusal::Cordoned) => vec!["node cordoned".to_string()],
                Some(Refusal::Selector) => vec!["node selector does not match".to_string()],
                Some(Refusal::Taint(i)) => {
                    let t = &self.nodes[node].taints[i];
                    let shown = if t.value.is_empty() {
                        t.key.clone()
                    } else {
                        format!("{}={}", t.key, t.value)
                    };
                    vec![format!("taint {shown} not tolerated")]
                }
                Some(Refusal::Resources(short)) => (0..DIMS)
                    .filter(|d| short & (1 << d) != 0)
                    .map(|d| format!("insufficient {}", RESOURCE_NAMES[d]))
                    .collect(),
                Some(Refusal::AntiAffinity(topo)) => {
                    vec![format!(
                        "anti-affinity: {} already has the maximum",
                        self.topology_key(topo)
                    )]
                }
                Some(Refusal::Spread {
                    topology,
                    unlabelled,
                }) => {
                    let key = self.topology_key(topology);
                    if unlabelled {
                        vec![format!(
                            "spread over node has no {key} label would exceed maxSkew"
                        )]
                    } else {
                        vec![format!("spread over {key} would exceed maxSkew")]
                    }
                }
            };
            for w in why {
                *reasons.entry(w).or_default() += 1;
            }
        }
        Unschedulable {
            instance: inst.id.clone(),
            nodes: self.nodes.len(),
            reasons,
        }
    }

    /// The cheapest eviction that lets `inst` in: on each node where it
    /// would pass every non-resource filter, evict lower-priority instances
    /// (lowest priority, then largest, first) until it fits, then give back
    /// any victim it still fits without. The node chosen has the lowest
    /// highest-victim priority, then the fewest victims, then the lowest
    /// priority sum. `None` if no eviction helps.
    pub fn preempt(&mut self, inst: &Instance) -> Option<Preemption> {
        let service = self.service(inst);
        // (highest victim priority, victim count, priority sum), node, victims
        let mut best: Option<(VictimCost, usize, Vec<String>)> = None;
        for node in 0..self.nodes.len() {
            match self.refusal(node, inst, &self.services[service]) {
                None => {
                    return Some(Preemption {
                        node: self.nodes[node].name.clone(),
                        victims: Vec::new(),
                    });
                }
                Some(Refusal::Resources(_)) => {}
                Some(_) => continue,
            }
            let mut candidates: Vec<&Placed> = self.on_node[node]
                .iter()
                .filter_map(|id| self.placed.get(id))
                .filter(|p| p.instance.priority < inst.priority)
                .collect();
            candidates.sort_by(|a, b| {
                a.instance
                    .priority
                    .cmp(&b.instance.priority)
                    .then(size(&b.instance.requests).cmp(&size(&a.instance.requests)))
                    .then(a.instance.id.cmp(&b.instance.id))
            });
            let cap = self.nodes[node].capacity;
            let mut used = self.used[node];
            let mut victims = Vec::new();
            for c in &candidates {
                if inst.requests.fits_in(&cap.sub(&used)) {
                    break;
                }
                used = used.sub(&c.instance.requests);
                victims.push(*c);
            }
            if !inst.requests.fits_in(&cap.sub(&used)) {
                continue;
            }
            // Reprieve: highest priority victims first.
            let mut kept = Vec::new();
            for v in victims.iter().rev() {
                let with = used.add(&v.instance.requests);
                if inst.requests.fits_in(&cap.sub(&with)) {
                    used = with;
                } else {
                    kept.push(*v);
                }
            }
            let key = (
                kept.iter()
                    .map(|v| v.instance.priority)
                    .max()
                    .unwrap_or(i32::MIN),
                kept.len(),
                kept.iter().map(|v| i64::from(v.instance.priority)).sum(),
            );
            if best.as_ref().is_none_or(|(k, ..)| key < *k) {
                let mut ids: Vec<String> = kept.iter().map(|v| v.instance.id.clone()).collect();
                ids.sort();
                best = Some((key, node, ids));
            }
        }
        best.map(|(_, node, victims)| Preemption {
            node: self.nodes[node].name.clone(),
            victims,
        })
    }

    /// Proposes at most `max_moves` moves: first to bring services whose
    /// spread drifted beyond `maxSkew` back within it, then (bin-packing)
    /// to empty the least-used nodes into fuller ones. The plan is applied
    /// to a copy; the scheduler itself is unchanged.
    pub fn rebalance(&self, max_moves: usize) -> Vec<Move> {
        let mut sim = self.clone();
        let mut moves = Vec::new();
        // 1. Spread.
        'spread: while moves.len() < max_moves {
            for s in 0..sim.services.len() {
                for &(topo, max_skew, _) in &sim.services[s].spread.clone() {
                    let c = &sim.services[s].counts[&topo];
                    if c.skew() <= max_skew {
                        continue;
                    }
                    let from_domain = (0..c.counts.len())
                        .filter(|d| c.eligible[*d])
                        .max_by_key(|d| c.counts[*d]);
                    let Some(from_domain) = from_domain else {
                        continue;
                    };
                    let victim = sim
                        .placed
                        .values()
                        .filter(|p| {
                            p.service == s
                                && sim.topologies[topo].of_node[p.node] == Some(from_domain)
                        })
                        .map(|p| p.instance.id.clone())
                        .min();
                    let Some(victim) = victim else { continue };
                    if let Some(m) = sim.try_move(
                        &victim,
                        format!(
                            "spread over {} exceeds maxSkew {max_skew}",
                            sim.topology_key(topo)
                        ),
                        |_, _| true,
                    ) {
                        moves.push(m);
                        continue 'spread;
                    }
                }
            }
            break;
        }
        // 2. Fragmentation: drain the emptiest nodes into fuller ones.
        if sim.config.packing == Packing::BinPack {
            let mut order: Vec<usize> = (0..sim.nodes.len())
                .filter(|n| !sim.on_node[*n].is_empty())
                .collect();
            order.sort_by(|a, b| {
                utilization(&sim.used[*a], &sim.nodes[*a].capacity)
                    .total_cmp(&utilization(&sim.used[*b], &sim.nodes[*b].capacity))
                    .then(a.cmp(b))
            });
            for node in order {
                let ids = sim.on_node[node].clone();
                if moves.len() + ids.len() > max_moves {
                    break;
                }
                // Only drain a node if everything on it can go elsewhere.
                let mut trial = sim.clone();
                let mut planned = Vec::new();
                let from_util = utilization(&sim.used[node], &sim.nodes[node].capacity);
                for id in &ids {
                    match trial.try_move(
                        id,
                        format!("defragment: empty {}", sim.nodes[node].name),
                        |t, to| {
                            to != node
                                && utilization(&t.used[to], &t.nodes[to].capacity) >= from_util
                        },
                    ) {
                        Some(m) => planned.push(m),
                        None => break,
                    }
                }
                if planned.len() == ids.len() && !ids.is_empty() {
                    sim = trial;
                    moves.extend(planned);
                }
            }
        }
        moves
    }

    /// Moves one instance to the best other node that accepts it.
    fn try_move(
        &mut self,
        id: &str,
        reason: String,
        allow: impl Fn(&Scheduler, usize) -> bool,
    ) -> Option<Move> {
        let from = self.placed.get(id)?.node;
        let inst = self.remove(id).ok()?;
        let service = self.service(&inst);
        let mut best: Option<(u64, usize)> = None;
        for node in 0..self.nodes.len() {
            if node == from
                || !allow(self, node)
                || self.refusal(node, &inst, &self.services[service]).is_some()
            {
                continue;
            }
            let s = self.score(node, &inst, &self.services[service]);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, node));
            }
        }
        match best {
            Some((_, to)) => {
                self.commit(to, inst, service);
                Some(Move {
                    instance: id.to_string(),
                    from: self.nodes[from].name.clone(),
                    to: self.nodes[to].name.clone(),
                    reason,
                })
            }
            None => {
                self.commit(from, inst, service);
                None
            }
        }
    }

    /// Checks that no node is overcommitted and every hard constraint holds.
    pub fn verify(&self) -> Result<(), String> {
        for (i, n) in self.nodes.iter().enumerate() {
            if !self.used[i].fits_in(&n.capacity) {
                return Err(format!(
                    "node {} is overcommitted: {:?} of {:?}",
                    n.name, self.used[i], n.capacity
                ));
            }
        }
        for p in self.placed.values() {
            let node = &self.nodes[p.node];
            if let Some(r) = static_fit_placed(node, &p.instance) {
                return Err(format!("{} on {} breaks {r:?}", p.instance.id, node.name));
            }
            let s = &self.services[p.service];
            for &(topo, max, hard) in &s.anti {
                if let Some(d) = self.topologies[topo].of_node[p.node]
                    && hard
                    && s.counts[&topo].counts[d] > max
                {
                    return Err(format!(
                        "{}: anti-affinity over {} exceeded",
                        p.instance.service,
                        self.topology_key(topo)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The largest spread skew of a service over a topology key.
    pub fn skew(&self, service: &str, key: &str) -> Option<u32> {
        let s = &self.services[*self.service_ids.get(service)?];
        let topo = *self.topology_ids.get(key)?;
        s.counts.get(&topo).map(DomainCounts::skew)
    }
}

/// How bad an eviction is: highest victim priority, victims, priority sum.
type VictimCost = (i32, usize, i64);

/// Filters that do not depend on what else is placed.
fn static_fit(node: &Node, inst: &Instance) -> Option<Refusal> {
    if !node.schedulable {
        return Some(Refusal::Cordoned);
    }
    static_fit_placed(node, inst)
}

/// The filters an already placed instance must still satisfy.
fn static_fit_placed(node: &Node, inst: &Instance) -> Option<Refusal> {
    if !inst
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
    {
        return Some(Refusal::Selector);
    }
    for (i, t) in node.taints.iter().enumerate() {
        if t.effect != Effect::PreferNoSchedule
            && !inst.tolerations.iter().any(|tol| tol.tolerates(t))
        {
            return Some(Refusal::Taint(i));
        }
    }
    None
}

/// A single number for ordering requests by size (CPU cores + memory GiB).
fn size(r: &Res) -> u64 {
    r.0[CPU] + r.0[MEMORY] / (1 << 20)
}

fn utilization(used: &Res, cap: &Res) -> f64 {
    let f = |d: usize| {
        if cap.0[d] == 0 {
            0.0
        } else {
            used.0[d] as f64 / cap.0[d] as f64
        }
    };
    (f(CPU) + f(MEMORY)) / 2.0
}
