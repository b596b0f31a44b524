//! Cross-process test infrastructure: start the real `storaged` on a temporary data dir, wait
//! until it serves, drive its volumes with the `blkio` crate (libblkio's virtio-blk-vhost-user
//! driver, written by the QEMU authors), and tear down.

// Test infrastructure: a failed step should stop the test with its message.
#![allow(clippy::unwrap_used)]

pub mod emulated_host;
pub mod loop_device;
pub mod raw_frontend;
pub mod writeback_fault;

use std::io::{BufRead, BufReader};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
pub use storaged::client::{AdminClient, Response};

/// Directory holding the workspace's built binaries (the test executable lives in `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    if deps.ends_with("deps") {
        deps.parent().expect("target dir").to_owned()
    } else {
        deps.to_owned()
    }
}

/// Path of a workspace binary, e.g. `storaged`.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run cargo build --workspace",
        p.display()
    );
    p
}

/// A running `storaged` on a temporary data dir.
pub struct Storaged {
    pub data_dir: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
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
            log: Arc::new(Mutex::new(Vec::new())),
            _tmp: Some(tmp),
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
            log: Arc::new(Mutex::new(Vec::new())),
            _tmp: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(bin("storaged"));
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
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("STORAGED_TEST_LOG").is_some() {
                    eprintln!("[storaged] {line}");
                }
                log.lock().unwrap().push(line);
            }
        });
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

    /// Everything storaged logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until the log has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Creates a volume; panics unless the API answers 201. Returns the volume JSON.
    pub fn create_volume(&self, body: &str) -> serde_json::Value {
        let r = self
            .admin()
            .request("POST", "/v1/volumes", Some(body))
            .unwrap();
        assert_eq!(r.status, 201, "create {body}: {}", r.body);
        r.json()
    }

    pub fn socket_of(&self, name: &str) -> PathBuf {
        let r = self.admin().get(&format!("/v1/volumes/{name}")).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        PathBuf::from(r.json()["socket"].as_str().unwrap())
    }

    pub fn metrics_url(&self) -> String {
        let r = self.admin().get("/v1/info").unwrap();
        r.json()["metrics_url"].as_str().unwrap().to_string()
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

/// A vhost-user-blk client on the blkio crate, with one memory region for buffers.
pub struct BlkClient {
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

/// Size of the client's buffer region.
pub const REGION_LEN: usize = 32 << 20;

impl BlkClient {
    pub fn connect(socket: &Path, num_queues: i32) -> blkio::Result<Self> {
        Self::connect_with(socket, num_queues, 256)
    }

    pub fn connect_with(socket: &Path, num_queues: i32, queue_size: i32) -> blkio::Result<Self> {
        Self::connect_opts(socket, num_queues, queue_size, false)
    }

    /// Connects as a read-only client (libblkio refuses a read-write client on a read-only
    /// device).
    pub fn connect_read_only(socket: &Path) -> blkio::Result<Self> {
        Self::connect_opts(socket, 1, 256, true)
    }

    fn connect_opts(
        socket: &Path,
        num_queues: i32,
        queue_size: i32,
        read_only: bool,
    ) -> blkio::Result<Self> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().expect("utf-8 path"))?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        b.set_i32("queue-size", queue_size)?;
        let outcome = b.start()?;
        let region = b.alloc_mem_region(REGION_LEN)?;
        b.map_mem_region(&region)?;
        Ok(BlkClient {
            queues: outcome.queues,
            region,
            blkio: b,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.get_u64("capacity")
    }

    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
    }

    pub fn get_bool(&self, name: &str) -> bool {
        self.blkio.get_bool(name).expect(name)
    }

    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio.get_i32(name).expect(name)
    }

    /// Pointer into the buffer region at `offset`.
    pub fn buf(&mut self, offset: usize) -> *mut u8 {
        assert!(offset < REGION_LEN);
        (self.region.addr + offset) as *mut u8
    }

    /// The buffer region as a slice.
    pub fn region(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped read-write for REGION_LEN bytes while self lives, and
        // &mut self keeps other users (requests) from running concurrently in this process.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, REGION_LEN) }
    }

    /// Waits for `n` completions on queue `q`; returns their results (`ret`, 0 = success).
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let mut timeout = Duration::from_secs(30);
            let k = self.queues[q]
                .do_io(&mut comps[..n - got.len()], 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(k > 0, "no completion within 30 s");
            for c in &comps[..k] {
                // SAFETY: do_io initialised the first k completions.
                let c = unsafe { c.assume_init_ref() };
                got.push((c.user_data, c.ret));
            }
        }
        got
    }

    fn one(&mut self, q: usize) -> i32 {
        self.wait(q, 1)[0].1
    }

    /// Writes `data` at byte `offset` through queue `q`; returns the completion's `ret`.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.region()[..data.len()].copy_from_slice(data);
        let buf = self.buf(0);
        self.queues[q].write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.one(q)
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.region()[..len].fill(0xee);
        let buf = self.buf(0);
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        match self.one(q) {
            0 => Ok(self.region()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.one(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.one(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.one(q)
    }
}

/// A deterministic pattern: byte i of the block at `offset` seeded by `seed`.
pub fn pattern(len: usize, offset: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = offset.wrapping_add(i as u64).wrapping_mul(2_654_435_761);
            (x >> 13) as u8 ^ seed
        })
        .collect()
}

