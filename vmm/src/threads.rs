//! Every thread vmm starts is started by [`spawn`], which is told its [`ThreadKind`]: the one
//! place that knows what each thread of the process is. [`spawn`] names the thread, starts
//! it, and the thread installs its kind's seccomp filter ([`crate::seccomp`]) before it runs
//! anything else; one that cannot ends the process (exit code 1: vmm failed) rather than run
//! unfiltered.
//!
//! The kinds, and what each thread does:
//!
//! - [`ThreadKind::Main`]: the process's own thread (not spawned): sets the VM up, starts the
//!   others, then waits for the VM's end on the exit eventfd and the signalfd.
//! - [`ThreadKind::Vcpu`]: one per vCPU (`vcpuN`), in `KVM_RUN`; serves port and MMIO exits.
//! - [`ThreadKind::Api`]: the HTTP API (`api`), a tokio runtime of its own on the API socket.
//! - [`ThreadKind::Console`]: the serial console's writer (`console`), writes to stdout or the
//!   serial log file.
//! - [`ThreadKind::Device`]: a device's own channel; today each disk's vhost-user backend
//!   request channel (`disk-cfg`).

use std::io;
use std::thread::JoinHandle;

/// What a thread of vmm is (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Main,
    Vcpu,
    Api,
    Console,
    Device,
}

/// Starts `f` on a new thread named `name`, of kind `kind`.
pub fn spawn<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    debug_assert_ne!(
        kind,
        ThreadKind::Main,
        "the main thread is the process's own"
    );
    let name = name.into();
    tracing::trace!(?kind, thread = %name, "starting thread");
    std::thread::Builder::new().name(name).spawn(move || {
        if let Err(e) = crate::seccomp::apply(kind) {
            eprintln!("vmm: {}", crate::error_chain(&e));
            std::process::exit(i32::from(crate::exit::ProcessExit::Failed.code()));
        }
        f()
    })
}
