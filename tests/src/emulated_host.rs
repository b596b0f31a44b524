//! Where the full-boot scenarios run: a host whose KVM is hardware virtualization, real or
//! emulated.
//!
//! A scenario (`tests/scenarios/NAME.sh`) starts storaged and vmm, boots the Debian cloud
//! kernel with the test initramfs (`images/out/`) and checks what the guest did. It needs KVM
//! backed by hardware virtualization: on `kvm_pvm` (nested KVM without VMX/SVM) Linux runs
//! emulated and never gets far. Where this host has `kvm_intel` or `kvm_amd`, a scenario runs
//! directly ([`Runner::Direct`]). Elsewhere it runs in an emulated host ([`Runner::Emulated`]):
//! QEMU's TCG emulating an AMD EPYC with SVM and nested paging (`-cpu EPYC,+svm,+npt`), 2 vCPUs,
//! booting the same Debian kernel with an initramfs that holds busybox, the kernel's KVM
//! modules, the workspace's binaries (storaged, storagectl, vmm, agent, agentctl, blkcheck,
//! boottime) with their libraries, the guest images and the scenarios. Its init (`emulated_host_init.sh`) loads
//! `kvm_amd`, which finds the emulated SVM, runs the scenario, prints its outcome on the serial
//! console and powers the host off; [`run_scenario`] reads the outcome back from the console.
//!
//! QEMU is Debian's QEMU 10 (bookworm-backports), extracted into `target/tools/qemu` by
//! `scripts/lib.sh` (`need_qemu`) rather than installed. One emulated host runs at a time (a
//! lock file): each keeps both of this machine's cores busy. The host's init sets
//! `shmem_enabled` to `advise`, the setting vmm's guest memory wants (`vmm/src/memory.rs`).
//! For experiments, `EMULATED_HOST_CPU` and `EMULATED_HOST_ACCEL` replace the `-cpu` and
//! `-accel` values and `EMULATED_HOST_QEMU_ARGS` adds QEMU arguments (e.g. a monitor socket).

// Test infrastructure: a failed step should stop the test with its message.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bin;

/// Memory of the emulated host: room for its initramfs (about 200 MiB unpacked), storaged's
/// volumes on tmpfs and a 512 MiB guest.
const HOST_MEMORY: &str = "3G";

/// Binaries of the workspace the scenarios use, put on the emulated host's PATH.
const BINARIES: &[&str] = &[
    "storaged",
    "storagectl",
    "vmm",
    "agent",
    "agentctl",
    "blkcheck",
    "boottime",
];

/// Guest images of `images/out` the scenarios boot.
const IMAGES: &[&str] = &["vmlinuz", "vmlinux", "initramfs.cpio.gz"];

/// The KVM modules of the Debian kernel, loaded in this order by the emulated host's init.
const HOST_MODULES: &[&str] = &["irqbypass", "kvm", "kvm-amd"];

/// Runs full-boot scenario `scenario` of `tests/scenarios/` where a host with hardware
/// virtualization can be had: this one, or the emulated host; says why it skips where neither
/// is possible. Panics, with the console's tail, unless it passes. `SCENARIO_ECHO=1` shows its
/// console as it runs.
pub fn full_boot(scenario: &str) {
    let runner = match Runner::pick() {
        Ok(r) => r,
        Err(why) => {
            eprintln!("SKIPPED full Linux boot ({scenario}): {why}");
            return;
        }
    };
    let echo = std::env::var_os("SCENARIO_ECHO").is_some();
    let outcome = run_scenario(&runner, scenario, Duration::from_secs(900), echo);
    assert!(
        outcome.passed,
        "scenario {scenario} failed, run {}; the console's tail:\n{}",
        runner.describe(),
        outcome.tail(150)
    );
}

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// `images/out`, where `images/build` puts the guest kernel, initramfs and host modules.
pub fn images_dir() -> PathBuf {
    workspace().join("images/out")
}

