//! The `storaged` harness: the real daemon on a temporary data dir (or one the test owns),
//! started with the test's arguments and waited for until its admin API answers; its log
//! (stderr) captured line by line; stopped by a signal, restarted on the same data dir, killed
//! on drop. Its admin API is reached with [`AdminClient`], the client `storagectl` uses.
//!
//! [`Storaged::start_in_netns`] starts it in a network namespace (`ip netns exec`, which execs
//! it: the child's pid is storaged's, for signals). Its admin and vhost-user sockets are Unix
//! sockets in the file system, reached from anywhere; its TCP listeners (metrics,
//! replication) are in its namespace, where [`Storaged::metrics`] scrapes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use storaged_api::client::{AdminClient, Response};
use storaged_api::CreateVolume;

use crate::{bin, Log};

/// A running `storaged` on a temporary data dir.
pub struct Storaged {
    pub data_dir: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
    log: Log,
    _tmp: Option<tempfile::TempDir>,
    /// The network namespace it runs in (`None`: the test's own).
    netns: Option<String>,
}

impl Storaged {
    /// Starts storaged on a new temporary data dir, metrics on an ephemeral loopback port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("stg")
            .tempdir()
            .expect("tempdir");
        let mut s = Storaged {
            data_dir: tmp.path().to_owned(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log: Log::default(),
            _tmp: Some(tmp),
            netns: None,
        };
        s.spawn();
        s
    }

    /// Starts storaged on `data_dir`, which the caller owns (a file system it mounted, say).
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Self {
        let mut s = Storaged {
            data_dir: data_dir.to_owned(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log: Log::default(),
            _tmp: None,
            netns: None,
        };
        s.spawn();
        s
    }

    /// Starts storaged in network namespace `netns` on a new temporary data dir; a restart
    /// starts it there again.
    pub fn start_in_netns(netns: &str, args: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("stg")
            .tempdir()
            .expect("tempdir");
        let mut s = Storaged {
            data_dir: tmp.path().to_owned(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log: Log::default(),
            _tmp: Some(tmp),
            netns: Some(netns.to_string()),
        };
        s.spawn();
        s
    }

    /// The network namespace it runs in, if not the test's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// A scrape of its /metrics, taken from its namespace.
    pub fn metrics(&self) -> String {
        let url = self.metrics_url();
        match &self.netns {
            Some(ns) => crate::netns::in_netns(ns, || crate::http_get(&url)),
            None => crate::http_get(&url),
        }
    }

    fn spawn(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("storaged"));
                c
            }
            None => Command::new(bin("storaged")),
        };
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--log",
                "storaged=debug,info",
            ])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn storaged");
        let stderr = child.stderr.take().expect("stderr");
        self.log.capture(stderr, "STORAGED_TEST_LOG", "storaged");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.admin().get("/v1/info") {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "storaged exited with {status} at start:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "storaged not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(self.admin_socket())
    }

    /// The names `GET /v1/volumes` lists, in its order.
    pub fn volume_names(&self) -> Vec<String> {
        self.admin()
            .get("/v1/volumes")
            .expect("GET /v1/volumes")
            .json()
            .as_array()
            .expect("a list of volumes")
            .iter()
            .map(|v| v["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Everything storaged logged so far.
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Waits until the log has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        self.log.wait_for(needle)
    }

    /// Creates a volume from a JSON body (read as the API's [`CreateVolume`]); panics unless
    /// the API creates it. Returns the volume as JSON.
    pub fn create_volume(&self, body: &str) -> serde_json::Value {
        let req: CreateVolume = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("create {body}: not a CreateVolume: {e}"));
        let v = self
            .admin()
            .create_volume(&req)
            .unwrap_or_else(|e| panic!("create {body}: {e}"));
        serde_json::to_value(v).expect("a VolumeInfo is JSON")
    }

    pub fn socket_of(&self, name: &str) -> PathBuf {
        self.admin()
            .volume(name)
            .unwrap_or_else(|e| panic!("volume {name}: {e}"))
            .socket
    }

    pub fn metrics_url(&self) -> String {
        self.admin()
            .info()
            .expect("GET /v1/info")
            .metrics_url
            .expect("storaged serves metrics")
    }

    /// The address the replication listener is bound to (`GET /v1/info`).
    pub fn replication_addr(&self) -> std::net::SocketAddr {
        self.admin()
            .info()
            .expect("GET /v1/info")
            .replication_listen
            .expect("storaged listens for replication peers")
            .parse()
            .expect("an IP:port")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal and waits for the process to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill() with a valid pid of our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "storaged did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then start again on the same data dir.
    pub fn restart(&mut self) {
        let status = self.signal_and_wait(libc::SIGTERM);
        assert!(
            status.success(),
            "storaged exit {status}:\n{}",
            self.log_text()
        );
        self.spawn();
    }

    /// Starts again after [`Storaged::signal_and_wait`] stopped it.
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

impl Drop for Storaged {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
