//! `skiff dev`: a local multi-node cluster on this machine. Each node is a
//! network namespace on a bridge (in its own "lan" namespace), running a
//! real `skiff agent`; the API server runs on the host. Everything it makes
//! is named after a slot number (several clusters can run at once) and is
//! removed on Ctrl-C, SIGTERM, `skiff dev down`, or when the process ends.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Where clusters keep their state; `<DEV_ROOT>/<slot>/` is one cluster.
pub const DEV_ROOT: &str = "/run/skiff-dev";
const SLOTS: u8 = 15;
/// The demo applied on start, built into the binary so it runs anywhere.
const SHOP: &str = include_str!("../../../examples/shop/shop.yaml");

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: Option<DevCommand>,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds without heartbeats before a node is declared lost.
    #[arg(long, default_value_t = 3.0)]
    pub node_grace: f64,
    /// Start no demo services.
    #[arg(long)]
    pub no_demo: bool,
    /// Agents stop their instances when cut off from the control plane for
    /// half the node grace, before replacements can start elsewhere.
    #[arg(long)]
    pub self_fence: bool,
    /// Inject the sidecar proxy into every instance (mTLS between them);
    /// the demo is then reached through the ingress gateway.
    #[arg(long)]
    pub mesh: bool,
    /// With --mesh: the localhost port of the ingress gateway to the demo.
    #[arg(long, default_value_t = 8000)]
    pub gateway_port: u16,
}

#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Stop every local cluster and remove what it made.
    Down,
}

/// How to make a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub node_grace: f64,
    pub self_fence: bool,
    /// Agents inject the sidecar proxy (`skiff agent --mesh`).
    pub mesh: bool,
    /// Seconds workload certificates live (server default: a day).
    pub cert_lifetime: Option<f64>,
    /// Where the admin client config goes.
    pub config: PathBuf,
}

/// One node of a dev cluster.
#[derive(Debug, Clone)]
pub struct DevNode {
    pub name: String,
    pub netns: String,
    /// The node's port on the lan bridge (in the lan namespace).
    pub lan_if: String,
    pub address: Ipv4Addr,
    /// Prefix of the agent's instance namespaces and cgroup directory.
    pub tag: String,
}

/// A running dev cluster; dropping it tears everything down.
#[derive(Debug)]
pub struct Cluster {
    pub slot: u8,
    pub dir: PathBuf,
    pub url: String,
    pub config: PathBuf,
    pub lan: String,
    pub host_if: String,
    pub nodes: Vec<DevNode>,
    pub pod_range: String,
    server: Option<Child>,
    agents: Vec<Option<Child>>,
    exe: PathBuf,
    join_token: String,
    options: Options,
}

