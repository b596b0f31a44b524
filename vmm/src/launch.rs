//! The process, from its parsed command line to its exit code: logging; the seccomp filters
//! its threads install; the stop signals,
//! blocked before any thread starts so that only the signalfd gets them; the API, if asked
//! for; the VM's configuration, the command line's or (without `--kernel`) the API's
//! `PUT /v1/vm/config` and `POST /v1/vm/start`; the VM's run; and the [`ProcessExit`] it all
//! ends with. Errors are printed whole, on stderr.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{self, Command, Shared};
use crate::config::{self, VmConfig};
use crate::exit::{Exit, ProcessExit};
use crate::vm;

/// The command line, parsed (`vmm --help` says what each is).
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// None: the VM is configured and started through the API.
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub memory: &'a str,
    pub disks: &'a [String],
    pub serial: &'a str,
    pub serial_log_max: Option<&'a str>,
    pub api_sock: Option<&'a Path>,
    pub seccomp: Seccomp<'a>,
    /// The log filter (tracing syntax).
    pub log: &'a str,
}

/// Which seccomp filters the threads install.
#[derive(Clone, Copy, Debug)]
pub enum Seccomp<'a> {
    BuiltIn,
    /// A seccompiler JSON file's.
    File(&'a Path),
    /// None.
    Off,
}

/// Runs the VMM as `opts` say; `started` is when the process started, for the
/// time-to-first-instruction log line.
pub fn run(opts: &Options<'_>, started: Instant) -> ProcessExit {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(opts.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before any thread exists, so that every thread finds its filter.
    let filters = match opts.seccomp {
        Seccomp::Off => Ok(None),
        Seccomp::BuiltIn => crate::seccomp::Filters::built_in().map(Some),
        Seccomp::File(path) => crate::seccomp::Filters::from_file(path).map(Some),
    };
    match filters {
        Ok(f) => {
            let _ = crate::seccomp::FILTERS.set(f);
        }
        Err(e) => {
            eprintln!("vmm: {}", crate::error_chain(&e));
            return ProcessExit::Refused;
        }
    }
    // Before any thread exists, so SIGTERM and SIGINT only ever reach this signalfd.
    let signals = match vm::block_stop_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {}", crate::error_chain(&e));
            return ProcessExit::Failed;
        }
    };
    let max_vcpus = kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus())
        .unwrap_or(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let waits_for_api = opts.kernel.is_none();
    let api = match opts.api_sock {
        Some(path) => {
            let shared = Arc::new(Shared::new(path, max_vcpus, waits_for_api.then_some(tx)));
            match api::serve(path, shared.clone()) {
                Ok(api) => Some((api, shared)),
                Err(e) => {
                    eprintln!("vmm: {}", crate::error_chain(&e));
                    return ProcessExit::Refused;
                }
            }
        }
        None => None,
    };
    let exit = configure_and_run(
        opts,
        max_vcpus,
        started,
        api.as_ref().map(|(_, s)| &**s),
        &rx,
        &signals,
    );
    // The API socket goes with the process.
    if let Some((api, _)) = api {
        api.close();
    }
    exit
}

/// The VM's configuration, then its run.
fn configure_and_run(
    opts: &Options<'_>,
    max_vcpus: usize,
    started: Instant,
    api: Option<&Shared>,
    commands: &Receiver<Command>,
    signals: &std::fs::File,
) -> ProcessExit {
    let cfg = match opts.kernel {
        None => {
            tracing::info!("waiting for PUT /v1/vm/config and POST /v1/vm/start");
            match wait_for_start(commands, signals) {
                Ok(cfg) => cfg,
                Err(exit) => return exit,
            }
        }
        Some(kernel) => {
            let request = config::Args {
                kernel,
                initrd: opts.initrd,
                cmdline: opts.cmdline,
                vcpus: opts.vcpus,
                memory: opts.memory,
                serial: opts.serial,
                serial_log_max: opts.serial_log_max,
                disks: config::DiskArgs::Options(opts.disks),
                api_sock: opts.api_sock,
            };
            match VmConfig::new(&request, max_vcpus) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("vmm: {}", crate::error_chain(&e));
                    return ProcessExit::Refused;
                }
            }
        }
    };
    match vm::run(&cfg, started, api, signals) {
        Ok(exit) => {
            match &exit {
                Exit::Crash(why) => {
                    tracing::error!(code = exit.code(), "guest crashed: {why}")
                }
                _ => tracing::info!(?exit, code = exit.code(), "VM ended"),
            }
            exit.process_exit()
        }
        Err(e) => {
            eprintln!("vmm: {}", crate::error_chain(&e));
            // A disk nobody serves is bad input, found before the guest starts.
            if e.before_guest() {
                ProcessExit::Refused
            } else {
                ProcessExit::Failed
            }
        }
    }
}

/// Waits for the API's `POST /v1/vm/start`: its configuration, or how the process ends if
/// it is told to stop first (the API, a stop signal).
fn wait_for_start(
    commands: &Receiver<Command>,
    signals: &std::fs::File,
) -> Result<VmConfig, ProcessExit> {
    loop {
        match commands.recv_timeout(Duration::from_millis(50)) {
            Ok(Command::Start(cfg)) => return Ok(*cfg),
            Ok(Command::Stop(exit)) => return Err(exit.process_exit()),
            Err(RecvTimeoutError::Timeout) => {
                if let Some(sig) = vm::pending_signal(signals) {
                    return Err(ProcessExit::Signal(sig));
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Err(ProcessExit::Failed),
        }
    }
}