/// Whether this host runs guests on hardware virtualization (kvm_intel or kvm_amd, not the
/// emulating kvm_pvm).
pub fn hardware_kvm() -> bool {
    let m = |name: &str| Path::new("/sys/module").join(name).exists();
    (m("kvm_intel") || m("kvm_amd")) && !m("kvm_pvm") && Path::new("/dev/kvm").exists()
}

/// Debian's QEMU as `need_qemu` extracts it: the tree holding `usr/bin/qemu-system-x86_64`.
#[derive(Clone, Debug)]
pub struct Qemu {
    root: PathBuf,
}

impl Qemu {
    /// `$QEMU_DIR`, else `target/tools/qemu/x`; an error says what is missing.
    pub fn find() -> Result<Qemu, String> {
        let root = std::env::var_os("QEMU_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/tools/qemu/x"));
        let q = Qemu { root };
        for needed in [
            "usr/bin/qemu-system-x86_64",
            "usr/share/seabios/bios-256k.bin",
        ] {
            if !q.root.join(needed).exists() {
                return Err(format!(
                    "no {} (QEMU with TCG and its firmware: scripts/test and \
                     scripts/emulated-host extract them from Debian's packages)",
                    q.root.join(needed).display()
                ));
            }
        }
        let runs = q
            .command()
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run QEMU: {e}"))?;
        if !runs.status.success() {
            return Err(format!(
                "QEMU in {} does not run: {}",
                q.root.display(),
                String::from_utf8_lossy(&runs.stderr).trim()
            ));
        }
        Ok(q)
    }

    /// `qemu-system-x86_64` with the environment that finds its libraries and modules.
    pub fn command(&self) -> Command {
        let lib = self.root.join("usr/lib/x86_64-linux-gnu");
        let mut c = Command::new(self.root.join("usr/bin/qemu-system-x86_64"));
        c.env("LD_LIBRARY_PATH", &lib)
            .env("QEMU_MODULE_DIR", lib.join("qemu"))
            .arg("-L")
            .arg(self.root.join("usr/share/qemu"))
            .arg("-L")
            .arg(self.root.join("usr/share/seabios"));
        c
    }
}

/// Where a scenario runs.
#[derive(Clone, Debug)]
pub enum Runner {
    /// On this host, whose KVM is hardware virtualization.
    Direct,
    /// In an emulated host with SVM.
    Emulated(Qemu),
}

impl Runner {
    /// Direct where this host's KVM is hardware virtualization, else the emulated host; an
    /// error says why neither is possible here.
    pub fn pick() -> Result<Runner, String> {
        for image in IMAGES {
            if !images_dir().join(image).exists() {
                return Err(format!(
                    "no {} (run images/build)",
                    images_dir().join(image).display()
                ));
            }
        }
        if hardware_kvm() {
            return Ok(Runner::Direct);
        }
        let why_not = |e: String| {
            format!(
                "this host's KVM is not hardware virtualization (kvm_intel/kvm_amd not \
                 loaded, or kvm_pvm) and the emulated host is not possible: {e}"
            )
        };
        if std::env::consts::ARCH != "x86_64" {
            return Err(why_not(
                "QEMU's x86_64 TCG host needs an x86_64 machine".into(),
            ));
        }
        for m in HOST_MODULES {
            let p = images_dir().join("host-modules").join(format!("{m}.ko"));
            if !p.exists() {
                return Err(why_not(format!("no {} (run images/build)", p.display())));
            }
        }
        Qemu::find().map(Runner::Emulated).map_err(why_not)
    }

    /// A few words on where scenarios run, for logs.
    pub fn describe(&self) -> &'static str {
        match self {
            Runner::Direct => "directly (this host's KVM is hardware virtualization)",
            Runner::Emulated(_) => {
                "in an emulated host (QEMU TCG, EPYC with SVM and nested paging, kvm_amd)"
            }
        }
    }
}

/// What a scenario printed, and whether it passed.
#[derive(Debug)]
pub struct Outcome {
    pub passed: bool,
    /// The scenario's output; in the emulated host, its whole serial console.
    pub console: String,
}

