//! `skiff policy test|trace|diff`: the policy workflow with no cluster.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use skiff_api::load_str;
use skiff_api::net::Protocol;
use skiff_api::policy::DefaultPolicy;
use skiff_api::policytest::Endpoint;
use skiff_api::policytest::PolicyTestSpec;
use skiff_netpol::model::Flow;
use skiff_netpol::suite;
use skiff_netpol::{Engine, World};

use crate::{exit, load_or_report, print_diagnostics};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run every PolicyTest case against the policies under the paths.
    Test(TestArgs),
    /// Explain the decision for one flow.
    Trace(TraceArgs),
    /// Show flows whose decision changes between a git revision and now.
    Diff(DiffArgs),
}

#[derive(Debug, Args)]
pub struct TestArgs {
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
    /// One JSON object per case instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
    /// Sender: `namespace/name` of a workload in a PolicyTest, or an IP address.
    #[arg(long)]
    pub from: Endpoint,
    /// Receiver: `namespace/name` or an IP address.
    #[arg(long)]
    pub to: Endpoint,
    #[arg(long)]
    pub port: u16,
    #[arg(long, default_value = "TCP", value_parser = parse_protocol)]
    pub protocol: Protocol,
    /// Cluster default; otherwise taken from the PolicyTests (isolate-selected if none says).
    #[arg(long = "default", value_parser = parse_default)]
    pub policy_default: Option<DefaultPolicy>,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The git revision to compare against (a branch, tag or commit).
    #[arg(long)]
    pub base: String,
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::parse(&s.to_ascii_uppercase())
        .ok_or_else(|| format!("expected one of {}", Protocol::ALL.join(", ")))
}

fn parse_default(s: &str) -> Result<DefaultPolicy, String> {
    DefaultPolicy::parse(s)
        .ok_or_else(|| format!("expected one of {}", DefaultPolicy::ALL.join(", ")))
}

pub fn run(cmd: &PolicyCommand) -> anyhow::Result<u8> {
    match cmd {
        PolicyCommand::Test(a) => Ok(test(a)),
        PolicyCommand::Trace(a) => trace(a),
        PolicyCommand::Diff(a) => diff(a),
    }
}

fn test(args: &TestArgs) -> u8 {
    let Some(report) = load_or_report(&args.paths) else {
        return exit::FAILED;
    };
    let results = match suite::run(&report.resources) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return exit::FAILED;
        }
    };
    let failed = results.iter().filter(|r| !r.passed()).count();
    for r in &results {
        if args.json {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("cannot encode result: {e}"),
            }
        } else if !r.passed() {
            println!(
                "FAIL {}:{}: {}: {} -> {} {}/{}: expected {}, got {}: {}",
                r.file,
                r.line,
                r.test,
                r.from,
                r.to,
                r.port,
                r.protocol,
                r.expect,
                r.got.as_str(),
                r.reason
            );
        }
    }
    if !args.json {
        if results.is_empty() {
            println!("no PolicyTest cases found under the given paths");
        }
        println!("{} passed, {failed} failed", results.len() - failed);
    }
    if failed > 0 || results.is_empty() {
        exit::FAILED
    } else {
        exit::OK
    }
}

fn trace(args: &TraceArgs) -> anyhow::Result<u8> {
    let Some(report) = load_or_report(&args.paths) else {
        return Ok(exit::FAILED);
    };
    let tests = suite::tests(&report.resources);
    let mut world = World::new();
    for (t, l) in &tests {
        world
            .add_test(&t.spec)
            .with_context(|| format!("{}:{}: PolicyTest {}", l.file, l.line, t.name()))?;
    }
    let default = args.policy_default.unwrap_or_else(|| {
        tests
            .iter()
            .map(|(t, _)| &t.spec)
            .find(|t| declares(t, &args.from) && declares(t, &args.to))
            .map_or(DefaultPolicy::IsolateSelected, |t| t.policy_default)
    });
    let engine = Engine::new(suite::policies(&report.resources), world, default);
    let flow = Flow {
        from: args.from.clone(),
        to: args.to.clone(),
        port: args.port,
        protocol: args.protocol,
    };
    let (verdict, lines) = engine.trace(&flow)?;
    println!(
        "{} -> {} {}/{}: {} (cluster default {})",
        flow.from,
        flow.to,
        flow.port,
        flow.protocol,
        verdict.decision.as_str().to_uppercase(),
        default
    );
    for line in lines {
        println!("  {line}");
    }
    Ok(exit::OK)
}

