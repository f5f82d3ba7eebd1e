//! Running a real `skiff server` for end-to-end tests.

#![allow(dead_code, reason = "each test file uses part of the support module")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use skiff_client::{Client, ClientConfig};

/// A `skiff server` process on a data directory; killed on drop.
pub struct Server {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub url: String,
}

/// A port that was free a moment ago (for restarts on the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts a server and waits for its "listening" line.
    pub fn start(data_dir: &Path, port: u16) -> Server {
        Self::start_with(data_dir, port, &[])
    }

    /// [`Server::start`] with extra `skiff server` arguments.
    pub fn start_with(data_dir: &Path, port: u16, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args([
                "server",
                "--no-write-config",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            .env("SKIFF_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start skiff server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("skiff server listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server did not start listening");
        Server {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            url,
        }
    }

    pub fn admin_config_path(&self) -> PathBuf {
        self.data_dir.join("admin.config")
    }

    pub fn admin(&self) -> ClientConfig {
        ClientConfig::load(&self.admin_config_path()).unwrap()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.admin()).unwrap()
    }

    pub fn join_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("join-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The cluster CA, to issue test credentials.
    pub fn ca(&self) -> skiff_identity::Ca {
        let pki = self.data_dir.join("pki");
        skiff_identity::Ca::from_pem(
            &std::fs::read_to_string(pki.join("ca.crt")).unwrap(),
            &std::fs::read_to_string(pki.join("ca.key")).unwrap(),
        )
        .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `skiff agent --simulate` process (hollow nodes); killed on drop.
pub struct Agent {
    child: Option<Child>,
}

impl Agent {
    pub fn start(server: &Server, prefix: &str, nodes: usize) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args([
                "agent",
                "--server",
                &server.url,
                "--join-token",
                &server.join_token(),
                "--simulate",
                &nodes.to_string(),
                "--node-prefix",
                prefix,
                "--ca-file",
            ])
            .arg(server.data_dir.join("pki/ca.crt"))
            .env("SKIFF_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start skiff agent");
        Agent { child: Some(child) }
    }

    /// SIGKILL: the node dies with everything on it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
