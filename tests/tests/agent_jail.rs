//! The jail of each vmm the agent starts, looked at from outside (`/proc`) and tried from
//! inside: `jail-probe` enters a jailed vmm's mount namespace as its uid, as a taken-over vmm
//! would be, and tries what it could open or connect to. Two VMs with a volume each, so that
//! one tries the other's.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use std::time::Duration;

use storaged_tests::agent_calls::{call, tenant, vm, wait_vm};
use storaged_tests::{bin, wait_until, Agent, AgentClient, Storaged};

/// Two VMs of one tenant, `a` and `b`, each running the spin guest with a volume of its
/// own (`vol-a`, `vol-b`).
fn two_vms(a: &Agent) -> AgentClient {
    let t = tenant(a, "acme");
    for n in ["a", "b"] {
        let body = format!(r#"{{"name":"vol-{n}","size":"16MiB","encryption":"none"}}"#);
        let (st, v) = call(&t, "POST", "/v1/volumes", Some(&body));
        assert_eq!(st, 201, "{v}");
        let body = format!(
            r#"{{"id":"{n}","memory":"32MiB","kernel":"spin.elf","volumes":[{{"name":"vol-{n}"}}]}}"#
        );
        let (st, v) = call(&t, "POST", "/v1/vms", Some(&body));
        assert_eq!(st, 201, "{v}");
    }
    t
}

/// The `Name:` line of /proc/PID/status, its fields.
fn status(pid: u64, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in status of {pid}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The soft and hard value of a line of /proc/PID/limits.
fn limit(pid: u64, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} limit"));
    let mut f = line[name.len()..].split_whitespace();
    (f.next().unwrap().into(), f.next().unwrap().into())
}

/// Every path under `root` (relative, with a trailing `/` for a directory).
fn tree(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let p = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                out.insert(format!("{}/", p.display()));
                // The host's kvm_pvm module directory is bound whole: not walked.
                if !p.starts_with("sys") {
                    dirs.push(p);
                }
            } else {
                out.insert(p.display().to_string());
            }
        }
    }
    out
}

/// Runs `jail-probe` as `uid` in the mount namespace of `pid` (or on the host) and returns
/// its lines.
fn probe(pid: u64, uid: u64, host: bool, tries: &[(&str, &str)]) -> Vec<String> {
    let mut cmd = std::process::Command::new(bin("jail-probe"));
    cmd.args(["--pid", &pid.to_string(), "--uid", &uid.to_string()]);
    if host {
        cmd.arg("--host");
    }
    for (flag, path) in tries {
        cmd.args([*flag, *path]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The threads of `pid` without a seccomp filter, by name.
fn unfiltered(pid: u64) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let st = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        if !st
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
        {
            out.push(std::fs::read_to_string(task.join("comm")).unwrap_or_default());
        }
    }
    out
}

#[test]
fn each_vmm_runs_as_a_uid_of_its_own_without_privileges_in_namespaces_of_its_own() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = two_vms(&a);
    let (va, vb) = (vm(&t, "a"), vm(&t, "b"));
    let (uid_a, uid_b) = (va["uid"].as_u64().unwrap(), vb["uid"].as_u64().unwrap());
    assert_ne!(uid_a, uid_b, "each VM its own uid");
    for (v, uid) in [(&va, uid_a), (&vb, uid_b)] {
        let pid = v["pid"].as_u64().unwrap();
        assert!(uid >= 10_000_000, "not a host user's uid: {uid}");
        let u = uid.to_string();
        assert_eq!(
            status(pid, "Uid"),
            [u.as_str(); 4],
            "real, effective, saved, fs"
        );
        assert_eq!(status(pid, "Gid"), [u.as_str(); 4]);
        assert!(status(pid, "Groups").is_empty(), "no supplementary groups");
        assert_eq!(status(pid, "NoNewPrivs"), ["1"]);
        assert_eq!(
            status(pid, "CapEff"),
            ["0000000000000000"],
            "no capabilities"
        );
        assert_eq!(limit(pid, "Max open files"), ("4096".into(), "4096".into()));
        assert_eq!(limit(pid, "Max processes"), ("65".into(), "65".into()));
        assert_eq!(limit(pid, "Max core file size"), ("0".into(), "0".into()));
        // Each thread under a seccomp filter (mode 2): the main thread's is installed once
        // the VM is set up.
        wait_until("every thread filtered", Duration::from_secs(10), || {
            unfiltered(pid).is_empty()
        });
        for ns in ["mnt", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{ns} namespace of its own");
        }
        // Its storaged volume is given to its uid, the socket file too.
        let name = if uid == uid_a {
            "acme_vol-a"
        } else {
            "acme_vol-b"
        };
        let info = s.admin().volume(name).unwrap();
        assert_eq!(info.owner.as_ref().map(|o| u64::from(o.uid)), Some(uid));
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&info.socket).unwrap();
        assert_eq!((u64::from(meta.uid()), meta.mode() & 0o777), (uid, 0o600));
    }
}

