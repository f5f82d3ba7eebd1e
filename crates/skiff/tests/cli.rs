//! The `skiff` binary's offline commands, driven as a user would.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn skiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .output()
        .expect("run skiff")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn validate_accepts_the_repository_manifests() {
    let root = repo_root();
    let out = skiff(&[
        "validate",
        "-f",
        root.join("policies").to_str().unwrap(),
        root.join("examples").to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
}

#[test]
fn validate_reports_every_mistake_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: skiff.dev/v1
kind: Policy
metadata:
  name: web
  namespace: shop
spec:
  selector: {matchLabel: {app: web}}
  ingress:
    - from: [{workloads: {matchLabels: {app: checkout}}}]
      ports: [{port: 80800}]
---
apiVersion: skiff.dev/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  run: {command: /bin/web}
  resources: {requests: {cpu: lots}}
",
    );
    let out = skiff(&["validate", "-f", &file]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected = [
        format!(
            "{file}:7:14: spec.selector.matchLabel: unknown field `matchLabel`; did you mean `matchLabels`?"
        ),
        format!(
            "{file}:10:22: spec.ingress[0].ports[0].port: expected an integer from 1 to 65535, found \"80800\""
        ),
        format!("{file}:17:31: spec.resources.requests.cpu: invalid quantity \"lots\""),
    ];
    for e in &expected {
        assert!(stderr.contains(e.as_str()), "missing {e:?} in:\n{stderr}");
    }
    assert!(stderr.contains("3 error(s) in 1 file(s)"), "{stderr}");
}

/// Runs `skiff validate` under a 256 MiB address-space limit: building a
/// tree for a hostile file would not fit; refusing it early does.
fn validate_in_256_mib(files: &[&str]) -> Output {
    let cmd = format!(
        "ulimit -v 262144; exec {} validate -f {}",
        env!("CARGO_BIN_EXE_skiff"),
        files.join(" ")
    );
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

#[test]
fn validate_rejects_huge_files_within_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let big = "a: b\n".repeat(2 * 1024 * 1024 + 1); // just over 10 MiB
    let file = write(dir.path(), "big.yaml", &big);
    let out = validate_in_256_mib(&[&file]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("larger than the 8 MiB limit"), "{stderr}");
}

#[test]
fn validate_rejects_deep_nesting_and_alias_bombs() {
    let dir = tempfile::tempdir().unwrap();
    let deep: String = (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
    let deep = write(dir.path(), "deep.yaml", &deep);
    let flow = write(dir.path(), "flow.yaml", &"[".repeat(1_000_000));
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..40 {
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n",
            p = i - 1
        ));
    }
    let bomb = write(dir.path(), "bomb.yaml", &bomb);
    let out = validate_in_256_mib(&[&deep, &flow, &bomb]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{deep}:65:"))
            && stderr.contains("nesting is deeper than 64 levels"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{flow}:1:")) && stderr.contains("nested too deeply"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{bomb}:")) && stderr.contains("counting alias expansions"),
        "{stderr}"
    );
    assert!(stderr.contains("3 error(s) in 3 file(s)"), "{stderr}");
}

#[test]
fn policy_test_passes_on_the_demo_policies() {
    let out = skiff(&[
        "policy",
        "test",
        "-f",
        repo_root().join("policies").to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.trim_end().ends_with(" passed, 0 failed"), "{stdout}");
}

const POLICY: &str = "apiVersion: skiff.dev/v1
kind: Policy
metadata: {name: payments, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  ingress:
    - from: [{workloads: {matchLabels: {app: checkout}}}]
      ports: [{port: grpc}]
";

const TEST: &str = "apiVersion: skiff.dev/v1
kind: PolicyTest
metadata: {name: t}
spec:
  workloads:
    - {name: shop/web, labels: {app: web}}
    - {name: shop/checkout, labels: {app: checkout}}
    - {name: shop/payments, labels: {app: payments}, ports: [{name: grpc, port: 9090}]}
  cases:
    - {from: shop/checkout, to: shop/payments, port: 9090, expect: allow}
    - {from: shop/web, to: shop/payments, port: 9090, expect: allow}
";

#[test]
fn policy_test_reports_failures_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.yaml", POLICY);
    let test = write(dir.path(), "test.yaml", TEST);
    let d = dir.path().to_str().unwrap();
    let out = skiff(&["policy", "test", "-f", d]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("FAIL {test}:11: t: shop/web -> shop/payments 9090/TCP: expected allow, got deny: ingress of shop/payments: isolated by Policy shop/payments; no rule allows it")),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");

    let out = skiff(&["policy", "test", "-f", d, "--json"]);
    let (stdout, _) = text(&out);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let keys: Vec<&String> = lines[1].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "test", "from", "to", "port", "protocol", "expect", "got", "reason"
        ]
    );
    assert_eq!(lines[1]["got"], "deny");
    assert_eq!(lines[0]["got"], "allow");
}

