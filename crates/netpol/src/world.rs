//! The workloads and namespaces a policy set is evaluated over, with
//! labels interned so selector checks compare integers, not strings.

use std::collections::HashMap;
use std::net::IpAddr;

use skiff_api::meta::{Labels, NAMESPACE_NAME_LABEL};
use skiff_api::policytest::{NamedPort, PolicyTestSpec};
use skiff_api::selector::{LabelSelector, Operator};

/// Index of a workload in a [`World`].
pub type WorkloadId = u32;
pub type NamespaceId = u32;

/// Workloads and namespaces, as policies see them.
#[derive(Debug, Default, Clone)]
pub struct World {
    interner: Interner,
    namespaces: Vec<NamespaceInfo>,
    ns_by_name: HashMap<String, NamespaceId>,
    workloads: Vec<WorkloadInfo>,
    by_name: HashMap<(String, String), WorkloadId>,
    /// Workloads by (namespace, label key, label value): the selection index.
    postings: HashMap<(NamespaceId, u32, u32), Vec<WorkloadId>>,
}

#[derive(Debug, Clone)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
    interned: ILabels,
    pub members: Vec<WorkloadId>,
}

#[derive(Debug, Clone)]
pub struct WorkloadInfo {
    pub namespace: NamespaceId,
    pub name: String,
    pub labels: Labels,
    interned: ILabels,
    pub ports: Vec<NamedPort>,
    pub ip: Option<IpAddr>,
}

/// Why a workload could not be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorldError {
    /// The same `namespace/name` with a different definition.
    Conflict(String),
}

impl std::error::Error for WorldError {}

impl std::fmt::Display for WorldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorldError::Conflict(what) => write!(f, "{what} is defined differently in two places"),
        }
    }
}

impl World {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or extends a namespace. Every namespace carries
    /// `kubernetes.io/metadata.name: <name>`, as in Kubernetes.
    pub fn add_namespace(
        &mut self,
        name: &str,
        labels: &Labels,
    ) -> Result<NamespaceId, WorldError> {
        let id = self.namespace_id(name);
        let ns = &mut self.namespaces[id as usize];
        for (k, v) in labels {
            match ns.labels.get(k) {
                Some(old) if old != v => {
                    return Err(WorldError::Conflict(format!("namespace {name} label {k}")));
                }
                _ => {
                    ns.labels.insert(k.clone(), v.clone());
                }
            }
        }
        let labels = ns.labels.clone();
        self.namespaces[id as usize].interned = self.interner.labels(&labels);
        Ok(id)
    }

    fn namespace_id(&mut self, name: &str) -> NamespaceId {
        if let Some(id) = self.ns_by_name.get(name) {
            return *id;
        }
        let id = self.namespaces.len() as NamespaceId;
        let labels: Labels = [(NAMESPACE_NAME_LABEL.to_string(), name.to_string())].into();
        let interned = self.interner.labels(&labels);
        self.namespaces.push(NamespaceInfo {
            name: name.to_string(),
            labels,
            interned,
            members: Vec::new(),
        });
        self.ns_by_name.insert(name.to_string(), id);
        id
    }