pub fn run(args: &DevArgs) -> anyhow::Result<u8> {
    if let Some(DevCommand::Down) = args.command {
        return down();
    }
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "skiff dev makes network namespaces and cgroups: run it as root"
    );
    anyhow::ensure!((1..=20).contains(&args.nodes), "--nodes must be 1 to 20");
    let config = skiff_client::ClientConfig::default_path();
    let options = Options {
        nodes: args.nodes,
        node_grace: args.node_grace,
        self_fence: args.self_fence,
        mesh: args.mesh,
        cert_lifetime: None,
        config,
    };
    let mut cluster = Cluster::up(&std::env::current_exe()?, &options)?;
    println!(
        "skiff dev: {} nodes, API at {}",
        cluster.nodes.len(),
        cluster.url
    );
    println!(
        "skiff dev: client config written to {}",
        cluster.config.display()
    );
    println!(
        "skiff dev: state in {}",
        cluster.dir.join("cluster.json").display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = cluster.client()?;
        tokio::spawn(host_routes(client.clone()));
        if !args.no_demo {
            demo(&cluster, &client).await?;
            if args.mesh {
                let listen = SocketAddr::from(([127, 0, 0, 1], args.gateway_port));
                let (client, dir) = (client.clone(), cluster.dir.join("gateway"));
                tokio::spawn(async move {
                    let never = std::future::pending::<()>();
                    if let Err(e) = crate::gateway::run(
                        client,
                        &dir,
                        listen,
                        "web.shop:8080",
                        None,
                        "skiff.local",
                        never,
                    )
                    .await
                    {
                        eprintln!("skiff dev: the gateway stopped: {e:#}");
                    }
                });
                // Shown once the gateway has the cluster's discovery.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let out = tokio::process::Command::new("curl")
                        .args(["-sS", "--max-time", "3", &format!("http://{listen}/")])
                        .output()
                        .await;
                    let answered = out.as_ref().is_ok_and(|o| o.status.success());
                    if answered || Instant::now() > deadline {
                        println!(
                            "$ curl http://{listen}/   # the mesh's ingress gateway, mTLS inside"
                        );
                        if let Ok(o) = out {
                            print!(
                                "{}{}",
                                String::from_utf8_lossy(&o.stdout),
                                String::from_utf8_lossy(&o.stderr)
                            );
                        }
                        println!();
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        println!(
            "skiff dev: running; Ctrl-C (or `skiff dev down`) stops it and removes everything"
        );
        shutdown_signal().await;
        anyhow::Ok(())
    })?;
    println!("skiff dev: stopping");
    cluster.teardown();
    Ok(0)
}

impl Cluster {
    /// Claims a slot, wires the namespaces, starts the server and agents,
    /// and waits until every node is ready. Admin config goes to `config`.
    /// `exe` is the skiff binary to run.
    pub fn up(exe: &Path, options: &Options) -> anyhow::Result<Cluster> {
        let nodes = options.nodes;
        let (slot, dir) = claim_slot()?;
        let mut c = Cluster {
            slot,
            url: format!("https://198.18.{slot}.1:7443"),
            config: options.config.clone(),
            lan: format!("skd{slot}-lan"),
            host_if: format!("skd{slot}h"),
            nodes: (1..=nodes)
                .map(|i| DevNode {
                    name: format!("n{i}"),
                    netns: format!("skd{slot}-n{i}"),
                    lan_if: format!("n{i}"),
                    address: Ipv4Addr::new(198, 18, slot, 10 + i as u8),
                    tag: format!("skd{slot}n{i}"),
                })
                .collect(),
            pod_range: format!("198.19.{}.0/20", u16::from(slot) * 16),
            dir,
            server: None,
            agents: Vec::new(),
            exe: PathBuf::new(),
            join_token: String::new(),
            options: options.clone(),
        };
        // From here on, a failure tears down what was made (Drop).
        c.wire()?;
        // Instances run the binary as `nobody`: give them a copy they can read.
        let bin = c.dir.join("bin");
        std::fs::create_dir_all(&bin)?;
        c.exe = bin.join("skiff");
        std::fs::copy(exe, &c.exe)?;
        set_mode(&bin, 0o755)?;
        set_mode(&c.exe, 0o755)?;
        c.start_server()?;
        c.join_token = std::fs::read_to_string(c.dir.join("server/join-token"))?
            .trim()
            .to_string();
        for i in 0..c.nodes.len() {
            let agent = c.start_agent(i)?;
            c.agents.push(Some(agent));
        }
        c.write_state()?;
        c.wait_nodes_ready(Duration::from_secs(60))?;
        c.route_host_to_pods()?;
        Ok(c)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let host = Ipv4Addr::new(198, 18, self.slot, 1);
        ip(&["netns", "add", &self.lan])?;
        ip(&["-n", &self.lan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &self.lan, "link", "set", "br0", "up"])?;
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "host",
            "netns",
            &self.lan,
        ])?;
        ip(&["addr", "add", &format!("{host}/24"), "dev", &self.host_if])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&[
            "-n", &self.lan, "link", "set", "host", "master", "br0", "up",
        ])?;
        for n in &self.nodes {
            ip(&["netns", "add", &n.netns])?;
            ip(&[
                "-n", &n.netns, "link", "add", "eth0", "type", "veth", "peer", "name", &n.lan_if,
                "netns", &self.lan,
            ])?;
            ip(&[
                "-n",
                &n.netns,
                "addr",
                "add",
                &format!("{}/24", n.address),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &n.netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &n.netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &self.lan, "link", "set", &n.lan_if, "master", "br0", "up",
            ])?;
        }
        Ok(())
    }

    /// Starts the API server (again, after [`Cluster::stop_server`]) on
    /// the slot's fixed address, and waits until it listens.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let mut server = Command::new(&self.exe)
            .args(["server", "--data-dir"])
            .arg(self.dir.join("server"))
            .args(["--listen", &format!("198.18.{}.1:7443", self.slot)])
            .args(["--advertise", &format!("198.18.{}.1", self.slot)])
            .args(["--pod-cidr-range", &self.pod_range])
            .args(["--node-grace", &self.options.node_grace.to_string()])
            .args(
                self.options
                    .cert_lifetime
                    .iter()
                    .flat_map(|s| ["--workload-cert-lifetime".to_string(), s.to_string()]),
            )
            .arg("--write-config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = server.stdout.take();
        self.server = Some(server);
        first_line_with(stdout, "listening on", Duration::from_secs(30)).ok_or_else(|| {
            anyhow::anyhow!(
                "the server did not start; see {}",
                self.dir.join("server.log").display()
            )
        })?;
        Ok(())
    }

    /// Stops the API server (SIGTERM); agents and instances carry on.
    pub fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            stop(s, Duration::from_secs(10));
        }
    }

    /// Starts node `i`'s agent (again, after [`Cluster::kill_agent`]).
    pub fn start_agent(&self, i: usize) -> anyhow::Result<Child> {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", n.name)))?;
        Ok(Command::new(&self.exe)
            .args(["agent", "--server", &self.url, "--ca-file"])
            .arg(self.dir.join("server/pki/ca.crt"))
            .args(["--node-name", &n.name, "--address", &n.address.to_string()])
            .args(["--netns", &n.netns, "--tag", &n.tag])
            .args(["--label", &format!("zone=zone-{}", i % 3)])
            .args(["--cpu", "2", "--memory", "4Gi", "--stop-grace", "3"])
            .args(self.options.self_fence.then_some("--self-fence"))
            .args(self.options.mesh.then_some("--mesh"))
            .arg("--data-dir")
            .arg(self.dir.join(&n.name))
            .env("SKIFF_JOIN_TOKEN", &self.join_token)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    }

    /// SIGKILLs node `i`'s agent (its instances keep running, orphaned).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(Some(mut a)) = self.agents.get_mut(i).map(Option::take) {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Puts a restarted agent back under the cluster's care.
    pub fn adopt_agent(&mut self, i: usize, agent: Child) {
        self.agents[i] = Some(agent);
    }

    /// The last `lines` lines of `server` or a node's (`n1`…) log.
    pub fn log_tail(&self, who: &str, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("{who}.log"))).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn client(&self) -> anyhow::Result<skiff_client::Client> {
        let config = skiff_client::ClientConfig::load(&self.config)?;
        Ok(skiff_client::Client::new(&config)?)
    }

    fn write_state(&self) -> anyhow::Result<()> {
        let state = json!({
            "slot": self.slot,
            "url": self.url,
            "config": self.config,
            "owner": std::process::id(),
            "lan": self.lan,
            "hostInterface": self.host_if,
            "podRange": self.pod_range,
            "nodes": self.nodes.iter().zip(&self.agents).map(|(n, a)| json!({
                "name": n.name, "netns": n.netns, "lanInterface": n.lan_if,
                "address": n.address.to_string(), "tag": n.tag,
                "agentPid": a.as_ref().map(Child::id),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(
            self.dir.join("cluster.json"),
            serde_json::to_vec_pretty(&state)?,
        )?;
        Ok(())
    }

    fn wait_nodes_ready(&self, within: Duration) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = self.client()?;
        let nodes =
            skiff_api::KindInfo::find("nodes").ok_or_else(|| anyhow::anyhow!("no Node kind"))?;
        let deadline = Instant::now() + within;
        loop {
            let list = runtime.block_on(client.list(nodes, None, None));
            let ready = list
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|v| {
                            v.pointer("/status/ready").and_then(Value::as_bool) == Some(true)
                                && v.pointer("/spec/podCIDR").is_some()
                        })
                        .count()
                })
                .unwrap_or(0);
            if ready == self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{ready} of {} nodes became ready within {}s; see the logs in {}",
                    self.nodes.len(),
                    within.as_secs(),
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Routes each node's pod range from the host via that node, so the
    /// host reaches instances (and is an outside address to them).
    fn route_host_to_pods(&self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let nodes =
            skiff_api::KindInfo::find("nodes").ok_or_else(|| anyhow::anyhow!("no Node kind"))?;
        for v in runtime
            .block_on(self.client()?.list(nodes, None, None))?
            .items
        {
            let cidr = v.pointer("/spec/podCIDR").and_then(Value::as_str);
            let via = v.pointer("/status/address").and_then(Value::as_str);
            if let (Some(c), Some(a)) = (cidr, via) {
                ip(&["route", "replace", c, "via", a])?;
            }
        }
        Ok(())
    }

    /// Stops agents (which stop their instances), the server, and removes
    /// every namespace, link, route, cgroup and file the cluster made.
    pub fn teardown(&mut self) {
        for a in self.agents.iter_mut().filter_map(Option::take) {
            stop(a, Duration::from_secs(20));
        }
        self.stop_server();
        cleanup_slot(
            self.slot,
            &self.nodes.iter().map(|n| n.tag.clone()).collect::<Vec<_>>(),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.dir.exists() {
            self.teardown();
        }
    }
}

/// Applies the demo, waits for it, and shows one instance answering.
async fn demo(c: &Cluster, client: &skiff_client::Client) -> anyhow::Result<()> {
    let file = c.dir.join("shop.yaml");
    std::fs::write(&file, SHOP)?;
    let out = tokio::process::Command::new(&c.exe)
        .args(["apply", "-f"])
        .arg(&file)
        .env("SKIFF_CONFIG", &c.config)
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(
        out.status.success(),
        "applying the demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let instances = skiff_api::KindInfo::find("instances")
        .ok_or_else(|| anyhow::anyhow!("no Instance kind"))?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut shown = String::new();
    let web = loop {
        let list = client.list(instances, Some("shop"), None).await?;
        let ready: Vec<&Value> = list
            .items
            .iter()
            .filter(|v| v.pointer("/status/ready").and_then(Value::as_bool) == Some(true))
            .collect();
        let line = format!("skiff dev: {} of 7 demo instances ready", ready.len());
        if line != shown {
            println!("{line}");
            shown = line;
        }
        if ready.len() >= 7 {
            break ready
                .iter()
                .find(|v| v.pointer("/spec/service").and_then(Value::as_str) == Some("web"))
                .and_then(|v| v.pointer("/status/address").and_then(Value::as_str))
                .map(str::to_string);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the demo did not become ready; `skiff get instances -n shop -o wide` shows why"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // With the mesh, an instance refuses plaintext from outside it: the
    // demo is shown through the ingress gateway instead.
    if let Some(addr) = web.filter(|_| !c.options.mesh) {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "3", &format!("http://{addr}:8080/")])
            .output()
            .await;
        println!("$ curl http://{addr}:8080/");
        match out {
            Ok(o) => print!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => println!("(curl: {e})"),
        }
    }
    println!("Try: skiff get instances -n shop -o wide; skiff describe service web -n shop");
    Ok(())
}

/// Keeps host routes to every node's pod range, so the host reaches instances.
async fn host_routes(client: skiff_client::Client) {
    let nodes = match skiff_api::KindInfo::find("nodes") {
        Some(k) => k,
        None => return,
    };
    loop {
        if let Ok(list) = client.list(nodes, None, None).await {
            for v in &list.items {
                let cidr = v.pointer("/spec/podCIDR").and_then(Value::as_str);
                let via = v.pointer("/status/address").and_then(Value::as_str);
                if let (Some(c), Some(a)) = (cidr, via) {
                    let _ = ip(&["route", "replace", c, "via", a]);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Claims the lowest free slot: `<DEV_ROOT>/<slot>` made atomically, with
/// the owner's pid in it. A slot whose owner died is cleaned and reused.
fn claim_slot() -> anyhow::Result<(u8, PathBuf)> {
    std::fs::create_dir_all(DEV_ROOT)?;
    set_mode(Path::new(DEV_ROOT), 0o755)?;
    for slot in 1..=SLOTS {
        let dir = Path::new(DEV_ROOT).join(slot.to_string());
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                std::fs::write(dir.join("owner"), std::process::id().to_string())?;
                set_mode(&dir, 0o755)?;
                return Ok((slot, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if owner_alive(&dir) {
                    continue;
                }
                // Dead owner (or one that is still writing its pid: leave
                // young slots alone).
                let young = std::fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .map(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(5))
                    .unwrap_or(true);
                if young {
                    continue;
                }
                cleanup_slot(slot, &stale_tags(&dir));
                let _ = std::fs::remove_dir_all(&dir);
                if std::fs::create_dir(&dir).is_ok() {
                    std::fs::write(dir.join("owner"), std::process::id().to_string())?;
                    set_mode(&dir, 0o755)?;
                    return Ok((slot, dir));
                }
            }
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", dir.display())),
        }
    }
    anyhow::bail!("all {SLOTS} local cluster slots are in use: `skiff dev down` stops them")
}

fn owner_alive(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("owner"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

fn stale_tags(dir: &Path) -> Vec<String> {
    std::fs::read(dir.join("cluster.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| {
            v.get("nodes")?.as_array().map(|ns| {
                ns.iter()
                    .filter_map(|n| n.get("tag")?.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Removes a slot's namespaces, links, routes and cgroups (whatever exists).
fn cleanup_slot(slot: u8, tags: &[String]) {
    let prefix = format!("skd{slot}");
    // Instance namespaces first (their veths sit in node namespaces), then
    // node and lan namespaces, which take their veths along.
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| {
                n.starts_with(&format!("{prefix}n")) || n.starts_with(&format!("{prefix}-"))
            })
            .collect();
        // Instance namespaces (`skd1n1-7`) sort after node ones (`skd1-n1`) by name; delete them first.
        names.sort_by_key(|n| !n.starts_with(&format!("{prefix}n")));
        for n in names {
            let _ = ip(&["netns", "del", &n]);
        }
    }
    let _ = ip(&["link", "del", &format!("{prefix}h")]);
    let _ = ip(&[
        "route",
        "flush",
        "root",
        &format!("198.19.{}.0/20", u16::from(slot) * 16),
    ]);
    for tag in tags {
        skiff_agent::runtime::cgroup::remove_agent_dirs(tag);
        let _ = std::fs::remove_dir_all(Path::new("/run/skiff-mesh").join(tag));
        skiff_netpol::datapath::unpin(
            &Path::new(skiff_netpol::datapath::BPFFS).join(format!("skiff-{tag}")),
        );
    }
}

/// `skiff dev down`: asks every running cluster's owner to stop, waits,
/// and cleans up slots whose owner is gone.
fn down() -> anyhow::Result<u8> {
    let Ok(entries) = std::fs::read_dir(DEV_ROOT) else {
        println!("skiff dev: no local cluster");
        return Ok(0);
    };
    let mut stopped = 0;
    for e in entries.flatten() {
        let dir = e.path();
        let Some(slot) = e.file_name().to_str().and_then(|s| s.parse::<u8>().ok()) else {
            continue;
        };
        if let Some(pid) = std::fs::read_to_string(dir.join("owner"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            && owner_alive(&dir)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(40);
            while owner_alive(&dir) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if dir.exists() {
            cleanup_slot(slot, &stale_tags(&dir));
            let _ = std::fs::remove_dir_all(&dir);
        }
        stopped += 1;
    }
    println!("skiff dev: stopped {stopped} local cluster(s)");
    Ok(0)
}

fn stop(mut child: Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a child's stdout until a line containing `needle` (or the timeout).
fn first_line_with(
    out: Option<std::process::ChildStdout>,
    needle: &str,
    within: Duration,
) -> Option<String> {
    use std::io::BufRead;
    let out = out?;
    let needle = needle.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&needle) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(within).ok()
}

/// Runs `f` on a fresh local cluster (admin config in a temporary
/// directory) and tears it down afterwards; when `f` fails, the server
/// log's tail goes to stderr first. The benches run this way.
pub fn with_cluster<T>(
    nodes: usize,
    node_grace: f64,
    f: impl FnOnce(&mut Cluster) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let dir = tempfile::tempdir()?;
    let options = Options {
        nodes,
        node_grace,
        self_fence: false,
        mesh: false,
        cert_lifetime: None,
        config: dir.path().join("config"),
    };
    let mut c = Cluster::up(&std::env::current_exe()?, &options)?;
    let result = f(&mut c);
    if result.is_err() {
        eprintln!("server log (last lines):\n{}", c.log_tail("server", 40));
    }
    c.teardown();
    result
}

/// What a bench on cluster `c` works with: a runtime, an admin client,
/// and the Service, Instance and Policy kinds.
pub(crate) fn bench_on(
    c: &Cluster,
) -> anyhow::Result<(
    tokio::runtime::Runtime,
    skiff_client::Client,
    [&'static skiff_api::KindInfo; 3],
)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let kind = crate::resources::kind;
    Ok((
        runtime,
        c.client()?,
        [kind("services")?, kind("instances")?, kind("policies")?],
    ))
}

/// A Service named `name` in namespace `bench`, labelled `app: <name>`.
pub(crate) fn bench_service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "skiff.dev/v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bench", "labels": {"app": name}},
        "spec": spec})
}

/// The network namespace of the instance at `address` in cluster `c`.
pub fn netns_of(c: &Cluster, address: Ipv4Addr) -> Option<String> {
    let names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    names
        .into_iter()
        .filter(|n| {
            c.nodes
                .iter()
                .any(|node| n.starts_with(&format!("{}-", node.tag)))
        })
        .find(|n| {
            Command::new("ip")
                .args(["-n", n, "-o", "-4", "addr", "show", "dev", "eth0"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {address}/32")))
                .unwrap_or(false)
        })
}

/// Pids of the `skiff demo-app --name NAME…` processes whose command line
/// contains `name` (the app itself, not an `internal-exec` on its way to it).
pub fn app_processes(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let has = |s: &str| {
            args.iter()
                .any(|a| a.windows(s.len()).any(|w| w == s.as_bytes()))
        };
        if has(name) && has("demo-app") && !has("internal-exec") {
            pids.push(pid);
        }
    }
    pids
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// Runs `ip ARGS` (blocking); the error carries what it printed.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `ip` (install iproute2): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