#[test]
fn a_jails_root_holds_only_what_vmm_needs_read_only_but_its_run_dir() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = two_vms(&a);
    let pid = vm(&t, "a")["pid"].as_u64().unwrap();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let files = tree(&root);
    let allowed = |p: &str| {
        [
            "vmm",
            "kernel",
            "disks/",
            "disks/0.sock",
            "dev/",
            "dev/kvm",
            "run/",
        ]
        .contains(&p)
            || p.starts_with("run/api.sock")
            || p.starts_with("run/console.log")
            || p.starts_with("lib")
            || p.starts_with("usr/")
            || p == "usr/"
            || ["proc/", "proc/meminfo", "sys/", "etc/", "etc/ld.so.cache"].contains(&p)
            || p.starts_with("sys/")
    };
    let odd: Vec<_> = files.iter().filter(|p| !allowed(p)).collect();
    assert!(
        odd.is_empty(),
        "unexpected in the jail: {odd:?}\nall: {files:?}"
    );
    for must in ["vmm", "kernel", "disks/0.sock", "dev/kvm", "run/api.sock"] {
        assert!(files.contains(must), "{must} missing: {files:?}");
    }
    assert!(
        files
            .iter()
            .any(|p| p.starts_with("lib") && p.contains("libc.so")),
        "its libc: {files:?}"
    );
    // Everything but run/ read-only, from inside.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (target, opts) = (f[1], f[3]);
        let rw = opts.split(',').any(|o| o == "rw");
        match target {
            "/run" | "/dev" => assert!(rw, "{line}"),
            _ => assert!(!rw, "{target} writable: {line}"),
        }
        assert!(opts.contains("nosuid"), "{line}");
    }
}

