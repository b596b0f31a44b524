//! Cross-process test infrastructure: the real binaries started on temporary directories,
//! driven from outside as a client or a peer would, and torn down. One module for each thing
//! a test drives or stands on:
//!
//! - `agent.rs`: [`Agent`], the node agent on a temporary data dir in the same shape, and
//!   [`AgentClient`] for its API, with a token; [`agent_calls`], the calls its tests repeat.
//! - `storaged.rs`: [`Storaged`], the storage daemon on a temporary data dir (start, wait until
//!   its API answers, log, restart, kill, tear down on drop) and [`AdminClient`] for its API.
//! - `vmm.rs`: [`Vmm`], the microVM monitor booting a test guest ([`guest`]) in the same shape
//!   (run to its end, or start and wait for its API socket; output captured; signal, wait for
//!   the exit code, kill on drop). Its API is reached with `vmm-api`'s `VmmClient`.
//! - [`pki`]: a CA and the node certificates it signs, for replication's mutual TLS.
//! - [`netns`]: two network namespaces joined by a veth pair with a 5 ms round trip, a link
//!   between two daemons that a test can cut; running code in a namespace.
//! - [`generations`]: a workload of generations over a set of blocks, each one flushed, and
//!   the check that an image (a replication secondary's) is one consistent point of it.
//! - `blk_client.rs`: [`BlkClient`], a vhost-user-blk client on the `blkio` crate (libblkio's
//!   virtio-blk-vhost-user driver, written by the QEMU authors) for storaged's volumes.
//! - [`raw_frontend`]: a vhost-user frontend written by hand, for requests and rings no
//!   well-behaved driver sends storaged.
//! - [`scripted_backend`]: a vhost-user backend written by hand, refusing what a test picks,
//!   for vmm's frontend.
//! - [`devices`]: block devices for device-backed volumes: a loop device, one whose writes hang
//!   on demand, one whose write-back fails.
//! - [`emulated_host`]: where the full-boot scenarios run (this host, or QEMU emulating one
//!   with hardware virtualization).
//!
//! Beside them, here: where the built binaries are ([`bin`]), a daemon's captured log
//! ([`Log`]), polling ([`wait_until`]), data patterns, a metrics scrape, skipping a test the
//! machine cannot run ([`skip`]), and the flag parsing of the tools in `src/bin/`.

// Test infrastructure: a failed step should stop the test with its message.
#![allow(clippy::unwrap_used)]

mod agent;
pub mod agent_calls;
mod blk_client;
pub mod devices;
pub mod emulated_host;
pub mod generations;
pub mod netns;
pub mod pki;
pub mod raw_frontend;
pub mod scripted_backend;
// The two harnesses are re-exported here, their modules not public: a public module named
// `storaged` would shadow the `storaged` crate in a test that glob-imports this one.
mod storaged;
mod vmm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use self::agent::{Agent, AgentClient};
pub use self::storaged::{AdminClient, Response, Storaged};
pub use blk_client::{connect_retry, BlkClient, REGION_LEN};
pub use devices::{FreezableDevice, LoopDevice, WritebackFault};
pub use vmm::{guest, wait_for_console, Vmm};

/// The property names of an object schema in `file` (an OpenAPI file, relative to the
/// workspace), by a path of keys; read with Python's YAML parser, a reader we did not write.
pub fn openapi_properties(file: &str, path: &[&str]) -> Vec<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(file);
    let script = "import json, sys, yaml\n\
        node = yaml.safe_load(open(sys.argv[1]))\n\
        for key in sys.argv[2:]:\n    node = node[key]\n\
        print(json.dumps(sorted(node['properties'])))";
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(&file)
        .args(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

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

/// A deterministic pattern: byte i of the block at `offset` seeded by `seed`.
pub fn pattern(len: usize, offset: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = offset.wrapping_add(i as u64).wrapping_mul(2_654_435_761);
            (x >> 13) as u8 ^ seed
        })
        .collect()
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

/// A daemon's log, read line by line from its stderr by a thread of its own (echoed to the
/// test's stderr, tagged, when the environment variable `echo_var` is set); kept across the
/// daemon's restarts.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Log {
    /// Starts reading `stderr` into the log.
    pub fn capture(&self, stderr: impl std::io::Read + Send + 'static, echo_var: &str, tag: &str) {
        use std::io::BufRead;
        let lines = self.0.clone();
        let echo = std::env::var_os(echo_var).is_some();
        let tag = tag.to_string();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if echo {
                    eprintln!("[{tag}] {line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// Waits (30 s at most) until a line contains `needle`: a line the daemon wrote before it
    /// answered may still be on its way through the pipe.
    pub fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in log:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// Lints a /metrics scrape with `promtool check metrics` (`$PROMTOOL`, else on the PATH; the
/// test skips, saying why, where there is none).
pub fn promtool_check(scrape: &str) {
    use std::io::Write;
    let promtool = std::env::var_os("PROMTOOL").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("promtool"))
                .find(|f| f.exists())
        })
    });
    let Some(promtool) = promtool else {
        skip("promtool check: promtool not found (scripts/test installs it)");
        return;
    };
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
