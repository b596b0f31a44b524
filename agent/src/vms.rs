//! Tenants' VMs: each one a `vmm` process the agent starts, watches and starts again per the
//! VM's restart policy, and finds again after its own restart.
//!
//! A VM's files are in `DATA_DIR/vms/TENANT_ID/`: `vmm.log` (vmm's stderr and stdout, one
//! run's) and its jail (`jail/`, see the `jail` module), whose `run/` holds `api.sock` and
//! `console.log` (the serial console: the last 64 KiB of the run before, then this run's, at
//! most [`CONSOLE_MAX`] before vmm rotates it to `console.log.1`); unjailed, `jail/run/`
//! only. Both are made anew at each launch. vmm runs in a process group of its own, its output in
//! files, never in pipes to the agent: nothing ties it to the agent's life, so a VM keeps
//! running while the agent stops, crashes or restarts.
//!
//! Watching: a pidfd per vmm, readable once it has ended (a task per VM on the runtime). A
//! vmm this agent started is its child, reaped through the pidfd with its exit code or
//! signal; one found again after a restart (the process serving the VM's API socket, by its
//! peer credential) is not, and its end is read from the last line of its log that gives
//! vmm's exit code (none: it was killed). vmm's exit-code table says what the end means;
//! a failure is any end but code 0 (the guest powered off or reset, or the API shut it down).
//!
//! Each VM has a lock, held across every change of its record and its process: a launch
//! (the record says `launching` before the spawn), an end, a start, a stop or kill, a delete.
//! So concurrent calls never give a VM two vmm processes, and the end of an older process
//! (the record no longer names its pid) changes nothing. A VM's volumes are attached in the
//! transaction that writes its record, which checks that no other VM has them; a volume is
//! marked deleting in the transaction that checks no VM has it.
//!
//! Restarting: `always` starts it again after any end, `on-failure` after a failure, `never`
//! not; a stop or kill through the API (which clears `want_running`) never. The backoff is
//! 1 s, doubling with each restart in the last [`RESTART_WINDOW`], at most 30 s; the
//! [`RESTART_CAP`]th restart in the window is not made and the VM is `failed`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_api::{CreateVm, LastExit, RestartPolicy, Vm};
use storaged_api::client::AdminClient;
use vmm_api::ProcessExit;

use crate::cgroups::{self, Cgroups};
use crate::jail;
use crate::metrics::Metrics;
use crate::store::{self, Store, VmRecord, VmSpec};
use crate::sys::{self, ChildExit};
use crate::tenants::valid_name;

/// Most bytes of a VM's serial log before vmm rotates it to `console.log.1`.
pub const CONSOLE_MAX: u64 = 1 << 20;

/// How much of a run's console a launch carries into the next run's.
const CONSOLE_KEPT: u64 = 64 << 10;

/// Restarts counted for the backoff and the cap.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Restarts in [`RESTART_WINDOW`] after which a VM is left `failed`.
pub const RESTART_CAP: usize = 5;

/// The longest backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long the agent waits for an answer of a vmm's API, however slowly it comes.
const VMM_API_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest answer of a vmm's API the agent reads (a vmm is its guest's, if taken over).
const VMM_API_MAX_RESPONSE: u64 = 1 << 20;

