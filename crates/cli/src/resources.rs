//! `skiff apply|get|delete|diff`: working with objects on a cluster.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use skiff_api::{KINDS, KindInfo, Loaded, Resource};
use skiff_client::{Client, ClientConfig, EventType};

use crate::output::{diff_lines, table, to_yaml};
use crate::{exit, load_or_report};

/// How to reach the cluster.
#[derive(Debug, Args)]
pub struct Connection {
    /// Client config file (default: $SKIFF_CONFIG, else ~/.skiff/config).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

impl Connection {
    pub fn client(&self) -> anyhow::Result<Client> {
        let path = self
            .config
            .clone()
            .unwrap_or_else(ClientConfig::default_path);
        let config = ClientConfig::load(&path)?;
        Ok(Client::new(&config)?)
    }
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Files or directories of manifests.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
    /// Then wait until every applied Service has all its instances ready,
    /// showing progress; on timeout, say why each unready one waits.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Kind: service(s), instance(s), node(s), polic(y|ies), networkpolicies, route(s), policytest(s).
    pub kind: String,
    pub name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Label selector, e.g. `app=web,tier!=db`.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "wide", "yaml", "json"])]
    pub output: String,
    /// After listing, print changes as they happen.
    #[arg(short = 'w', long)]
    pub watch: bool,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub kind: Option<String>,
    pub name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Delete what these manifests describe.
    #[arg(short = 'f', long = "filename", num_args = 1..)]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub connection: Connection,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(crate) fn kind(name: &str) -> anyhow::Result<&'static KindInfo> {
    KindInfo::find(name).with_context(|| {
        let known: Vec<&str> = KINDS.iter().map(|k| k.plural).collect();
        format!("unknown kind `{name}`; known: {}", known.join(", "))
    })
}

fn namespace_of(r: &Resource) -> Option<&str> {
    r.metadata().namespace.as_deref()
}

/// The object as it would be stored, without server-managed fields.
fn desired(r: &Resource) -> anyhow::Result<Value> {
    let mut v = serde_json::to_value(r)?;
    strip(&mut v);
    Ok(v)
}

/// Removes what the server manages (revision; status of kinds whose status agents write).
fn strip(v: &mut Value) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("revision");
    }
}

fn comparable(v: &Value, kind: &KindInfo) -> Value {
    let mut v = v.clone();
    strip(&mut v);
    if kind.has_status
        && let Some(o) = v.as_object_mut()
    {
        o.remove("status");
    }
    v
}

pub fn apply(args: &ApplyArgs) -> anyhow::Result<u8> {
    let Some(report) = load_or_report(&args.paths) else {
        return Ok(exit::FAILED);
    };
    let client = args.connection.client()?;
    runtime()?.block_on(async {
        let mut failed = 0;
        for l in &report.resources {
            match apply_one(&client, l).await {
                Ok(outcome) => println!("{} {outcome}", l.resource.display_name()),
                Err(e) => {
                    failed += 1;
                    eprintln!(
                        "{}:{}: {}: {e:#}",
                        l.file,
                        l.line,
                        l.resource.display_name()
                    );
                }
            }
        }
        if failed > 0 {
            return Ok(exit::FAILED);
        }
        if args.wait {
            let services: Vec<(String, String, u32)> = report
                .resources
                .iter()
                .filter_map(|l| match &l.resource {
                    Resource::Service(s) => Some((
                        s.namespace().to_string(),
                        s.name().to_string(),
                        s.spec.replicas,
                    )),
                    _ => None,
                })
                .collect();
            return wait_ready(
                &client,
                &services,
                std::time::Duration::from_secs(args.timeout),
            )
            .await;
        }
        Ok(exit::OK)
    })
}