impl Outcome {
    /// The last `n` lines of the console, for a failure message.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// What a scenario may be given beyond the workspace's binaries (the boot benchmark): other
/// VMMs, found through `$QEMU` (the root of the extracted QEMU tree) and `$FIRECRACKER` (the
/// binary), empty when absent, and variables. In the emulated host the VMMs are copied in
/// with their libraries and the variables (values without spaces) passed on its kernel
/// command line.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub qemu: Option<Qemu>,
    pub firecracker: Option<PathBuf>,
    pub vars: Vec<(String, String)>,
}

/// Runs `tests/scenarios/NAME.sh` and waits for it, at most `timeout`. With `echo`, the output
/// is also printed to stderr as it comes.
pub fn run_scenario(runner: &Runner, name: &str, timeout: Duration, echo: bool) -> Outcome {
    run_scenario_with(runner, name, &Extras::default(), timeout, echo)
}

/// [`run_scenario`] with other VMMs at hand.
pub fn run_scenario_with(
    runner: &Runner,
    name: &str,
    extras: &Extras,
    timeout: Duration,
    echo: bool,
) -> Outcome {
    let script = workspace()
        .join("tests/scenarios")
        .join(format!("{name}.sh"));
    assert!(script.exists(), "no scenario {}", script.display());
    let _one_at_a_time = HostLock::take();
    let work = tempfile::Builder::new().prefix("scn").tempdir().unwrap();
    match runner {
        Runner::Direct => {
            let scratch = work.path().join("work");
            fs::create_dir(&scratch).unwrap();
            let path = format!(
                "{}:{}",
                crate::bin_dir().display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let mut cmd = Command::new("sh");
            cmd.arg(&script)
                .env("WORK", &scratch)
                .env("IMAGES", images_dir())
                .env("PATH", path)
                .env(
                    "QEMU",
                    extras
                        .qemu
                        .as_ref()
                        .map(|q| q.root.clone())
                        .unwrap_or_default(),
                )
                .env(
                    "FIRECRACKER",
                    extras.firecracker.clone().unwrap_or_default(),
                )
                .envs(extras.vars.iter().map(|(k, v)| (k, v)));
            let (code, console) = run_with_timeout(cmd, timeout, echo, false);
            Outcome {
                passed: code == Some(0),
                console,
            }
        }
        Runner::Emulated(qemu) => {
            let initramfs = work.path().join("host.cpio");
            build_host_initramfs(&work.path().join("root"), extras, &initramfs);
            let mut cmd = qemu.command();
            let env_or = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
            cmd.args(["-M", "q35", "-accel"])
                .arg(env_or("EMULATED_HOST_ACCEL", "tcg,thread=multi"))
                .arg("-cpu")
                .arg(env_or("EMULATED_HOST_CPU", "EPYC,+svm,+npt"))
                .args([
                    "-smp",
                    "2",
                    "-m",
                    HOST_MEMORY,
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                    "-kernel",
                ])
                .arg(images_dir().join("vmlinuz"))
                .arg("-initrd")
                .arg(&initramfs)
                .arg("-append")
                .arg(format!(
                    "console=ttyS0 quiet panic=-1 emulated_host.scenario={name} \
                 emulated_host.qemu={} emulated_host.firecracker={}{}",
                    u8::from(extras.qemu.is_some()),
                    u8::from(extras.firecracker.is_some()),
                    extras
                        .vars
                        .iter()
                        .map(|(k, v)| format!(" emulated_host.var={k}={v}"))
                        .collect::<String>()
                ))
                .args(
                    std::env::var("EMULATED_HOST_QEMU_ARGS")
                        .unwrap_or_default()
                        .split_whitespace(),
                );
            let mut earlier = String::new();
            for attempt in 1..=HOST_ATTEMPTS {
                let (_, console) = run_with_timeout(clone_command(&cmd), timeout, echo, true);
                let passed = console
                    .lines()
                    .any(|l| l.trim_end() == format!("emulated-host: scenario {name} passed"));
                let fault = if passed {
                    None
                } else {
                    emulation_fault(&console)
                };
                let Some(fault) = fault.filter(|_| attempt < HOST_ATTEMPTS) else {
                    return Outcome {
                        passed,
                        console: earlier + &console,
                    };
                };
                let note = format!(
                    "emulated-host: {fault} (attempt {attempt} of {HOST_ATTEMPTS}): a fault of \
                     the emulation, not of the scenario; again"
                );
                eprintln!("{note}");
                earlier += &format!("{console}\n{note}\n");
            }
            unreachable!("the last attempt returns")
        }
    }
}

/// How often a scenario is started in a new emulated host when the emulation failed under it
/// ([`emulation_fault`]). Under QEMU 10.0's TCG emulation of SVM, with this machine's two
/// cores also busy with other tests, that happens about once in twenty runs here: the host
/// kernel overflows a KVM vCPU thread's stack (`BUG: TASK stack guard page was hit`, then a
/// panic), or the nested guest's kernel triple-faults or stops at a random point of its early
/// boot (bringing up its second CPU, loading its ACPI tables, printing a line). Neither says
/// anything about the code under test; a scenario that fails once the guest's init has run,
/// or for a reason of its own, is never run again.
const HOST_ATTEMPTS: u32 = 3;

/// How [`run_with_timeout`]'s last line starts when it killed the run at its time limit.
const KILLED: &str = "(killed after ";

/// Why a failed run is a fault of the emulation, if it is: the emulated host's own kernel
/// (not the guest's: its lines are marked `guest| `) reported a BUG or a panic, or the guest's
/// kernel crashed or stalled before its init ran (the scenario says so: `lib.sh`'s
/// `vmm_ended_early` and `check_stall`), or the whole run was killed at its time limit before
/// the guest's init ran (the emulated host itself stopped, so its scenario could not say).
fn emulation_fault(console: &str) -> Option<&'static str> {
    let host_crashed = console.lines().any(|l| {
        l.starts_with('[')
            && l.split_once("] ")
                .is_some_and(|(_, msg)| msg.starts_with("BUG: ") || msg.starts_with("Kernel panic"))
    });
    // The scenario's line may follow a guest line cut short by the crash on the same line.
    let guest_failed_early = console.lines().any(|l| {
        l.split_once("scenario: FAIL ")
            .is_some_and(|(_, why)| why.contains("before its init ran"))
    });
    let killed = console.lines().any(|l| l.starts_with(KILLED));
    let init_ran = console.contains("vmm-test: init started");
    if host_crashed {
        Some("the emulated host's kernel crashed")
    } else if guest_failed_early {
        Some("the guest's kernel crashed or stalled before its init ran")
    } else if killed && !init_ran {
        Some("the emulated host stopped before the guest's init ran (killed at the time limit)")
    } else {
        None
    }
}