/// Connects, retrying while the socket is still being set up or was just released.
pub fn connect_retry(socket: &Path, num_queues: i32) -> BlkClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match BlkClient::connect(socket, num_queues) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to {}: {e:?}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The command line of a test tool as `--flag value` pairs; `Err(usage)` for `--help`, and a
/// message naming the flag that lacks its value.
pub fn flag_pairs(usage: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(usage.into());
        }
        let val = it.next().ok_or(format!("{flag} needs a value\n{usage}"))?;
        pairs.push((flag, val));
    }
    Ok(pairs)
}

/// `value` of `flag` as a number, or a message naming both.
pub fn flag_number(flag: &str, value: &str) -> Result<u64, String> {
    value.parse().map_err(|e| format!("{flag} {value}: {e}"))
}

/// Polls `cond` every 10 ms until it holds; fails the test with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fetches a URL over plain HTTP/1.1 (for /metrics on loopback).
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).expect("connect metrics");
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Value of a metric line `name{labels} value` in a scrape, if present.
pub fn metric_value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A block device whose writes hang while it is frozen: a loop device over a file on an ext4
/// file system (itself on a loop device) that `fsfreeze` freezes. A write sent to the device
/// meanwhile stays in flight in the kernel, uninterruptibly, until [`FreezableDevice::thaw`]:
/// a hung disk, for real. Thawed and taken apart on drop.
pub struct FreezableDevice {
    /// The device to serve, e.g. `/dev/loop7`.
    pub dev: String,
    fs_dev: String,
    mnt: tempfile::TempDir,
    mounted: bool,
    frozen: bool,
    image: tempfile::NamedTempFile,
}

fn command_ok(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl FreezableDevice {
    /// A device of `size` bytes; `None` where it cannot be set up (it needs root, losetup,
    /// mkfs.ext4, mount and fsfreeze).
    pub fn new(size: u64) -> Option<Self> {
        let image = tempfile::NamedTempFile::new_in("/var/tmp").ok()?;
        image.as_file().set_len(size + (32 << 20)).ok()?;
        let mut d = FreezableDevice {
            dev: String::new(),
            fs_dev: String::new(),
            mnt: tempfile::tempdir().ok()?,
            mounted: false,
            frozen: false,
            image,
        };
        let image_path = d.image.path().to_str()?.to_string();
        let mnt = d.mnt.path().to_str()?.to_string();
        command_ok("mkfs.ext4", &["-q", "-F", &image_path])?;
        d.fs_dev = command_ok("losetup", &["--find", "--show", &image_path])?;
        command_ok("mount", &[&d.fs_dev, &mnt])?;
        d.mounted = true;
        let disk = d.mnt.path().join("disk.img");
        std::fs::File::create(&disk).ok()?.set_len(size).ok()?;
        d.dev = command_ok("losetup", &["--find", "--show", disk.to_str()?])?;
        Some(d)
    }

    /// From now on, writes to the device wait until [`FreezableDevice::thaw`].
    pub fn freeze(&mut self) {
        let mnt = self.mnt.path().to_str().unwrap().to_string();
        assert!(
            command_ok("fsfreeze", &["--freeze", &mnt]).is_some(),
            "fsfreeze --freeze {mnt} failed"
        );
        self.frozen = true;
    }

    /// Lets the writes waiting on the device go on.
    pub fn thaw(&mut self) {
        if self.frozen {
            let mnt = self.mnt.path().to_str().unwrap().to_string();
            let _ = command_ok("fsfreeze", &["--unfreeze", &mnt]);
            self.frozen = false;
        }
    }

    /// Requests (reads and writes) the kernel has in flight on the device.
    pub fn inflight(&self) -> u64 {
        let name = self.dev.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/inflight"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for FreezableDevice {
    fn drop(&mut self) {
        // Thaw first: whatever waits on the device (a daemon's drain, a test's write) goes on.
        self.thaw();
        // A device still open (by a daemon the test has not stopped yet) is detached when it
        // is closed; the lazy unmount lets the file system go once the loop device is gone.
        if !self.dev.is_empty() {
            let _ = command_ok("losetup", &["-d", &self.dev]);
        }
        if self.mounted {
            let mnt = self.mnt.path().to_str().unwrap_or_default().to_string();
            let _ = command_ok("umount", &["--lazy", &mnt]);
        }
        if !self.fs_dev.is_empty() {
            let _ = command_ok("losetup", &["-d", &self.fs_dev]);
        }
    }
}

/// Skips a test that needs what this machine lacks (root, loop devices, a tool), saying so.
/// Under CI (the `CI` variable set, as `scripts/test` reads it) the machine is expected to have
/// it, so a skip there is a failure instead: a green run never hides a test that did not run.
pub fn skip(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what}; under CI this test must run");
    }
    eprintln!("SKIPPED {what}");
}
