//! `vmm`: boots one microVM from the command line. This file parses it; the library
//! ([`vmm::launch::run`]) does the rest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::exit::ProcessExit;
use vmm::launch::Options;

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
    /// Guest memory, e.g. 512MiB or 2GiB (a multiple of 2 MiB; GB is 10^9 bytes, GiB 2^30).
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
    /// Seccomp filters replacing the built-in ones: a seccompiler JSON file with a filter for
    /// each thread kind (main, vcpu, api, console, device).
    #[arg(long, conflicts_with = "no_seccomp")]
    seccomp_filter: Option<PathBuf>,
    /// Run every thread without a seccomp filter.
    #[arg(long)]
    no_seccomp: bool,
    /// Log filter (tracing syntax), e.g. "info" or "vmm=debug".
    #[arg(long, default_value = "info", env = "VMM_LOG")]
    log: String,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = Args::parse();
    let opts = Options {
        kernel: args.kernel.as_deref(),
        initrd: args.initrd.as_deref(),
        cmdline: &args.cmdline,
        vcpus: args.vcpus,
        memory: &args.memory,
        disks: &args.disks,
        serial: &args.serial,
        serial_log_max: args.serial_log_max.as_deref(),
        api_sock: args.api_sock.as_deref(),
        seccomp: match (&args.seccomp_filter, args.no_seccomp) {
            (_, true) => vmm::launch::Seccomp::Off,
            (Some(f), _) => vmm::launch::Seccomp::File(f),
            (None, false) => vmm::launch::Seccomp::BuiltIn,
        },
        log: &args.log,
    };
    vmm::launch::run(&opts, started).into()
}