/// A copy of a command that has not been started: program, arguments and environment.
fn clone_command(cmd: &Command) -> Command {
    let mut copy = Command::new(cmd.get_program());
    copy.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => copy.env(k, v),
            None => copy.env_remove(k),
        };
    }
    copy
}

/// Runs `cmd` (stdin closed), collecting stdout and stderr, killed after `timeout`. Returns
/// its exit code (None when killed or signalled) and what it printed. `quiet_stderr` keeps
/// stderr out of the echo (QEMU's warnings about CPU features TCG lacks).
fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    echo: bool,
    quiet_stderr: bool,
) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl() is async-signal-safe and touches only the new process: it is killed
    // if this thread ends without having waited for it (a test run interrupted).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = [
        (
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            echo,
        ),
        (
            Box::new(child.stderr.take().unwrap()),
            echo && !quiet_stderr,
        ),
    ]
    .into_iter()
    .map(|(stream, echo)| {
        let out = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{line}");
                }
                out.lock().unwrap().push(line);
            }
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            // What the scenario left behind (a console follower, a daemon) would keep the
            // output pipes open: the group goes with it.
            // SAFETY: kill() of the process group this function started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            break status.code();
        }
        if Instant::now() > deadline {
            // SAFETY: kill() of the process group this function started (the scenario's
            // shell and whatever it started).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            out.lock()
                .unwrap()
                .push(format!("{KILLED}{} s)", timeout.as_secs()));
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in readers {
        let _ = r.join();
    }
    let text = out.lock().unwrap().join("\n");
    (code, text)
}

