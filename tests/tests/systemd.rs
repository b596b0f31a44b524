//! The systemd unit and the daemon's readiness protocol.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use storaged_tests::*;

fn repo_file(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// `systemd-analyze verify` on the unit `name`, its ExecStart pointed at the binary under
/// test (verify checks that it exists): no error, no warning.
fn verify_unit(name: &str, binary: &str) -> String {
    let unit = std::fs::read_to_string(repo_file(&format!("systemd/{name}"))).unwrap();
    assert!(unit.contains("Type=notify"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let installed = format!("/usr/local/bin/{binary}");
    std::fs::write(
        &path,
        unit.replace(&installed, bin(binary).to_str().unwrap()),
    )
    .unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("systemd-analyze is required (apt-get install systemd): {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warned: {stderr}"
    );
    unit
}

#[test]
fn unit_file_passes_systemd_analyze_verify_without_warnings() {
    verify_unit("storaged.service", "storaged");
}

#[test]
fn the_agents_unit_passes_verify_and_leaves_the_vms_out_of_its_kill_scope() {
    let unit = verify_unit("agent.service", "agent");
    // A stop or restart of the agent signals the agent only; the vmm processes stay.
    assert!(unit.lines().any(|l| l == "KillMode=process"), "{unit}");
    assert!(unit.lines().any(|l| l == "Delegate=yes"), "{unit}");
    assert!(unit.contains("After=storaged.service") && unit.contains("Wants=storaged.service"));
}

#[test]
fn the_agent_notifies_ready_once_its_api_answers_and_stopping_at_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data = dir.path().join("agent");
    let mut child = Command::new(bin("agent"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "off"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let w = AgentClient::new(data.join("agent.sock"), token.trim())
        .whoami()
        .expect("the API answers at READY=1");
    assert_eq!(w.role, agent_api::Role::Admin);
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
    // A stop that comes the instant READY=1 does is a clean stop too: the signals are caught
    // before readiness is told.
    for _ in 0..5 {
        let mut child = Command::new(bin("agent"))
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "off"])
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let n = notify.recv(&mut buf).expect("no READY=1 within 30 s");
        assert_eq!(&buf[..n], b"READY=1");
        // SAFETY: kill() on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let n = notify
            .recv(&mut buf)
            .expect("no STOPPING=1 after a SIGTERM at READY=1");
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn ready_is_notified_once_every_socket_listens() {
    let dir = tempfile::tempdir().unwrap();
    // A first run creates a volume, so the second must bring up its socket before READY=1.
    let mut s = Storaged::start();
    s.create_volume(r#"{"name":"n1","size":"4MiB"}"#);
    let socket = s.socket_of("n1");
    let status = s.signal_and_wait(libc::SIGTERM);
    assert!(status.success());

    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(bin("storaged"))
        .arg("--data-dir")
        .arg(&s.data_dir)
        .args(["--metrics-addr", "off"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    // At READY=1 both the admin socket and the volume socket accept connections.
    assert!(std::os::unix::net::UnixStream::connect(s.admin_socket()).is_ok());
    let mut c = BlkClient::connect(&socket, 1).expect("volume socket not serving at READY=1");
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
    drop(c);
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}
