//! Instance cgroups, always below the agent's own cgroup in each hierarchy.
//!
//! Two layouts are supported: a pure cgroup v2 host (the `cpu` and `memory`
//! controllers in the unified hierarchy), and a hybrid host where those
//! controllers sit on v1 hierarchies and the v2 hierarchy has none (it is
//! still used, for cgroup BPF). Each instance gets a pod directory carrying
//! its limits, with an `app` leaf its processes join (the proxy gets a leaf
//! beside it). A hierarchy whose agent cgroup is the hierarchy's root is
//! never written to: limits there are reported as not enforced.

use std::path::{Path, PathBuf};

use super::RuntimeError;

/// What one hierarchy controls, as far as instance limits go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// cgroup v2; `cpu`/`memory` say whether those controllers can be enabled below us.
    Unified {
        cpu: bool,
        memory: bool,
    },
    V1Cpu,
    V1Memory,
}

#[derive(Debug, Clone)]
struct Hierarchy {
    role: Role,
    /// `<agent's cgroup>/skiff-<tag>`: every instance directory lives here.
    base: PathBuf,
}

/// Limits for one instance; `None` leaves a resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU in millicores.
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Relative CPU weight from the request, in millicores.
    pub cpu_request_millis: Option<u64>,
}

/// The cgroup hierarchies the agent may use.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchies: Vec<Hierarchy>,
    /// Human-readable: which limits are enforced here, and why not otherwise.
    pub enforcement: Vec<String>,
}

/// The directories of one instance.
#[derive(Debug, Clone)]
pub struct PodCgroup {
    /// Pod directories (limits), one per hierarchy.
    pods: Vec<PathBuf>,
    roles: Vec<Role>,
}

impl Cgroups {
    /// Reads the layout from `/proc/self/mountinfo` and `/proc/self/cgroup`
    /// and prepares `skiff-<node>` below the agent's cgroup in each usable
    /// hierarchy, removing what an earlier run of this agent left there.
    pub fn detect(tag: &str) -> Result<Cgroups, RuntimeError> {
        let mountinfo = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        let mut hierarchies = Vec::new();
        let mut enforcement = Vec::new();
        for mount in mounts(&mountinfo) {
            let own_path = match own_path(&own, &mount) {
                Some(p) => p,
                None => continue,
            };
            let dir = join(&mount.point, &mount.root, &own_path);
            let role = match mount.version {
                2 => {
                    let controllers =
                        std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
                    Role::Unified {
                        cpu: has("cpu"),
                        memory: has("memory"),
                    }
                }
                _ if mount.controllers.iter().any(|c| c == "memory") => Role::V1Memory,
                _ if mount.controllers.iter().any(|c| c == "cpu") => Role::V1Cpu,
                _ => continue,
            };
            let at_root = own_path == "/" || own_path.is_empty();
            if at_root {
                enforcement.push(format!(
                    "{}: not used (the agent runs in the hierarchy's root cgroup, where Skiff creates nothing)",
                    describe(role)
                ));
                continue;
            }
            let base = dir.join(format!("skiff-{tag}"));
            remove_tree(&base);
            if let Err(e) = std::fs::create_dir_all(&base) {
                enforcement.push(format!(
                    "{}: not used ({}: {e})",
                    describe(role),
                    base.display()
                ));
                continue;
            }
            let role = match role {
                Role::Unified { cpu, memory } if cpu || memory => {
                    match enable_controllers(&dir, &base, cpu, memory) {
                        Ok(()) => role,
                        Err(e) => {
                            enforcement.push(format!("cgroup v2 cpu/memory: not enforced ({e})"));
                            Role::Unified {
                                cpu: false,
                                memory: false,
                            }
                        }
                    }
                }
                r => r,
            };
            enforcement.push(format!("{}: {}", describe(role), base.display()));
            hierarchies.push(Hierarchy { role, base });
        }
        Ok(Cgroups {
            hierarchies,
            enforcement,
        })
    }

    /// Whether memory limits are enforced (and OOM kills can be counted).
    pub fn enforces_memory(&self) -> bool {
        self.hierarchies
            .iter()
            .any(|h| matches!(h.role, Role::V1Memory | Role::Unified { memory: true, .. }))
    }

    pub fn enforces_cpu(&self) -> bool {
        self.hierarchies
            .iter()
            .any(|h| matches!(h.role, Role::V1Cpu | Role::Unified { cpu: true, .. }))
    }