/// How long a stop waits for the guest to power off after its power button, unless the
/// call says otherwise.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a stop may be told to wait.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a stop waits for vmm to end after its API's shutdown before it kills it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Errors of the VM calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid VM id {0:?}: 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit")]
    InvalidId(String),
    #[error("VM {0} exists with another spec")]
    Exists(String),
    #[error("No VM {0}")]
    NotFound(String),
    #[error("No tenant {0}")]
    NoTenant(String),
    #[error("Invalid VM: {0}")]
    Invalid(String),
    #[error("Volume {volume} is attached to VM {vm}")]
    VolumeInUse { volume: String, vm: String },
    #[error("{0}")]
    Busy(String),
    #[error("Cannot start vmm {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot prepare the VM's directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroups::Error),
    #[error(transparent)]
    Jail(#[from] jail::Error),
    #[error(transparent)]
    Storaged(#[from] crate::volumes::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// The VMs and their vmm processes.
pub struct VmSupervisor {
    store: Arc<Store>,
    storaged: AdminClient,
    images_dir: PathBuf,
    vmm: PathBuf,
    vms_dir: PathBuf,
    seccomp_filter: Option<PathBuf>,
    /// Every VM with a vmm running: its pidfd.
    running: Mutex<HashMap<String, Arc<OwnedFd>>>,
    /// One lock per VM, held across each change of its record and its process (a launch, an
    /// end, a stop, a kill, a delete): no two of them interleave, so no VM gets two vmm
    /// processes and no record is written over with a stale copy.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    /// How each vmm is jailed (none: `jail = false`).
    jail: Option<JailSettings>,
}

/// How the VMs are jailed (see the `jail` module).
pub struct JailSettings {
    /// Where each vmm's cgroups go.
    pub cgroups: Cgroups,
    /// The first of the vmms' uids.
    pub uid_base: u32,
    /// The files the vmm binary loads besides itself (`ldd`).
    pub libraries: Vec<PathBuf>,
}

/// A VM's files on the host, in its directory: `vmm.log`, and its jail (`jail/`) whose
/// `run/` holds vmm's API socket and serial log.
struct VmFiles(PathBuf);

impl VmFiles {
    fn dir(&self) -> &Path {
        &self.0
    }
    fn log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    fn jail(&self) -> PathBuf {
        self.0.join("jail")
    }
    fn run(&self) -> PathBuf {
        self.0.join("jail/run")
    }
    fn api(&self) -> PathBuf {
        self.0.join("jail/run/api.sock")
    }
    fn console(&self) -> PathBuf {
        self.0.join("jail/run/console.log")
    }
}

/// A VM's name on the host: its directory's and its cgroups' (`_` is in neither name).
fn host_name(tenant: &str, id: &str) -> String {
    format!("{tenant}_{id}")
}

fn key(tenant: &str, id: &str) -> String {
    format!("{tenant}/{id}")
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the VMs are made from and where their files go.
pub struct VmPaths {
    /// The image catalog.
    pub images_dir: PathBuf,
    /// The vmm binary.
    pub vmm: PathBuf,
    /// The VMs' directories.
    pub vms_dir: PathBuf,
    /// vmm's `--seccomp-filter`, if not its built-in filters.
    pub seccomp_filter: Option<PathBuf>,
}

impl VmSupervisor {
    pub fn new(
        store: Arc<Store>,
        storaged: AdminClient,
        paths: VmPaths,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        jail: Option<JailSettings>,
    ) -> Arc<Self> {
        Arc::new(VmSupervisor {
            store,
            storaged,
            images_dir: paths.images_dir,
            vmm: paths.vmm,
            vms_dir: paths.vms_dir,
            seccomp_filter: paths.seccomp_filter,
            running: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            runtime,
            metrics,
            jail,
        })
    }

    fn files(&self, tenant: &str, id: &str) -> VmFiles {
        VmFiles(self.vms_dir.join(host_name(tenant, id)))
    }

    /// The uids a VM's own files may belong to: root's, and its vmm's when jailed.
    fn owners(r: &VmRecord) -> [u32; 2] {
        [0, r.uid.unwrap_or(0)]
    }

    /// A client of VM `r`'s vmm API, and the handle of the socket it connects to (held as
    /// long as the client is used). The socket is in a directory the vmm's uid owns: it is
    /// opened without following a symlink and must be a socket of that uid or root.
    fn vmm_api(&self, r: &VmRecord) -> Option<(vmm_api::VmmClient, sys::SocketRef)> {
        let socket =
            sys::SocketRef::open(&self.files(&r.tenant, &r.id).api(), &Self::owners(r)).ok()?;
        let client = vmm_api::VmmClient::new(socket.path())
            .with_timeout(VMM_API_TIMEOUT)
            .with_max_response(VMM_API_MAX_RESPONSE);
        Some((client, socket))
    }

    /// The lock of VM `k`.
    fn lock(&self, k: &str) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(k.to_string())
            .or_default()
            .clone()
    }

    fn pidfd(&self, k: &str) -> Option<Arc<OwnedFd>> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(k)
            .cloned()
    }

    /// The files of the image catalog, by their paths relative to it.
    pub fn images(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![self.images_dir.clone()];
        while let Some(d) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => dirs.push(p),
                    Ok(t) if t.is_file() => {
                        if let Ok(rel) = p.strip_prefix(&self.images_dir) {
                            out.push(rel.to_string_lossy().into_owned());
                        }
                    }
                    _ => {}
                }
            }
        }
        out.sort();
        out
    }

    /// The catalog file `name` names: a regular file inside the catalog. A name with a `..`
    /// or a root is refused as it is, before any look at the file system, and every other
    /// failure says the same: the answer tells nothing of what lies outside the catalog.
    fn image(&self, what: &str, name: &str) -> Result<PathBuf, Error> {
        let refused = || {
            Error::Invalid(format!("{what} {name:?}: not a file of the image catalog (a path relative to it; GET /v1/images lists them)"))
        };
        let rel = Path::new(name);
        let plain = !name.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(refused());
        }
        let root = self.images_dir.canonicalize().map_err(|_| refused())?;
        let path = root.join(rel).canonicalize().map_err(|_| refused())?;
        if !path.starts_with(&root) || !path.is_file() {
            return Err(refused());
        }
        Ok(path)
    }

    /// Creates a VM of `tenant` (started unless `start` is false). A create with the id of an
    /// existing VM of the tenant and the same spec answers that VM (a retry); another spec is
    /// refused.
    pub fn create(self: &Arc<Self>, tenant: &str, req: &CreateVm) -> Result<(Vm, bool), Error> {
        let id = match &req.id {
            Some(id) if valid_name(id) => id.clone(),
            Some(id) => return Err(Error::InvalidId(id.clone())),
            None => uuid_v4(),
        };
        if !self.store.tenants()?.iter().any(|t| t.name == tenant) {
            return Err(Error::NoTenant(tenant.to_string()));
        }
        if !(1..=64).contains(&req.vcpus) {
            return Err(Error::Invalid(format!("vcpus {}: 1 to 64", req.vcpus)));
        }
        let memory = req.memory.bytes();
        if memory == 0 || !memory.is_multiple_of(2 << 20) || memory > host_memory() {
            return Err(Error::Invalid(format!(
                "memory {}: a non-zero multiple of 2 MiB, at most the host's {}",
                req.memory,
                size::ByteSize(host_memory())
            )));
        }
        if let Some(c) = &req.cmdline {
            if c.len() > 4096 || c.contains('\0') {
                return Err(Error::Invalid("cmdline: at most 4096 bytes, no NUL".into()));
            }
        }
        for (i, v) in req.volumes.iter().enumerate() {
            if req.volumes[..i].iter().any(|w| w.name == v.name) {
                return Err(Error::Invalid(format!("volume {} is listed twice", v.name)));
            }
        }
        let spec = VmSpec {
            vcpus: req.vcpus,
            memory_bytes: req.memory.bytes(),
            kernel: req.kernel.clone(),
            initrd: req.initrd.clone(),
            cmdline: req.cmdline.clone(),
            volumes: req.volumes.clone(),
            restart_policy: req.restart_policy,
        };
        let lock = self.lock(&key(tenant, &id));
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.store.vm(tenant, &id)? {
            if existing.spec == spec {
                return Ok((self.view(&existing), false));
            }
            return Err(Error::Exists(id));
        }
        let kernel = self.image("kernel", &spec.kernel)?;
        if !is_kernel(&kernel) {
            return Err(Error::Invalid(format!(
                "kernel {:?}: not a kernel (neither an ELF vmlinux nor a bzImage)",
                spec.kernel
            )));
        }
        let initrd = spec
            .initrd
            .as_ref()
            .map(|i| self.image("initrd", i))
            .transpose()?;
        if self.jail.is_some() {
            self.readable_by_vms(&kernel, initrd.as_deref())?;
        }
        self.volume_sockets(tenant, &spec)?;
        let record = VmRecord {
            tenant: tenant.to_string(),
            id: id.clone(),
            spec,
            want_running: req.start,
            pid: None,
            started_unix: None,
            restarts: 0,
            recent_restarts_unix: Vec::new(),
            last_exit: None,
            state: if req.start { "launching" } else { "stopped" }.into(),
            uid: None,
        };
        // The record, and with it the volumes' attachment, in one transaction that checks that
        // no other VM has them.
        match self.store.insert_vm(&record)? {
            store::Inserted::Yes => {}
            store::Inserted::Exists => return Err(Error::Exists(id)),
            store::Inserted::NoVolume(v) => return Err(Error::Invalid(format!("no volume {v}"))),
            store::Inserted::VolumeTaken { volume, vm } => {
                return Err(Error::VolumeInUse { volume, vm })
            }
        }
        let record = if req.start {
            match self.launch(record.clone()) {
                Ok(r) => r,
                Err(e) => {
                    // Nothing half-made: no record of a VM that never started, its volumes
                    // root's again.
                    if let Ok(Some(r)) = self.store.vm(tenant, &id) {
                        self.release_disks(&r);
                    }
                    let _ = self.store.remove_vm(tenant, &id);
                    let _ = std::fs::remove_dir_all(self.files(tenant, &id).dir());
                    return Err(e);
                }
            }
        } else {
            record
        };
        Ok((self.view(&record), true))
    }

    /// The spec's volumes, each one of the tenant's: its name in storaged, its vhost-user
    /// socket, whether the VM has it read-only.
    fn volume_sockets(&self, tenant: &str, spec: &VmSpec) -> Result<Vec<Disk>, Error> {
        let mut disks = Vec::new();
        for v in &spec.volumes {
            let record = match self.store.volume(tenant, &v.name)? {
                Some(r) if r.created => r,
                _ => return Err(Error::Invalid(format!("no volume {}", v.name))),
            };
            let info = self
                .storaged
                .volume(&record.storaged_name)
                .map_err(crate::volumes::Error::from)?;
            disks.push(Disk {
                storaged_name: record.storaged_name,
                socket: info.socket,
                read_only: v.read_only,
                owner: info.owner,
            });
        }
        Ok(disks)
    }

    /// Gives each of `disks` to `owner` in storaged (its socket served to that uid only),
    /// where it is not already.
    fn give_disks(&self, disks: &[Disk], owner: &storaged_api::Owner) -> Result<(), Error> {
        for d in disks.iter().filter(|d| d.owner.as_ref() != Some(owner)) {
            let update = storaged_api::UpdateVolume {
                owner: Some(Some(owner.clone())),
                ..Default::default()
            };
            self.storaged
                .update_volume(&d.storaged_name, &update)
                .map_err(crate::volumes::Error::from)?;
        }
        Ok(())
    }

    /// `Ok` when a jailed vmm, running as a uid of its own, can read the kernel and initrd.
    fn readable_by_vms(&self, kernel: &Path, initrd: Option<&Path>) -> Result<(), Error> {
        for (what, f) in [("kernel", Some(kernel)), ("initrd", initrd)] {
            if let Some(f) = f {
                readable_by_others(f).map_err(|reason| {
                    Error::Invalid(format!(
                        "{what} {:?}: {reason}",
                        f.file_name().unwrap_or_default()
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Gives the volumes of a VM that is going back to root in storaged (served to the agent
    /// only), logging a volume it cannot.
    fn release_disks(&self, r: &VmRecord) {
        let root = storaged_api::Owner {
            uid: 0,
            vm_id: None,
        };
        match self.volume_sockets(&r.tenant, &r.spec) {
            Ok(disks) => {
                if let Err(e) = self.give_disks(&disks, &root) {
                    tracing::warn!(vm = %r.id, "cannot give its volumes back to root: {}", crate::error_chain(&e));
                }
            }
            Err(e) => {
                tracing::warn!(vm = %r.id, "cannot find its volumes: {}", crate::error_chain(&e))
            }
        }
    }

    /// Starts `record`'s vmm and its watch; returns the record as saved (running). The caller
    /// holds the VM's lock. The record says `launching` before the spawn: an agent that dies
    /// between the spawn and the next write finds the vmm again at start by its API socket.
    fn launch(self: &Arc<Self>, mut record: VmRecord) -> Result<VmRecord, Error> {
        let spec = record.spec.clone();
        let kernel = self.image("kernel", &spec.kernel)?;
        let initrd = spec
            .initrd
            .as_ref()
            .map(|i| self.image("initrd", i))
            .transpose()?;
        let disks = self.volume_sockets(&record.tenant, &spec)?;
        let files = self.files(&record.tenant, &record.id);
        let dir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Dir { path, source }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(files.dir())
                .map_err(dir_err(files.dir()))?;
        }
        let api = files.api();
        let log = std::fs::File::create(files.log()).map_err(dir_err(files.dir()))?;
        let log2 = log.try_clone().map_err(dir_err(files.dir()))?;
        // Jailed: its uid, cgroups and jail, entered between fork and exec.
        let cgroup_name = host_name(&record.tenant, &record.id);
        // Until the spawn: a launch that fails leaves no cgroup behind.
        let mut made_cgroups = CgroupsMade(None, &cgroup_name);
        let mut procs = Vec::new();
        // The jail is made anew: the run before's last console output goes into the new
        // console, so that a crash's last words stay readable after its restart.
        let previous = self.console_of(&record, CONSOLE_KEPT).unwrap_or_default();
        let (jailed, inside) = match &self.jail {
            Some(j) => {
                let uid = match record.uid {
                    Some(uid) => uid,
                    None => self
                        .store
                        .assign_uid(&record.tenant, &record.id, j.uid_base)?
                        .ok_or_else(|| Error::NotFound(record.id.clone()))?,
                };
                record.uid = Some(uid);
                self.readable_by_vms(&kernel, initrd.as_deref())?;
                procs = j
                    .cgroups
                    .prepare(&cgroup_name, spec.memory_bytes, spec.vcpus)?;
                made_cgroups.0 = Some(&j.cgroups);
                let sockets: Vec<PathBuf> = disks.iter().map(|d| d.socket.clone()).collect();
                let contents = jail::Contents {
                    kernel: &kernel,
                    initrd: initrd.as_deref(),
                    disks: &sockets,
                    seccomp_filter: self.seccomp_filter.as_deref(),
                };
                let (jail, inside) = jail::prepare(
                    &files.jail(),
                    uid,
                    spec.vcpus,
                    &self.vmm,
                    &j.libraries,
                    &contents,
                    cgroups::raw(&procs),
                )?;
                (Some(jail), inside)
            }
            None => {
                use std::os::unix::fs::DirBuilderExt;
                // Made anew: nothing a vmm before it (jailed, as another uid) left in run/
                // is followed by this one, which runs as root.
                match std::fs::remove_dir_all(files.jail()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(dir_err(&files.jail())(e))
                    }
                    _ => {}
                }
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(files.run())
                    .map_err(dir_err(&files.run()))?;
                let inside = jail::Inside {
                    program: self.vmm.clone(),
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    disks: disks.iter().map(|d| d.socket.clone()).collect(),
                    api_sock: api.clone(),
                    serial: files.console(),
                    seccomp_filter: self.seccomp_filter.clone(),
                };
                (None, inside)
            }
        };
        if !previous.is_empty() {
            carry_console(&files.console(), &previous, record.uid)
                .map_err(dir_err(&files.run()))?;
        }
        let owner = storaged_api::Owner {
            uid: record.uid.unwrap_or(0),
            vm_id: Some(record.id.clone()),
        };
        self.give_disks(&disks, &owner)?;
        let mut cmd = std::process::Command::new(&inside.program);
        cmd.arg("--kernel")
            .arg(&inside.kernel)
            .args(["--vcpus", &spec.vcpus.to_string()])
            .args(["--memory", &spec.memory_bytes.to_string()])
            .arg("--serial")
            .arg(&inside.serial)
            .args(["--serial-log-max", &CONSOLE_MAX.to_string()])
            .arg("--api-sock")
            .arg(&inside.api_sock);
        if let Some(i) = &inside.initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(f) = &inside.seccomp_filter {
            cmd.arg("--seccomp-filter").arg(f);
        }
        if let Some(c) = &spec.cmdline {
            // One argument: a command line that starts with "--" is still the value.
            cmd.arg(format!("--cmdline={c}"));
        }
        for (socket, d) in inside.disks.iter().zip(&disks) {
            let ro = if d.read_only { ",readonly" } else { "" };
            cmd.arg("--disk")
                .arg(format!("socket={}{ro}", socket.display()));
        }
        {
            use std::os::unix::process::CommandExt;
            // A group of its own: a signal to the agent's group (a terminal's ^C) is not its.
            cmd.process_group(0);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(jail) = jailed {
            use std::os::unix::process::CommandExt;
            // Nothing of the agent's environment but how vmm logs (no RUST_BACKTRACE: a
            // backtrace opens files, which the seccomp filters refuse).
            cmd.env_clear();
            if let Some(v) = std::env::var_os("RUST_LOG") {
                cmd.env("RUST_LOG", v);
            }
            // SAFETY: the hook runs in the child between fork and exec; Jail::enter only makes
            // system calls on strings and descriptors the parent made (and keeps until the
            // spawn returns): no allocation, no lock.
            unsafe {
                cmd.pre_exec(move || jail.enter());
            }
        }
        record.state = "launching".into();
        self.store.put_vm(&record)?;
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            path: self.vmm.clone(),
            source,
        })?;
        drop(procs);
        let pid = child.id();
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(source) => {
                // Not to be left running unwatched.
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Spawn {
                    path: self.vmm.clone(),
                    source,
                });
            }
        };
        // Reaped through its pidfd, not through `child`; its cgroups go at its end.
        drop(child);
        made_cgroups.0 = None;
        record.pid = Some(pid);
        record.started_unix = Some(now_unix());
        record.state = "running".into();
        // Watched before the record is written: whatever happens next, its end is seen.
        self.watch(&record, pidfd, true);
        if let Err(e) = self.store.put_vm(&record) {
            // It runs and is watched: its end is recorded (the record says launching).
            tracing::error!(vm = %record.id, "cannot record the VM as running: {}", crate::error_chain(&e));
        }
        tracing::info!(tenant = %record.tenant, vm = %record.id, pid, uid = ?record.uid, "vm started");
        self.metrics.launches.inc();
        let (metrics, launched) = (self.metrics.clone(), Instant::now());
        let owners = Self::owners(&record);
        self.runtime.spawn(async move {
            // The launch is done when vmm's API answers (a vmm that ends first is not). A
            // blocking connect, bounded, off the runtime's threads.
            while launched.elapsed() < Duration::from_secs(10) {
                let (api, owners) = (api.clone(), owners);
                let answers = tokio::task::spawn_blocking(move || {
                    sys::SocketRef::open(&api, &owners).is_ok_and(|s| {
                        unix_http::connect(&s.path(), Duration::from_millis(100)).is_ok()
                    })
                })
                .await
                .unwrap_or(false);
                if answers {
                    metrics
                        .launch_seconds
                        .observe(launched.elapsed().as_secs_f64());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        Ok(record)
    }

    /// Watches the vmm behind `pidfd` until it ends (`child`: this agent started it).
    fn watch(self: &Arc<Self>, record: &VmRecord, pidfd: OwnedFd, child: bool) {
        let k = key(&record.tenant, &record.id);
        let pidfd = Arc::new(pidfd);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k.clone(), pidfd.clone());
        let me = self.clone();
        let (tenant, id) = (record.tenant.clone(), record.id.clone());
        let pid = record.pid;
        self.runtime.spawn(async move {
            // SAFETY: ArcFd holds an Arc of the pidfd, so the descriptor stays open and the
            // same for as long as the AsyncFd that owns the ArcFd lives.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    ArcFd(pidfd.clone()),
                    tokio::io::Interest::READABLE,
                )
            };
            let ended = match registered {
                Ok(afd) => afd.readable().await.map(|_| ()),
                Err(e) => Err(std::io::Error::from(e)),
            };
            if let Err(e) = ended {
                // Not to be lost: a blocking wait for its end, on a thread of its own.
                tracing::warn!(vm = %id, "cannot watch the vmm by pidfd ({e}): polling it");
                let fd = pidfd.clone();
                let _ = tokio::task::spawn_blocking(move || loop {
                    if !matches!(sys::reap(&fd), Ok(None)) && !sys::alive(&fd) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                })
                .await;
            }
            let exit = if child {
                sys::reap(&pidfd).ok().flatten()
            } else {
                None
            };
            let me2 = me.clone();
            let r = tokio::task::spawn_blocking(move || {
                let lock = me2.lock(&k);
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                {
                    // Only this process's entry: a newer vmm of the VM is not this one.
                    let mut running = me2.running.lock().unwrap_or_else(|p| p.into_inner());
                    if running.get(&k).is_some_and(|fd| Arc::ptr_eq(fd, &pidfd)) {
                        running.remove(&k);
                    }
                }
                me2.ended(&tenant, &id, pid, exit)
            })
            .await;
            if let Ok(Some((record, backoff))) = r {
                tokio::time::sleep(backoff).await;
                let _ = tokio::task::spawn_blocking(move || me.restart_after_backoff(record)).await;
            }
        });
    }

    /// A VM's vmm (`pid`) ended (`exit`: its code or signal, when it was this agent's child):
    /// records how, and returns the record and the backoff if it is to start again. The caller
    /// holds the VM's lock. The end of a process the record no longer names (a deleted VM,
    /// one started again since) changes nothing.
    fn ended(
        &self,
        tenant: &str,
        id: &str,
        pid: Option<u32>,
        exit: Option<ChildExit>,
    ) -> Option<(VmRecord, Duration)> {
        let mut record = match self.store.vm(tenant, id) {
            Ok(Some(r)) if r.pid == pid => r,
            _ => return None,
        };
        let last = last_exit(exit, &self.files(tenant, id).log());
        if let Some(j) = &self.jail {
            j.cgroups.remove(&host_name(tenant, id));
        }
        self.metrics
            .ends
            .with_label_values(&[if last.failure { "true" } else { "false" }])
            .inc();
        tracing::info!(tenant, vm = id, code = ?last.code, signal = ?last.signal, meaning = %last.meaning, "vm ended");
        record.pid = None;
        record.started_unix = None;
        let restart = record.want_running
            && match record.spec.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => last.failure,
                RestartPolicy::Never => false,
            };
        record.last_exit = Some(last);
        let mut backoff = None;
        if !restart {
            record.want_running = false;
            record.state = "stopped".into();
        } else {
            // The restarts in the window, kept in the record: an agent restart does not
            // reset the cap.
            let now = now_unix();
            let recent = &mut record.recent_restarts_unix;
            recent.retain(|t| now.saturating_sub(*t) <= RESTART_WINDOW.as_secs());
            if recent.len() >= RESTART_CAP {
                tracing::warn!(
                    tenant,
                    vm = id,
                    restarts = recent.len(),
                    "vm ended too often: left failed"
                );
                record.want_running = false;
                record.state = "failed".into();
            } else {
                let b = Duration::from_secs(1 << recent.len().min(5)).min(MAX_BACKOFF);
                recent.push(now);
                record.state = "restarting".into();
                backoff = Some(b);
                tracing::info!(
                    tenant,
                    vm = id,
                    backoff_ms = b.as_millis() as u64,
                    "vm to start again"
                );
            }
        }
        if let Err(e) = self.store.put_vm(&record) {
            tracing::error!(
                vm = id,
                "cannot record the VM's end: {}",
                crate::error_chain(&e)
            );
        }
        backoff.map(|b| (record, b))
    }

    /// After its backoff: starts the VM again unless a call stopped it meanwhile.
    fn restart_after_backoff(self: &Arc<Self>, record: VmRecord) {
        let lock = self.lock(&key(&record.tenant, &record.id));
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.restart_locked(record);
    }

    /// [`restart_after_backoff`](Self::restart_after_backoff), the VM's lock held.
    fn restart_locked(self: &Arc<Self>, record: VmRecord) {
        let current = match self.store.vm(&record.tenant, &record.id) {
            Ok(Some(r)) => r,
            _ => return,
        };
        if !current.want_running || current.state != "restarting" {
            return;
        }
        let mut next = current;
        next.restarts += 1;
        self.metrics.restarts.inc();
        if let Err(e) = self.launch(next.clone()) {
            tracing::error!(vm = %next.id, "cannot start the VM again: {}", crate::error_chain(&e));
            next.want_running = false;
            next.state = "failed".into();
            let _ = self.store.put_vm(&next);
        }
    }

    fn get_record(&self, tenant: &str, id: &str) -> Result<VmRecord, Error> {
        self.store
            .vm(tenant, id)?
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    pub fn get(&self, tenant: &str, id: &str) -> Result<Vm, Error> {
        Ok(self.view(&self.get_record(tenant, id)?))
    }

    pub fn list(&self, tenant: Option<&str>) -> Result<Vec<Vm>, Error> {
        Ok(self
            .store
            .vms(tenant)?
            .iter()
            .map(|r| self.view(r))
            .collect())
    }

    /// Starts a VM that is not running (and forgets its restarts: the cap starts afresh).
    pub fn start(self: &Arc<Self>, tenant: &str, id: &str) -> Result<Vm, Error> {
        let lock = self.lock(&key(tenant, id));
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut record = self.get_record(tenant, id)?;
        if self.pidfd(&key(tenant, id)).is_some() {
            return Ok(self.view(&record));
        }
        record.recent_restarts_unix.clear();
        record.want_running = true;
        let record = self.launch(record)?;
        Ok(self.view(&record))
    }

    /// Marks the VM not to run (`stopping` while its vmm is there) and returns its record and
    /// its vmm's pidfd, under the VM's lock.
    fn halt(&self, tenant: &str, id: &str) -> Result<(VmRecord, Option<Arc<OwnedFd>>), Error> {
        let lock = self.lock(&key(tenant, id));
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut record = self.get_record(tenant, id)?;
        record.want_running = false;
        let pidfd = self.pidfd(&key(tenant, id));
        record.state = if pidfd.is_some() {
            "stopping"
        } else {
            "stopped"
        }
        .into();
        self.store.put_vm(&record)?;
        Ok((record, pidfd))
    }

    /// Stops a VM, which is not started again: its ACPI power button (vmm's API), and if the
    /// guest has not powered off within `timeout`, vmm's shutdown (the VM ends at once), and
    /// if vmm has not ended [`SHUTDOWN_GRACE`] later, SIGKILL. A vmm whose API cannot be
    /// reached (after a few tries: one just started may not answer yet) is killed at once.
    pub fn stop(self: &Arc<Self>, tenant: &str, id: &str, timeout: Duration) -> Result<Vm, Error> {
        let (record, pidfd) = self.halt(tenant, id)?;
        if let Some(pidfd) = pidfd {
            // Both later steps are set first, each on its own timer: a vmm whose API hangs
            // is still killed in time.
            let fd = pidfd.clone();
            self.runtime.spawn(async move {
                tokio::time::sleep(timeout + SHUTDOWN_GRACE).await;
                // Still the same process (its pidfd): past its time.
                let _ = sys::pidfd_signal(&fd, libc::SIGKILL);
            });
            let (fd, me, r) = (pidfd.clone(), self.clone(), record.clone());
            self.runtime.spawn(async move {
                tokio::time::sleep(timeout).await;
                if sys::alive(&fd) {
                    tracing::info!(vm = %r.id, "the guest did not power off in time: shutting its vmm down");
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Some((api, _socket)) = me.vmm_api(&r) {
                            let _ = api.shutdown();
                        }
                    })
                    .await;
                }
            });
            let deadline = Instant::now() + Duration::from_secs(3);
            let press = || match self.vmm_api(&record) {
                Some((api, _socket)) => api.power_button().map_err(|e| e.to_string()),
                None => Err("no API socket".to_string()),
            };
            let mut result = press();
            while result.is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                result = press();
            }
            match result {
                Ok(_) => tracing::info!(vm = id, ?timeout, "power button pressed"),
                Err(e) => {
                    tracing::warn!(
                        vm = id,
                        "vmm did not take the power button ({e}): killing it"
                    );
                    let _ = sys::pidfd_signal(&pidfd, libc::SIGKILL);
                }
            }
        }
        Ok(self.view(&record))
    }

    /// Kills a VM's vmm (SIGKILL); it is not started again.
    pub fn kill(&self, tenant: &str, id: &str) -> Result<Vm, Error> {
        let (record, pidfd) = self.halt(tenant, id)?;
        if let Some(pidfd) = pidfd {
            let _ = sys::pidfd_signal(&pidfd, libc::SIGKILL);
        }
        Ok(self.view(&record))
    }

    /// Waits until the VM's vmm has ended and its end is recorded, at most `timeout`.
    fn wait_ended(&self, tenant: &str, id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let stopped = self.pidfd(&key(tenant, id)).is_none()
                && self
                    .store
                    .vm(tenant, id)
                    .ok()
                    .flatten()
                    .is_none_or(|r| r.state != "stopping");
            if stopped {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops a VM (as [`stop`](Self::stop)) and starts it again.
    pub fn restart(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<Vm, Error> {
        self.stop(tenant, id, timeout)?;
        let most = timeout + SHUTDOWN_GRACE + Duration::from_secs(2);
        if !self.wait_ended(tenant, id, most) {
            return Err(Error::Invalid(format!(
                "VM {id} did not end within {most:?} of its stop; not started again"
            )));
        }
        self.start(tenant, id)
    }

    /// Kills a VM's vmm and forgets the VM: its record (and with it its volumes'
    /// attachment) and its files, once the vmm has ended.
    pub fn delete(&self, tenant: &str, id: &str) -> Result<(), Error> {
        self.kill(tenant, id)?;
        if !self.wait_ended(tenant, id, Duration::from_secs(10)) {
            return Err(Error::Invalid(format!(
                "VM {id}: its vmm did not end after SIGKILL; not deleted"
            )));
        }
        let lock = self.lock(&key(tenant, id));
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.pidfd(&key(tenant, id)).is_some() {
            // A start between the kill and the lock: that vmm is not left without its VM.
            return Err(Error::Busy(format!(
                "VM {id} was started again while it was being deleted; not deleted"
            )));
        }
        let record = self.get_record(tenant, id)?;
        self.release_disks(&record);
        self.store.remove_vm(tenant, id)?;
        let _ = std::fs::remove_dir_all(self.files(tenant, id).dir());
        Ok(())
    }

    /// The tail of a VM's serial console: its last `max` bytes.
    pub fn console(&self, tenant: &str, id: &str, max: u64) -> Result<Vec<u8>, Error> {
        let record = self.get_record(tenant, id)?;
        Ok(self.console_of(&record, max).unwrap_or_default())
    }

    /// The last `max` bytes of VM `r`'s console file. The VM's uid owns its directory: no
    /// symlink followed, no FIFO waited on, a regular file of that uid or root only.
    fn console_of(&self, r: &VmRecord, max: u64) -> Option<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.files(&r.tenant, &r.id).console();
        let mut f = sys::open_own_file(&path, &Self::owners(r)).ok()?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
        let mut out = Vec::new();
        // At most `max`: the file grows while it is read, as far as the vmm likes.
        let _ = f.take(max).read_to_end(&mut out);
        Some(out)
    }

    /// At start: finds every VM's vmm again, watching it; a VM whose vmm ended while the
    /// agent was away is handled as any end (its policy may start it again), and one left in
    /// its backoff, or before its first launch, is started.
    ///
    /// A VM's vmm is the process that serves its API socket (in the VM's own directory): its
    /// pid is the socket's peer credential, and (jailed) the process runs as the VM's uid in
    /// the VM's cgroup. The credential is the pid of the process that listened, which may
    /// have ended and its pid gone to another process: the uid and cgroup, read while the
    /// pidfd shows the process alive, rule that out. Neither a pid the record names (another
    /// process by now, after a reboot or a pid's reuse) nor a vmm the agent died too early to
    /// record can mislead it.
    pub fn adopt(self: &Arc<Self>) -> Result<(), Error> {
        for record in self.store.vms(None)? {
            let k = key(&record.tenant, &record.id);
            let lock = self.lock(&k);
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            let peer = || {
                let socket = sys::SocketRef::open(
                    &self.files(&record.tenant, &record.id).api(),
                    &Self::owners(&record),
                )
                .ok()?;
                sys::socket_peer_pid(&socket.path())
            };
            let found = peer()
                .and_then(|pid| sys::pidfd_open(pid).ok().map(|fd| (pid, fd)))
                .filter(|(pid, fd)| self.is_vmm_of(&record, *pid, fd))
                // The same process once its pidfd is held: no pid reuse in between.
                .filter(|(pid, _)| peer() == Some(*pid));
            match found {
                Some((pid, pidfd)) => {
                    tracing::info!(tenant = %record.tenant, vm = %record.id, pid, "vm found running: watching it again");
                    let mut r = record;
                    r.pid = Some(pid);
                    r.started_unix = r.started_unix.or(Some(now_unix()));
                    if r.state != "stopping" {
                        r.state = "running".into();
                    }
                    self.watch(&r, pidfd, false);
                    self.store.put_vm(&r)?;
                }
                None if record.pid.is_some()
                    || matches!(record.state.as_str(), "launching" | "stopping") =>
                {
                    tracing::info!(tenant = %record.tenant, vm = %record.id, "vm ended while the agent was away");
                    if let Some((r, _)) = self.ended(&record.tenant, &record.id, record.pid, None) {
                        self.restart_locked(r);
                    }
                }
                None if record.want_running && record.state == "restarting" => {
                    self.restart_locked(record);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Whether process `pid` (held by `pidfd`) is VM `r`'s vmm: jailed, it runs as the VM's
    /// uid in the VM's cgroup (what a process of another uid, or of no VM, cannot be); read
    /// from `/proc` while the pidfd shows it alive, so the pid is still its.
    fn is_vmm_of(&self, r: &VmRecord, pid: u32, pidfd: &OwnedFd) -> bool {
        let Some(j) = &self.jail else {
            return sys::alive(pidfd);
        };
        let ours = r.uid.is_some()
            && sys::process_uid(pid) == r.uid
            && j.cgroups.holds(&host_name(&r.tenant, &r.id), pid);
        ours && sys::alive(pidfd)
    }

    /// Each running VM's counters, from its vmm's API (a vmm that does not answer is left
    /// out).
    pub fn counters(&self) -> Vec<(Vm, vmm_api::Counters)> {
        let Ok(records) = self.store.vms(None) else {
            return Vec::new();
        };
        records
            .iter()
            .filter(|r| self.pidfd(&key(&r.tenant, &r.id)).is_some())
            .filter_map(|r| {
                let (api, _socket) = self.vmm_api(r)?;
                api.counters().ok().map(|c| (self.view(r), c))
            })
            .collect()
    }

    fn view(&self, r: &VmRecord) -> Vm {
        Vm {
            id: r.id.clone(),
            tenant: r.tenant.clone(),
            state: r.state.clone(),
            pid: r.pid,
            uid: r.uid,
            uptime_seconds: r.started_unix.map(|t| now_unix().saturating_sub(t)),
            restarts: r.restarts,
            last_exit: r.last_exit.clone(),
            vcpus: r.spec.vcpus,
            memory: size::ByteSize(r.spec.memory_bytes).to_string(),
            kernel: r.spec.kernel.clone(),
            initrd: r.spec.initrd.clone(),
            cmdline: r.spec.cmdline.clone(),
            volumes: r.spec.volumes.clone(),
            restart_policy: r.spec.restart_policy,
        }
    }
}

/// Whether `path` starts as a kernel vmm boots: an ELF executable (`e_type` ET_EXEC), or a
/// bzImage (its setup header's "HdrS" at 0x202).
fn is_kernel(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    let n = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        })
        .unwrap_or(0);
    let elf_exec = n >= 18 && head[..4] == *b"\x7fELF" && head[16..18] == [2, 0];
    elf_exec || (n >= 0x206 && head[0x202..0x206] == *b"HdrS")
}

/// The host's memory (`MemTotal` of /proc/meminfo), in bytes; a VM may have at most that.
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(u64::MAX)
}

/// Starts the console file at `path` (in a new, empty `run/`) with `bytes`, the run before's
/// last output, owned by `uid` (root's unjailed), for vmm to append to.
fn carry_console(path: &Path, bytes: &[u8], uid: Option<u32>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(bytes)?;
    if let Some(uid) = uid {
        std::os::unix::fs::fchown(&f, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// A VM's cgroups made by a launch that has not spawned its vmm yet: removed when dropped
/// while it still names them.
struct CgroupsMade<'a>(Option<&'a Cgroups>, &'a str);

impl Drop for CgroupsMade<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            c.remove(self.1);
        }
    }
}

/// One of a VM's volumes, as its launch needs it.
struct Disk {
    storaged_name: String,
    socket: PathBuf,
    read_only: bool,
    /// Whom storaged serves it to now.
    owner: Option<storaged_api::Owner>,
}

/// `Ok` when others than the file's owner and group may read `path` (as a jailed vmm's uid
/// must), else why not (a tenant's answer: the catalog's path is not in it).
fn readable_by_others(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    if mode & 0o004 == 0 {
        return Err(format!(
            "mode {:o}: a jailed vmm runs as a uid of its own and cannot read it (make it readable by others, 0644)",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// A shared pidfd, for `AsyncFd`.
struct ArcFd(Arc<OwnedFd>);

impl std::os::fd::AsRawFd for ArcFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// How a vmm ended: from its reaped status, or (not this agent's child) from its log.
fn last_exit(exit: Option<ChildExit>, log: &Path) -> LastExit {
    let (code, signal) = match exit {
        Some(ChildExit::Code(c)) => (Some(c), None),
        Some(ChildExit::Signal(s)) => (None, Some(s)),
        None => (code_in_log(log), None),
    };
    let meaning = match (code, signal, exit) {
        (Some(c), _, _) => ProcessExit::from_code(c)
            .map(ProcessExit::meaning)
            .unwrap_or_else(|| format!("exit code {c}")),
        (None, Some(s), _) => ProcessExit::Signal(s).meaning(),
        (None, None, _) => {
            "ended while the agent was not its parent, and its log does not say how (killed?)"
                .into()
        }
    };
    LastExit {
        code,
        signal,
        failure: code != Some(0),
        meaning,
        at_unix: now_unix(),
    }
}

/// The exit code vmm's log gives in its last line that gives one (`code=N`).
fn code_in_log(log: &Path) -> Option<i32> {
    use std::io::{Read, Seek, SeekFrom};
    // Its last 64 KiB: the end is there, and the log is as long as the vmm made it.
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).ok()?;
    let mut bytes = Vec::new();
    f.take(64 << 10).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    text.lines().rev().find_map(|l| {
        let rest = l.split(" code=").nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// A random id: a UUID v4 in its usual form.
fn uuid_v4() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    // The system's generator does not fail on Linux; were it to, the id would still be
    // unique enough for one tenant's VMs (the time), and a clash is refused by the create.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b[..8].copy_from_slice(&now_unix().to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_read_from_vmms_log_is_its_last_code() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(
            &log,
            "INFO vmm: started\nINFO vmm::launch: VM ended exit=PowerOff code=0\n",
        )
        .unwrap();
        let e = last_exit(None, &log);
        assert_eq!((e.code, e.failure), (Some(0), false));
        std::fs::write(&log, "INFO vmm: started\n").unwrap();
        let e = last_exit(None, &log);
        assert_eq!((e.code, e.failure), (None, true));
        let e = last_exit(Some(ChildExit::Signal(9)), &log);
        assert_eq!((e.signal, e.failure), (Some(9), true));
        let e = last_exit(Some(ChildExit::Code(3)), &log);
        assert!(e.meaning.contains("crashed"), "{}", e.meaning);
    }

    #[test]
    fn an_elf_and_a_bzimage_are_kernels_and_a_text_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[16] = 2;
        std::fs::write(&elf, &e).unwrap();
        let object = dir.path().join("spin.o");
        e[16] = 1;
        std::fs::write(&object, &e).unwrap();
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzimage = dir.path().join("bzImage");
        std::fs::write(&bzimage, &bz).unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"hello").unwrap();
        assert!(is_kernel(&elf) && is_kernel(&bzimage));
        assert!(!is_kernel(&text) && !is_kernel(&object));
    }

    #[test]
    fn ids_are_uuids_and_valid_names() {
        let a = uuid_v4();
        assert_eq!(a.len(), 36);
        assert!(valid_name(&a));
        assert_ne!(a, uuid_v4());
    }
}