#[test]
fn a_jailed_uid_reaches_no_file_outside_its_root_and_not_another_vms_disk_socket() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = two_vms(&a);
    let (va, vb) = (vm(&t, "a"), vm(&t, "b"));
    let pid_a = va["pid"].as_u64().unwrap();
    let uid_a = va["uid"].as_u64().unwrap();
    let socket_b = s.admin().volume("acme_vol-b").unwrap().socket;
    let socket_b = socket_b.to_str().unwrap();
    let db = a.data_dir.join("agent.redb");
    let token = a.data_dir.join("admin.token");
    let inside = probe(
        pid_a,
        uid_a,
        false,
        &[
            ("--open", "/kernel"),
            ("--open", "/dev/kvm"),
            ("--open", "/etc/passwd"),
            ("--open", "/proc/1/root/etc/passwd"),
            ("--open", "/../../etc/passwd"),
            ("--open", db.to_str().unwrap()),
            ("--open", token.to_str().unwrap()),
            ("--write", "/vmm"),
            ("--write", "/kernel"),
            ("--connect", socket_b),
            ("--connect", "/disks/1.sock"),
        ],
    );
    let db = db.display();
    let token = token.display();
    assert_eq!(
        inside,
        [
            "open /kernel: ok".to_string(),
            "open /dev/kvm: ok".into(),
            "open /etc/passwd: ENOENT".into(),
            "open /proc/1/root/etc/passwd: ENOENT".into(),
            "open /../../etc/passwd: ENOENT".into(),
            format!("open {db}: ENOENT"),
            format!("open {token}: ENOENT"),
            "write /vmm: EACCES".into(),
            "write /kernel: EACCES".into(),
            format!("connect {socket_b}: ENOENT"),
            "connect /disks/1.sock: ENOENT".into(),
        ]
    );
    // Were the uid to reach the host's file system, the other VM's socket is not its.
    let outside = probe(pid_a, uid_a, true, &[("--connect", socket_b)]);
    assert_eq!(outside, [format!("connect {socket_b}: EACCES")]);
    // And VM b, which the probes did not touch, still runs.
    assert_eq!(vm(&t, "b")["state"], "running");
    assert_eq!(vm(&t, "b")["pid"], vb["pid"]);
}

#[test]
fn a_system_call_outside_the_filter_kills_the_vmm_by_sigsys_and_the_agent_says_so() {
    let s = Storaged::start();
    let dir = tempfile::tempdir().unwrap();
    // Every kind allowed everything but the vCPU threads' ioctl: the first KVM_RUN.
    let allow_all = r#"{"mismatch_action": "allow", "match_action": "kill_process", "filter": []}"#;
    let filters = format!(
        r#"{{"main": {allow_all}, "api": {allow_all}, "console": {allow_all}, "device": {allow_all},
            "vcpu": {{"mismatch_action": "allow", "match_action": "kill_process",
                      "filter": [{{"syscall": "ioctl"}}]}}}}"#
    );
    let filter_file = dir.path().join("seccomp.json");
    std::fs::write(&filter_file, filters).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("seccomp_filter = {:?}\n", filter_file.to_str().unwrap()),
    )
    .unwrap();
    let a = Agent::with_guests_and(&s, &["--config", config.to_str().unwrap()]);
    let t = tenant(&a, "acme");
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"a","memory":"32MiB","kernel":"spin.elf","restart_policy":"never"}"#),
    );
    assert_eq!(st, 201, "{v}");
    let v = wait_vm(&t, "a", "killed", Duration::from_secs(30), |v| {
        v["state"] == "stopped"
    });
    let last = &v["last_exit"];
    assert_eq!(last["signal"], 31, "{v}");
    assert_eq!(last["failure"], true);
    assert!(
        last["meaning"].as_str().unwrap().contains("seccomp"),
        "{last}"
    );
    a.wait_for_log("signal=Some(31)");
}

/// `tests/scenarios/agent.sh`, on a host with hardware virtualization (this one or the
/// emulated host): the agent launches, jailed, the Debian cloud kernel whose fio runs on the
/// tenant's volume; the tenant's stop presses the guest's ACPI power button, the guest powers
/// off, the agent records exit code 0; the volume holds what fio wrote.
#[test]
fn a_jailed_debian_guest_runs_fio_on_its_volume_and_a_stop_powers_it_off_by_acpi() {
    storaged_tests::emulated_host::full_boot("agent");
}

#[test]
fn an_image_a_jailed_vmm_cannot_read_is_refused_and_leaves_nothing_behind() {
    use std::os::unix::fs::PermissionsExt;
    let s = Storaged::start();
    let images = tempfile::tempdir().unwrap();
    let private = images.path().join("private.elf");
    std::fs::copy(storaged_tests::guest("spin"), &private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let socket = s.admin_socket();
    let a = Agent::start_with(&[
        "--storaged-socket",
        socket.to_str().unwrap(),
        "--images-dir",
        images.path().to_str().unwrap(),
    ]);
    let t = tenant(&a, "acme");
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"a","memory":"32MiB","kernel":"private.elf"}"#),
    );
    assert_eq!(st, 400, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("cannot read it") && e.contains("0644"), "{e}");
    assert!(
        !e.contains(images.path().to_str().unwrap()),
        "no host path: {e}"
    );
    assert_eq!(call(&t, "GET", "/v1/vms/a", None).0, 404);
    assert!(!a.data_dir.join("vms/acme_a").exists());
}