    /// Creates the instance's pod directories with its limits and an empty
    /// `app` leaf in each. On failure, removes what it made.
    pub fn create(&self, pod: &str, limits: Limits) -> Result<PodCgroup, RuntimeError> {
        let made = PodCgroup {
            pods: self.hierarchies.iter().map(|h| h.base.join(pod)).collect(),
            roles: self.hierarchies.iter().map(|h| h.role).collect(),
        };
        let result = (|| {
            for (dir, role) in made.pods.iter().zip(&made.roles) {
                mkdir(dir)?;
                apply_limits(dir, *role, limits)?;
                if let Role::Unified { cpu, memory } = role
                    && (*cpu || *memory)
                {
                    write(&dir.join("cgroup.subtree_control"), &subtree(*cpu, *memory))?;
                }
                mkdir(&dir.join("app"))?;
                mkdir(&dir.join("proxy"))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            made.remove();
            return Err(e);
        }
        Ok(made)
    }
}

impl PodCgroup {
    /// The `cgroup.procs` files a process of the app writes its pid to.
    pub fn app_procs(&self) -> Vec<PathBuf> {
        self.leaf_procs("app")
    }

    /// The same for the instance's sidecar proxy: a sibling leaf, inside
    /// the instance's limits.
    pub fn proxy_procs(&self) -> Vec<PathBuf> {
        self.leaf_procs("proxy")
    }

    fn leaf_procs(&self, leaf: &str) -> Vec<PathBuf> {
        self.pods
            .iter()
            .map(|d| d.join(leaf).join("cgroup.procs"))
            .collect()
    }

    /// OOM kills in this pod so far (0 where memory is not controlled).
    pub fn oom_kills(&self) -> u64 {
        let mut total = 0;
        for (dir, role) in self.pods.iter().zip(&self.roles) {
            match role {
                // memory.events is hierarchical: the pod counts its leaves.
                Role::Unified { memory: true, .. } => {
                    total += counter(&dir.join("memory.events"), "oom_kill");
                }
                // v1 counts a kill in the cgroup whose task died, the leaf.
                Role::V1Memory => {
                    total += counter(&dir.join("memory.oom_control"), "oom_kill");
                    total += counter(&dir.join("app").join("memory.oom_control"), "oom_kill");
                }
                _ => {}
            }
        }
        total
    }

    /// Kills whatever is left in the pod's cgroups and removes them.
    pub fn remove(&self) {
        for dir in &self.pods {
            remove_tree(dir);
        }
    }
}

fn describe(role: Role) -> &'static str {
    match role {
        Role::Unified {
            cpu: true,
            memory: true,
        } => "cgroup v2 (cpu, memory)",
        Role::Unified { cpu: true, .. } => "cgroup v2 (cpu)",
        Role::Unified { memory: true, .. } => "cgroup v2 (memory)",
        Role::Unified { .. } => "cgroup v2 (no cpu/memory controllers; for BPF)",
        Role::V1Cpu => "cgroup v1 cpu",
        Role::V1Memory => "cgroup v1 memory",
    }
}

fn subtree(cpu: bool, memory: bool) -> String {
    let mut s = Vec::new();
    if cpu {
        s.push("+cpu");
    }
    if memory {
        s.push("+memory");
    }
    s.join(" ")
}

/// cgroup v2 forbids controllers in a cgroup's children while it holds
/// processes itself: if the agent's cgroup does, the agent moves into a
/// leaf below it (staying inside its own tree) and tries again.
fn enable_controllers(
    own: &Path,
    base: &Path,
    cpu: bool,
    memory: bool,
) -> Result<(), RuntimeError> {
    let want = subtree(cpu, memory);
    if write(&own.join("cgroup.subtree_control"), &want).is_err() {
        let leaf = base.with_file_name(format!(
            "{}-agent",
            base.file_name().and_then(|n| n.to_str()).unwrap_or("skiff")
        ));
        mkdir(&leaf)?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        write(&own.join("cgroup.subtree_control"), &want)?;
    }
    write(&base.join("cgroup.subtree_control"), &want)
}

fn apply_limits(dir: &Path, role: Role, l: Limits) -> Result<(), RuntimeError> {
    const PERIOD: u64 = 100_000;
    match role {
        Role::Unified { cpu, memory } => {
            if cpu {
                if let Some(m) = l.cpu_millis {
                    write(
                        &dir.join("cpu.max"),
                        &format!("{} {PERIOD}", (m * PERIOD / 1000).max(1000)),
                    )?;
                }
                if let Some(r) = l.cpu_request_millis {
                    // cpu.weight 1..10000, 100 for one core as Kubernetes maps shares.
                    let weight = (r * 100 / 1000).clamp(1, 10_000);
                    write(&dir.join("cpu.weight"), &weight.to_string())?;
                }
            }
            if memory && let Some(b) = l.memory_bytes {
                write(&dir.join("memory.max"), &b.to_string())?;
                let _ = write(&dir.join("memory.swap.max"), "0");
            }
        }
        Role::V1Cpu => {
            if let Some(m) = l.cpu_millis {
                write(&dir.join("cpu.cfs_period_us"), &PERIOD.to_string())?;
                write(
                    &dir.join("cpu.cfs_quota_us"),
                    &(m * PERIOD / 1000).max(1000).to_string(),
                )?;
            }
            if let Some(r) = l.cpu_request_millis {
                write(
                    &dir.join("cpu.shares"),
                    &(r * 1024 / 1000).max(2).to_string(),
                )?;
            }
        }
        Role::V1Memory => {
            if let Some(b) = l.memory_bytes {
                write(&dir.join("memory.limit_in_bytes"), &b.to_string())?;
                // With swap accounting, forbid swapping around the limit.
                let _ = write(&dir.join("memory.memsw.limit_in_bytes"), &b.to_string());
            }
        }
    }
    Ok(())
}

struct Mount {
    point: PathBuf,
    root: String,
    version: u8,
    controllers: Vec<String>,
}

/// cgroup mounts from mountinfo: `id parent maj:min root point opts … - fstype source superopts`.
fn mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let version = match r[0] {
            "cgroup2" => 2,
            "cgroup" => 1,
            _ => continue,
        };
        out.push(Mount {
            point: PathBuf::from(unescape(l[4])),
            root: unescape(l[3]),
            version,
            controllers: r[2].split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// mountinfo escapes spaces and the like as `\040`.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(n as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The agent's cgroup in one hierarchy, from `/proc/self/cgroup`.
fn own_path(own: &str, mount: &Mount) -> Option<String> {
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if mount.version == 2 {
            id == "0" && controllers.is_empty()
        } else {
            let cs: Vec<&str> = controllers.split(',').collect();
            !controllers.is_empty() && cs.iter().all(|c| mount.controllers.iter().any(|m| m == c))
        };
        if matches {
            return Some(path.to_string());
        }
    }
    None
}

/// The directory of cgroup `path` in a hierarchy mounted at `point` whose
/// mount shows `root` (not "/" inside a cgroup namespace or a bind mount).
fn join(point: &Path, root: &str, path: &str) -> PathBuf {
    let rel = if root != "/" {
        path.strip_prefix(root).unwrap_or(path)
    } else {
        path
    };
    point.join(rel.trim_start_matches('/'))
}

fn counter(file: &Path, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn read(path: &str) -> Result<String, RuntimeError> {
    std::fs::read_to_string(path).map_err(|e| RuntimeError::Cgroup(format!("{path}: {e}")))
}

fn mkdir(dir: &Path) -> Result<(), RuntimeError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RuntimeError::Cgroup(format!("{}: {e}", dir.display()))),
    }
}