    /// Adds a workload; adding the same definition twice is a no-op.
    pub fn add_workload(
        &mut self,
        namespace: &str,
        name: &str,
        labels: &Labels,
        ports: &[NamedPort],
        ip: Option<IpAddr>,
    ) -> Result<WorkloadId, WorldError> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(&id) = self.by_name.get(&key) {
            let w = &self.workloads[id as usize];
            if &w.labels != labels || w.ports != ports || w.ip != ip {
                return Err(WorldError::Conflict(format!("workload {namespace}/{name}")));
            }
            return Ok(id);
        }
        let ns = self.namespace_id(namespace);
        let id = self.workloads.len() as WorkloadId;
        let interned = self.interner.labels(labels);
        self.workloads.push(WorkloadInfo {
            namespace: ns,
            name: name.to_string(),
            labels: labels.clone(),
            interned,
            ports: ports.to_vec(),
            ip,
        });
        for &(k, v) in &self.workloads[id as usize].interned.0 {
            self.postings.entry((ns, k, v)).or_default().push(id);
        }
        self.namespaces[ns as usize].members.push(id);
        self.by_name.insert(key, id);
        Ok(id)
    }

    /// Adds the namespaces and workloads a PolicyTest declares.
    pub fn add_test(&mut self, spec: &PolicyTestSpec) -> Result<(), WorldError> {
        for ns in &spec.namespaces {
            self.add_namespace(&ns.name, &ns.labels)?;
        }
        for w in &spec.workloads {
            self.add_workload(&w.namespace, &w.name, &w.labels, &w.ports, w.ip)?;
        }
        Ok(())
    }

    pub fn workload(&self, id: WorkloadId) -> &WorkloadInfo {
        &self.workloads[id as usize]
    }

    pub fn namespace(&self, id: NamespaceId) -> &NamespaceInfo {
        &self.namespaces[id as usize]
    }

    pub fn namespace_by_name(&self, name: &str) -> Option<NamespaceId> {
        self.ns_by_name.get(name).copied()
    }

    pub fn lookup(&self, namespace: &str, name: &str) -> Option<WorkloadId> {
        self.by_name
            .get(&(namespace.to_string(), name.to_string()))
            .copied()
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn workload_ids(&self) -> impl Iterator<Item = WorkloadId> + '_ {
        0..self.workloads.len() as WorkloadId
    }

    /// `namespace/name` of a workload.
    pub fn workload_name(&self, id: WorkloadId) -> String {
        let w = self.workload(id);
        format!("{}/{}", self.namespace(w.namespace).name, w.name)
    }

    pub(crate) fn compile(&mut self, sel: &LabelSelector) -> Selector {
        Selector {
            labels: self.interner.labels(&sel.match_labels),
            exprs: sel
                .match_expressions
                .iter()
                .map(|r| Expr {
                    key: self.interner.id(&r.key),
                    op: r.operator,
                    values: r.values.iter().map(|v| self.interner.id(v)).collect(),
                })
                .collect(),
        }
    }

    pub(crate) fn workload_labels(&self, id: WorkloadId) -> &ILabels {
        &self.workloads[id as usize].interned
    }

    pub(crate) fn namespace_labels(&self, id: NamespaceId) -> &ILabels {
        &self.namespaces[id as usize].interned
    }

    /// Workloads of `ns` labelled `key=value`, from the index.
    pub(crate) fn members_with(&self, ns: NamespaceId, key: u32, value: u32) -> &[WorkloadId] {
        self.postings
            .get(&(ns, key, value))
            .map_or(&[], Vec::as_slice)
    }
}

/// String ↔ integer table for label keys and values.
#[derive(Debug, Default, Clone)]
struct Interner {
    ids: HashMap<String, u32>,
}

impl Interner {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(s.to_string(), id);
        id
    }

    fn labels(&mut self, labels: &Labels) -> ILabels {
        let mut pairs: Vec<(u32, u32)> = labels
            .iter()
            .map(|(k, v)| (self.id(k), self.id(v)))
            .collect();
        pairs.sort_unstable();
        ILabels(pairs)
    }
}

/// Interned labels sorted by key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ILabels(pub(crate) Vec<(u32, u32)>);

impl ILabels {
    #[inline]
    pub(crate) fn get(&self, key: u32) -> Option<u32> {
        // Label sets are small: a linear scan beats binary search here.
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// A compiled label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    pub(crate) labels: ILabels,
    exprs: Vec<Expr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Expr {
    key: u32,
    op: Operator,
    values: Vec<u32>,
}

impl Selector {
    #[inline]
    pub(crate) fn matches(&self, labels: &ILabels) -> bool {
        self.labels.0.iter().all(|&(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|e| {
                let value = labels.get(e.key);
                match e.op {
                    Operator::In => value.is_some_and(|v| e.values.contains(&v)),
                    Operator::NotIn => !value.is_some_and(|v| e.values.contains(&v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}