/// Lays out the emulated host's root file system in `root` and packs it as an uncompressed
/// cpio archive at `out` (the kernel unpacks it without a decompressor, which matters when
/// every instruction is emulated).
fn build_host_initramfs(root: &Path, extras: &Extras, out: &Path) {
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib/modules",
        "images",
        "scenarios",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let images = images_dir();
    let busybox = images.join("busybox");
    fs::copy(&busybox, root.join("bin/busybox"))
        .unwrap_or_else(|e| panic!("{}: {e} (run images/build)", busybox.display()));
    let applets = Command::new(&busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    for m in HOST_MODULES {
        let name = format!("{m}.ko");
        fs::copy(
            images.join("host-modules").join(&name),
            root.join("lib/modules").join(&name),
        )
        .unwrap();
    }
    let mut libraries = Vec::new();
    if let Some(q) = &extras.qemu {
        copy_tree(&q.root.join("usr"), &root.join("opt/qemu/usr"));
        let mut ldd = Command::new("ldd");
        ldd.env("LD_LIBRARY_PATH", q.root.join("usr/lib/x86_64-linux-gnu"));
        libraries.extend(shared_libraries(
            ldd,
            &q.root.join("usr/bin/qemu-system-x86_64"),
        ));
    }
    if let Some(fc) = &extras.firecracker {
        fs::copy(fc, root.join("bin/firecracker"))
            .unwrap_or_else(|e| panic!("{}: {e}", fc.display()));
        libraries.extend(shared_libraries(Command::new("ldd"), fc));
    }
    for name in BINARIES {
        let src = bin(name);
        let dst = root.join("bin").join(name);
        // Without debug info the initramfs is a fifth of the size; a plain copy where there
        // is no objcopy.
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&src)
            .arg(&dst)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            fs::copy(&src, &dst).unwrap();
        }
        libraries.extend(shared_libraries(Command::new("ldd"), &src));
    }
    libraries.sort();
    libraries.dedup();
    for lib in libraries {
        // Flattened into a directory the loader searches by default (QEMU's own libraries,
        // which ldd found in its tree, too); the loader itself where binaries name it.
        let dst = root
            .join("lib/x86_64-linux-gnu")
            .join(lib.file_name().unwrap());
        let dst = if lib.starts_with("/lib64") {
            root.join(lib.strip_prefix("/").unwrap())
        } else {
            dst
        };
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        // Through symlinks: the file the loader will open under this name.
        fs::copy(&lib, &dst).unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
    }
    for image in IMAGES {
        fs::copy(images.join(image), root.join("images").join(image)).unwrap();
    }
    for entry in fs::read_dir(workspace().join("tests/scenarios")).unwrap() {
        let p = entry.unwrap().path();
        fs::copy(&p, root.join("scenarios").join(p.file_name().unwrap())).unwrap();
    }
    let init = root.join("init");
    fs::write(&init, include_str!("emulated_host_init.sh")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    let archive = fs::File::create(out).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet")
        .current_dir(root)
        .stdout(archive)
        .status()
        .expect("cpio (images/build installs it)");
    assert!(status.success(), "cpio failed packing {}", root.display());
}

/// Copies the directory tree `src` to `dst`, symlinks as symlinks.
fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from).unwrap(), &to).unwrap();
        } else if kind.is_dir() {
            copy_tree(&from, &to);
        } else {
            fs::copy(&from, &to).unwrap();
        }
    }
}

