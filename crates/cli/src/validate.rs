//! `skiff validate`: check manifests and policies with no cluster.

use std::path::PathBuf;

use clap::Args;

use crate::{exit, load_or_report};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Files or directories (searched recursively for *.yaml, *.yml, *.json).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: &ValidateArgs) -> u8 {
    let Some(report) = load_or_report(&args.paths) else {
        return exit::FAILED;
    };
    let files: std::collections::BTreeSet<&str> =
        report.resources.iter().map(|l| l.file.as_str()).collect();
    println!(
        "{} resource(s) in {} file(s) valid",
        report.resources.len(),
        files.len()
    );
    exit::OK
}
