//! The `agent` harness: the real agent on a temporary data dir, its API on an ephemeral
//! loopback port and on its socket, waited for until it answers the admin token; its log
//! (stderr) captured; stopped by a signal, restarted on the same data dir, killed on drop.
//! Its API is reached with [`AgentClient`], the client `agentctl` uses.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use agent_api::client::AgentClient;

use crate::{bin, Log};

/// A running `agent` on a temporary data dir.
pub struct Agent {
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    log: Log,
    _tmp: tempfile::TempDir,
}

impl Agent {
    /// An agent whose storaged is nowhere (a socket that does not exist).
    pub fn start() -> Self {
        Self::start_with(&["--storaged-socket", "/nonexistent/admin.sock"])
    }

    /// An agent making its volumes on `storaged`.
    pub fn with_storaged(storaged: &crate::Storaged) -> Self {
        let socket = storaged.admin_socket();
        Self::start_with(&["--storaged-socket", socket.to_str().expect("a UTF-8 path")])
    }

    /// An agent making its volumes on `storaged` and booting its VMs from the test guests
    /// (`images/guests/`, assembled: `hello.elf`, `spin.elf`, ...).
    pub fn with_guests(storaged: &crate::Storaged) -> Self {
        let socket = storaged.admin_socket();
        let guests = crate::guest("spin");
        let dir = guests.parent().expect("the guests' dir");
        Self::start_with(&[
            "--storaged-socket",
            socket.to_str().expect("a UTF-8 path"),
            "--images-dir",
            dir.to_str().expect("a UTF-8 path"),
        ])
    }

    pub fn start_with(args: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("agt")
            .tempdir()
            .expect("tempdir");
        let mut a = Agent {
            data_dir: tmp.path().to_owned(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log: Log::default(),
            _tmp: tmp,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let mut child = Command::new(bin("agent"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log",
                "agent=debug,audit=info,info",
            ])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent");
        let stderr = child.stderr.take().expect("stderr");
        self.log.capture(stderr, "AGENT_TEST_LOG", "agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log_text().contains("agent ready") {
                if let Ok(w) = self.admin().whoami() {
                    assert_eq!(w.role, agent_api::Role::Admin);
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("agent exited with {status} at start:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("agent.sock")
    }

    /// The admin token, as the agent wrote it.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    /// A client with the admin token.
    pub fn admin(&self) -> AgentClient {
        self.client(&self.admin_token())
    }

    /// A client with `token`.
    pub fn client(&self, token: &str) -> AgentClient {
        AgentClient::new(self.socket(), token)
    }

    /// The API's TCP address, from the startup log.
    pub fn tcp_addr(&self) -> std::net::SocketAddr {
        let log = self.log_text();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("agent ready"))
            .expect("the ready line");
        let url = line
            .split("api_url=")
            .nth(1)
            .and_then(|r| r.split("://").nth(1))
            .and_then(|r| r.split('/').next())
            .expect("api_url in the ready line");
        url.parse().expect("an IP:port")
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Waits until the log has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        self.log.wait_for(needle)
    }

    /// Sends a signal and waits for the process to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill() with the pid of our own child, not yet waited for.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().expect("wait")
    }

    /// SIGTERM, then start again on the same data dir.
    pub fn restart(&mut self) {
        let status = self.signal_and_wait(libc::SIGTERM);
        assert!(
            status.success(),
            "agent exit {status}:\n{}",
            self.log_text()
        );
        self.spawn();
    }

    /// Starts again after [`Agent::signal_and_wait`] stopped it.
    pub fn restart_after_stop(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// SIGKILL, then start again on the same data dir.
    pub fn kill_and_restart(&mut self) {
        self.signal_and_wait(libc::SIGKILL);
        self.spawn();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
