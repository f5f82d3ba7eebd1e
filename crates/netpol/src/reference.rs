//! The policy semantics read literally: every policy scanned for every
//! flow, labels compared as strings. Slow by design; it is the oracle the
//! engine is property-tested against and the baseline `skiff bench
//! policy-eval` measures the index against.

use skiff_api::net::{PortRef, Protocol};
use skiff_api::policy::{DefaultPolicy, Mode, PolicyPort};

use crate::engine::{Decision, Resolved};
use crate::model::{Direction, Namespaces, Peer, PolicyRule};
use crate::world::World;

/// Decides a flow by scanning every policy.
pub fn decide(
    policies: &[PolicyRule],
    world: &World,
    default: DefaultPolicy,
    from: Resolved,
    to: Resolved,
    port: u16,
    proto: Protocol,
) -> Decision {
    let passes = |include: &dyn Fn(&PolicyRule) -> bool| {
        let flow = FlowAt {
            world,
            port,
            proto,
            to,
        };
        side(
            policies,
            default,
            Direction::Egress,
            from,
            to,
            &flow,
            include,
        ) && side(
            policies,
            default,
            Direction::Ingress,
            to,
            from,
            &flow,
            include,
        )
    };
    if !passes(&|p| p.mode == Mode::Enforce) {
        Decision::Deny
    } else if !passes(&|_| true) {
        Decision::AuditDenied
    } else {
        Decision::Allow
    }
}

struct FlowAt<'a> {
    world: &'a World,
    port: u16,
    proto: Protocol,
    /// The receiver, against whose ports names resolve.
    to: Resolved,
}

/// Whether `subject`'s side passes, counting only policies `include` accepts.
fn side(
    policies: &[PolicyRule],
    default: DefaultPolicy,
    dir: Direction,
    subject: Resolved,
    other: Resolved,
    flow: &FlowAt<'_>,
    include: &dyn Fn(&PolicyRule) -> bool,
) -> bool {
    let Resolved::Workload(w) = subject else {
        return true;
    };
    let w = flow.world.workload(w);
    let ns = &flow.world.namespace(w.namespace).name;
    let selecting: Vec<&PolicyRule> = policies
        .iter()
        .filter(|p| {
            include(p)
                && &p.id.namespace == ns
                && p.rules(dir).is_some()
                && p.selector.matches(&w.labels)
        })
        .collect();
    if selecting.is_empty() && default == DefaultPolicy::IsolateSelected {
        return true;
    }
    selecting
        .iter()
        .flat_map(|p| p.rules(dir).unwrap_or_default())
        .any(|r| {
            (r.peers.is_empty()
                || r.peers
                    .iter()
                    .any(|peer| peer_matches(peer, other, flow.world)))
                && (r.ports.is_empty() || r.ports.iter().any(|p| port_matches(p, flow)))
        })
}

fn peer_matches(peer: &Peer, end: Resolved, world: &World) -> bool {
    match peer {
        Peer::Select {
            namespaces,
            workloads,
        } => {
            let Resolved::Workload(w) = end else {
                return false;
            };
            let w = world.workload(w);
            let ns = world.namespace(w.namespace);
            let ns_ok = match namespaces {
                Namespaces::Same(name) => &ns.name == name,
                Namespaces::Matching(sel) => sel.matches(&ns.labels),
            };
            ns_ok && workloads.as_ref().is_none_or(|sel| sel.matches(&w.labels))
        }
        Peer::Cidr { cidr, except } => {
            let ip = match end {
                Resolved::Address(ip) => Some(ip),
                Resolved::Workload(w) => world.workload(w).ip,
            };
            ip.is_some_and(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)))
        }
    }
}

fn port_matches(p: &PolicyPort, flow: &FlowAt<'_>) -> bool {
    p.protocol == flow.proto
        && match &p.port {
            None => true,
            Some(PortRef::Number(n)) => p
                .end_port
                .map_or(*n == flow.port, |end| (*n..=end).contains(&flow.port)),
            Some(PortRef::Name(name)) => match flow.to {
                Resolved::Workload(w) => flow.world.workload(w).ports.iter().any(|np| {
                    np.name.as_deref() == Some(name)
                        && np.port == flow.port
                        && np.protocol == flow.proto
                }),
                Resolved::Address(_) => false,
            },
        }
}
