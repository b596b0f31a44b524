//! The `vmm` binary with small guests written in assembly (images/guests/, built by
//! tests/build.rs): how a VM starts, talks on its serial port, and ends; and the command
//! lines it refuses before starting a guest.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storaged_tests::emulated_host::{full_boot, images_dir};
use storaged_tests::scripted_backend::{self, GET_VRING_BASE, SET_VRING_ENABLE, SET_VRING_KICK};
use storaged_tests::{bin, guest, wait_for_console, wait_until, Vmm};
use vmm_api::{ExitKind, VmState};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_guest_prints_on_the_serial_port_and_its_reset_ends_the_vmm_with_0() {
    let k = guest("hello");
    let out = Vmm::run(&["--kernel", k.to_str().unwrap(), "--memory", "64MiB"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from the test guest\n");
    let log = text(&out.stderr);
    assert!(log.contains("starting guest"), "{log}");
    assert!(log.contains("first serial byte"), "{log}");
}

#[test]
fn serial_output_can_go_to_a_file_and_several_vcpus_start() {
    let tmp = tempfile::tempdir().unwrap();
    let console = tmp.path().join("console.log");
    let k = guest("hello");
    let out = Vmm::run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vcpus",
        "2",
        "--serial",
        console.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "hello from the test guest\n"
    );
}

/// What the `chatter` guest writes on its console before it powers off: 4096 numbered lines
/// of 64 bytes, 256 KiB.
fn chatter_output() -> Vec<u8> {
    (0..4096)
        .flat_map(|i| {
            format!("line {i:05x}: the serial console of a guest that has much to say.\n")
                .into_bytes()
        })
        .collect()
}

#[test]
fn a_guest_flooding_its_console_log_keeps_under_the_cap_in_the_log_and_one_rotated_file() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("console.log");
    let rotated = tmp.path().join("console.log.1");
    std::fs::write(&rotated, "from an older run\n").unwrap();
    let out = Vmm::run(&[
        "--kernel",
        guest("chatter").to_str().unwrap(),
        "--memory",
        "64MiB",
        "--serial",
        log.to_str().unwrap(),
        "--serial-log-max",
        "64KiB",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let current = std::fs::read(&log).unwrap();
    let older = std::fs::read(&rotated).unwrap();
    assert!(
        current.len() <= 64 << 10,
        "{} bytes in the log",
        current.len()
    );
    assert!(
        older.len() <= 64 << 10,
        "{} bytes in the rotated log",
        older.len()
    );
    // The two files hold the end of what the guest wrote, in order, nothing left out.
    let kept = [older, current].concat();
    assert!(kept.len() >= 64 << 10, "only {} bytes kept", kept.len());
    assert!(
        chatter_output().ends_with(&kept),
        "the logs are not the end of the guest's output"
    );
}

#[test]
fn a_stdout_nobody_reads_does_not_stop_the_guest_or_its_power_off() {
    use std::os::fd::AsRawFd;
    let mut child = Command::new(bin("vmm"))
        .arg("--kernel")
        .arg(guest("chatter"))
        .args(["--memory", "64MiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads vmm's stdout: its pipe is full after 4 KiB of the 256 KiB the guest writes.
    let stdout = child.stdout.take().unwrap();
    // SAFETY: F_SETPIPE_SZ on a pipe this test owns.
    unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the guest never powered off: vmm is stuck on its stdout");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("PowerOff"), "{log}");
    drop(stdout);
}

#[test]
fn a_triple_fault_ends_the_vmm_with_3() {
    let k = guest("crash");
    let out = Vmm::run(&["--kernel", k.to_str().unwrap(), "--memory", "64MiB"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("guest crashed"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn sigterm_ends_the_vmm_with_143() {
    let k = guest("spin");
    let tmp = tempfile::tempdir().unwrap();
    let console = tmp.path().join("console.log");
    let mut vmm = Vmm::start(&[
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "64MiB",
        "--serial",
        console.to_str().unwrap(),
    ]);
    wait_for_console(
        &console,
        "the guest did not start",
        Duration::from_secs(30),
        |text| text == "spinning\n",
    );
    let status = vmm.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(143));
}

#[test]
fn bad_command_lines_are_refused_before_the_guest_starts_with_exit_code_2() {
    let k = guest("hello");
    let k = k.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let not_a_kernel = tmp.path().join("notes.txt");
    std::fs::write(&not_a_kernel, "just text").unwrap();
    let cases: [(Vec<&str>, &str); 8] = [
        (
            vec!["--kernel", k, "--vcpus", "0"],
            "--vcpus must be between 1",
        ),
        (
            vec!["--kernel", k, "--vcpus", "1000"],
            "--vcpus must be between 1",
        ),
        (
            vec!["--kernel", k, "--memory", "8MiB"],
            "less than the 16 MiB",
        ),
        (
            vec!["--kernel", k, "--memory", "100000GiB"],
            "more than the",
        ),
        (vec!["--kernel", k, "--memory", "lots"], "is not a size"),
        (
            vec!["--kernel", not_a_kernel.to_str().unwrap()],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (
            vec!["--kernel", "/nonexistent/vmlinuz"],
            "Cannot open /nonexistent/vmlinuz",
        ),
        (
            vec!["--kernel", k, "--initrd", "/nonexistent/initrd"],
            "--initrd /nonexistent/initrd",
        ),
    ];
    for (args, needle) in cases {
        let out = Vmm::run(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: '{err}' lacks '{needle}'");
        assert!(!err.contains("starting guest"), "{args:?} started a guest");
    }
}

#[test]
fn every_vcpu_comes_up_and_reports_its_apic_id() {
    let k = guest("smp");
    for n in [1u32, 2, 4] {
        let out = Vmm::run(&[
            "--kernel",
            k.to_str().unwrap(),
            "--vcpus",
            &n.to_string(),
            "--memory",
            "64MiB",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let console = text(&out.stdout);
        let mut ups: Vec<&str> = console.lines().filter(|l| l.starts_with("cpu ")).collect();
        ups.sort();
        let want: Vec<String> = (0..n).map(|i| format!("cpu {i} up")).collect();
        assert_eq!(ups, want, "{console}");
        assert!(
            console.ends_with(&format!("all {n} cpus up\n")),
            "{console}"
        );
    }
}

/// The Debian cloud kernel (decompressed by images/build) prints its first boot messages on
/// our console: this machine's KVM runs it emulated, so it is watched only until it has shown
/// that it found our boot data, then stopped.
#[test]
fn the_debian_cloud_kernel_shows_our_e820_map_acpi_tables_and_cpus() {
    let kernel = images_dir().join("vmlinux");
    assert!(
        kernel.exists(),
        "{} is missing: run images/build (scripts/test does)",
        kernel.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let console = tmp.path().join("console.log");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 smoketest=1";
    let mut vmm = Vmm::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--vcpus",
        "2",
        "--memory",
        "512MiB",
        "--cmdline",
        cmdline,
        "--serial",
        console.to_str().unwrap(),
    ]);
    let needles = [
        "Linux version 6.".to_string(),
        format!("Command line: {cmdline}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".into(),
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".into(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable".into(),
        "ACPI: RSDP 0x00000000000E0000".into(),
        "ACPI: XSDT".into(),
        "ACPI: FACP".into(),
        "ACPI: DSDT".into(),
        "ACPI: APIC".into(),
        "Allowing 2 CPUs".into(),
    ];
    let deadline = Instant::now() + Duration::from_secs(300);
    let seen = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let missing: Vec<&String> = needles
            .iter()
            .filter(|n| !text.contains(n.as_str()))
            .collect();
        if missing.is_empty() {
            break Ok(());
        }
        if Instant::now() > deadline || vmm.try_wait().is_some() {
            break Err(format!("missing {missing:?} in:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    vmm.kill();
    if let Err(e) = seen {
        panic!("{e}");
    }
}

#[test]
fn a_guest_driver_writes_flushes_and_reads_a_storaged_volume_through_virtio_mmio() {
    let s = storaged_tests::Storaged::start();
    s.create_volume(r#"{"name":"vda","size":"64MiB"}"#);
    virtio_guest_passes_on(&s.socket_of("vda"), 1);
}

/// Runs the virtio-mmio driver guest on a volume with `queues` queues: it must pass on the
/// last one, twice (it resets the device in between), and what it wrote to sector 8 must be
/// on the volume as the blkio client reads it through that queue.
fn virtio_guest_passes_on(socket: &std::path::Path, queues: i32) {
    let out = Vmm::run(&[
        "--kernel",
        guest("virtio_blk").to_str().unwrap(),
        "--memory",
        "64MiB",
        "--disk",
        &format!("socket={}", socket.display()),
    ]);
    let last = queues - 1;
    let pass = format!("virtio-blk: PASS on queue {last}\n");
    assert_eq!(text(&out.stdout), pass.repeat(2), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    let mut c = storaged_tests::connect_retry(socket, queues);
    let want: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 0x5a) as u8).collect();
    assert_eq!(c.read(last as usize, 8 * 512, 4096).unwrap(), want);
}

#[test]
fn a_disk_nobody_serves_is_refused_with_exit_code_2() {
    let k = guest("hello");
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("nobody.sock");
    let out = Vmm::run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--disk",
        &format!("socket={}", sock.display()),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nobody serves"),
        "{}",
        text(&out.stderr)
    );
    let out = Vmm::run(&["--kernel", k.to_str().unwrap(), "--disk", "path=/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("expected socket=PATH"));
}

#[test]
fn a_disk_whose_activation_fails_halfway_has_the_rings_it_started_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("backend.sock");
    // Queue 0 is handed over, kicked and enabled; queue 1's kick is refused.
    let backend = scripted_backend::start(&socket, |code, payload| {
        code == SET_VRING_KICK && payload[0] == 1
    });
    let out = Vmm::run(&[
        "--kernel",
        guest("virtio_two_queues").to_str().unwrap(),
        "--memory",
        "64MiB",
        "--disk",
        &format!("socket={}", socket.display()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "virtio: DEVICE_NEEDS_RESET\nvirtio: reset\n",
        "{}",
        text(&out.stderr)
    );
    let seen = backend.join().unwrap();
    let on_queue = |p: &[u8], q: u32| u32::from_le_bytes(p[..4].try_into().unwrap()) == q;
    let codes: Vec<u32> = seen.iter().map(|(c, _)| *c).collect();
    let enabled = seen
        .iter()
        .position(|(c, p)| *c == SET_VRING_ENABLE && on_queue(p, 0) && p[4] == 1)
        .unwrap_or_else(|| panic!("queue 0 was never enabled: {codes:?}"));
    let after = &seen[enabled..];
    assert!(
        after
            .iter()
            .any(|(c, p)| *c == SET_VRING_ENABLE && on_queue(p, 0) && p[4] == 0),
        "queue 0 was enabled and never disabled: {codes:?}"
    );
    assert!(
        after
            .iter()
            .any(|(c, p)| *c == GET_VRING_BASE && on_queue(p, 0)),
        "queue 0 was started and never stopped (GET_VRING_BASE): {codes:?}"
    );
}

/// Starts `vmm` with a guest, a serial log and an API socket; waits for the first output.
fn vmm_with_api(guest_name: &str, tmp: &std::path::Path) -> (Vmm, PathBuf) {
    let console = tmp.join("console.log");
    let vmm = Vmm::start_with_api(
        &tmp.join("api.sock"),
        &[
            "--kernel",
            guest(guest_name).to_str().unwrap(),
            "--vcpus",
            "2",
            "--memory",
            "64MiB",
            "--serial",
            console.to_str().unwrap(),
        ],
    );
    wait_for_console(
        &console,
        "the guest did not start",
        Duration::from_secs(30),
        |text| !text.is_empty(),
    );
    (vmm, console)
}

#[test]
fn the_api_pauses_and_resumes_the_vm_and_counts_exits() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (mut vmm, console) = vmm_with_api("tick", tmp.path());
    let api = vmm.api_socket().to_owned();
    assert_eq!(
        std::fs::metadata(&api).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let c = vmm.api();
    let vm = vmm.status();
    assert_eq!(vm.state, VmState::Running);
    let config = vm.config.expect("a running VM shows its configuration");
    assert_eq!(config.vcpus, 2);
    assert_eq!(config.memory_bytes, 64 << 20);

    assert_eq!(c.pause().unwrap().state, VmState::Paused);
    assert_eq!(vmm.status().state, VmState::Paused);
    let e = c.pause().unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("already paused"), "{e}");
    // Paused: the guest writes nothing more. (What it wrote before reaches the file within
    // the console writer's few milliseconds.)
    std::thread::sleep(Duration::from_millis(100));
    let len = std::fs::metadata(&console).unwrap().len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::metadata(&console).unwrap().len(), len);

    assert_eq!(c.resume().unwrap().state, VmState::Running);
    wait_until(
        "the guest did not run again",
        Duration::from_secs(10),
        || std::fs::metadata(&console).unwrap().len() != len,
    );
    assert_eq!(c.resume().unwrap_err().status(), Some(409));

    let exits = vmm.counters().vcpu_exits;
    assert!(exits[&ExitKind::IoOut] >= len);
    assert!(exits[&ExitKind::Interrupted] >= 1);

    // Misuse: JSON errors, no crash.
    let r = c.request("GET", "/v1/nothing", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = c.request("DELETE", "/v1/vm", None).unwrap();
    assert_eq!(r.status, 405);
    assert!(r.json()["error"].is_string());
    let r = c.request("GET", "/v1/vm/pause", None).unwrap();
    assert_eq!(r.status, 405);

    assert_eq!(c.kill().unwrap().exit_code, Some(4));
    assert_eq!(vmm.wait().code(), Some(4));
    assert!(!api.exists(), "API socket left behind");
}

#[test]
fn an_api_shutdown_ends_the_vmm_with_0_and_a_busy_api_socket_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut vmm, _console) = vmm_with_api("spin", tmp.path());
    let api = vmm.api_socket().to_owned();
    // A second VMM on the same API socket is refused before its guest starts.
    let out = Vmm::run(&[
        "--kernel",
        guest("hello").to_str().unwrap(),
        "--api-sock",
        api.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("another process serves it"));
    let c = vmm.api();
    assert_eq!(c.shutdown().unwrap().exit_code, Some(0));
    assert_eq!(vmm.wait().code(), Some(0));
    assert!(!api.exists());
}

#[test]
fn a_shutdown_that_comes_while_the_vm_is_set_up_ends_it_once_it_runs() {
    // The API answers as soon as its socket is bound, before the command line's VM runs: a
    // shutdown then (an agent stopping a VM it has just started) must not be lost.
    for _ in 0..5 {
        let tmp = tempfile::tempdir().unwrap();
        let api = tmp.path().join("api.sock");
        let mut vmm = Vmm::start(&[
            "--kernel",
            guest("spin").to_str().unwrap(),
            "--memory",
            "32MiB",
            "--api-sock",
            api.to_str().unwrap(),
        ]);
        let c = vmm_api::VmmClient::new(&api);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let answer = loop {
            match c.shutdown() {
                Ok(t) => break t,
                Err(_) => {
                    assert!(std::time::Instant::now() < deadline, "{}", vmm.log_text());
                    std::thread::yield_now();
                }
            }
        };
        assert_eq!(answer.exit_code, Some(0));
        assert_eq!(vmm.wait().code(), Some(0), "{}", vmm.log_text());
    }
}

#[test]
fn an_acpi_power_off_ends_the_vmm_with_0() {
    let k = guest("poweroff");
    let out = Vmm::run(&["--kernel", k.to_str().unwrap(), "--memory", "64MiB"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("PowerOff"),
        "{}",
        text(&out.stderr)
    );
}

/// `tests/scenarios/full-boot.sh`: the Debian cloud kernel (bzImage) and the test initramfs,
/// /dev/vda an encrypted storaged volume, fio in the guest, the guest's power-off ending vmm
/// with 0, and what fio wrote read back from storaged with blkio.
#[test]
fn linux_boots_runs_fio_on_an_encrypted_storaged_disk_and_powers_off() {
    full_boot("full-boot");
}

/// `tests/scenarios/disks.sh`: two disks, one read-only, two queues on the other; Linux sees
/// their sizes, read-only flag and queue counts as vmm offers them, and an online grow.
#[test]
fn linux_sees_two_disks_as_offered_and_a_grow_made_while_it_runs() {
    full_boot("disks");
}

#[test]
fn a_vm_can_be_configured_and_started_through_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let api = tmp.path().join("api.sock");
    let console = tmp.path().join("console.log");
    // Only an API socket: vmm waits to be configured there.
    let mut vmm = Vmm::start_with_api(&api, &[]);
    let c = vmm.api();
    let vm = vmm.status();
    assert_eq!(vm.state, VmState::NotStarted);
    assert_eq!(vm.config, None);
    // Nothing to start or pause yet.
    assert_eq!(c.start().unwrap_err().status(), Some(409));
    assert_eq!(c.pause().unwrap_err().status(), Some(409));
    // The command line's checks, as 400s that say what is wrong.
    let k = guest("hello");
    let bad = format!(r#"{{"kernel":"{}","vcpus":0}}"#, k.display());
    let r = c.request("PUT", "/v1/vm/config", Some(&bad)).unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("--vcpus"),
        "{}",
        r.body
    );
    let r = c
        .request(
            "PUT",
            "/v1/vm/config",
            Some(r#"{"kernel":"/etc/hostname"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    let r = c
        .request("PUT", "/v1/vm/config", Some("{not json"))
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].is_string());

    let good = format!(
        r#"{{"kernel":"{}","vcpus":2,"memory":"64MiB","serial":"{}"}}"#,
        k.display(),
        console.display()
    );
    // The JSON as a client in any language writes it.
    let r = c.request("PUT", "/v1/vm/config", Some(&good)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let config = vmm.status().config.expect("configured");
    assert_eq!((config.vcpus, config.memory_bytes), (2, 64 << 20));
    c.start().unwrap();
    // The hello guest prints and resets: the VMM ends with 0.
    assert_eq!(vmm.wait().code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "hello from the test guest\n"
    );
    assert!(!api.exists());
}

#[test]
fn a_configuration_sent_as_the_api_crates_types_boots_the_vm_it_describes() {
    let tmp = tempfile::tempdir().unwrap();
    let console = tmp.path().join("console.log");
    let mut vmm = Vmm::start_with_api(&tmp.path().join("api.sock"), &[]);
    let c = vmm.api();
    let config = vmm_api::VmConfig {
        kernel: guest("hello"),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        memory: vmm_api::ByteSize(64 << 20),
        serial: console.to_str().unwrap().into(),
        serial_log_max: None,
        disks: vec![],
    };
    let status = c.configure(&config).unwrap();
    assert_eq!(status.state, VmState::NotStarted);
    let info = status.config.expect("the configuration is shown");
    assert_eq!((info.vcpus, info.memory_bytes), (1, 64 << 20));
    assert_eq!(c.start().unwrap().state, VmState::Starting);
    assert_eq!(vmm.wait().code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "hello from the test guest\n"
    );
}

#[test]
fn sigterm_while_waiting_for_an_api_configuration_ends_with_143_and_removes_the_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let api = tmp.path().join("api.sock");
    let mut vmm = Vmm::start_with_api(&api, &[]);
    assert_eq!(vmm.signal_and_wait(libc::SIGTERM).code(), Some(143));
    assert!(!api.exists(), "API socket left behind");
}

#[test]
fn growing_a_storaged_volume_raises_a_configuration_change_in_the_guest() {
    let s = storaged_tests::Storaged::start();
    s.create_volume(r#"{"name":"grow","size":"64MiB"}"#);
    let socket = s.socket_of("grow");
    let tmp = tempfile::tempdir().unwrap();
    let console = tmp.path().join("console.log");
    let mut vmm = Vmm::start(&[
        "--kernel",
        guest("config_change").to_str().unwrap(),
        "--memory",
        "64MiB",
        "--disk",
        &format!("socket={}", socket.display()),
        "--serial",
        console.to_str().unwrap(),
    ]);
    wait_for_console(
        &console,
        "the guest did not start",
        Duration::from_secs(30),
        |text| text.contains('\n'),
    );
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "capacity 131072\n"
    );
    let r = s
        .admin()
        .request("PATCH", "/v1/volumes/grow", Some(r#"{"size":"128MiB"}"#))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(vmm.wait().code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "capacity 131072\ncapacity 262144\n"
    );
}

#[test]
fn a_multi_queue_volume_is_served_on_its_last_queue_too() {
    let s = storaged_tests::Storaged::start();
    s.create_volume(r#"{"name":"mq","size":"64MiB","num_queues":2}"#);
    virtio_guest_passes_on(&s.socket_of("mq"), 2);
}

#[test]
fn several_disks_get_their_own_windows_and_readonly_ones_show_ro() {
    let s = storaged_tests::Storaged::start();
    s.create_volume(r#"{"name":"a","size":"16MiB"}"#);
    s.create_volume(r#"{"name":"b","size":"16MiB"}"#);
    let (a, b) = (s.socket_of("a"), s.socket_of("b"));
    let out = Vmm::run(&[
        "--kernel",
        guest("probe").to_str().unwrap(),
        "--memory",
        "64MiB",
        "--disk",
        &format!("socket={}", a.display()),
        "--disk",
        &format!("socket={},readonly", b.display()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "disk 0: id 2, ro 0\ndisk 1: id 2, ro 1\n"
    );
}

/// The bzImage path with an image small enough to run here: linux-loader reads the setup
/// header, the protected-mode part goes to 1 MiB, the 64-bit entry at +0x200 gets the zero
/// page in RSI, and the guest prints the command line the zero page points to.
#[test]
fn a_bzimage_is_entered_at_its_64_bit_entry_with_the_zero_page() {
    let k = PathBuf::from(env!("GUEST_DIR")).join("bzimage.img");
    let out = Vmm::run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "64MiB",
        "--cmdline",
        "root=/dev/vda console=ttyS0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "bzImage: root=/dev/vda console=ttyS0\n");
    assert!(
        text(&out.stderr).contains("entry=0x100200"),
        "{}",
        text(&out.stderr)
    );
}
