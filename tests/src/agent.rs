//! The `agent` harness: the real agent on a temporary data dir, its API on an ephemeral
//! loopback port and on its socket, waited for until it answers the admin token; its log
//! (stderr) captured; stopped by a signal, restarted on the same data dir; killed on drop
//! with its VMs (all in a cgroup of its own). Each agent of a test process has uids of its
//! own for its VMs.
//! Its API is reached with [`AgentClient`], the client `agentctl` uses.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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
    cgroup: TestCgroup,
    _tmp: tempfile::TempDir,
}

/// A cgroup of its own for each agent a test starts, as systemd gives each unit one, in each
/// hierarchy the agent puts its VMs' cgroups in (v1's memory and cpu, else v2): the VMs'
/// cgroups go under it, so agents of tests running side by side never share one, and its
/// drop ends every process in it: the agent and its VMs, which outlive the agent by design.
struct TestCgroup {
    dirs: Vec<PathBuf>,
}

impl TestCgroup {
    /// The cgroup of the test process's `instance`th agent.
    fn new(instance: u32) -> TestCgroup {
        let name = format!("agent-test-{}-{instance}", std::process::id());
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let own_in = |controller: &str| {
            own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, c, path) = (parts.next()?, parts.next()?, parts.next()?);
                let hit = if controller.is_empty() {
                    c.is_empty()
                } else {
                    c.split(',').any(|c| c == controller)
                };
                hit.then(|| path.trim_start_matches('/').to_string())
            })
        };
        let v1 = ["memory", "cpu"]
            .iter()
            .filter_map(|c| {
                let root = Path::new("/sys/fs/cgroup").join(c);
                root.join("cgroup.procs")
                    .exists()
                    .then(|| Some(root.join(own_in(c)?).join(&name)))
                    .flatten()
            })
            .collect::<Vec<_>>();
        let dirs = if v1.len() == 2 {
            v1
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            own_in("")
                .map(|p| vec![Path::new("/sys/fs/cgroup").join(p).join(&name)])
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        for d in &dirs {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        TestCgroup { dirs }
    }

    /// The `cgroup.procs` files a new agent writes itself into.
    fn procs(&self) -> Vec<std::fs::File> {
        self.dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            })
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for d in &self.dirs {
            // Depth first: the VMs' cgroups, then theirs, then this one.
            let mut all = vec![d.clone()];
            let mut i = 0;
            while i < all.len() {
                if let Ok(entries) = std::fs::read_dir(&all[i]) {
                    all.extend(
                        entries
                            .flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                }
                i += 1;
            }
            for c in all.iter().rev() {
                loop {
                    let pids = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
                    if pids.trim().is_empty() || Instant::now() > deadline {
                        break;
                    }
                    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                        // SAFETY: kill(2) of a process of this test's cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = std::fs::remove_dir(c);
            }
        }
    }
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
        Self::with_guests_and(storaged, &[])
    }

    /// [`with_guests`](Self::with_guests) with more arguments.
    pub fn with_guests_and(storaged: &crate::Storaged, more: &[&str]) -> Self {
        let socket = storaged.admin_socket();
        let guests = crate::guest("spin");
        let dir = guests.parent().expect("the guests' dir");
        let mut args = vec![
            "--storaged-socket",
            socket.to_str().expect("a UTF-8 path"),
            "--images-dir",
            dir.to_str().expect("a UTF-8 path"),
        ];
        args.extend_from_slice(more);
        Self::start_with(&args)
    }

    pub fn start_with(args: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("agt")
            .tempdir()
            .expect("tempdir");
        // Each agent of the test process its own uids and cgroup: tests run side by side.
        static INSTANCES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let instance = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut extra_args = vec![
            "--jail-uid-base".to_string(),
            (10_000_000 + instance * 1000).to_string(),
        ];
        extra_args.extend(args.iter().map(|s| s.to_string()));
        let mut a = Agent {
            data_dir: tmp.path().to_owned(),
            extra_args,
            child: None,
            log: Log::default(),
            cgroup: TestCgroup::new(instance),
            _tmp: tmp,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let procs = self.cgroup.procs();
        let raw: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new(bin("agent"));
        // SAFETY: between fork and exec the hook only sets the umask and writes to descriptors
        // the parent opened (kept open until the spawn returns), from a static buffer: no
        // allocation, no lock.
        unsafe {
            cmd.pre_exec(move || {
                // As systemd/agent.service runs it (UMask=0077).
                libc::umask(0o077);
                for &fd in &raw {
                    if libc::write(fd, b"0\n".as_ptr().cast(), 2) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
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
        drop(procs);
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
