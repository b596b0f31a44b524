//! vmm's API as types: the body of `PUT /v1/vm/config` ([`VmConfig`], its disks as typed
//! values), what `GET /v1/vm` shows ([`VmStatus`]), the answers of the state changes
//! ([`Transition`]), `GET /v1/vm/counters` ([`Counters`], vCPU exits by [`ExitKind`]) and the
//! exit codes of the process ([`ProcessExit`]). vmm parses into and answers with these; the
//! tests and the node agent read them, through [`VmmClient`] on the API socket.
//! `vmm/openapi.yaml` describes the same API.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
pub use size::ByteSize;

pub mod client;

pub use client::VmmClient;

/// A vhost-user-blk disk: `{"socket": "/run/storaged/db1.sock", "read_only": false}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub socket: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// `PUT /v1/vm/config`: the command line's options, as JSON, checked as the command line is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest memory [default: 512MiB].
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// "stdout" or a file path.
    #[serde(default = "default_serial")]
    pub serial: String,
    /// As `--serial-log-max` (a serial log file only) [default: 16MiB].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log_max: Option<ByteSize>,
    #[serde(default)]
    pub disks: Vec<Disk>,
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1".into()
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> ByteSize {
    ByteSize(512 << 20)
}
fn default_serial() -> String {
    "stdout".into()
}

/// Where the VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Waiting for `PUT /v1/vm/config` and `POST /v1/vm/start`.
    NotStarted,
    /// `POST /v1/vm/start` was accepted.
    Starting,
    Running,
    Paused,
    /// `POST /v1/vm/shutdown` or `/kill` was accepted.
    Stopping,
}

/// A checked configuration, as `GET /v1/vm` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub disks: Vec<Disk>,
}

/// `GET /v1/vm` and `PUT /v1/vm/config` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    /// Null before a configuration is given.
    pub config: Option<VmInfo>,
}

/// Answer of `POST /v1/vm/start|pause|resume|shutdown|kill`: the state the VM goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: VmState,
    /// The code the process will exit with (shutdown and kill).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// `GET /v1/vm/counters` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// vCPU exits by kind, every kind present.
    pub vcpu_exits: BTreeMap<ExitKind, u64>,
    pub disks: Vec<DiskCounters>,
}

/// One disk's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCounters {
    pub socket: PathBuf,
    /// The driver set the device up and the backend serves its queues.
    pub active: bool,
    /// The used ring's index in guest memory (null before the driver set the queue up).
    pub completed_requests_mod_65536: Option<u16>,
    /// Queue notifications that were not caught by the ioeventfd (normally 0).
    pub notifications_through_vmm: u64,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What the process exits with. [`ProcessExit::TABLE`] says it in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessExit {
    /// 0: the guest reset or powered off, or the API shut the VM down.
    Ended,
    /// 1: the VMM failed.
    Failed,
    /// 2: the configuration was refused before the guest started.
    Refused,
    /// 3: the guest crashed or KVM could not run it.
    Crashed,
    /// 4: the API killed the VM.
    Killed,
    /// 128 + N: stopped by signal N.
    Signal(i32),
}

impl ProcessExit {
    /// Each exit code and what it means, in order; `vmm --help` prints it and the README's
    /// list starts each item with it.
    pub const TABLE: [(&'static str, &'static str); 6] = [
        (
            "0",
            "the guest reset or powered off, or the API shut the VM down",
        ),
        ("1", "the VMM failed"),
        (
            "2",
            "the configuration was refused before the guest started",
        ),
        ("3", "the guest crashed or KVM could not run it"),
        ("4", "the API killed the VM"),
        ("128+N", "stopped by signal N (SIGTERM: 143)"),
    ];

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            ProcessExit::Ended => 0,
            ProcessExit::Failed => 1,
            ProcessExit::Refused => 2,
            ProcessExit::Crashed => 3,
            ProcessExit::Killed => 4,
            ProcessExit::Signal(n) => (128 + n) as u8,
        }
    }

    /// The exit of a process that exited with `code` (one killed by a signal has none: it is
    /// [`ProcessExit::Signal`]); `None` for a code vmm does not exit with.
    pub fn from_code(code: i32) -> Option<ProcessExit> {
        Some(match code {
            0 => ProcessExit::Ended,
            1 => ProcessExit::Failed,
            2 => ProcessExit::Refused,
            3 => ProcessExit::Crashed,
            4 => ProcessExit::Killed,
            129..=192 => ProcessExit::Signal(code - 128),
            _ => return None,
        })
    }

    /// What it means, in the words of [`ProcessExit::TABLE`].
    pub fn meaning(self) -> String {
        match self {
            ProcessExit::Signal(libc_sig::SIGSYS) => {
                "killed by SIGSYS: a system call outside its seccomp filter".into()
            }
            ProcessExit::Signal(libc_sig::SIGKILL) => "killed (SIGKILL)".into(),
            ProcessExit::Signal(n) => format!("stopped by signal {n}"),
            other => Self::TABLE[other.code() as usize].1.to_string(),
        }
    }

    /// [`ProcessExit::TABLE`] as `--help` text.
    pub fn help() -> String {
        let mut s = String::from("Exit codes:");
        for (code, what) in Self::TABLE {
            s.push_str(&format!("\n  {code:<7} {what}"));
        }
        s
    }
}

impl From<ProcessExit> for std::process::ExitCode {
    fn from(e: ProcessExit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// The signal numbers [`ProcessExit::meaning`] names (x86-64 Linux).
mod libc_sig {
    pub const SIGKILL: i32 = 9;
    pub const SIGSYS: i32 = 31;
}

/// The kinds of vCPU exit counted, in the order of their counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    /// `KVM_RUN` returned EINTR or EAGAIN: kicked (pause) or interrupted.
    Interrupted,
    /// A triple fault.
    Shutdown,
    /// Every other exit: those that end the VM (system events, internal errors, unhandled).
    Other,
}

impl ExitKind {
    /// Every kind, each at its [`ExitKind::index`].
    pub const ALL: [ExitKind; 8] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Interrupted,
        ExitKind::Shutdown,
        ExitKind::Other,
    ];

    /// Where the kind's counter is.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind's name in `GET /v1/vm/counters` (`vcpu_exits`).
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Shutdown => "shutdown",
            ExitKind::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_typed_values_and_unknown_fields_are_refused() {
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","memory":"1GB","disks":[{"socket":"/a.sock"},{"socket":"/b.sock","read_only":true}]}"#,
        )
        .unwrap();
        assert_eq!(c.memory, ByteSize(1_000_000_000));
        assert_eq!(
            c.disks,
            [
                Disk {
                    socket: "/a.sock".into(),
                    read_only: false
                },
                Disk {
                    socket: "/b.sock".into(),
                    read_only: true
                },
            ]
        );
        assert_eq!(c.vcpus, 1);
        assert!(
            serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","disks":["socket=/a"]}"#).is_err()
        );
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"kernel":"/k","disks":[{"socket":"/a","ro":true}]}"#
        )
        .is_err());
    }

    #[test]
    fn exit_kinds_are_counted_under_their_names() {
        for k in ExitKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }
}
