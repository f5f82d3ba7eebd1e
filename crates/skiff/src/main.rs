//! The `skiff` binary: parses the command line and hands off to the libraries.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use skiff_cli::{bench, policy, validate};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Validate(args) => Ok(validate::run(args)),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
