//! The process supervisor with real processes: restarts with backoff,
//! graceful and forced stops, missing commands, rotated logs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly on unexpected errors"
)]

use std::time::Duration;

use skiff_agent::supervise::{Spec, State, Supervisor};
use tokio::sync::watch;

fn sh(script: &str, dir: &std::path::Path) -> Spec {
    let mut spec = Spec::new("/bin/sh", dir.to_path_buf());
    spec.args = vec!["-c".into(), script.into()];
    spec.env.insert("PATH".into(), "/usr/bin:/bin".into());
    spec.backoff_initial = Duration::from_millis(50);
    spec.backoff_max = Duration::from_millis(400);
    spec
}

/// Waits (bounded) for a state matching `want`.
async fn until(
    state: &mut watch::Receiver<State>,
    what: &str,
    want: impl Fn(&State) -> bool,
) -> State {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let now = state.borrow_and_update().clone();
            if want(&now) {
                return now;
            }
            state.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits (bounded) until the current log holds `text`. Log writes come
/// from another task with no event to wait on, so this polls.
async fn until_logged(dir: &std::path::Path, text: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !log(dir).contains(text) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{text:?} never appeared in the log"));
}

fn log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("output.log")).unwrap_or_default()
}

#[tokio::test]
async fn restarts_with_growing_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let s = Supervisor::start(sh("echo started; echo oops >&2; exit 3", dir.path()));
    let mut state = s.state();
    let mut delays = Vec::new();
    for n in 1..=4 {
        if let State::Backoff { delay, reason, .. } = until(
            &mut state,
            "a restart",
            |st| matches!(st, State::Backoff { restarts, .. } if *restarts == n),
        )
        .await
        {
            assert_eq!(reason, "exited with code 3");
            delays.push(delay);
        }
    }
    assert_eq!(delays, [50, 100, 200, 400].map(Duration::from_millis));
    s.stop().await;
    let out = log(dir.path());
    assert!(
        out.matches("started").count() >= 4 && out.contains("oops"),
        "{out}"
    );
}

#[tokio::test]
async fn stops_gracefully_then_forcibly() {
    let dir = tempfile::tempdir().unwrap();
    let graceful = Supervisor::start(sh(
        "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
        dir.path(),
    ));
    let mut state = graceful.state();
    until(&mut state, "running", |st| {
        matches!(st, State::Running { .. })
    })
    .await;
    // The script says "ready" once its trap is installed.
    until_logged(dir.path(), "ready").await;
    let end = graceful.stop().await;
    assert_eq!(
        end,
        State::Stopped {
            reason: "stopped: exited with code 0".into()
        }
    );
    assert!(log(dir.path()).contains("bye"));

    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh(
        "trap '' TERM; echo ready; while true; do sleep 0.05; done",
        dir.path(),
    );
    spec.stop_grace = Duration::from_millis(300);
    let stubborn = Supervisor::start(spec);
    let mut state = stubborn.state();
    until(&mut state, "running", |st| {
        matches!(st, State::Running { .. })
    })
    .await;
    // The script says "ready" once its trap is installed.
    until_logged(dir.path(), "ready").await;
    let end = stubborn.stop().await;
    assert!(
        matches!(&end, State::Stopped { reason } if reason.contains("did not stop within 0.3s of SIGTERM: killed")),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_missing_command_says_so_and_keeps_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new("/no/such/binary", dir.path().to_path_buf());
    spec.backoff_initial = Duration::from_millis(20);
    let s = Supervisor::start(spec);
    let mut state = s.state();
    let st = until(&mut state, "a second failed start", |st| {
        matches!(st, State::Backoff { restarts: 2, .. })
    })
    .await;
    assert!(
        matches!(&st, State::Backoff { reason, .. } if reason == "command `/no/such/binary` not found"),
        "{st:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn logs_rotate_within_their_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh(
        "i=0; while [ $i -lt 400 ]; do echo line-$i; i=$((i+1)); done; sleep 30",
        dir.path(),
    );
    spec.log_max_bytes = 1000;
    spec.log_files = 3;
    let s = Supervisor::start(spec);
    until_logged(dir.path(), "line-399").await;
    s.stop().await;
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["output.log", "output.log.1", "output.log.2"]);
    for n in &names {
        assert!(
            std::fs::metadata(dir.path().join(n)).unwrap().len() <= 1000,
            "{n}"
        );
    }
    // The newest lines survive; the oldest were rotated away.
    assert!(log(dir.path()).contains("line-399"));
    assert!(
        !std::fs::read_to_string(dir.path().join("output.log.2"))
            .unwrap()
            .contains("line-0\n")
    );
}
