//! The seccomp filter of each thread kind, as Firecracker has one for its vmm, API and vCPU
//! threads: the system calls a thread of that kind makes once it is set up, and for `ioctl`
//! and `prctl` the requests; anything else kills the process (`SECCOMP_RET_KILL_PROCESS`:
//! it ends by SIGSYS, which its supervisor sees).
//!
//! Each thread installs its kind's filter itself: a spawned thread first thing in
//! [`crate::threads::spawn`], before its own code runs; the main thread once the VM is set
//! up, before any vCPU runs the guest (they wait for it), just before it waits for the VM's
//! end. A thread another one starts (the API's runtime threads) inherits its starter's
//! filter. Beside its kind's, each thread installs [`no_clone3`]: `clone3` fails, glibc falls
//! back to `clone`, and `clone` is allowed only for threads (`CLONE_THREAD`), so no filtered
//! thread starts a process.
//!
//! The threads share their memory: code that runs in one of them (a taken-over vmm) can make
//! another make its calls. What the process as a whole can do is the union of the kinds'
//! lists; the split keeps each kind's own code to what it needs, and the union is what a
//! jailed vmm is confined to.
//!
//! The filters are built in ([`built_in`]); `--seccomp-filter FILE` replaces them by a file in
//! seccompiler's JSON format with one filter per kind (`main`, `vcpu`, `api`, `console`,
//! `device`), and `--no-seccomp` leaves every thread unfiltered. They are compiled once, at
//! start, and kept in [`FILTERS`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use seccompiler::{
    BpfMap, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

use crate::threads::ThreadKind;

/// Errors building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot build the built-in seccomp filter of the {0:?} threads: {1}")]
    Build(ThreadKind, String),
    #[error("Cannot read the seccomp filter file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid seccomp filter file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("The seccomp filter file {path} has no filter {kind:?} (it needs main, vcpu, api, console and device)")]
    Missing { path: PathBuf, kind: &'static str },
    #[error("No seccomp filter for the {0:?} threads among the filters in use")]
    NoFilter(ThreadKind),
    #[error("Cannot install the seccomp filter of the {0:?} threads")]
    Apply(ThreadKind, #[source] seccompiler::Error),
}

/// The filters every thread installs: set once at start (`None`: `--no-seccomp`).
pub static FILTERS: OnceLock<Option<Filters>> = OnceLock::new();

/// One compiled filter per thread kind, and [`no_clone3`].
pub struct Filters {
    kinds: BTreeMap<&'static str, BpfProgram>,
    no_clone3: BpfProgram,
}

const KINDS: [(ThreadKind, &str); 5] = [
    (ThreadKind::Main, "main"),
    (ThreadKind::Vcpu, "vcpu"),
    (ThreadKind::Api, "api"),
    (ThreadKind::Console, "console"),
    (ThreadKind::Device, "device"),
];

fn name(kind: ThreadKind) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("main", |(_, n)| n)
}

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);

/// What every thread does whatever its kind: memory, locks, signals masks and returns,
/// time, its own end (or the process's), writing its log, closing what it owns, naming
/// itself (`prctl`, see [`rules`]).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_prctl,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// What each kind does besides [`COMMON`].
fn own(kind: ThreadKind) -> &'static [i64] {
    match kind {
        // Waits for the end (eventfd, signalfd), then takes the VM down: the backends'
        // connections, the API socket's file.
        ThreadKind::Main => &[
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
        // KVM_RUN and the exits it serves: port and MMIO devices, a disk's vhost-user
        // messages, its eventfds.
        ThreadKind::Vcpu => &[
            libc::SYS_ioctl,
            libc::SYS_poll,
            libc::SYS_read,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
        ],
        // The HTTP API on its own runtime (which starts threads of its own), a configuration
        // put through it (the kernel, initrd and serial log opened and checked), pausing the
        // vCPUs (a signal to each vCPU thread).
        ThreadKind::Api => &[
            libc::SYS_accept4,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_wait,
            libc::SYS_eventfd2,
            libc::SYS_ioctl,
            libc::SYS_lseek,
            libc::SYS_newfstatat,
            libc::SYS_openat,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_socketpair,
            libc::SYS_statx,
        ],
        // The serial log: written, rotated (renamed, a new one opened).
        ThreadKind::Console => &[
            libc::SYS_fsync,
            libc::SYS_lseek,
            libc::SYS_newfstatat,
            libc::SYS_openat,
            libc::SYS_rename,
            libc::SYS_statx,
        ],
        // A disk backend's request channel.
        ThreadKind::Device => &[
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
        ],
    }
}