#[test]
fn policy_trace_explains_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.yaml", POLICY);
    write(dir.path(), "test.yaml", TEST);
    let out = skiff(&[
        "policy",
        "trace",
        "-f",
        dir.path().to_str().unwrap(),
        "--from",
        "shop/web",
        "--to",
        "shop/payments",
        "--port",
        "9090",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with("shop/web -> shop/payments 9090/TCP: DENY"),
        "{stdout}"
    );
    assert!(
        stdout.contains("egress of shop/web: not isolated"),
        "{stdout}"
    );
    assert!(stdout.contains("ingress[0] peers [workloads app=checkout in namespace shop] ports [grpc/TCP]: peer shop/web not in"), "{stdout}");

    let out = skiff(&[
        "policy",
        "trace",
        "-f",
        dir.path().to_str().unwrap(),
        "--from",
        "shop/nobody",
        "--to",
        "shop/payments",
        "--port",
        "9090",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("workload shop/nobody is not declared in any PolicyTest"),
        "{stderr}"
    );
}

#[test]
fn policy_diff_shows_flows_that_change() {
    let dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q"]);
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    write(&dir.path().join("policies"), "policy.yaml", POLICY);
    write(&dir.path().join("policies"), "test.yaml", TEST);
    git(&["add", "."]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "commit",
        "-qm",
        "base",
    ]);
    // The change under review: web may now call payments too.
    write(
        &dir.path().join("policies"),
        "policy.yaml",
        &POLICY.replace(
            "{app: checkout}",
            "{app: checkout}}}, {workloads: {matchLabels: {app: web}",
        ),
    );
    let path = dir.path().join("policies");
    let out = skiff(&[
        "policy",
        "diff",
        "--base",
        "HEAD",
        "-f",
        path.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("shop/web -> shop/payments 9090/TCP: deny -> allow"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 flow(s) change decision between HEAD and the working tree"),
        "{stdout}"
    );

    let out = skiff(&[
        "policy",
        "diff",
        "--base",
        "no-such-rev",
        "-f",
        path.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("`no-such-rev` is not a git revision"),
        "{stderr}"
    );
}

#[test]
fn bench_policy_eval_prints_json() {
    let out = skiff(&[
        "bench",
        "policy-eval",
        "--workloads",
        "200",
        "--policies",
        "40",
        "--flows",
        "20000",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["bench"], "policy-eval");
    assert_eq!(v["workloads"], 200);
    assert_eq!(v["policies"], 40);
    assert!(v["flows_per_s"].as_f64().unwrap() > 0.0);
    // The synthetic cluster must exercise both outcomes, or the number means little.
    assert!(
        v["allowed"].as_u64().unwrap() > 0 && v["denied"].as_u64().unwrap() > 0,
        "{v}"
    );
}

#[test]
fn bench_store_prints_json() {
    let out = skiff(&[
        "bench",
        "store",
        "--clients",
        "8",
        "--writes",
        "400",
        "--watchers",
        "4",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["bench"], "store");
    assert_eq!(v["watchers_incomplete"], 0, "{v}");
    // Watcher `id` samples the revisions r (1..=400) with r % 64 == id.
    let expected: usize = (0..4u64)
        .map(|id| (1..=400u64).filter(|r| r % 64 == id).count())
        .sum();
    assert_eq!(v["watch_samples"], expected, "{v}");
    assert!(v["writes_per_s"].as_f64().unwrap() > 0.0 && v["commits"].as_u64().unwrap() >= 1);
}

#[test]
fn bench_scheduler_prints_json() {
    let out = skiff(&[
        "bench",
        "scheduler",
        "--nodes",
        "50",
        "--instances",
        "1000",
        "--spread",
        "zone",
        "--anti-affinity",
        "--compare-full-scan",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["bench"], "scheduler");
    assert_eq!(v["overcommitted_nodes"], 0);
    assert_eq!(v["full_scan"]["overcommitted_nodes"], 0);
    assert!(v["max_skew"].as_u64().unwrap() <= 1, "{v}");
    let placed = v["placed"].as_u64().unwrap();
    assert_eq!(placed + v["unschedulable"].as_u64().unwrap(), 1000);
    assert!(placed > 500, "{v}");
}

#[test]
fn bench_failover_prints_json() {
    let out = skiff(&[
        "bench",
        "failover",
        "--nodes",
        "2",
        "--replicas",
        "2",
        "--grace",
        "1",
        "--hollow",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["bench"], "failover");
    assert_eq!(v["max_instances"], 2, "{v}");
    assert!(
        v["replaced_ready_s"].as_f64().unwrap() >= v["detect_s"].as_f64().unwrap(),
        "{v}"
    );
}

#[test]
fn bench_proxy_prints_every_path_side_by_side() {
    let missing: Vec<&str> = ["haproxy", "nginx", "wrk"]
        .into_iter()
        .filter(|t| {
            !["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(t).is_file())
        })
        .collect();
    if !missing.is_empty() {
        assert_ne!(
            std::env::var("SKIFF_E2E").as_deref(),
            Ok("require"),
            "bench proxy needs {missing:?} (scripts/install-deps.sh installs them)"
        );
        eprintln!("skipping bench_proxy_prints_every_path_side_by_side: {missing:?} not installed");
        return;
    }
    let out = skiff(&[
        "bench",
        "proxy",
        "--seconds",
        "1",
        "--max-seconds",
        "1",
        "--rates",
        "200",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["bench"], "proxy");
    for path in ["direct", "skiff", "skiff_mtls_pair", "haproxy", "nginx"] {
        let p = &v["paths"][path];
        assert_eq!(p["errors_200"], 0, "{path}: {p}");
        let q = |k: &str| {
            p[k].as_f64()
                .unwrap_or_else(|| panic!("{path}: no {k}: {p}"))
        };
        assert!(q("p50_ms_200") > 0.0, "{path}: {p}");
        assert!(
            q("p50_ms_200") <= q("p90_ms_200")
                && q("p90_ms_200") <= q("p99_ms_200")
                && q("p99_ms_200") <= q("p999_ms_200"),
            "{path}: {p}"
        );
        // Every path took its turns: the kept second at 200/s.
        assert!(q("achieved_rps_200") > 100.0, "{path}: {p}");
        assert!(q("steal_ms_200") >= 0.0, "{path}: {p}");
        assert!(p["max_rps"].as_f64().unwrap() > 0.0, "{path}: {p}");
        if path != "direct" {
            assert!(p["peak_rss_mb"].as_f64().unwrap() > 1.0, "{path}: {p}");
            // What the processes hold alone is part of what they hold.
            assert!(q("anon_rss_mb_200") > 0.0, "{path}: {p}");
            assert!(q("anon_rss_mb_200") <= q("rss_mb_200"), "{path}: {p}");
        }
    }
}

#[test]
fn bench_discovery_makes_tables_and_sends_only_changes() {
    let out = skiff(&[
        "bench",
        "discovery",
        "--instances",
        "2000",
        "--services",
        "100",
        "--local",
        "5",
        "--rounds",
        "3",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["bench"], "discovery");
    assert!(v["table_ms_p50"].as_f64().unwrap() > 0.0, "{v}");
    // Every instance has a peer entry in the snapshot; an update carries
    // the one that changed.
    let snapshot = v["snapshot_bytes"].as_u64().unwrap();
    let update = v["largest_update_bytes"].as_u64().unwrap();
    assert!(snapshot > 2000 * 30, "{v}");
    assert!(update > 0 && update * 100 < snapshot, "{v}");
}

#[test]
fn a_bad_proxy_config_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.yaml");
    std::fs::write(
        &file,
        "outbound:\n  - listen: 127.0.0.1:1\n    routes: [{name: r, backends: [{service: ghost}]}]\n",
    )
    .unwrap();
    let out = skiff(&["proxy", "--config", file.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(&format!(
            "{}: outbound[0].routes[0].backends[0].service: no service \"ghost\"",
            file.display()
        )),
        "{stderr}"
    );
}
