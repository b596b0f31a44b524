//! Each VM's cgroups: its vmm runs in a cgroup of its own under the agent's, with a memory
//! limit (the guest's memory and [`VMM_OVERHEAD`]) and a CPU quota (one CPU per vCPU), on
//! cgroup v2 where the host has it with the memory and cpu controllers, else on v1's memory
//! and cpu hierarchies (as Firecracker's jailer supports both). The vmm enters them before it
//! runs any of its own code (its pid written to `cgroup.procs` between fork and exec), so
//! nothing it does escapes the limits; its cgroups are removed when it has ended.
//!
//! Under the agent's own cgroup (from `/proc/self/cgroup`): `agent-vms/TENANT_ID`. On v2 a
//! cgroup with processes cannot give controllers to its children, so the agent first moves
//! itself into `agent/` beside `agent-vms/` under its own cgroup, then enables the
//! controllers there (what a systemd unit with `Delegate=yes` allows). The development
//! machine has v1 only: the tests there exercise v1, and the emulated host's agent scenario
//! (`tests/scenarios/agent.sh`, on cgroup v2 alone) exercises v2.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Memory a vmm may use beyond its guest's.
pub const VMM_OVERHEAD: u64 = 64 << 20;

/// The CFS period the CPU quota is a multiple of.
const PERIOD_US: u64 = 100_000;

/// Errors setting up the cgroups.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("No cgroups for the VMs: neither cgroup v2 with the memory and cpu controllers nor v1's memory and cpu hierarchies are mounted under /sys/fs/cgroup (set jail = false to run VMs without them)")]
    Missing,
    #[error("Cannot set up cgroup {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the VMs' cgroups go.
#[derive(Clone, Debug)]
pub enum Cgroups {
    /// v2: the parent of the VMs' cgroups.
    V2(PathBuf),
    /// v1: the parents in the memory and in the cpu hierarchy.
    V1 { memory: PathBuf, cpu: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The calling process's cgroup in hierarchy `controller` (v1), or its v2 cgroup (`""`).
fn own_cgroup(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        hit.then(|| path.trim_start_matches('/').to_string())
    })
}

impl Cgroups {
    /// Finds the host's cgroups and prepares the VMs' parent; [`Error::Missing`] where
    /// there are none to use.
    pub fn detect() -> Result<Cgroups, Error> {
        let root = Path::new("/sys/fs/cgroup");
        let v2_controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| v2_controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("cpu") {
            let own = root.join(own_cgroup("").unwrap_or_default());
            let agent = own.join("agent");
            std::fs::create_dir_all(&agent).map_err(io_err(&agent))?;
            let procs = agent.join("cgroup.procs");
            std::fs::write(&procs, "0").map_err(io_err(&procs))?;
            let control = own.join("cgroup.subtree_control");
            std::fs::write(&control, "+memory +cpu").map_err(io_err(&control))?;
            let vms = own.join("agent-vms");
            std::fs::create_dir_all(&vms).map_err(io_err(&vms))?;
            let control = vms.join("cgroup.subtree_control");
            std::fs::write(&control, "+memory +cpu").map_err(io_err(&control))?;
            return Ok(Cgroups::V2(vms));
        }
        let (memory, cpu) = (root.join("memory"), root.join("cpu"));
        if memory.join("memory.limit_in_bytes").exists() && cpu.join("cpu.cfs_quota_us").exists() {
            let m = memory
                .join(own_cgroup("memory").unwrap_or_default())
                .join("agent-vms");
            let c = cpu
                .join(own_cgroup("cpu").unwrap_or_default())
                .join("agent-vms");
            std::fs::create_dir_all(&m).map_err(io_err(&m))?;
            std::fs::create_dir_all(&c).map_err(io_err(&c))?;
            return Ok(Cgroups::V1 { memory: m, cpu: c });
        }
        Err(Error::Missing)
    }

    /// The cgroup directories of VM `name`.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2(p) => vec![p.join(name)],
            Cgroups::V1 { memory, cpu } => vec![memory.join(name), cpu.join(name)],
        }
    }

    /// Makes VM `name`'s cgroups with its limits; returns their `cgroup.procs`, open for the
    /// vmm to enter between fork and exec.
    pub fn prepare(&self, name: &str, memory_bytes: u64, vcpus: u8) -> Result<Vec<OwnedFd>, Error> {
        let limit = memory_bytes + VMM_OVERHEAD;
        let quota = u64::from(vcpus) * PERIOD_US;
        let settings: Vec<(PathBuf, Vec<(&str, String)>)> = match self {
            Cgroups::V2(p) => vec![(
                p.join(name),
                vec![
                    ("memory.max", limit.to_string()),
                    ("cpu.max", format!("{quota} {PERIOD_US}")),
                ],
            )],
            Cgroups::V1 { memory, cpu } => vec![
                (
                    memory.join(name),
                    vec![("memory.limit_in_bytes", limit.to_string())],
                ),
                (
                    cpu.join(name),
                    vec![
                        ("cpu.cfs_period_us", PERIOD_US.to_string()),
                        ("cpu.cfs_quota_us", quota.to_string()),
                    ],
                ),
            ],
        };
        let mut procs = Vec::new();
        for (dir, files) in settings {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            for (file, value) in files {
                let path = dir.join(file);
                std::fs::write(&path, &value).map_err(io_err(&path))?;
            }
            let path = dir.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            procs.push(OwnedFd::from(f));
        }
        Ok(procs)
    }

    /// Whether process `pid` is in VM `name`'s cgroups (`/proc/PID/cgroup`).
    pub fn holds(&self, name: &str, pid: u32) -> bool {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return false;
        };
        let root = Path::new("/sys/fs/cgroup");
        self.dirs(name).iter().all(|dir| {
            text.lines().any(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), Some(c)) => (a, b, c),
                    _ => return false,
                };
                let hierarchy = match self {
                    Cgroups::V2(_) => root.to_owned(),
                    Cgroups::V1 { .. } => match controllers
                        .split(',')
                        .find(|c| dir.starts_with(root.join(c)))
                    {
                        Some(c) => root.join(c),
                        None => return false,
                    },
                };
                hierarchy.join(path.trim_start_matches('/')) == *dir
            })
        })
    }

    /// Removes VM `name`'s cgroups once its vmm has ended, first killing what is left in
    /// them: processes the vmm forked (its guest's, if it was taken over) end with it, and
    /// nothing of a VM outlives it as its uid, which the next VM may get. Logs a cgroup it
    /// cannot empty or remove.
    pub fn remove(&self, name: &str) {
        for d in self.dirs(name) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect();
                if pids.is_empty() || std::time::Instant::now() > deadline {
                    break;
                }
                // v2 kills the whole cgroup at once (Linux 5.14); v1 and older, each process.
                if std::fs::write(d.join("cgroup.kill"), "1").is_err() {
                    for pid in pids {
                        // SAFETY: kill(2) with a pid read from the VM's own cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            match std::fs::remove_dir(&d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(cgroup = %d.display(), "cannot remove the VM's cgroup: {e}")
                }
                _ => {}
            }
        }
    }
}

/// Moves the calling process into each cgroup of `procs` (between fork and exec: only a
/// `write(2)` per descriptor, async-signal-safe).
pub fn enter(procs: &[i32]) -> io::Result<()> {
    for &fd in procs {
        // SAFETY: write(2) of two bytes from a static buffer to a descriptor the parent
        // opened and the child inherited.
        if unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The raw descriptors of `fds`, for [`enter`].
pub fn raw(fds: &[OwnedFd]) -> Vec<i32> {
    fds.iter().map(|f| f.as_raw_fd()).collect()
}
