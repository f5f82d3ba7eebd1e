//! What the scheduler works on: nodes, instances to place, constraints.

use std::collections::BTreeMap;

/// Resource dimensions: CPU (millicores), memory (bytes), and up to
/// [`EXTENDED`] extended resources (such as `gpu`), by index.
pub const DIMS: usize = 2 + EXTENDED;
/// How many extended resource kinds a cluster may use.
pub const EXTENDED: usize = 2;
pub const CPU: usize = 0;
pub const MEMORY: usize = 1;

/// An amount of every resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Res(pub [u64; DIMS]);

impl Res {
    pub fn new(cpu_milli: u64, memory: u64) -> Res {
        let mut r = [0; DIMS];
        r[CPU] = cpu_milli;
        r[MEMORY] = memory;
        Res(r)
    }

    /// With an extended resource (slot 0 or 1).
    pub fn with_extended(mut self, slot: usize, amount: u64) -> Res {
        if let Some(v) = self.0.get_mut(2 + slot) {
            *v = amount;
        }
        self
    }

    pub fn fits_in(&self, free: &Res) -> bool {
        self.0.iter().zip(free.0.iter()).all(|(a, b)| a <= b)
    }

    pub fn add(&self, o: &Res) -> Res {
        let mut r = *self;
        for (a, b) in r.0.iter_mut().zip(o.0.iter()) {
            *a = a.saturating_add(*b);
        }
        r
    }

    pub fn sub(&self, o: &Res) -> Res {
        let mut r = *self;
        for (a, b) in r.0.iter_mut().zip(o.0.iter()) {
            *a = a.saturating_sub(*b);
        }
        r
    }
}

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: Effect,
}

/// Tolerates taints with `key` (any key if empty and `exists`), the given
/// value (unless `exists`), and `effect` (any if `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    pub key: String,
    pub exists: bool,
    pub value: String,
    pub effect: Option<Effect>,
}

impl Toleration {
    pub fn tolerates(&self, t: &Taint) -> bool {
        let key_ok = (self.key.is_empty() && self.exists) || self.key == t.key;
        let value_ok = self.exists || self.value == t.value;
        let effect_ok = self.effect.is_none_or(|e| e == t.effect);
        key_ok && value_ok && effect_ok
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub capacity: Res,
    pub labels: Labels,
    pub taints: Vec<Taint>,
    /// False when cordoned: keeps what runs there, takes nothing new.
    pub schedulable: bool,
}

/// How instances of a service spread over a topology (`hostname` = each node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spread {
    pub topology_key: String,
    pub max_skew: u32,
    /// Hard: a filter. Soft: only a score.
    pub hard: bool,
}

/// At most `max_per_domain` instances of the service per topology domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AntiAffinity {
    pub topology_key: String,
    pub max_per_domain: u32,
    pub hard: bool,
}

/// Scoring strategy for resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Packing {
    /// Most-allocated first: fill nodes, keep others empty.
    #[default]
    BinPack,
    /// Least-allocated first: even load.
    Spread,
}

/// One instance to place. Instances of a service share `service`, and with
/// it their constraints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub requests: Res,
    pub node_selector: Labels,
    pub tolerations: Vec<Toleration>,
    pub spread: Vec<Spread>,
    pub anti_affinity: Vec<AntiAffinity>,
    pub priority: i32,
    /// Overrides the cluster's packing strategy.
    pub packing: Option<Packing>,
}

impl Instance {
    /// A plain instance: resources only.
    pub fn new(id: impl Into<String>, service: impl Into<String>, requests: Res) -> Instance {
        Instance {
            id: id.into(),
            service: service.into(),
            requests,
            node_selector: Labels::new(),
            tolerations: Vec::new(),
            spread: Vec::new(),
            anti_affinity: Vec::new(),
            priority: 0,
            packing: None,
        }
    }
}

/// The topology key meaning "each node is its own domain".
pub const HOSTNAME: &str = "hostname";
