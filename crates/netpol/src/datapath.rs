//! The eBPF datapath on one node: loads `ebpf/policy.bpf.c` once, with its
//! maps pinned under a per-node bpffs directory (so enforcement outlives
//! the agent, and a restarted agent finds the same maps), attaches the two
//! classifiers to an instance's host-side veth, and reads and writes the
//! maps. Filters are attached through netlink with a fixed priority and
//! handle and deliberately left in place when this process exits.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::tc::{NlOptions, SchedClassifier, TcAttachOptions, TcAttachType, TcHandle};
use aya::{Ebpf, EbpfLoader};

use crate::maps::*;

/// The compiled datapath, built by build.rs from `ebpf/policy.bpf.c`.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The tc priority of Skiff's filters (lower runs first).
const PRIORITY: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF datapath: {0}")]
    Load(String),
    #[error("attaching to {interface}: {message}")]
    Attach { interface: String, message: String },
    #[error("map {map}: {message}")]
    Map { map: &'static str, message: String },
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        message: e.to_string(),
    }
}

/// Counters the datapath keeps, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub allowed: u64,
    pub denied: u64,
    pub audit: u64,
    pub established: u64,
    pub events_lost: u64,
}

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    ipcache: LpmTrie<MapData, [u8; 4], u32>,
    endpoints: HashMap<MapData, u32, [u8; ENDPOINT_LEN]>,
    policy: HashMap<MapData, [u8; POLICY_KEY_LEN], [u8; POLICY_VALUE_LEN]>,
    epoch: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the programs; maps are pinned in `pin_dir` (under bpffs, which
    /// is mounted if it is not), reusing maps already pinned there.
    pub fn load(pin_dir: &Path) -> Result<Datapath, DatapathError> {
        mount_bpffs()?;
        std::fs::create_dir_all(pin_dir)
            .map_err(|e| DatapathError::Bpffs(format!("{}: {e}", pin_dir.display())))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(e.to_string()))?;
        for name in ["skiff_to_pod", "skiff_from_pod"] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| DatapathError::Load(format!("no program {name}")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| DatapathError::Load(format!("no map {name}")))
        };
        let ipcache =
            LpmTrie::try_from(take("skiff_ipcache")?).map_err(map_err("skiff_ipcache"))?;
        let endpoints =
            HashMap::try_from(take("skiff_endpoints")?).map_err(map_err("skiff_endpoints"))?;
        let policy = HashMap::try_from(take("skiff_policy")?).map_err(map_err("skiff_policy"))?;
        let epoch = Array::try_from(take("skiff_epoch")?).map_err(map_err("skiff_epoch"))?;
        let stats = PerCpuArray::try_from(take("skiff_stats")?).map_err(map_err("skiff_stats"))?;
        let events =
            Some(RingBuf::try_from(take("skiff_events")?).map_err(map_err("skiff_events"))?);
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            ipcache,
            endpoints,
            policy,
            epoch,
            stats,
            events,
        })
    }

    /// Attaches both classifiers to `interface` (the host side of an
    /// instance's veth). Until its endpoint entry is written, the interface
    /// drops every IPv4 packet. A filter already there (from an earlier run)
    /// is kept.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        let attach_err = |message: String| DatapathError::Attach {
            interface: interface.to_string(),
            message,
        };
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(interface) {
            let text = e.to_string();
            // Already there (an earlier attach, or an earlier run of the agent).
            if !text.contains("exists") && !text.contains("Exclusivity") {
                return Err(attach_err(format!("clsact qdisc: {text}")));
            }
        }
        for (name, kind) in [
            ("skiff_to_pod", TcAttachType::Egress),
            ("skiff_from_pod", TcAttachType::Ingress),
        ] {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| attach_err(format!("no program {name}")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                handle: TcHandle::new(0, 1),
                classid: None,
            });
            match prog.attach_with_options(interface, kind, options) {
                Ok(id) => {
                    // The filter must outlive this process (enforcement
                    // continues while the agent restarts); dropping the link
                    // would detach it. It goes away with the interface.
                    let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                    std::mem::forget(link);
                }
                Err(e) if e.to_string().contains("exists") => {}
                Err(e) => return Err(attach_err(format!("{name}: {e}"))),
            }
        }
        Ok(())
    }

    pub fn set_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), DatapathError> {
        self.endpoints
            .insert(ifindex, ep.to_bytes(), 0)
            .map_err(map_err("skiff_endpoints"))
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        ignore_missing(self.endpoints.remove(&ifindex)).map_err(map_err("skiff_endpoints"))
    }

    pub fn endpoints(&self) -> BTreeMap<u32, Endpoint> {
        self.endpoints
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, Endpoint::from_bytes(v)))
            .collect()
    }

    /// Maps `addr/prefix` to an identity.
    pub fn set_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u8,
        identity: u32,
    ) -> Result<(), DatapathError> {
        self.ipcache
            .insert(&Key::new(u32::from(prefix), addr.octets()), identity, 0)
            .map_err(map_err("skiff_ipcache"))
    }

    pub fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix: u8) -> Result<(), DatapathError> {
        ignore_missing(
            self.ipcache
                .remove(&Key::new(u32::from(prefix), addr.octets())),
        )
        .map_err(map_err("skiff_ipcache"))
    }

    pub fn ipcache(&self) -> BTreeMap<(Ipv4Addr, u8), u32> {
        self.ipcache
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| ((Ipv4Addr::from(k.data()), k.prefix_len() as u8), v))
            .collect()
    }

    pub fn set_policy(&mut self, key: PolicyKey, value: PolicyValue) -> Result<(), DatapathError> {
        self.policy
            .insert(key.to_bytes(), value.to_bytes(), 0)
            .map_err(map_err("skiff_policy"))
    }

    pub fn remove_policy(&mut self, key: PolicyKey) -> Result<(), DatapathError> {
        ignore_missing(self.policy.remove(&key.to_bytes())).map_err(map_err("skiff_policy"))
    }

    pub fn policy(&self) -> BTreeMap<PolicyKey, PolicyValue> {
        self.policy
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((PolicyKey::from_bytes(k)?, PolicyValue::from_bytes(v))))
            .collect()
    }

    /// Starts a new policy epoch: established flows are decided again by
    /// the current entries on their next packet.
    pub fn bump_epoch(&mut self) -> Result<u32, DatapathError> {
        let next = self
            .epoch
            .get(&0, 0)
            .map_err(map_err("skiff_epoch"))?
            .wrapping_add(1);
        self.epoch.set(0, next, 0).map_err(map_err("skiff_epoch"))?;
        Ok(next)
    }

    pub fn stats(&self) -> Stats {
        let sum = |i: u32| -> u64 {
            self.stats
                .get(&i, 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        };
        Stats {
            allowed: sum(SKIFF_STAT_ALLOWED),
            denied: sum(SKIFF_STAT_DENIED),
            audit: sum(SKIFF_STAT_AUDIT),
            established: sum(SKIFF_STAT_ESTABLISHED),
            events_lost: sum(SKIFF_STAT_EVENTS_LOST),
        }
    }

    /// The verdict events ring buffer, for one reader to own.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// Mounts bpffs at [`BPFFS`] unless it is mounted.
fn mount_bpffs() -> Result<(), DatapathError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .map_err(|e| DatapathError::Bpffs(format!("mount -t bpf: {e}")))?;
    if !status.success() {
        return Err(DatapathError::Bpffs(format!(
            "mount -t bpf bpf {BPFFS} failed ({status})"
        )));
    }
    Ok(())
}

/// Removes a node's pinned maps (its directory under bpffs).
pub fn unpin(pin_dir: &Path) {
    let _ = std::fs::remove_dir_all(pin_dir);
}