#[test]
fn an_agent_that_is_not_root_refuses_to_jail_and_says_why_unless_jail_is_false() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let nobody = 65534;
    std::os::unix::fs::chown(dir.path(), Some(nobody), Some(nobody)).unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(bin("agent"));
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "off", "--storaged-socket", "/nonexistent.sock"])
            .args(extra)
            .uid(nobody)
            .gid(nobody)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let out = run(&[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Cannot jail the VMs: the agent is not root") && err.contains("jail = false"),
        "{err}"
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "jail = false\n").unwrap();
    let mut child = run(&["--config", config.to_str().unwrap()]);
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let ready = loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
            break false;
        }
        log.push_str(&line);
        if line.contains("agent ready") {
            break true;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "{log}");
    assert!(
        log.contains("jail = false"),
        "it says the VMs run unjailed: {log}"
    );
}

#[test]
fn a_process_left_in_a_vms_cgroup_is_killed_at_the_vms_end_and_its_cgroups_go() {
    use std::os::unix::process::CommandExt;
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = two_vms(&a);
    let v = vm(&t, "a");
    let (pid, uid) = (
        v["pid"].as_u64().unwrap(),
        v["uid"].as_u64().unwrap() as u32,
    );
    // The VM's cgroups, as its vmm's /proc/PID/cgroup names them.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let dirs: Vec<PathBuf> = cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            if !path.ends_with("/agent-vms/acme_a") {
                return None;
            }
            let hierarchy = match controllers {
                "" => PathBuf::from("/sys/fs/cgroup"),
                c => PathBuf::from("/sys/fs/cgroup").join(c.split(',').next()?),
            };
            Some(hierarchy.join(path.trim_start_matches('/')))
        })
        .filter(|d| d.exists())
        .collect();
    assert!(!dirs.is_empty(), "{cgroup}");
    // What a taken-over vmm could have forked: a process of its uid in its cgroups.
    let procs: Vec<std::fs::File> = dirs
        .iter()
        .map(|d| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
                .unwrap()
        })
        .collect();
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600").uid(uid).gid(uid);
    // SAFETY: between fork and exec the hook only writes to descriptors the parent opened.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                if libc::write(fd, b"0\n".as_ptr().cast(), 2) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut left = cmd.spawn().unwrap();
    drop(procs);
    assert_eq!(call(&t, "POST", "/v1/vms/a/kill", None).0, 200);
    wait_vm(&t, "a", "killed", Duration::from_secs(10), |v| {
        v["state"] == "stopped"
    });
    let status = left.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "killed at the VM's end"
    );
    wait_until("the VM's cgroups removed", Duration::from_secs(5), || {
        dirs.iter().all(|d| !d.exists())
    });
    // VM b, in cgroups of its own, runs on.
    assert_eq!(vm(&t, "b")["state"], "running");
}

#[test]
fn an_agent_on_a_host_without_cgroups_refuses_to_jail_and_says_why() {
    // The agent in a mount namespace of its own whose /sys/fs/cgroup is an empty tmpfs: a
    // host without cgroups, as far as it can see.
    let dir = tempfile::tempdir().unwrap();
    let agent = bin("agent");
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs none /sys/fs/cgroup && exec {} --data-dir {} --listen off --storaged-socket /nonexistent.sock",
        agent.display(),
        dir.path().join("data").display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No cgroups for the VMs") && err.contains("jail = false"),
        "{err}"
    );
}
