//! Process supervision for instances: start, capture stdout and stderr to
//! size-bounded rotated log files, restart with exponential backoff, and
//! stop gracefully (SIGTERM, a grace period, then SIGKILL).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// What to run and how to treat it.
#[derive(Debug, Clone)]
pub struct Spec {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Directory for `output.log` (stdout and stderr) and its rotations.
    pub log_dir: PathBuf,
    /// Rotate when the current file reaches this size.
    pub log_max_bytes: u64,
    /// Files kept: `output.log` and `output.log.1` … up to this many in all.
    pub log_files: usize,
    /// Time between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// First restart delay; doubles per consecutive failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A run this long resets the backoff.
    pub backoff_reset: Duration,
}

impl Spec {
    pub fn new(command: impl Into<String>, log_dir: PathBuf) -> Spec {
        Spec {
            command: command.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            log_dir,
            log_max_bytes: 10 * 1024 * 1024,
            log_files: 5,
            stop_grace: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            backoff_reset: Duration::from_secs(600),
        }
    }
}

/// What the supervised process is doing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Starting,
    Running {
        pid: u32,
        restarts: u32,
    },
    /// Exited (or could not start); restarting after `delay`.
    Backoff {
        restarts: u32,
        delay: Duration,
        reason: String,
    },
    /// Stopped on request.
    Stopped {
        reason: String,
    },
}

/// A running supervisor; dropping it does not stop the process: call [`Supervisor::stop`].
#[derive(Debug)]
pub struct Supervisor {
    state: watch::Receiver<State>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    pub fn start(spec: Spec) -> Supervisor {
        let (state_tx, state) = watch::channel(State::Starting);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(spec, state_tx, stop_rx));
        Supervisor { state, stop, task }
    }

    /// Follow the state as it changes.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// SIGTERM, then SIGKILL after the grace period; returns once the
    /// process is gone.
    pub async fn stop(self) -> State {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.state.borrow().clone()
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(9)) => "killed (SIGKILL; out of memory or stopped)".to_string(),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "exited".to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

async fn run(spec: Spec, state: watch::Sender<State>, mut stop: watch::Receiver<bool>) {
    let mut restarts = 0u32;
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            let _ = state.send(State::Stopped {
                reason: "stopped before start".into(),
            });
            return;
        }
        let started = tokio::time::Instant::now();
        let reason = match spawn(&spec) {
            Err(reason) => reason,
            Ok((mut child, copies)) => {
                let pid = child.id().unwrap_or_default();
                let _ = state.send(State::Running { pid, restarts });
                let (reason, stopped) = tokio::select! {
                    status = child.wait() => (describe(status), false),
                    _ = stop.changed() => (terminate(&mut child, spec.stop_grace).await, true),
                };
                // Everything the process wrote is in the log before anyone
                // hears it ended (bounded: a leftover child may hold the pipe).
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    for c in copies {
                        let _ = c.await;
                    }
                })
                .await;
                if stopped {
                    let _ = state.send(State::Stopped { reason });
                    return;
                }
                reason
            }
        };
        failures = if started.elapsed() >= spec.backoff_reset {
            1
        } else {
            failures + 1
        };
        let delay = spec
            .backoff_initial
            .saturating_mul(1 << (failures - 1).min(20))
            .min(spec.backoff_max);
        restarts += 1;
        let _ = state.send(State::Backoff {
            restarts,
            delay,
            reason,
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {
                let _ = state.send(State::Stopped { reason: "stopped while waiting to restart".into() });
                return;
            }
        }
    }
}

/// Starts the process with its output going to the log; also returns the
/// tasks copying it, which end when the output does.
fn spawn(spec: &Spec) -> Result<(Child, Vec<tokio::task::JoinHandle<()>>), String> {
    std::fs::create_dir_all(&spec.log_dir).map_err(|e| {
        format!(
            "cannot create log directory {}: {e}",
            spec.log_dir.display()
        )
    })?;
    let mut child = Command::new(&spec.command)
        .args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        // Its own process group, so a stop reaches everything it started.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("command `{}` not found", spec.command),
            std::io::ErrorKind::PermissionDenied => {
                format!("command `{}` is not executable", spec.command)
            }
            _ => format!("cannot start `{}`: {e}", spec.command),
        })?;
    let log = Log::new(spec);
    let mut copies = Vec::new();
    if let Some(out) = child.stdout.take() {
        copies.push(tokio::spawn(copy_to_log(out, log.clone())));
    }
    if let Some(err) = child.stderr.take() {
        copies.push(tokio::spawn(copy_to_log(err, log)));
    }
    Ok((child, copies))
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
async fn terminate(child: &mut Child, grace: Duration) -> String {
    let Some(pid) = child.id() else {
        return "already exited".into();
    };
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => format!("stopped: {}", describe(status)),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            format!(
                "did not stop within {}s of SIGTERM: killed",
                grace.as_secs_f64()
            )
        }
    }
}

/// The rotated log of one instance, shared by its stdout and stderr.
#[derive(Debug, Clone)]
struct Log {
    inner: std::sync::Arc<tokio::sync::Mutex<LogFile>>,
}

#[derive(Debug)]
struct LogFile {
    dir: PathBuf,
    max: u64,
    files: usize,
    file: Option<tokio::fs::File>,
    size: u64,
}

impl Log {
    fn new(spec: &Spec) -> Log {
        let size = std::fs::metadata(spec.log_dir.join("output.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        Log {
            inner: std::sync::Arc::new(tokio::sync::Mutex::new(LogFile {
                dir: spec.log_dir.clone(),
                max: spec.log_max_bytes.max(1),
                files: spec.log_files.max(1),
                file: None,
                size,
            })),
        }
    }

    async fn write(&self, mut data: &[u8]) -> std::io::Result<()> {
        let mut f = self.inner.lock().await;
        while !data.is_empty() {
            if f.size >= f.max {
                f.rotate().await?;
            }
            let room = (f.max - f.size) as usize;
            let (now, later) = data.split_at(room.min(data.len()));
            if f.file.is_none() {
                f.file = Some(
                    tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(f.dir.join("output.log"))
                        .await?,
                );
            }
            if let Some(file) = &mut f.file {
                file.write_all(now).await?;
                // tokio's File completes writes in the background: flush
                // so the log is on disk when the write returns.
                file.flush().await?;
            }
            f.size += now.len() as u64;
            data = later;
        }
        Ok(())
    }
}

impl LogFile {
    async fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let path = |i: usize| {
            if i == 0 {
                self.dir.join("output.log")
            } else {
                self.dir.join(format!("output.log.{i}"))
            }
        };
        let _ = tokio::fs::remove_file(path(self.files - 1)).await;
        for i in (0..self.files - 1).rev() {
            let _ = tokio::fs::rename(path(i), path(i + 1)).await;
        }
        self.size = 0;
        Ok(())
    }
}

async fn copy_to_log(mut from: impl AsyncRead + Unpin, log: Log) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if log.write(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