/// Waits until each service has `replicas` ready instances; prints a line
/// whenever the counts change, and on timeout why each unready one waits.
async fn wait_ready(
    client: &Client,
    services: &[(String, String, u32)],
    timeout: std::time::Duration,
) -> anyhow::Result<u8> {
    if services.is_empty() {
        return Ok(exit::OK);
    }
    let instances = kind("instances")?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shown = String::new();
    loop {
        let items = client.list(instances, None, None).await?.items;
        let mut line = Vec::new();
        let mut done = true;
        let mut waiting = Vec::new();
        for (ns, name, replicas) in services {
            let mine: Vec<&Value> = items
                .iter()
                .filter(|i| {
                    i.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
                        && i.pointer("/spec/service").and_then(Value::as_str) == Some(name)
                })
                .collect();
            let ready = mine
                .iter()
                .filter(|i| i.pointer("/status/ready").and_then(Value::as_bool) == Some(true))
                .count();
            done &= ready >= *replicas as usize && mine.len() == *replicas as usize;
            line.push(format!("{ns}/{name} {ready}/{replicas} ready"));
            for i in mine
                .iter()
                .filter(|i| i.pointer("/status/ready").and_then(Value::as_bool) != Some(true))
            {
                let text = |p: &str| {
                    i.pointer(p)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                let why = match text("/status/message") {
                    m if m.is_empty() => {
                        format!("{} on {}", text("/status/phase"), text("/spec/node"))
                    }
                    m => m,
                };
                waiting.push(format!("  {ns}/{}: {why}", text("/metadata/name")));
            }
        }
        let line = line.join(", ");
        if line != shown {
            println!("{line}");
            shown = line;
        }
        if done {
            return Ok(exit::OK);
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("not ready after {}s:", timeout.as_secs());
            for w in waiting {
                eprintln!("{w}");
            }
            return Ok(exit::FAILED);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn apply_one(client: &Client, l: &Loaded) -> anyhow::Result<&'static str> {
    let kind = l.resource.info();
    let ns = namespace_of(&l.resource);
    let name = &l.resource.metadata().name;
    let want = desired(&l.resource)?;
    // One retry: someone may change the object between our read and write.
    for attempt in 0..2 {
        let Some(live) = client.get(kind, ns, name).await? else {
            client.create(kind, ns, &want).await?;
            return Ok("created");
        };
        if comparable(&live, kind) == comparable(&want, kind) {
            return Ok("unchanged");
        }
        let mut update = want.clone();
        if let (Some(meta), Some(rev)) = (
            update.get_mut("metadata").and_then(Value::as_object_mut),
            live.pointer("/metadata/revision"),
        ) {
            meta.insert("revision".into(), rev.clone());
        }
        match client.update(kind, ns, name, &update).await {
            Ok(_) => return Ok("configured"),
            Err(e) if e.status() == Some(409) && attempt == 0 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("the object keeps changing; try again")
}

pub fn get(args: &GetArgs) -> anyhow::Result<u8> {
    let kind = kind(&args.kind)?;
    let ns = (kind.namespaced && !args.all_namespaces).then_some(args.namespace.as_str());
    let client = args.connection.client()?;
    runtime()?.block_on(async {
        let (items, revision) = match &args.name {
            Some(name) => match client.get(kind, ns.or(Some(&args.namespace)).filter(|_| kind.namespaced), name).await? {
                Some(v) => (vec![v], None),
                None => {
                    eprintln!("{} {name} not found", kind.kind);
                    return Ok(exit::FAILED);
                }
            },
            None => {
                let list = client.list(kind, ns, args.selector.as_deref()).await?;
                (list.items, Some(list.revision))
            }
        };
        let show_ns = kind.namespaced && args.all_namespaces;
        match args.output.as_str() {
            "json" => {
                let v = if args.name.is_some() { items[0].clone() } else { serde_json::json!({"kind": format!("{}List", kind.kind), "revision": revision, "items": items}) };
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            "yaml" => {
                let docs: Vec<String> = items.iter().map(to_yaml).collect();
                print!("{}", docs.join("---\n"));
            }
            wide => {
                let mut rows = vec![header(kind, show_ns, wide == "wide")];
                rows.extend(items.iter().map(|o| row(kind, o, show_ns, wide == "wide")));
                if items.is_empty() && !args.watch {
                    eprintln!("No {} found{}.", kind.plural, ns.map(|n| format!(" in namespace {n}")).unwrap_or_default());
                } else {
                    print!("{}", table(&rows));
                }
            }
        }
        if args.watch {
            let mut watch = client.watch(kind, ns, args.selector.as_deref(), revision.unwrap_or(0));
            while let Some(event) = watch.next().await {
                let event = event?;
                let mut r = row(kind, &event.object, show_ns, args.output == "wide");
                r.insert(0, format!("{:?}", event.kind).to_uppercase());
                if event.kind != EventType::Bookmark {
                    print!("{}", table(&[r]));
                }
            }
        }
        Ok(exit::OK)
    })
}

fn header(kind: &KindInfo, show_ns: bool, wide: bool) -> Vec<String> {
    let mut h: Vec<&str> = Vec::new();
    if show_ns {
        h.push("NAMESPACE");
    }
    h.push("NAME");
    h.extend(match kind.kind {
        "Service" => &["REPLICAS", "PORTS"][..],
        "Instance" => &[
            "SERVICE", "NODE", "PHASE", "READY", "ADDRESS", "RESTARTS", "AGE",
        ][..],
        "Node" => &["READY", "ADDRESS", "POD CIDR", "SCHEDULABLE"][..],
        "Policy" => &["SELECTOR", "MODE", "INGRESS", "EGRESS"][..],
        "NetworkPolicy" => &["POD SELECTOR", "INGRESS", "EGRESS"][..],
        "Route" => &["SERVICE", "RULES"][..],
        _ => &["CASES"][..],
    });
    h.push("REVISION");
    if wide {
        h.push("LABELS");
    }
    h.into_iter().map(String::from).collect()
}

/// How long ago an RFC 3339 time was, as `kubectl` shows ages: 45s, 3m, 5h, 2d.
fn age(rfc3339: &str) -> String {
    let Ok(then) =
        time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
    else {
        return String::new();
    };
    let secs = (time::OffsetDateTime::now_utc() - then)
        .whole_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn selector_text(v: Option<&Value>) -> String {
    v.and_then(|s| serde_json::from_value::<SelectorView>(s.clone()).ok())
        .map_or("-".into(), |s| s.to_string())
}

/// Enough of a selector to print it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorView {
    #[serde(default)]
    match_labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<Value>,
}

impl std::fmt::Display for SelectorView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.extend(self.match_expressions.iter().map(|e| {
            format!(
                "{} {} {}",
                text(e.get("key")),
                text(e.get("operator")),
                text(e.get("values"))
            )
        }));
        f.write_str(if parts.is_empty() { "(all)" } else { "" })?;
        f.write_str(&parts.join(","))
    }
}

fn rules(v: Option<&Value>) -> String {
    match v {
        None => "-".into(),
        Some(Value::Array(a)) => format!("{} rule(s)", a.len()),
        Some(_) => "0 rule(s)".into(),
    }
}

fn row(kind: &KindInfo, o: &Value, show_ns: bool, wide: bool) -> Vec<String> {
    let p = |path: &str| o.pointer(path);
    let mut r = Vec::new();
    if show_ns {
        r.push(text(p("/metadata/namespace")));
    }
    r.push(text(p("/metadata/name")));
    match kind.kind {
        "Service" => {
            r.push(text(p("/spec/replicas")));
            let ports = p("/spec/ports").and_then(Value::as_array).map(|ps| {
                ps.iter()
                    .map(|x| {
                        format!(
                            "{}:{}/{}",
                            text(x.get("name")),
                            text(x.get("port")),
                            text(x.get("protocol"))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            });
            r.push(
                ports
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        "Instance" => {
            for path in [
                "/spec/service",
                "/spec/node",
                "/status/phase",
                "/status/ready",
                "/status/address",
                "/status/restarts",
            ] {
                r.push(text(p(path)));
            }
            // Since its first event (the controller's Scheduled or FailedScheduling, at creation).
            r.push(
                p("/status/events/0/time")
                    .and_then(Value::as_str)
                    .map(age)
                    .unwrap_or_default(),
            );
        }
        "Node" => {
            r.push(text(p("/status/ready")));
            r.push(text(p("/status/address")));
            r.push(text(p("/spec/podCIDR")));
            r.push(
                (!p("/spec/unschedulable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false))
                .to_string(),
            );
        }
        "Policy" => {
            r.push(selector_text(p("/spec/selector")));
            r.push(text(p("/spec/mode")));
            r.push(rules(p("/spec/ingress")));
            r.push(rules(p("/spec/egress")));
        }
        "NetworkPolicy" => {
            r.push(selector_text(p("/spec/podSelector")));
            r.push(rules(p("/spec/ingress")));
            r.push(rules(p("/spec/egress")));
        }
        "Route" => {
            r.push(text(p("/spec/service")));
            r.push(rules(p("/spec/rules")));
        }
        _ => r.push(
            p("/spec/cases")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
                .to_string(),
        ),
    }
    r.push(text(p("/metadata/revision")));
    if wide {
        let labels = p("/metadata/labels").and_then(Value::as_object).map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", text(Some(v))))
                .collect::<Vec<_>>()
                .join(",")
        });
        r.push(
            labels
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "<none>".into()),
        );
    }
    r
}

pub fn delete(args: &DeleteArgs) -> anyhow::Result<u8> {
    let targets: Vec<(&'static KindInfo, Option<String>, String)> = if args.paths.is_empty() {
        let (Some(k), Some(name)) = (&args.kind, &args.name) else {
            bail!(
                "name what to delete: `skiff delete KIND NAME [-n NS]` or `skiff delete -f PATH`"
            );
        };
        let kind = kind(k)?;
        vec![(
            kind,
            kind.namespaced.then(|| args.namespace.clone()),
            name.clone(),
        )]
    } else {
        let Some(report) = load_or_report(&args.paths) else {
            return Ok(exit::FAILED);
        };
        report
            .resources
            .iter()
            .map(|l| {
                (
                    l.resource.info(),
                    l.resource.metadata().namespace.clone(),
                    l.resource.metadata().name.clone(),
                )
            })
            .collect()
    };
    let client = args.connection.client()?;
    runtime()?.block_on(async {
        let mut failed = 0;
        for (kind, ns, name) in &targets {
            let shown = match ns {
                Some(ns) => format!("{} {ns}/{name}", kind.kind),
                None => format!("{} {name}", kind.kind),
            };
            match client.delete(kind, ns.as_deref(), name).await {
                Ok(_) => println!("{shown} deleted"),
                Err(e) => {
                    failed += 1;
                    eprintln!("{shown}: {e}");
                }
            }
        }
        Ok(if failed > 0 { exit::FAILED } else { exit::OK })
    })
}

/// Exit 0 when the cluster matches the files, 1 when it differs.
pub fn diff(args: &DiffArgs) -> anyhow::Result<u8> {
    let Some(report) = load_or_report(&args.paths) else {
        return Ok(2);
    };
    let client = args.connection.client()?;
    runtime()?.block_on(async {
        let mut differs = false;
        for l in &report.resources {
            let kind = l.resource.info();
            let live = client
                .get(kind, namespace_of(&l.resource), &l.resource.metadata().name)
                .await?;
            let want = comparable(&desired(&l.resource)?, kind);
            let (old, new) = match &live {
                Some(v) => (to_yaml(&comparable(v, kind)), to_yaml(&want)),
                None => (String::new(), to_yaml(&want)),
            };
            let lines = diff_lines(&old, &new);
            if !lines.is_empty() {
                differs = true;
                let state = if live.is_some() { "live" } else { "absent" };
                println!(
                    "--- {} ({state})\n+++ {} ({}:{})",
                    l.resource.display_name(),
                    l.resource.display_name(),
                    l.file,
                    l.line
                );
                for line in lines {
                    println!("{line}");
                }
            }
        }
        Ok(if differs { exit::FAILED } else { exit::OK })
    })
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    pub node: String,
    #[command(flatten)]
    pub connection: Connection,
}

/// `skiff cordon NODE` / `uncordon`: stop or resume placing instances there.
pub fn cordon(args: &NodeArgs, unschedulable: bool) -> anyhow::Result<u8> {
    let client = args.connection.client()?;
    runtime()?.block_on(async {
        set_unschedulable(&client, &args.node, unschedulable).await?;
        println!(
            "Node {} {}",
            args.node,
            if unschedulable {
                "cordoned"
            } else {
                "uncordoned"
            }
        );
        Ok(exit::OK)
    })
}

async fn set_unschedulable(client: &Client, node: &str, unschedulable: bool) -> anyhow::Result<()> {
    let nodes = kind("nodes")?;
    for _ in 0..5 {
        let mut v = client
            .get(nodes, None, node)
            .await?
            .with_context(|| format!("Node {node} not found"))?;
        v["spec"]["unschedulable"] = Value::Bool(unschedulable);
        match client.update(nodes, None, node, &v).await {
            Ok(_) => return Ok(()),
            Err(e) if e.status() == Some(409) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("Node {node} keeps changing; try again")
}

/// `skiff drain NODE`: cordon, then move its instances off one at a time,
/// each only after its service is back to full strength elsewhere.
pub fn drain(args: &NodeArgs) -> anyhow::Result<u8> {
    let client = args.connection.client()?;
    runtime()?.block_on(async {
        set_unschedulable(&client, &args.node, true).await?;
        println!("Node {} cordoned", args.node);
        let instances = kind("instances")?;
        let on_node = |items: &[Value]| -> Vec<(String, String, String)> {
            items
                .iter()
                .filter(|i| i.pointer("/spec/node").and_then(Value::as_str) == Some(args.node.as_str()))
                .map(|i| (text(i.pointer("/metadata/namespace")), text(i.pointer("/metadata/name")), text(i.pointer("/spec/service"))))
                .collect()
        };
        let list = client.list(instances, None, None).await?;
        for (ns, name, service) in on_node(&list.items) {
            // Ready instances of the service; the node is cordoned, so
            // replacements land elsewhere.
            let ready = |items: &[Value]| items.iter().filter(|i| text(i.pointer("/spec/service")) == service && i.pointer("/status/ready") == Some(&Value::Bool(true))).count();
            let before = ready(&client.list(instances, Some(&ns), None).await?.items);
            client.delete(instances, Some(&ns), &name).await?;
            println!("Instance {ns}/{name} evicted");
            // Wait until the service is as available as before, elsewhere.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            loop {
                let items = client.list(instances, Some(&ns), None).await?.items;
                if ready(&items) >= before && items.iter().all(|i| text(i.pointer("/metadata/name")) != name) {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    bail!("{ns}/{service} did not recover within 2 minutes; stopping the drain (the node stays cordoned)");
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        println!("Node {} drained", args.node);
        Ok(exit::OK)
    })
}
