//! Instance networking: a network namespace per instance, a veth pair to
//! the node, a /32 address from the node's pod range with the default route
//! via the node side, and host-gw routes between nodes.
//!
//! Links, addresses and routes are changed through iproute2's `ip`, one
//! function ([`ip`]) that every change goes through.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::RuntimeError;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// One instance's network: namespace, host-side interface, address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    pub netns: String,
    pub host_if: String,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

impl PodNet {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.netns)
    }

    /// Creates the namespace and wires it to the node. On failure, removes
    /// what it made.
    pub async fn create(&self) -> Result<(), RuntimeError> {
        let result = self.wire().await;
        if result.is_err() {
            self.remove().await;
        }
        result
    }

    async fn wire(&self) -> Result<(), RuntimeError> {
        let (ns, host, addr, gw) = (
            self.netns.as_str(),
            self.host_if.as_str(),
            self.address.to_string(),
            self.gateway.to_string(),
        );
        ip(&["netns", "add", ns]).await?;
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])
        .await?;
        ip(&["addr", "add", &format!("{gw}/32"), "dev", host]).await?;
        ip(&["link", "set", host, "up"]).await?;
        ip(&[
            "route",
            "replace",
            &format!("{addr}/32"),
            "dev",
            host,
            "src",
            &gw,
        ])
        .await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        ip(&[
            "-n", ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
        ])
        .await?;
        ip(&[
            "-n", ns, "route", "add", "default", "via", &gw, "dev", "eth0", "src", &addr,
        ])
        .await?;
        // Apps run unprivileged; let them bind low ports in their own
        // namespace (as Docker does), where no other service can be hurt.
        ip(&[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start",
        ])
        .await?;
        Ok(())
    }

    /// Deletes the namespace (which takes the veth pair and its route along).
    pub async fn remove(&self) {
        if let Err(e) = ip(&["netns", "del", &self.netns]).await
            && PathBuf::from(NETNS_DIR).join(&self.netns).exists()
        {
            tracing::warn!(netns = %self.netns, error = %e, "Cannot delete network namespace");
        }
        // A veth whose namespace went away early disappears with it; one
        // left by a half-done setup does not.
        let _ = ip(&["link", "del", &self.host_if]).await;
    }
}

/// The host-side interface name for a namespace: at most 15 bytes, stable.
pub fn host_if_name(netns: &str) -> String {
    // FNV-1a: short, stable across runs and releases.
    let mut h: u32 = 0x811c_9dc5;
    for b in netns.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("sk{h:08x}")
}

/// The addresses of a node's /24: `.1` is the node side of every veth,
/// instances get `.2` to `.254`.
pub fn gateway_of(pod_cidr: Ipv4Addr) -> Ipv4Addr {
    let o = pod_cidr.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

/// The lowest instance address of the /24 at `pod_cidr` not in `used`.
pub fn free_address(
    pod_cidr: Ipv4Addr,
    used: &std::collections::BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let o = pod_cidr.octets();
    (2..=254)
        .map(|i| Ipv4Addr::new(o[0], o[1], o[2], i))
        .find(|a| !used.contains(a))
}

/// Removes every named namespace starting with `prefix` (what an earlier
/// run of this agent left), with its veth.
pub async fn remove_leftovers(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(prefix) {
            let net = PodNet {
                host_if: host_if_name(&name),
                netns: name,
                address: Ipv4Addr::UNSPECIFIED,
                gateway: Ipv4Addr::UNSPECIFIED,
            };
            tracing::info!(netns = %net.netns, "Removing a leftover instance network");
            net.remove().await;
        }
    }
}

/// Makes the node forward between instances and other nodes.
pub fn enable_forwarding() -> Result<(), RuntimeError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| RuntimeError::Net(format!("enabling IPv4 forwarding: {e}")))
}

/// Routes a remote node's pod range via that node (host-gw).
pub async fn route_via(cidr: &str, via: Ipv4Addr) -> Result<(), RuntimeError> {
    ip(&["route", "replace", cidr, "via", &via.to_string()]).await
}

pub async fn unroute(cidr: &str) {
    let _ = ip(&["route", "del", cidr]).await;
}

/// Runs `ip ARGS`; a failure carries the command and what it printed.
pub async fn ip(args: &[&str]) -> Result<(), RuntimeError> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| RuntimeError::Net(format!("cannot run `ip` (install iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::Net(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_the_kernel_limit_and_are_stable() {
        let a = host_if_name("skiff-abcdef-node-1-17");
        assert!(a.len() <= 15, "{a}");
        assert_eq!(a, host_if_name("skiff-abcdef-node-1-17"));
        assert_ne!(a, host_if_name("skiff-abcdef-node-1-18"));
    }

    #[test]
    fn addresses_skip_the_gateway_and_reuse_freed_ones() {
        let net = Ipv4Addr::new(198, 19, 3, 0);
        assert_eq!(gateway_of(net), Ipv4Addr::new(198, 19, 3, 1));
        let mut used = std::collections::BTreeSet::new();
        for _ in 0..3 {
            let a = free_address(net, &used).unwrap_or_else(|| panic!("full"));
            used.insert(a);
        }
        assert_eq!(free_address(net, &used), Some(Ipv4Addr::new(198, 19, 3, 5)));
        used.remove(&Ipv4Addr::new(198, 19, 3, 3));
        assert_eq!(free_address(net, &used), Some(Ipv4Addr::new(198, 19, 3, 3)));
        let full: std::collections::BTreeSet<_> =
            (2..=254).map(|i| Ipv4Addr::new(198, 19, 3, i)).collect();
        assert_eq!(free_address(net, &full), None);
    }
}
