//! `skiff describe service|instance|node NAME`: one object in prose, with
//! the instances involved and their recent events, newest last.

use clap::Args;
use serde_json::Value;

use crate::resources::{Connection, kind, runtime};

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// service, instance or node.
    pub kind: String,
    pub name: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub connection: Connection,
}

pub fn run(args: &DescribeArgs) -> anyhow::Result<u8> {
    let client = args.connection.client()?;
    let k = kind(&args.kind)?;
    let ns = Some(args.namespace.as_str()).filter(|_| k.namespaced);
    runtime()?.block_on(async {
        let Some(object) = client.get(k, ns, &args.name).await? else {
            anyhow::bail!(
                "{} {} not found{}",
                k.kind,
                args.name,
                ns.map(|n| format!(" in namespace {n}")).unwrap_or_default()
            );
        };
        let instances = crate::resources::kind("instances")?;
        let all = client.list(instances, None, None).await?.items;
        let involved: Vec<&Value> = match k.kind {
            "Service" => all
                .iter()
                .filter(|i| {
                    str_at(i, "/metadata/namespace") == args.namespace
                        && str_at(i, "/spec/service") == args.name
                })
                .collect(),
            "Node" => all
                .iter()
                .filter(|i| str_at(i, "/spec/node") == args.name)
                .collect(),
            "Instance" => vec![&object],
            other => anyhow::bail!("describe shows services, instances and nodes, not {other}"),
        };
        print!("{}", render(k.kind, &object, &involved));
        Ok(0)
    })
}

/// The description as text (pure, for tests).
pub fn render(kind: &str, object: &Value, instances: &[&Value]) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    line("Kind:", kind.to_string());
    line("Name:", str_at(object, "/metadata/name").to_string());
    if let Some(ns) = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        line("Namespace:", ns.to_string());
    }
    match kind {
        "Service" => {
            line(
                "Replicas:",
                format!(
                    "{} wanted, {} placed, {} ready",
                    object
                        .pointer("/spec/replicas")
                        .and_then(Value::as_u64)
                        .unwrap_or(1),
                    instances
                        .iter()
                        .filter(|i| i.pointer("/spec/node").is_some())
                        .count(),
                    instances
                        .iter()
                        .filter(
                            |i| i.pointer("/status/ready").and_then(Value::as_bool) == Some(true)
                        )
                        .count(),
                ),
            );
            line("Command:", run_line(object));
        }
        "Node" => {
            line("Address:", str_at(object, "/status/address").to_string());
            line("Ready:", raw(object, "/status/ready"));
            line("Pod range:", str_at(object, "/spec/podCIDR").to_string());
            line("Generation:", raw(object, "/status/generation"));
            line(
                "Capacity:",
                format!(
                    "cpu {}, memory {}",
                    str_at(object, "/status/capacity/cpu"),
                    str_at(object, "/status/capacity/memory")
                ),
            );
            if object
                .pointer("/spec/unschedulable")
                .and_then(Value::as_bool)
                == Some(true)
            {
                line("Cordoned:", "yes (no new instances)".into());
            }
        }
        _ => {
            line("Service:", str_at(object, "/spec/service").to_string());
            line("Node:", str_at(object, "/spec/node").to_string());
            line("Phase:", str_at(object, "/status/phase").to_string());
            line("Ready:", raw(object, "/status/ready"));
            line("Address:", str_at(object, "/status/address").to_string());
            line("Restarts:", raw(object, "/status/restarts"));
            let message = str_at(object, "/status/message");
            if !message.is_empty() {
                line("Message:", message.to_string());
            }
        }
    }
    if kind != "Instance" {
        out.push_str(&format!("Instances:    {}\n", instances.len()));
        for i in instances {
            out.push_str(&format!(
                "  {:<28} {:<8} {:<12} ready={:<5} {}\n",
                str_at(i, "/metadata/name"),
                str_at(i, "/spec/node"),
                str_at(i, "/status/phase"),
                i.pointer("/status/ready")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                str_at(i, "/status/message"),
            ));
        }
    }
    let mut events: Vec<(String, String, String, String)> = instances
        .iter()
        .flat_map(|i| {
            let name = str_at(i, "/metadata/name").to_string();
            i.pointer("/status/events")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| {
                    (
                        str_at(&e, "/time").to_string(),
                        name.clone(),
                        str_at(&e, "/reason").to_string(),
                        str_at(&e, "/message").to_string(),
                    )
                })
        })
        .collect();
    events.sort();
    let shown = events.len().saturating_sub(30);
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  (none)\n");
    }
    for (time, instance, reason, message) in &events[shown..] {
        if kind == "Instance" {
            out.push_str(&format!("  {time}  {reason:<17} {message}\n"));
        } else {
            out.push_str(&format!(
                "  {time}  {instance:<28} {reason:<17} {message}\n"
            ));
        }
    }
    out
}

fn run_line(service: &Value) -> String {
    let mut parts = vec![str_at(service, "/spec/run/command").to_string()];
    if let Some(args) = service.pointer("/spec/run/args").and_then(Value::as_array) {
        parts.extend(args.iter().filter_map(Value::as_str).map(str::to_string));
    }
    parts.join(" ")
}

/// Any value as JSON text (numbers, booleans), empty when absent.
fn raw(v: &Value, pointer: &str) -> String {
    v.pointer(pointer).map(Value::to_string).unwrap_or_default()
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_service_lists_its_instances_and_their_events_in_time_order() {
        let svc = json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"replicas": 2, "run": {"command": "skiff", "args": ["demo-app"]}}});
        let a = json!({"metadata": {"name": "web-a"}, "spec": {"node": "n1"}, "status": {"phase": "running", "ready": true,
            "events": [{"time": "2026-01-01T00:00:02Z", "reason": "Started", "message": "started"}]}});
        let b = json!({"metadata": {"name": "web-b"}, "spec": {}, "status": {"phase": "pending", "message": "no node fits",
            "events": [{"time": "2026-01-01T00:00:01Z", "reason": "FailedScheduling", "message": "no node fits"}]}});
        let text = render("Service", &svc, &[&a, &b]);
        assert!(text.contains("2 wanted, 1 placed, 1 ready"), "{text}");
        assert!(text.contains("skiff demo-app"), "{text}");
        let failed = text.find("FailedScheduling").unwrap_or(usize::MAX);
        let started = text.find("Started").unwrap_or(0);
        assert!(failed < started, "events are in time order:\n{text}");
    }
}
