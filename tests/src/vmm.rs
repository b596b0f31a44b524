//! The `vmm` harness: the real microVM monitor booting a test guest, the same shape as
//! [`crate::Storaged`]. [`Vmm::run`] runs a VM to its end (a guest that resets or powers off,
//! a triple fault, a command line vmm refuses) and gives its output. [`Vmm::start`] leaves it
//! running for a test that acts on it meanwhile: its stdout (the serial console, unless
//! `--serial` sends that to a file) and stderr (its log) are read as they come, so vmm never
//! waits on a full pipe; [`Vmm::start_with_api`] also waits until it listens on its API
//! socket, for [`Vmm::api`]. A test waits for its exit code ([`Vmm::wait`]) or signals it; a
//! VMM still running is killed on drop.
//!
//! The guests are the assembly programs of `images/guests/`, built by `tests/build.rs`
//! ([`guest`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_api::{Counters, VmStatus, VmmClient};

use crate::{bin, wait_until};

/// How long [`Vmm::wait`] waits for vmm to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Vmm::start_with_api`] waits for the API socket.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the test guest `name` (`images/guests/NAME.S`, assembled to an ELF image).
pub fn guest(name: &str) -> PathBuf {
    PathBuf::from(env!("GUEST_DIR")).join(format!("{name}.elf"))
}

/// A running `vmm`.
pub struct Vmm {
    child: Child,
    /// Set once the process has been reaped: its pid is no longer ours to signal.
    exit: Option<ExitStatus>,
    api_socket: Option<PathBuf>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Vmm {
    /// Runs vmm with `args` until it exits; returns its exit status, stdout and stderr.
    pub fn run(args: &[&str]) -> Output {
        Command::new(bin("vmm")).args(args).output().unwrap()
    }

    /// Starts vmm with `args`, its output read into buffers as it comes.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(bin("vmm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            read_into(child.stdout.take().expect("stdout"), stdout.clone()),
            read_into(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        Vmm {
            child,
            exit: None,
            api_socket: None,
            stdout,
            stderr,
            readers,
        }
    }

    /// Starts vmm with `args` and `--api-sock api_socket`; returns once the socket exists.
    pub fn start_with_api(api_socket: &Path, args: &[&str]) -> Self {
        let mut all = args.to_vec();
        all.extend(["--api-sock", api_socket.to_str().expect("utf-8 path")]);
        let mut vmm = Self::start(&all);
        vmm.api_socket = Some(api_socket.to_owned());
        let deadline = Instant::now() + API_TIMEOUT;
        while !api_socket.exists() {
            if let Some(status) = vmm.try_wait() {
                panic!("vmm exited with {status} at start:\n{}", vmm.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no API socket {}:\n{}",
                api_socket.display(),
                vmm.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }

    /// The API socket given to [`Vmm::start_with_api`].
    pub fn api_socket(&self) -> &Path {
        self.api_socket
            .as_deref()
            .expect("started with an API socket")
    }

    /// A client of vmm's API.
    pub fn api(&self) -> VmmClient {
        VmmClient::new(self.api_socket())
    }

    /// `GET /v1/vm`.
    pub fn status(&self) -> VmStatus {
        self.api().status().expect("GET /v1/vm")
    }

    /// `GET /v1/vm/counters`.
    pub fn counters(&self) -> Counters {
        self.api().counters().expect("GET /v1/vm/counters")
    }

    /// Everything vmm wrote on its stdout so far: the serial console, unless `--serial` sent
    /// it to a file.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Everything vmm logged (its stderr) so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if vmm has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait vmm");
            if self.exit.is_some() {
                // The pipes are closed: the readers have all the output or soon will.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
            }
        }
        self.exit
    }

    /// Waits for vmm to exit (its output then complete); fails the test after a minute.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "vmm did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends vmm a signal, unless it has exited.
    pub fn signal(&self, sig: i32) {
        if self.exit.is_none() {
            // SAFETY: kill() with the pid of our own child, not yet reaped (so not reused).
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Sends a signal and waits for vmm to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        self.signal(sig);
        self.wait()
    }

    /// SIGKILL, and waits for vmm to exit.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `from` to its end into `into`, on a thread; echoes it with `[vmm]` prefixed when
/// `STORAGED_TEST_LOG` is set, as [`crate::Storaged`] does.
fn read_into(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if std::env::var_os("STORAGED_TEST_LOG").is_some() {
                eprint!("[vmm] {}", String::from_utf8_lossy(&buf[..n]));
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// Waits until the serial console file `console` holds what `cond` wants; fails the test
/// with `what` after `timeout`.
pub fn wait_for_console(
    console: &Path,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut(&str) -> bool,
) {
    wait_until(what, timeout, || {
        cond(&std::fs::read_to_string(console).unwrap_or_default())
    });
}
