//! Skiff's client commands: argument types and what each command prints.
//!
//! Every command returns its exit code; the binary only dispatches.

pub mod bench;
pub mod bench_cluster;
pub mod bench_datapath;
pub mod bench_discovery;
mod bench_etcd;
pub mod bench_policy;
pub mod bench_proxy;
pub mod bench_scheduler;
pub mod bench_store;
pub mod demo_app;
pub mod describe;
pub mod dev;
pub mod flows;
pub mod gateway;
pub mod logs;
pub mod output;
pub mod policy;
pub mod resources;
pub mod validate;

use std::path::PathBuf;

use skiff_api::{Diagnostic, LoadReport, load_paths};

/// Exit codes shared by every command.
pub mod exit {
    pub const OK: u8 = 0;
    /// The input was read but is wrong: invalid files, failing tests.
    pub const FAILED: u8 = 1;
}

/// Loads `paths`, printing every error to stderr. `None` if there were any.
pub fn load_or_report(paths: &[PathBuf]) -> Option<LoadReport> {
    let report = load_paths(paths);
    if report.errors.is_empty() {
        Some(report)
    } else {
        print_diagnostics(&report.errors);
        None
    }
}

pub fn print_diagnostics(errors: &[Diagnostic]) {
    for e in errors {
        if e.line == 0 {
            eprintln!("{}: {}", e.file, e.message);
        } else {
            eprintln!("{e}");
        }
    }
    let files: std::collections::BTreeSet<&str> = errors.iter().map(|e| e.file.as_str()).collect();
    eprintln!("{} error(s) in {} file(s)", errors.len(), files.len());
}
