//! The `skiff` binary: parses the command line and hands off to the libraries.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use skiff_cli::{bench, policy, resources, validate};

#[derive(Debug, Parser)]
#[command(
    name = "skiff",
    version,
    about = "An orchestrator with a built-in service mesh and eBPF network policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check manifests and policies for errors, with no cluster.
    Validate(validate::ValidateArgs),
    /// Test, trace and diff network policies, with no cluster.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Measure performance; each prints one JSON line.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the control plane: the HTTPS API over the embedded store.
    Server(ServerArgs),
    /// Run a node agent: this machine's instances (or hollow nodes, with --simulate).
    Agent(AgentArgs),
    /// A local cluster: server and N node agents in network namespaces, with the demo.
    Dev(skiff_cli::dev::DevArgs),
    /// The sidecar proxy, from a config file; or the mesh's ingress gateway (--gateway).
    Proxy(ProxyArgs),
    /// The demo shop's HTTP service (what `skiff dev` runs in its instances).
    DemoApp(skiff_cli::demo_app::DemoAppArgs),
    /// The first process of every instance (used by the agent, not by hand).
    #[command(hide = true)]
    InternalExec(InternalExecArgs),
    /// Create or update objects from manifests (prints created / configured / unchanged).
    Apply(resources::ApplyArgs),
    /// Show objects: a table, or -o yaml|json|wide; --watch for changes.
    Get(resources::GetArgs),
    /// Delete objects by kind and name, or those a manifest describes.
    Delete(resources::DeleteArgs),
    /// Show how the cluster differs from manifests (exit 1 if it does).
    Diff(resources::DiffArgs),
    /// What network policy denied or audited, from every node, with the deciding policy.
    Flows(skiff_cli::flows::FlowsArgs),
    /// An instance's output (stdout and stderr), from its node.
    Logs(skiff_cli::logs::LogsArgs),
    /// One service, instance or node in prose, with recent events.
    Describe(skiff_cli::describe::DescribeArgs),
    /// Place no new instances on a node.
    Cordon(resources::NodeArgs),
    /// Place instances on a node again.
    Uncordon(resources::NodeArgs),
    /// Cordon a node and move its instances off, one at a time, each once its service recovered elsewhere.
    Drain(resources::NodeArgs),
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// The API server, e.g. https://198.18.0.1:7443.
    #[arg(long)]
    server: String,
    /// The cluster CA certificate (the server's data dir has it in pki/ca.crt).
    #[arg(long)]
    ca_file: std::path::PathBuf,
    /// The join token (the server's data dir has it in join-token).
    #[arg(long, env = "SKIFF_JOIN_TOKEN")]
    join_token: String,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The address other nodes reach this one at (default: the source
    /// address of this host's route).
    #[arg(long)]
    address: Option<std::net::Ipv4Addr>,
    /// Node labels, `key=value` (repeatable), e.g. `--label zone=a`.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Port of the agent's log endpoint (the API server reads logs there).
    #[arg(long, default_value_t = 7444)]
    log_port: u16,
    /// Where instance logs live.
    #[arg(long, default_value = "/var/lib/skiff-agent")]
    data_dir: std::path::PathBuf,
    /// Prefix of this agent's network namespaces and cgroup directory
    /// (default: `skiff-<node name>`); unique per agent on one machine.
    #[arg(long)]
    tag: Option<String>,
    /// Run inside this named network namespace (`skiff dev` nodes).
    #[arg(long, hide = true)]
    netns: Option<String>,
    /// Stop every instance when cut off from the control plane for half the
    /// node grace, before replacements start elsewhere. Off by default: it
    /// also stops instances during a control-plane outage.
    #[arg(long)]
    self_fence: bool,
    /// What an instance no policy selects may do: `isolate-selected`
    /// (Kubernetes: everything until a policy selects it) or `deny-all`.
    #[arg(long, default_value = "isolate-selected", value_parser = ["isolate-selected", "deny-all"])]
    policy_default: String,
    /// Inject the sidecar proxy into every instance: mTLS between
    /// instances, transparent to the apps (needs iptables on the node).
    #[arg(long)]
    mesh: bool,
    /// Trust domain of workload identities; must match the server's.
    #[arg(long, default_value = "skiff.local")]
    trust_domain: String,
    /// Run instances with no network policy enforcement at all (no eBPF).
    #[arg(long)]
    dangerously_skip_network_policy: bool,
    /// Seconds between SIGTERM and SIGKILL when an instance is stopped.
    #[arg(long, default_value_t = 10.0)]
    stop_grace: f64,
    /// Register this many hollow nodes that heartbeat and report their
    /// instances running without starting anything (control-plane scale tests).
    #[arg(long)]
    simulate: Option<usize>,
    /// Name prefix of the hollow nodes (`{prefix}{i}`).
    #[arg(long, default_value = "hollow-")]
    node_prefix: String,
    /// Node capacity (default: this machine's; hollow nodes: 8 CPUs, 32Gi).
    #[arg(long)]
    cpu: Option<String>,
    #[arg(long)]
    memory: Option<String>,
    /// Hollow nodes are labelled `zone: zone-{i % zones}`.
    #[arg(long, default_value_t = 3)]
    zones: usize,
}

