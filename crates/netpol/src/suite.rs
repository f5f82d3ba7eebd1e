//! Running `PolicyTest` cases and diffing two policy sets: the offline
//! workflow behind `skiff policy test|trace|diff`.

use std::collections::BTreeSet;

use serde::Serialize;
use skiff_api::Loaded;
use skiff_api::policy::DefaultPolicy;
use skiff_api::policytest::{Endpoint, Expect, PolicyTestSpec, TestCase};
use skiff_api::resource::{Object, Resource};

use crate::engine::{Decision, Engine};
use crate::model::{Flow, PolicyRule};
use crate::world::{World, WorldError};

/// The result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub test: String,
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: u16,
    pub protocol: skiff_api::net::Protocol,
    pub expect: Expect,
    pub got: Decision,
    pub reason: String,
    #[serde(skip)]
    pub file: String,
    #[serde(skip)]
    pub line: usize,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        matches!(
            (self.expect, self.got),
            (Expect::Allow, Decision::Allow)
                | (Expect::Deny, Decision::Deny)
                | (Expect::AuditDenied, Decision::AuditDenied)
        )
    }
}

/// Every Policy and NetworkPolicy among `resources`, translated.
pub fn policies(resources: &[Loaded]) -> Vec<PolicyRule> {
    resources
        .iter()
        .filter_map(|l| PolicyRule::from_resource(&l.resource))
        .collect()
}

/// Every PolicyTest among `resources`, with the file it came from.
pub fn tests(resources: &[Loaded]) -> Vec<(&Object<PolicyTestSpec>, &Loaded)> {
    resources
        .iter()
        .filter_map(|l| match &l.resource {
            Resource::PolicyTest(t) => Some((t, l)),
            _ => None,
        })
        .collect()
}

/// Builds the engine one PolicyTest describes: its world, its default,
/// and every policy in the set.
pub fn engine_for(test: &PolicyTestSpec, policies: &[PolicyRule]) -> Result<Engine, WorldError> {
    let mut world = World::new();
    world.add_test(test)?;
    Ok(Engine::new(policies.to_vec(), world, test.policy_default))
}

fn flow_of(case: &TestCase) -> Flow {
    Flow {
        from: case.from.clone(),
        to: case.to.clone(),
        port: case.port,
        protocol: case.protocol,
    }
}

/// Runs every case of every PolicyTest in `resources` against every policy there.
pub fn run(resources: &[Loaded]) -> Result<Vec<CaseResult>, String> {
    let policies = policies(resources);
    let mut results = Vec::new();
    for (test, loaded) in tests(resources) {
        let engine = engine_for(&test.spec, &policies).map_err(|e| {
            format!(
                "{}:{}: PolicyTest {}: {e}",
                loaded.file,
                loaded.line,
                test.name()
            )
        })?;
        for case in &test.spec.cases {
            let flow = flow_of(case);
            let verdict = engine
                .evaluate(&flow)
                .map_err(|e| format!("{}:{}: {e}", loaded.file, case.line))?;
            results.push(CaseResult {
                test: test.name().to_string(),
                from: case.from.clone(),
                to: case.to.clone(),
                port: case.port,
                protocol: case.protocol,
                expect: case.expect,
                got: verdict.decision,
                reason: engine.reason(&flow, &verdict),
                file: loaded.file.clone(),
                line: case.line,
            });
        }
    }
    Ok(results)
}

/// A flow whose decision differs between two policy sets.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: u16,
    pub protocol: skiff_api::net::Protocol,
    pub policy_default: String,
    pub before: Decision,
    pub after: Decision,
    /// Why the new policies decide as they do.
    pub reason: String,
}

/// Flows between the workloads of each PolicyTest (to every declared
/// port of the receiver) whose decision changes from `base` to `head`.
pub fn diff(
    tests: &[&PolicyTestSpec],
    base: &[PolicyRule],
    head: &[PolicyRule],
) -> Result<Vec<Change>, WorldError> {
    let mut seen: BTreeSet<(String, String, u16, String, &'static str)> = BTreeSet::new();
    let mut changes = Vec::new();
    for test in tests {
        let before = engine_for(test, base)?;
        let after = engine_for(test, head)?;
        for from in &test.workloads {
            for to in &test.workloads {
                for port in &to.ports {
                    let flow = Flow {
                        from: Endpoint::Workload {
                            namespace: from.namespace.clone(),
                            name: from.name.clone(),
                        },
                        to: Endpoint::Workload {
                            namespace: to.namespace.clone(),
                            name: to.name.clone(),
                        },
                        port: port.port,
                        protocol: port.protocol,
                    };
                    let key = (
                        flow.from.to_string(),
                        flow.to.to_string(),
                        flow.port,
                        flow.protocol.to_string(),
                        default_name(test.policy_default),
                    );
                    if !seen.insert(key) {
                        continue;
                    }
                    let (Ok(b), Ok(a)) = (before.evaluate(&flow), after.evaluate(&flow)) else {
                        continue;
                    };
                    if a.decision != b.decision {
                        changes.push(Change {
                            reason: after.reason(&flow, &a),
                            from: flow.from,
                            to: flow.to,
                            port: flow.port,
                            protocol: flow.protocol,
                            policy_default: default_name(test.policy_default).to_string(),
                            before: b.decision,
                            after: a.decision,
                        });
                    }
                }
            }
        }
    }
    Ok(changes)
}

fn default_name(d: DefaultPolicy) -> &'static str {
    d.as_str()
}
