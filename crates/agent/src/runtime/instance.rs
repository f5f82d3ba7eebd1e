//! One instance on this node, from start to removal: network and cgroups
//! first, then the supervised process (through `skiff internal-exec`),
//! health checks, and status reports to the control plane.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use skiff_api::cluster::InstanceEvent;
use skiff_api::service::{Probe, ServiceSpec};
use skiff_client::Client;
use tokio::sync::watch;

use super::cgroup::{Cgroups, Limits, PodCgroup};
use super::net::PodNet;
use super::probe::{self, Inside};
use crate::supervise::{self, State, Supervisor};

/// What every instance on the node shares.
#[derive(Debug)]
pub struct NodeRuntime {
    pub client: Client,
    /// Network policy; `None` where it is not enforced.
    pub enforcer: Option<Arc<crate::policy::Enforcer>>,
    /// Sidecar injection; `None` where the mesh is off.
    pub mesh: Option<Arc<super::mesh::Mesh>>,
    pub cgroups: Cgroups,
    /// The `skiff` binary, for `internal-exec`.
    pub exe: PathBuf,
    /// Instance logs live in `<logs>/<namespace>/<name>/`.
    pub logs: PathBuf,
    /// SIGTERM → SIGKILL grace when an instance is stopped.
    pub stop_grace: Duration,
}

/// One instance to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub namespace: String,
    pub name: String,
    /// The Service it runs (its identity in the mesh).
    pub service: String,
    pub spec: ServiceSpec,
    pub net: PodNet,
}

impl Plan {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn log_dir(&self, rt: &NodeRuntime) -> PathBuf {
        rt.logs.join(&self.namespace).join(&self.name)
    }
}

/// A running instance; [`Handle::stop`] ends it and cleans up.
#[derive(Debug)]
pub struct Handle {
    stop: watch::Sender<Stop>,
    task: tokio::task::JoinHandle<()>,
    pub address: Ipv4Addr,
}

/// Whether, and when, an instance stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// At once (fenced, cut off, the agent shutting down).
    Now,
    /// Once every node's sidecar proxies have applied this revision of the
    /// instances, which no longer sends callers here (a few seconds at
    /// most): no request is sent to an app that is already going.
    AfterRevision(u64),
}

/// The longest an instance waits for the mesh to stop sending it requests.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

impl Handle {
    pub fn start(rt: Arc<NodeRuntime>, plan: Plan) -> Handle {
        let (stop, stopped) = watch::channel(Stop::Running);
        let address = plan.net.address;
        let task = tokio::spawn(run(rt, plan, stopped));
        Handle {
            stop,
            task,
            address,
        }
    }

    /// Stops the process (SIGTERM, grace, SIGKILL) and removes its cgroups
    /// and network; returns when all of that is done.
    pub async fn stop(self, when: Stop) {
        let _ = self.stop.send(when);
        let _ = self.task.await;
    }
}

/// The instance's status as this agent last reported it.
#[derive(Debug, Clone, PartialEq)]
struct Status {
    phase: &'static str,
    ready: bool,
    restarts: u32,
    message: String,
}