#[derive(Debug, clap::Args)]
struct ProxyArgs {
    /// Listeners, services, routes and identity files (YAML or JSON).
    #[arg(long, required_unless_present = "gateway", conflicts_with = "gateway")]
    config: Option<std::path::PathBuf>,
    /// Ingress gateway mode: everything accepted on --listen goes to this
    /// Service of the mesh, `<service>.<namespace>:<port>`, over mTLS. The
    /// identity and the discovery come from the cluster (admin client config).
    #[arg(long)]
    gateway: Option<String>,
    /// Gateway mode: where outside clients connect.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
    /// Gateway mode: serve HTTPS with this certificate (PEM chain)...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// ... and this key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Gateway mode: where its key, certificates and discovery socket live.
    #[arg(long, default_value = "/run/skiff-gateway")]
    state_dir: std::path::PathBuf,
    /// Gateway mode: the cluster's trust domain.
    #[arg(long, default_value = "skiff.local")]
    trust_domain: String,
    /// Worker threads: the cores the proxy may use.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Debug, clap::Args)]
struct InternalExecArgs {
    /// `cgroup.procs` files to join (repeatable).
    #[arg(long = "cgroup")]
    cgroups: Vec<std::path::PathBuf>,
    /// Network namespace file to enter.
    #[arg(long)]
    netns: Option<std::path::PathBuf>,
    /// User name or uid to run as.
    #[arg(long)]
    user: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Where the store, the CA and the credentials live.
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: std::path::PathBuf,
    /// Address to listen on (port 0: any free port; the chosen URL is printed).
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: std::net::SocketAddr,
    /// Names or addresses clients use to reach this server (repeatable).
    #[arg(long)]
    advertise: Vec<String>,
    /// Also write the admin client config here (default: $SKIFF_CONFIG, else ~/.skiff/config).
    #[arg(long)]
    write_config: Option<std::path::PathBuf>,
    /// Do not write the admin client config outside the data directory.
    #[arg(long, conflicts_with = "write_config")]
    no_write_config: bool,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Declare a node lost after this many seconds without a heartbeat.
    #[arg(long, default_value_t = 3.0)]
    node_grace: f64,
    /// Instance addresses: each node gets a /24 of this range.
    #[arg(long, default_value = "198.19.0.0/16")]
    pod_cidr_range: String,
    /// Services' virtual addresses (never routed: sidecar proxies intercept them).
    #[arg(long, default_value = "198.18.128.0/17")]
    service_cidr: String,
    /// Trust domain of workload identities (spiffe://<this>/ns/<ns>/sa/<service>).
    #[arg(long, default_value = "skiff.local")]
    trust_domain: String,
    /// Seconds a workload certificate is valid; agents renew at half.
    #[arg(long, default_value_t = 86_400.0)]
    workload_cert_lifetime: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Validate(args) => Ok(validate::run(args)),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Server(args) => server(args),
        Command::Agent(args) => agent(args),
        Command::InternalExec(args) => internal_exec(args),
        Command::Dev(args) => skiff_cli::dev::run(args),
        Command::Describe(args) => skiff_cli::describe::run(args),
        Command::Logs(args) => skiff_cli::logs::run(args),
        Command::Flows(args) => skiff_cli::flows::run(args),
        Command::DemoApp(args) => skiff_cli::demo_app::run(args),
        Command::Proxy(args) => proxy(args),
        Command::Apply(args) => resources::apply(args),
        Command::Get(args) => resources::get(args),
        Command::Delete(args) => resources::delete(args),
        Command::Diff(args) => resources::diff(args),
        Command::Cordon(args) => resources::cordon(args, true),
        Command::Uncordon(args) => resources::cordon(args, false),
        Command::Drain(args) => resources::drain(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr, filtered by `SKIFF_LOG` (default `info`).
fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

fn proxy(args: &ProxyArgs) -> anyhow::Result<u8> {
    init_logs(args.log_format == "json");
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    if let Some(target) = &args.gateway {
        let client = skiff_client::Client::new(&skiff_client::ClientConfig::load(
            &skiff_client::ClientConfig::default_path(),
        )?)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?;
        runtime.block_on(skiff_cli::gateway::run(
            client,
            &args.state_dir,
            args.listen,
            target,
            args.tls_cert.clone().zip(args.tls_key.clone()),
            &args.trust_domain,
            shutdown_signal(),
        ))?;
        return Ok(0);
    }
    let Some(path) = &args.config else {
        anyhow::bail!("give --config FILE, or --gateway TARGET");
    };
    let config = skiff_proxy::config::Config::load(path)?;
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(skiff_proxy::run(config, shutdown_signal()))?;
    Ok(0)
}

fn server(args: &ServerArgs) -> anyhow::Result<u8> {
    init_logs(args.log_format == "json");
    let write_config = match (&args.write_config, args.no_write_config) {
        (_, true) => None,
        (Some(p), false) => Some(p.clone()),
        (None, false) => Some(skiff_client::ClientConfig::default_path()),
    };
    anyhow::ensure!(
        args.node_grace >= 0.5,
        "--node-grace must be at least 0.5 seconds"
    );
    anyhow::ensure!(
        args.workload_cert_lifetime >= 10.0 && args.workload_cert_lifetime.is_finite(),
        "--workload-cert-lifetime must be at least 10 seconds"
    );
    skiff_identity::SpiffeId::new(&args.trust_domain, "ns", "sa")
        .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
    let options = skiff_control::ServerOptions {
        trust_domain: args.trust_domain.clone(),
        service_cidr: args
            .service_cidr
            .parse()
            .map_err(|e| anyhow::anyhow!("--service-cidr {}: {e}", args.service_cidr))?,
        workload_cert_lifetime: std::time::Duration::from_secs_f64(args.workload_cert_lifetime),
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        advertise: args.advertise.clone(),
        write_config,
        node_grace: std::time::Duration::from_secs_f64(args.node_grace),
        pod_cidr_range: args
            .pod_cidr_range
            .parse()
            .map_err(|e| anyhow::anyhow!("--pod-cidr-range {}: {e}", args.pod_cidr_range))?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(skiff_control::run(options, shutdown_signal()))?;
    Ok(0)
}

fn agent(args: &AgentArgs) -> anyhow::Result<u8> {
    // Before any thread exists: setns applies to the calling thread only.
    if let Some(ns) = &args.netns {
        let path = std::path::Path::new("/run/netns").join(ns);
        let f = std::fs::File::open(&path)
            .map_err(|e| anyhow::anyhow!("--netns {}: {e}", path.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow::anyhow!("--netns {}: {e}", path.display()))?;
    }
    init_logs(false);
    for q in [&args.cpu, &args.memory].into_iter().flatten() {
        skiff_api::quantity::Quantity::parse(q)
            .map_err(|e| anyhow::anyhow!("--cpu/--memory {q:?}: {e}"))?;
    }
    let ca = std::fs::read_to_string(&args.ca_file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.ca_file.display()))?;
    let config = skiff_client::ClientConfig {
        server: args.server.clone(),
        certificate_authority: ca,
        client_certificate: None,
        client_key: None,
        token: Some(args.join_token.trim().to_string()),
        node: None,
    };
    let client = skiff_client::Client::new(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(nodes) = args.simulate {
        let sim = skiff_agent::Simulation {
            prefix: args.node_prefix.clone(),
            nodes,
            cpu: args.cpu.clone().unwrap_or_else(|| "8".into()),
            memory: args.memory.clone().unwrap_or_else(|| "32Gi".into()),
            zones: args.zones,
            heartbeat: std::time::Duration::from_secs(1),
        };
        runtime.block_on(async {
            tokio::select! {
                r = skiff_agent::simulate(client, sim) => r.map_err(anyhow::Error::from),
                _ = shutdown_signal() => Ok(()),
            }
        })?;
        return Ok(0);
    }
    let name = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")?
            .trim()
            .to_string(),
    };
    anyhow::ensure!(
        skiff_api::meta::is_dns_subdomain(&name),
        "node name {name:?} is not a DNS name: pass --node-name"
    );
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {l:?}: expected key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let address = match args.address.or_else(skiff_agent::node::guess_address) {
        Some(a) => a,
        None => anyhow::bail!("cannot tell this node's address: pass --address"),
    };
    anyhow::ensure!(
        args.stop_grace >= 0.0 && args.stop_grace.is_finite(),
        "--stop-grace must be a number of seconds"
    );
    let (cpu, memory) = skiff_agent::node::machine_capacity();
    let cfg = skiff_agent::node::NodeConfig {
        tag: args.tag.clone().unwrap_or_else(|| format!("skiff-{name}")),
        name,
        address,
        labels,
        cpu: args.cpu.clone().unwrap_or(cpu),
        memory: args.memory.clone().unwrap_or(memory),
        exe: std::env::current_exe()?,
        data_dir: args.data_dir.clone(),
        heartbeat: std::time::Duration::from_secs(1),
        stop_grace: std::time::Duration::from_secs_f64(args.stop_grace),
        self_fence: args.self_fence,
        log_port: args.log_port,
        network_policy: (!args.dangerously_skip_network_policy).then(|| {
            if args.policy_default == "deny-all" {
                skiff_api::policy::DefaultPolicy::DenyAll
            } else {
                skiff_api::policy::DefaultPolicy::IsolateSelected
            }
        }),
        join_token: args.join_token.trim().to_string(),
        mesh: args.mesh.then(|| args.trust_domain.clone()),
    };
    runtime.block_on(skiff_agent::node::run(client, cfg, shutdown_signal()))?;
    Ok(0)
}

fn internal_exec(args: &InternalExecArgs) -> anyhow::Result<u8> {
    let e = skiff_agent::runtime::exec::Exec {
        cgroups: args.cgroups.clone(),
        netns: args.netns.clone(),
        user: args.user.clone(),
        command: args.command.clone(),
    };
    match skiff_agent::runtime::exec::exec(&e) {
        Ok(never) => match never {},
        Err(err) => {
            // The instance's log shows this line; the agent reports it.
            eprintln!("skiff: {}", err.message);
            std::process::exit(err.code);
        }
    }
}

use skiff_cli::dev::shutdown_signal;