/// `arg` equals `value` (a 32-bit argument).
fn arg_is(arg: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// The rules a call of `kind` must match beyond its number: the requests of `ioctl` and
/// `prctl`; none for the others.
fn rules(kind: ThreadKind, syscall: i64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    match syscall {
        libc::SYS_prctl => Ok(vec![arg_is(0, libc::PR_SET_NAME as u64)?]),
        // Threads only, not processes ([`no_clone3`] makes glibc use clone, whose flags a
        // filter can read).
        libc::SYS_clone => Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?]),
        libc::SYS_ioctl if kind == ThreadKind::Vcpu => {
            [KVM_RUN(), KVM_GET_REGS(), KVM_SET_REGS(), KVM_GET_SREGS()]
                .into_iter()
                .map(|r| arg_is(1, r))
                .collect()
        }
        // The API's sockets: non-blocking mode.
        libc::SYS_ioctl => Ok(vec![arg_is(1, libc::FIONBIO)?]),
        _ => Ok(Vec::new()),
    }
}

/// The built-in filter of `kind`.
pub fn built_in(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let err = |e: seccompiler::BackendError| Error::Build(kind, e.to_string());
    let mut map = BTreeMap::new();
    for &syscall in COMMON.iter().chain(own(kind)) {
        map.insert(syscall, rules(kind, syscall).map_err(err)?);
    }
    let filter = SeccompFilter::new(
        map,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// A filter every thread installs beside its kind's: `clone3` fails with ENOSYS, so that
/// glibc starts threads with `clone`, whose flags (in a register, unlike `clone3`'s) the
/// kinds' filters check: a thread, never a process.
pub fn no_clone3() -> Result<BpfProgram, Error> {
    let err = |e: seccompiler::BackendError| Error::Build(ThreadKind::Main, e.to_string());
    let map = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)
}

impl Filters {
    /// The built-in filters.
    pub fn built_in() -> Result<Filters, Error> {
        let mut kinds = BTreeMap::new();
        for (kind, name) in KINDS {
            kinds.insert(name, built_in(kind)?);
        }
        Ok(Filters {
            kinds,
            no_clone3: no_clone3()?,
        })
    }

    /// The filters of a seccompiler JSON file, which must have one for each kind.
    pub fn from_file(path: &Path) -> Result<Filters, Error> {
        let file = std::fs::File::open(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut map: BpfMap =
            seccompiler::compile_from_json(file, TargetArch::x86_64).map_err(|e| {
                Error::Invalid {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }
            })?;
        let mut kinds = BTreeMap::new();
        for (_, name) in KINDS {
            let program = map.remove(name).ok_or(Error::Missing {
                path: path.to_owned(),
                kind: name,
            })?;
            kinds.insert(name, program);
        }
        Ok(Filters {
            kinds,
            no_clone3: no_clone3()?,
        })
    }
}

/// Installs `kind`'s filters on the calling thread, if there are filters (none before
/// [`FILTERS`] is set, as in unit tests, or with `--no-seccomp`). Once there are, a kind
/// without one is an error, not a thread left unfiltered.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let Some(Some(filters)) = FILTERS.get() else {
        return Ok(());
    };
    let program = filters
        .kinds
        .get(name(kind))
        .filter(|p| !p.is_empty())
        .ok_or(Error::NoFilter(kind))?;
    seccompiler::apply_filter(&filters.no_clone3).map_err(|e| Error::Apply(kind, e))?;
    seccompiler::apply_filter(program).map_err(|e| Error::Apply(kind, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_built_in_filter() {
        let f = Filters::built_in().unwrap();
        assert_eq!(f.kinds.len(), 5);
        assert!(f.kinds.values().all(|p| !p.is_empty()));
        assert!(!f.no_clone3.is_empty());
    }

    #[test]
    fn kvm_ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN(), 0xAE80);
        assert_eq!(KVM_GET_REGS(), 0x8090_AE81);
        assert_eq!(KVM_SET_REGS(), 0x4090_AE82);
        assert_eq!(KVM_GET_SREGS(), 0x8138_AE83);
    }

    #[test]
    fn a_filter_file_lacking_a_kind_is_refused_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        std::fs::write(
            &path,
            r#"{"main": {"mismatch_action": "kill_process", "match_action": "allow", "filter": [{"syscall": "write"}]}}"#,
        )
        .unwrap();
        let e = Filters::from_file(&path).err().unwrap();
        assert!(e.to_string().contains("no filter \"vcpu\""), "{e}");
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            Filters::from_file(&path),
            Err(Error::Invalid { .. })
        ));
    }
}