async fn run(rt: Arc<NodeRuntime>, plan: Plan, mut stopped: watch::Receiver<Stop>) {
    let reporter = Reporter::new(rt.client.clone(), &plan);
    let mut status = Status {
        phase: "starting",
        ready: false,
        restarts: 0,
        message: String::new(),
    };
    let cgroup = match prepare(&rt, &plan).await {
        Ok(c) => c,
        Err(e) => {
            status.phase = "failed";
            status.message = e.clone();
            reporter.report(&status, &[("FailedSetup", e)]).await;
            let _ = stopped.changed().await;
            if let Some(e) = &rt.enforcer {
                e.release(&plan.id(), plan.net.address);
            }
            plan.net.remove().await;
            return;
        }
    };
    let sidecar = match &rt.mesh {
        Some(mesh) => match start_sidecar(&rt, mesh, &plan, &cgroup).await {
            Ok(s) => {
                let until = time::OffsetDateTime::from_unix_timestamp(s.not_after_unix)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                reporter
                    .report(
                        &status,
                        &[(
                            "ProxyReady",
                            format!("mTLS as {}; certificate valid until {until}", s.identity),
                        )],
                    )
                    .await;
                Some(s)
            }
            Err(e) => {
                status.phase = "failed";
                status.message = e.clone();
                reporter.report(&status, &[("FailedSetup", e)]).await;
                let _ = stopped.changed().await;
                cgroup.remove();
                mesh.remove(&plan);
                if let Some(e) = &rt.enforcer {
                    e.release(&plan.id(), plan.net.address);
                }
                plan.net.remove().await;
                return;
            }
        },
        None => None,
    };
    let inside = Inside {
        exe: rt.exe.clone(),
        exec_prefix: exec_prefix(&plan, &cgroup),
    };
    let mut spec = supervise::Spec::new(rt.exe.display().to_string(), plan.log_dir(&rt));
    spec.args = inside.exec_prefix.clone();
    spec.args.push("--".into());
    spec.args.push(plan.spec.run.command.clone());
    spec.args.extend(plan.spec.run.args.iter().cloned());
    spec.env = plan.spec.run.env.clone();
    // The skiff binary's own directory is on the default PATH, so
    // `command: skiff` (the demo apps) runs wherever skiff is installed.
    spec.env.entry("PATH".into()).or_insert_with(|| {
        let own = rt
            .exe
            .parent()
            .map(|d| format!(":{}", d.display()))
            .unwrap_or_default();
        format!("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin{own}")
    });
    spec.stop_grace = rt.stop_grace;
    let log_dir = spec.log_dir.clone();
    let supervisor = Supervisor::start(spec);
    let mut state = supervisor.state();
    let mut checks = Checks::new(&plan.spec);
    let mut ooms = cgroup.oom_kills();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reporter.report(&status, &[]).await;
    loop {
        let mut events: Vec<(&str, String)> = Vec::new();
        tokio::select! {
            _ = stopped.changed() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = state.borrow_and_update().clone();
                match now {
                    State::Starting | State::Stopped { .. } => {}
                    State::Running { restarts, .. } => {
                        status.phase = "running";
                        status.restarts = restarts;
                        status.ready = plan.spec.health.readiness.is_none();
                        checks.restart();
                        events.push(("Started", if restarts == 0 { "started".to_string() } else { format!("started again (restart {restarts})") }));
                    }
                    State::Backoff { restarts, delay, reason } => {
                        status.phase = "starting";
                        status.ready = false;
                        status.restarts = restarts;
                        let now_ooms = cgroup.oom_kills();
                        let reason = if now_ooms > ooms {
                            ooms = now_ooms;
                            events.push(("OOMKilled", format!(
                                "killed: out of memory (limit {})",
                                memory_limit(&plan.spec).unwrap_or_else(|| "none".into())
                            )));
                            format!("OOMKilled: {reason}")
                        } else {
                            match last_line(&log_dir) {
                                Some(said) => format!("{reason}: {said}"),
                                None => reason,
                            }
                        };
                        status.message = format!("{reason}; restarting in {}s", delay.as_secs_f64());
                        events.push(("BackOff", status.message.clone()));
                    }
                }
            }
            _ = tick.tick() => {
                if status.phase == "running" {
                    let pid = match &*state.borrow() {
                        State::Running { pid, .. } => Some(*pid),
                        _ => None,
                    };
                    if let Some(outcome) = checks.run(&plan, &inside).await {
                        match outcome {
                            Outcome::Ready(ready, why) => {
                                if status.ready != ready {
                                    status.ready = ready;
                                    status.message = why.clone();
                                    events.push(if ready { ("Ready", "passed its readiness check".into()) } else { ("Unhealthy", format!("readiness: {why}")) });
                                }
                            }
                            Outcome::Dead(why) => {
                                events.push(("Unhealthy", format!("liveness: {why}; restarting")));
                                status.message = format!("liveness check failed: {why}");
                                if let Some(pid) = pid {
                                    let _ = nix::sys::signal::killpg(
                                        nix::unistd::Pid::from_raw(pid as i32),
                                        nix::sys::signal::Signal::SIGKILL,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        reporter.report(&status, &events).await;
    }
    let when = *stopped.borrow();
    if let (Stop::AfterRevision(revision), Some(mesh)) = (when, &rt.mesh)
        && !mesh.acks.wait(revision, LEAVE_WAIT).await
    {
        tracing::warn!(instance = %plan.id(), revision, "Not every node's proxies acknowledged this instance's removal in time; stopping it anyway");
    }
    supervisor.stop().await;
    // The proxy after the app: it drains what the app's last requests left.
    if let Some(s) = sidecar {
        s.renew.abort();
        s.proxy.stop().await;
    }
    if let Some(mesh) = &rt.mesh {
        mesh.remove(&plan);
    }
    cgroup.remove();
    if let Some(e) = &rt.enforcer {
        e.release(&plan.id(), plan.net.address);
    }
    plan.net.remove().await;
}

/// Certificate, config, interception, then the proxy; returns once the
/// proxy answers `/ready`, with the proxy's supervisor, the renewal task
/// and the certificate's expiry and identity.
async fn start_sidecar(
    rt: &Arc<NodeRuntime>,
    mesh: &Arc<super::mesh::Mesh>,
    plan: &Plan,
    cgroup: &PodCgroup,
) -> Result<RunningSidecar, String> {
    use super::mesh::{ADMIN_PORT, PROXY_UID};
    if plan.spec.run.user.as_deref() == Some(&PROXY_UID.to_string()) {
        return Err(format!(
            "the service runs as uid {PROXY_UID}, the sidecar proxy's: its traffic would bypass the mesh; choose another user"
        ));
    }
    let sidecar = mesh
        .prepare(&rt.client, plan)
        .await
        .map_err(|e| format!("sidecar setup failed: {e}"))?;
    let mut args = vec!["internal-exec".to_string()];
    for procs in cgroup.proxy_procs() {
        args.push("--cgroup".into());
        args.push(procs.display().to_string());
    }
    args.extend([
        "--netns".into(),
        plan.net.netns_path().display().to_string(),
        "--user".into(),
        PROXY_UID.to_string(),
        "--".into(),
        rt.exe.display().to_string(),
        "proxy".into(),
        "--config".into(),
        sidecar.config.display().to_string(),
    ]);
    let mut spec =
        supervise::Spec::new(rt.exe.display().to_string(), plan.log_dir(rt).join("proxy"));
    spec.args = args;
    spec.stop_grace = Duration::from_secs(10);
    let proxy = Supervisor::start(spec);
    let admin = std::net::SocketAddr::from((plan.net.address, ADMIN_PORT));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match probe::http(admin, "/ready").await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() > deadline => {
                proxy.stop().await;
                return Err(format!(
                    "the sidecar proxy did not become ready in 10 s: {e}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let renew = {
        let (client, mesh, plan) = (rt.client.clone(), mesh.clone(), plan.clone());
        tokio::spawn(super::mesh::renew_at_half_life(
            plan.id(),
            sidecar.not_after_unix,
            move || {
                let (client, mesh, plan) = (client.clone(), mesh.clone(), plan.clone());
                async move { mesh.issue(&client, &plan).await.map(|(_, t)| t) }
            },
        ))
    };
    Ok(RunningSidecar {
        proxy,
        renew,
        not_after_unix: sidecar.not_after_unix,
        identity: sidecar.identity.to_string(),
    })
}

/// An instance's proxy, running and ready.
struct RunningSidecar {
    proxy: Supervisor,
    /// Renews the certificate until aborted.
    renew: tokio::task::JoinHandle<()>,
    not_after_unix: i64,
    identity: String,
}

async fn prepare(rt: &NodeRuntime, plan: &Plan) -> Result<PodCgroup, String> {
    plan.net
        .create()
        .await
        .map_err(|e| format!("network setup failed: {e}"))?;
    // Policy before the process: the veth drops everything until the
    // instance's endpoint entry is written, so a new instance never takes a
    // connection its policy forbids.
    if let Some(e) = &rt.enforcer
        && let Err(why) = e
            .admit(
                &plan.id(),
                &plan.net.host_if,
                plan.net.address,
                Duration::from_secs(10),
            )
            .await
    {
        if why.contains("not written within") {
            tracing::warn!(instance = %plan.id(), reason = %why, "Starting anyway; its traffic is dropped until the policy is written");
        } else {
            return Err(format!("network policy setup failed: {why}"));
        }
    }
    rt.cgroups
        .create(&plan.net.netns, limits(&plan.spec))
        .map_err(|e| format!("cgroup setup failed: {e}"))
}

fn exec_prefix(plan: &Plan, cgroup: &PodCgroup) -> Vec<String> {
    let mut args = vec!["internal-exec".to_string()];
    for procs in cgroup.app_procs() {
        args.push("--cgroup".into());
        args.push(procs.display().to_string());
    }
    args.push("--netns".into());
    args.push(plan.net.netns_path().display().to_string());
    args.push("--user".into());
    args.push(
        plan.spec
            .run
            .user
            .clone()
            .unwrap_or_else(|| "nobody".into()),
    );
    args
}

fn limits(spec: &ServiceSpec) -> Limits {
    let millis = |m: &std::collections::BTreeMap<String, skiff_api::quantity::Quantity>| {
        m.get("cpu").map(|q| q.milli() as u64)
    };
    Limits {
        cpu_millis: millis(&spec.resources.limits),
        cpu_request_millis: millis(&spec.resources.requests),
        memory_bytes: spec
            .resources
            .limits
            .get("memory")
            .map(|q| q.units_ceil() as u64),
    }
}

fn memory_limit(spec: &ServiceSpec) -> Option<String> {
    spec.resources
        .limits
        .get("memory")
        .map(|q| q.as_str().to_string())
}

/// The last non-empty line the process wrote (the usual "why" of an exit).
fn last_line(log_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read(log_dir.join("output.log")).ok()?;
    let tail = &text[text.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(300).collect())
}

enum Outcome {
    /// Readiness changed: ready or not, and why.
    Ready(bool, String),
    /// Liveness failed past its threshold.
    Dead(String),
}

/// Readiness and liveness state between ticks.
struct Checks {
    readiness: Option<Probe>,
    liveness: Option<Probe>,
    next_ready: tokio::time::Instant,
    next_live: tokio::time::Instant,
    ok: u32,
    failed: u32,
    live_failed: u32,
    ready: bool,
}

impl Checks {
    fn new(spec: &ServiceSpec) -> Checks {
        let now = tokio::time::Instant::now();
        Checks {
            readiness: spec.health.readiness.clone(),
            liveness: spec.health.liveness.clone(),
            next_ready: now,
            next_live: now,
            ok: 0,
            failed: 0,
            live_failed: 0,
            ready: spec.health.readiness.is_none(),
        }
    }

    /// After a (re)start: checks begin again after their initial delays.
    fn restart(&mut self) {
        let now = tokio::time::Instant::now();
        self.next_ready = now
            + self
                .readiness
                .as_ref()
                .map(|p| p.initial_delay.0)
                .unwrap_or_default();
        self.next_live = now
            + self
                .liveness
                .as_ref()
                .map(|p| p.initial_delay.0)
                .unwrap_or_default();
        self.ok = 0;
        self.failed = 0;
        self.live_failed = 0;
        self.ready = self.readiness.is_none();
    }

    /// Runs whichever checks are due; reports a change.
    async fn run(&mut self, plan: &Plan, inside: &Inside) -> Option<Outcome> {
        let now = tokio::time::Instant::now();
        let address = plan.net.address;
        if let Some(p) = self.liveness.clone()
            && now >= self.next_live
        {
            self.next_live = now + p.period.0;
            match probe::check(&p.check, address, &plan.spec.ports, p.timeout.0, inside).await {
                Ok(()) => self.live_failed = 0,
                Err(why) => {
                    self.live_failed += 1;
                    if self.live_failed >= p.failure_threshold.max(1) {
                        self.live_failed = 0;
                        return Some(Outcome::Dead(why));
                    }
                }
            }
        }
        if let Some(p) = self.readiness.clone()
            && now >= self.next_ready
        {
            // Until first ready, check often: readiness gates traffic and rollouts.
            let period = if self.ready {
                p.period.0
            } else {
                p.period.0.min(Duration::from_millis(500))
            };
            self.next_ready = now + period;
            match probe::check(&p.check, address, &plan.spec.ports, p.timeout.0, inside).await {
                Ok(()) => {
                    self.failed = 0;
                    self.ok += 1;
                    if !self.ready && self.ok >= p.success_threshold.max(1) {
                        self.ready = true;
                        return Some(Outcome::Ready(true, String::new()));
                    }
                }
                Err(why) => {
                    self.ok = 0;
                    self.failed += 1;
                    if self.ready && self.failed >= p.failure_threshold.max(1) {
                        self.ready = false;
                        return Some(Outcome::Ready(false, why));
                    }
                }
            }
        }
        None
    }
}

/// Writes the instance's status, skipping writes that change nothing.
struct Reporter {
    client: Client,
    namespace: String,
    name: String,
    address: Ipv4Addr,
    last: tokio::sync::Mutex<Option<Status>>,
}

impl Reporter {
    fn new(client: Client, plan: &Plan) -> Reporter {
        Reporter {
            client,
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            address: plan.net.address,
            last: tokio::sync::Mutex::new(None),
        }
    }

    async fn report(&self, status: &Status, new_events: &[(&str, String)]) {
        let mut last = self.last.lock().await;
        if new_events.is_empty() && last.as_ref() == Some(status) {
            return;
        }
        let Some(kind) = skiff_api::KindInfo::find("instances") else {
            return;
        };
        for _ in 0..5 {
            let current = match self
                .client
                .get(kind, Some(&self.namespace), &self.name)
                .await
            {
                Ok(Some(v)) => v,
                // Deleted: the node loop stops us.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(instance = %format!("{}/{}", self.namespace, self.name), error = %e, "Cannot read instance for a status report");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut events: Vec<Value> = current
                .pointer("/status/events")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (reason, message) in new_events {
                events.push(json!(InstanceEvent {
                    time: now_rfc3339(),
                    reason: reason.to_string(),
                    message: message.clone(),
                }));
            }
            let excess = events.len().saturating_sub(InstanceEvent::KEEP);
            events.drain(..excess);
            let mut update = current.clone();
            update["status"] = json!({
                "phase": status.phase,
                "ready": status.ready,
                "address": self.address.to_string(),
                "restarts": status.restarts,
                "message": status.message,
                "events": events,
            });
            match self
                .client
                .update_status(kind, Some(&self.namespace), &self.name, &update)
                .await
            {
                Ok(_) => {
                    *last = Some(status.clone());
                    return;
                }
                Err(e) if e.status() == Some(404) => return,
                Err(e) if e.status() == Some(409) => continue,
                Err(e) => {
                    tracing::warn!(instance = %format!("{}/{}", self.namespace, self.name), error = %e, "Status report failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Now, RFC 3339 in UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
