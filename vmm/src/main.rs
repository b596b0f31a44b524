//! `vmm`: boots one microVM from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use std::sync::Arc;

use clap::Parser;
use vmm::api::{Command, Shared};
use vmm::config::VmConfig;
use vmm::exit::ProcessExit;

/// Boot a Linux kernel (bzImage or ELF vmlinux) in a KVM microVM.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_long_help = ProcessExit::help())]
struct Args {
    /// Kernel image: a bzImage or an ELF vmlinux. Without it, the VM is configured and started
    /// through the API (--api-sock): PUT /v1/vm/config, then POST /v1/vm/start.
    #[arg(long, required_unless_present = "api_sock")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory, e.g. 512MiB or 2GiB (a multiple of 2 MiB).
    #[arg(long, default_value = "512MiB")]
    memory: String,
    /// A vhost-user-blk disk (virtio-mmio): socket=PATH[,readonly]. Repeat for more disks;
    /// the first is /dev/vda.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Serial console (ttyS0) output: "stdout" or a file path. The guest never waits for it:
    /// what the output cannot take in time is dropped (and counted in the log).
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Most bytes in the serial log file (--serial FILE), e.g. 64MiB; when full it is renamed
    /// FILE.1 (replacing the one before) and a new FILE started. At least 4KiB. [default:
    /// 16MiB]
    #[arg(long)]
    serial_log_max: Option<String>,
    /// API socket (HTTP/1.1 + JSON under /v1; see vmm/openapi.yaml), mode 0600.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Log filter (tracing syntax), e.g. "info" or "vmm=debug".
    #[arg(long, default_value = "info", env = "VMM_LOG")]
    log: String,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before any thread exists, so SIGTERM and SIGINT only ever reach this signalfd.
    let signals = match vmm::vm::block_stop_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {}", vmm::error_chain(&e));
            return ProcessExit::Failed.into();
        }
    };
    let max_vcpus = kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus())
        .unwrap_or(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let waits_for_api = args.kernel.is_none();
    let api = match &args.api_sock {
        Some(path) => {
            let shared = Arc::new(Shared::new(path, max_vcpus, waits_for_api.then_some(tx)));
            match vmm::api::serve(path, shared.clone()) {
                Ok(api) => Some((api, shared)),
                Err(e) => {
                    eprintln!("vmm: {}", vmm::error_chain(&e));
                    return ProcessExit::Refused.into();
                }
            }
        }
        None => None,
    };
    let code = run(
        &args,
        max_vcpus,
        started,
        api.as_ref().map(|(_, s)| &**s),
        waits_for_api,
        &rx,
        &signals,
    );
    // The API socket goes with the process.
    if let Some((api, _)) = api {
        api.close();
    }
    code
}

fn run(
    args: &Args,
    max_vcpus: usize,
    started: Instant,
    api: Option<&Shared>,
    waits_for_api: bool,
    rx: &std::sync::mpsc::Receiver<Command>,
    signals: &std::fs::File,
) -> ExitCode {
    let cfg = if waits_for_api {
        tracing::info!("waiting for PUT /v1/vm/config and POST /v1/vm/start");
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(Command::Start(cfg)) => break *cfg,
                Ok(Command::Stop(exit)) => return exit.process_exit().into(),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(sig) = vmm::vm::pending_signal(signals) {
                        return ProcessExit::Signal(sig).into();
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return ProcessExit::Failed.into()
                }
            }
        }
    } else {
        let Some(kernel) = args.kernel.as_deref() else {
            return ProcessExit::Refused.into();
        };
        let request = vmm::config::Args {
            kernel,
            initrd: args.initrd.as_deref(),
            cmdline: &args.cmdline,
            vcpus: args.vcpus,
            memory: &args.memory,
            serial: &args.serial,
            serial_log_max: args.serial_log_max.as_deref(),
            disks: &args.disks,
            api_sock: args.api_sock.as_deref(),
        };
        match VmConfig::new(&request, max_vcpus) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmm: {}", vmm::error_chain(&e));
                return ProcessExit::Refused.into();
            }
        }
    };
    match vmm::vm::run(&cfg, started, api, signals) {
        Ok(exit) => {
            match &exit {
                vmm::vm::Exit::Crash(why) => {
                    tracing::error!(code = exit.code(), "guest crashed: {why}")
                }
                _ => tracing::info!(?exit, code = exit.code(), "VM ended"),
            }
            exit.process_exit().into()
        }
        Err(e) => {
            eprintln!("vmm: {}", vmm::error_chain(&e));
            // A disk nobody serves is bad input, found before the guest starts.
            if e.before_guest() {
                ProcessExit::Refused.into()
            } else {
                ProcessExit::Failed.into()
            }
        }
    }
}