fn write(file: &Path, value: &str) -> Result<(), RuntimeError> {
    std::fs::write(file, value)
        .map_err(|e| RuntimeError::Cgroup(format!("writing {value:?} to {}: {e}", file.display())))
}

/// Removes the `skiff-<tag>` directories of an agent that is gone, in every
/// hierarchy, killing what is left in them (`skiff dev` teardown).
pub fn remove_agent_dirs(tag: &str) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    for mount in mounts(&mountinfo) {
        if let Some(path) = own_path(&own, &mount) {
            let dir = join(&mount.point, &mount.root, &path);
            remove_tree(&dir.join(format!("skiff-{tag}")));
            remove_tree(&dir.join(format!("skiff-{tag}-agent")));
        }
    }
}

/// SIGKILLs every process in a cgroup subtree and removes it, deepest first.
/// Best effort: a directory that stays busy is logged and left.
pub(crate) fn remove_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    for attempt in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if attempt == 49 => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "Cannot remove cgroup");
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
";
    const HYBRID_SELF: &str = "\
12:pids:/process_api/x
5:cpu,cpuacct:/
4:memory:/process_api/x
0::/process_api/x
";

    #[test]
    fn hybrid_layout_is_read_from_mountinfo_and_proc_self_cgroup() {
        let m = mounts(HYBRID_MOUNTINFO);
        assert_eq!(m.len(), 4);
        let found: Vec<(String, Option<String>)> = m
            .iter()
            .map(|m| (m.point.display().to_string(), own_path(HYBRID_SELF, m)))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "/sys/fs/cgroup/unified".into(),
                    Some("/process_api/x".into())
                ),
                (
                    "/sys/fs/cgroup/memory".into(),
                    Some("/process_api/x".into())
                ),
                ("/sys/fs/cgroup/cpu,cpuacct".into(), Some("/".into())),
                ("/sys/fs/cgroup/pids".into(), Some("/process_api/x".into())),
            ]
        );
    }

    #[test]
    fn paths_are_relative_to_the_mounts_root() {
        assert_eq!(
            join(Path::new("/sys/fs/cgroup"), "/a", "/a/b/c"),
            PathBuf::from("/sys/fs/cgroup/b/c")
        );
        assert_eq!(
            join(Path::new("/sys/fs/cgroup"), "/", "/a/b"),
            PathBuf::from("/sys/fs/cgroup/a/b")
        );
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }

    #[test]
    fn counters_are_read_by_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(counter(&f, "oom_kill"), 2);
        assert_eq!(counter(&f, "oom"), 2);
        assert_eq!(counter(&f, "absent"), 0);
    }
}