/// The shared libraries `ldd` (the command given, with its environment) names for a binary,
/// the dynamic loader among them.
fn shared_libraries(mut ldd: Command, binary: &Path) -> Vec<PathBuf> {
    let out = ldd.arg(binary).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            assert!(
                !l.contains("not found"),
                "{}: a library is missing: {l}",
                binary.display()
            );
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// An exclusive lock on `target/tools/emulated-host.lock`, held while a scenario runs.
struct HostLock {
    _file: fs::File,
}

impl HostLock {
    fn take() -> HostLock {
        let dir = workspace().join("target/tools");
        fs::create_dir_all(&dir).unwrap();
        let f = fs::File::create(dir.join("emulated-host.lock")).unwrap();
        // SAFETY: flock on a file descriptor this function owns; blocks until it is ours.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
        HostLock { _file: f }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_kernel_panic_is_told_from_the_guests_and_from_a_failed_scenario() {
        assert!(emulation_fault(
            "scenario: booting\n[   70.847856] BUG: TASK stack guard page was hit at 0000\n"
        )
        .is_some());
        assert!(
            emulation_fault("[   70.86] Kernel panic - not syncing: corrupted stack end").is_some()
        );
        assert_eq!(
            emulation_fault(
                "guest| [    1.0] Kernel panic - not syncing: VFS\nscenario: FAIL vmm exited with 1"
            ),
            None
        );
        assert_eq!(
            emulation_fault("emulated-host: scenario disks failed with 1"),
            None
        );
    }

    /// Runs `body` after sourcing the scenarios' `lib.sh`, with `vmm` on the PATH a shell
    /// script of `fake_vmm` (writing to `$WORK/console` as vmm's serial would); returns
    /// whether it exited 0 and what it printed.
    fn with_scenario_lib(fake_vmm: &str, body: &str) -> (bool, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let work = dir.path().join("work");
        fs::create_dir(&bin).unwrap();
        fs::create_dir(&work).unwrap();
        let vmm = bin.join("vmm");
        fs::write(&vmm, format!("#!/bin/sh\n{fake_vmm}\n")).unwrap();
        fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
        let lib = workspace().join("tests/scenarios/lib.sh");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(". '{}'\n{body}", lib.display()))
            .env("WORK", &work)
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// What the full-boot scenario does with vmm: start it, wait for its end, check its code.
    const RUN_VMM: &str = "follow_guest_console\nstart_vmm\nwait_vmm 2\nstop_following\n\
                           [ \"$VMM_CODE\" = 0 ] || vmm_ended_early \"instead of its power-off\"\n\
                           echo scenario: vmm ended with 0";

    #[test]
    fn the_scenario_library_tells_a_guest_lost_before_its_init_from_one_lost_after_it() {
        // A guest kernel that triple-faults while booting.
        let (ok, out) = with_scenario_lib(
            "echo '[    1.0] smp: Bringing up secondary CPUs ...' >>\"$WORK/console\"; exit 3",
            RUN_VMM,
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains(
                "scenario: FAIL the guest crashed (vmm exited with 3) before its init ran, \
                 instead of its power-off"
            ),
            "{out}"
        );
        assert!(emulation_fault(&out).is_some(), "{out}");

        // One that stops at a random point of its boot: its silence ends the wait.
        let (ok, out) = with_scenario_lib(
            "echo '[    1.0] x86: Booting SMP configuration:' >>\"$WORK/console\"; exec sleep 60",
            RUN_VMM,
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains("scenario: FAIL the guest stalled before its init ran"),
            "{out}"
        );
        assert!(emulation_fault(&out).is_some(), "{out}");

        // Once the init has run, a crash or a stall is the scenario's failure.
        let (ok, out) = with_scenario_lib(
            "echo 'vmm-test: init started' >>\"$WORK/console\"; exit 3",
            RUN_VMM,
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains("scenario: FAIL the guest crashed (vmm exited with 3) instead of"),
            "{out}"
        );
        assert_eq!(emulation_fault(&out), None, "{out}");
        let (ok, out) = with_scenario_lib(
            "echo 'vmm-test: init started' >>\"$WORK/console\"; exec sleep 60",
            RUN_VMM,
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains("scenario: FAIL the guest stalled: its console was silent for 2 s"),
            "{out}"
        );
        assert_eq!(emulation_fault(&out), None, "{out}");

        // A guest that powers off.
        let (ok, out) =
            with_scenario_lib("echo 'vmm-test: init started' >>\"$WORK/console\"", RUN_VMM);
        assert!(ok, "{out}");
        assert!(out.contains("scenario: vmm ended with 0"), "{out}");
    }

    #[test]
    fn waiting_for_the_console_ends_as_soon_as_vmm_does() {
        // Waited out, the failure would be "no ... within 600 s".
        let (ok, out) = with_scenario_lib(
            "exit 3",
            "follow_guest_console\nstart_vmm\nwait_console 'vmm-test: waiting' 600",
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains(
                "scenario: FAIL the guest crashed (vmm exited with 3) before its init ran, \
                 without 'vmm-test: waiting' on the guest's console"
            ),
            "{out}"
        );
    }

    #[test]
    fn waiting_for_the_console_ends_when_the_guest_falls_silent_saying_whether_its_init_ran() {
        // A guest stopped in its early boot (as the emulation sometimes leaves one): waited
        // out, the failure would come after 600 s and not say it is the emulation's.
        let (ok, out) = with_scenario_lib(
            "echo '[    1.8] ACPI: 1 ACPI AML tables successfully acquired and loaded' \
             >>\"$WORK/console\"; exec sleep 60",
            "follow_guest_console\nstart_vmm\nwait_console 'vmm-test: waiting' 2",
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains(
                "scenario: FAIL the guest stalled before its init ran: its console was silent \
                 for 2 s"
            ),
            "{out}"
        );
        assert!(emulation_fault(&out).is_some(), "{out}");

        // Silent after its init ran: the scenario's own failure.
        let (ok, out) = with_scenario_lib(
            "echo 'vmm-test: init started' >>\"$WORK/console\"; exec sleep 60",
            "follow_guest_console\nstart_vmm\nwait_console 'vmm-test: waiting' 2",
        );
        assert!(!ok, "{out}");
        assert!(
            out.contains("scenario: FAIL the guest stalled: its console was silent for 2 s"),
            "{out}"
        );
        assert_eq!(emulation_fault(&out), None, "{out}");

        // A guest that keeps talking is waited for until it says what is waited for.
        let (ok, out) = with_scenario_lib(
            "for i in 1 2 3 4; do echo \"line $i\" >>\"$WORK/console\"; sleep 1; done; \
             echo 'vmm-test: waiting for vda to grow' >>\"$WORK/console\"; exec sleep 60",
            "follow_guest_console\nstart_vmm\nwait_console 'vmm-test: waiting' 2\n\
             echo scenario: seen",
        );
        assert!(ok, "{out}");
        assert!(out.contains("scenario: seen"), "{out}");
    }

    #[test]
    fn a_guest_that_fails_before_its_init_is_a_fault_of_the_emulation_and_later_ones_are_not() {
        assert!(emulation_fault(
            "scenario: FAIL the guest crashed (vmm exited with 3) before its init ran, instead \
             of its power-off (exit 0)"
        )
        .is_some());
        assert!(emulation_fault(
            "scenario: FAIL the guest stalled before its init ran: its console was silent for 300 s"
        )
        .is_some());
        // After a guest line the crash cut short.
        assert!(emulation_fault(
            "guest| [    2.8] x2apic enabled\nguest| [ scenario: FAIL the guest crashed (vmm \
             exited with 3) before its init ran, without 'vmm-test: waiting' on the console"
        )
        .is_some());
        assert_eq!(
            emulation_fault(
                "guest| vmm-test: init started\nscenario: FAIL the guest crashed (vmm exited with \
                 3) instead of its power-off (exit 0)"
            ),
            None
        );
        assert_eq!(
            emulation_fault("scenario: FAIL fio did not complete in the guest"),
            None
        );
        // The whole emulated host stopped mid-boot of the guest, and the run was killed.
        assert!(emulation_fault(
            "guest| [    7.4] Serial: 8250/16550 driver, 4 ports, IRQ sharing enabled\n(killed \
             after 900 s)"
        )
        .is_some());
        assert_eq!(
            emulation_fault("guest| vmm-test: init started\n(killed after 900 s)"),
            None
        );
    }
}
