//! The `exec` runtime: each instance in its own network namespace (veth to
//! the node, an address from the node's pod range), its own cgroups with
//! its limits, as an unprivileged user, supervised with rotated logs,
//! restart backoff and health checks.

pub mod cgroup;
pub mod discovery;
pub mod exec;
pub mod instance;
pub mod mesh;
pub mod net;
pub mod probe;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cgroups: {0}")]
    Cgroup(String),
    #[error("network: {0}")]
    Net(String),
}
