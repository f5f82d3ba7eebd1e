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
    /// Run a node agent (so far: hollow nodes only, with --simulate).
    Agent(AgentArgs),
    /// Create or update objects from manifests (prints created / configured / unchanged).
    Apply(resources::ApplyArgs),
    /// Show objects: a table, or -o yaml|json|wide; --watch for changes.
    Get(resources::GetArgs),
    /// Delete objects by kind and name, or those a manifest describes.
    Delete(resources::DeleteArgs),
    /// Show how the cluster differs from manifests (exit 1 if it does).
    Diff(resources::DiffArgs),
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
    /// Register this many hollow nodes that heartbeat and report their
    /// instances running without starting anything (control-plane scale tests).
    #[arg(long)]
    simulate: Option<usize>,
    /// Name prefix of the hollow nodes (`{prefix}{i}`).
    #[arg(long, default_value = "hollow-")]
    node_prefix: String,
    /// Capacity of each hollow node.
    #[arg(long, default_value = "8")]
    cpu: String,
    #[arg(long, default_value = "32Gi")]
    memory: String,
    #[arg(long, default_value_t = 3)]
    zones: usize,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Validate(args) => Ok(validate::run(args)),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Server(args) => server(args),
        Command::Agent(args) => agent(args),
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

fn server(args: &ServerArgs) -> anyhow::Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let write_config = match (&args.write_config, args.no_write_config) {
        (_, true) => None,
        (Some(p), false) => Some(p.clone()),
        (None, false) => Some(skiff_client::ClientConfig::default_path()),
    };
    anyhow::ensure!(
        args.node_grace >= 0.5,
        "--node-grace must be at least 0.5 seconds"
    );
    let options = skiff_control::ServerOptions {
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        advertise: args.advertise.clone(),
        write_config,
        node_grace: std::time::Duration::from_secs_f64(args.node_grace),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(skiff_control::run(options, shutdown_signal()))?;
    Ok(0)
}

fn agent(args: &AgentArgs) -> anyhow::Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Some(nodes) = args.simulate else {
        anyhow::bail!(
            "only hollow nodes are supported so far: pass --simulate N (the real runtime comes with the agent issue)"
        );
    };
    for q in [&args.cpu, &args.memory] {
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
    let sim = skiff_agent::Simulation {
        prefix: args.node_prefix.clone(),
        nodes,
        cpu: args.cpu.clone(),
        memory: args.memory.clone(),
        zones: args.zones,
        heartbeat: std::time::Duration::from_secs(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::select! {
            r = skiff_agent::simulate(client, sim) => r.map_err(anyhow::Error::from),
            _ = shutdown_signal() => Ok(()),
        }
    })?;
    Ok(0)
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