fn diff(args: &DiffArgs) -> anyhow::Result<u8> {
    let Some(head) = load_or_report(&args.paths) else {
        return Ok(exit::FAILED);
    };
    let mut base = Vec::new();
    let mut errors = Vec::new();
    for path in &args.paths {
        for (name, src) in files_at_revision(&args.base, path)? {
            match load_str(&name, &src) {
                Ok(l) => base.extend(l),
                Err(e) => errors.extend(e),
            }
        }
    }
    if !errors.is_empty() {
        eprintln!("the policies at {} do not load:", args.base);
        print_diagnostics(&errors);
        return Ok(exit::FAILED);
    }
    // Workloads come from the PolicyTests of both sides, so a test added or
    // removed in the change still shows its flows.
    let mut specs: Vec<&PolicyTestSpec> = suite::tests(&head.resources)
        .into_iter()
        .map(|(t, _)| &t.spec)
        .collect();
    specs.extend(suite::tests(&base).into_iter().map(|(t, _)| &t.spec));
    let changes = suite::diff(
        &specs,
        &suite::policies(&base),
        &suite::policies(&head.resources),
    )?;
    for c in &changes {
        if args.json {
            println!("{}", serde_json::to_string(c)?);
        } else {
            println!(
                "{} -> {} {}/{}: {} -> {}  ({})",
                c.from,
                c.to,
                c.port,
                c.protocol,
                c.before.as_str(),
                c.after.as_str(),
                c.reason
            );
        }
    }
    if !args.json {
        println!(
            "{} flow(s) change decision between {} and the working tree",
            changes.len(),
            args.base
        );
    }
    Ok(exit::OK)
}

fn declares(test: &PolicyTestSpec, end: &Endpoint) -> bool {
    match end {
        Endpoint::Workload { namespace, name } => test
            .workloads
            .iter()
            .any(|w| &w.namespace == namespace && &w.name == name),
        Endpoint::Address(_) => true,
    }
}

/// The manifest files under `path` as of git revision `rev`, as
/// (display name, contents). A path that did not exist then yields nothing.
fn files_at_revision(rev: &str, path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let abs = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
    let dir = if abs.is_dir() {
        abs.clone()
    } else {
        abs.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let root = git(&dir, &["rev-parse", "--show-toplevel"])?;
    let root = PathBuf::from(root.trim());
    let rel = abs
        .strip_prefix(std::fs::canonicalize(&root)?)
        .unwrap_or(Path::new(""));
    let rel_str = rel.to_string_lossy().to_string();
    git(
        &root,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ],
    )
    .with_context(|| format!("`{rev}` is not a git revision in {}", root.display()))?;
    let listing = git(
        &root,
        &[
            "ls-tree",
            "-r",
            "-z",
            "--name-only",
            rev,
            "--",
            if rel_str.is_empty() { "." } else { &rel_str },
        ],
    )?;
    let mut out = Vec::new();
    for file in listing.split('\0').filter(|f| !f.is_empty()) {
        let explicit = file == rel_str;
        let manifest = [".yaml", ".yml", ".json"].iter().any(|e| file.ends_with(e));
        let hidden = file.split('/').any(|part| part.starts_with('.'));
        if explicit || (manifest && !hidden) {
            let src = git(&root, &["show", &format!("{rev}:{file}")])?;
            out.push((format!("{rev}:{file}"), src));
        }
    }
    Ok(out)
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .context("cannot run git")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
