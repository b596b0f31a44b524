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

#[test]
fn unit_file_passes_systemd_analyze_verify_without_warnings() {
    let unit = std::fs::read_to_string(repo_file("systemd/storaged.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storaged.service");
    let unit = unit.replace("/usr/local/bin/storaged", bin("storaged").to_str().unwrap());
    std::fs::write(&path, unit).unwrap();
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
