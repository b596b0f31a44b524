//! Volume owners: a volume assigned to a uid is served only to frontends of that uid, its
//! socket belongs to that uid, and an owner change takes effect for the connection being
//! served and for those waiting in the socket's backlog. Frontends of other uids are real
//! processes (`blkcheck`, the libblkio client) started with that uid.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use storaged_tests::*;

/// Uids no account on the test machine uses.
const OWNER_UID: u32 = 40_001;
const OTHER_UID: u32 = 40_002;

/// storaged with its sockets in a folder every uid can reach (a test data dir is 0700).
fn start_with_reachable_sockets() -> (Storaged, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("own").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.path().join("storaged.toml");
    let sockets = dir.path().join("sockets");
    std::fs::write(
        &cfg,
        format!("socket_dir = {:?}\n", sockets.to_str().unwrap()),
    )
    .unwrap();
    let s = Storaged::start_with(&["--config", cfg.to_str().unwrap()]);
    (s, dir)
}

/// Runs `blkcheck` as `uid` (group `uid`, no supplementary groups): reads `len` bytes at 0
/// and checks they repeat `pattern`. Returns whether it passed, and what it printed.
fn blkcheck_as(uid: u32, socket: &Path, len: u64, pattern: &str) -> (bool, String) {
    let out = Command::new(bin("blkcheck"))
        .args(["--socket", socket.to_str().unwrap()])
        .args([
            "--offset",
            "0",
            "--len",
            &len.to_string(),
            "--pattern",
            pattern,
        ])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Owner uid and mode bits of the socket file.
fn socket_owner(socket: &Path) -> (u32, u32) {
    let m = std::fs::metadata(socket).unwrap();
    (m.uid(), m.mode() & 0o777)
}

fn patch(s: &Storaged, name: &str, body: &str) -> serde_json::Value {
    let r = s
        .admin()
        .request("PATCH", &format!("/v1/volumes/{name}"), Some(body))
        .unwrap();
    assert_eq!(r.status, 200, "PATCH {body}: {}", r.body);
    r.json()
}

/// Log lines of refused peers with `uid`.
fn refusals_of(s: &Storaged, uid: u32) -> usize {
    s.log_text()
        .lines()
        .filter(|l| {
            l.contains("refused a frontend of another uid") && l.contains(&format!("uid={uid} "))
        })
        .count()
}

#[test]
fn an_owned_volume_is_served_to_its_owners_uid_only() {
    let (s, _dir) = start_with_reachable_sockets();
    let v = s.create_volume(&format!(
        r#"{{"name":"own","size":"16MiB","owner":{{"uid":{OWNER_UID},"vm_id":"vm-a"}}}}"#
    ));
    assert_eq!(
        v["owner"],
        serde_json::json!({"uid": OWNER_UID, "vm_id": "vm-a"})
    );
    let socket = PathBuf::from(v["socket"].as_str().unwrap());
    assert_eq!(socket_owner(&socket), (OWNER_UID, 0o600));

    // Another uid cannot even connect: the socket is not its own.
    let (ok, out) = blkcheck_as(OTHER_UID, &socket, 65536, "00");
    assert!(!ok, "uid {OTHER_UID} was served: {out}");

    // Root can connect (it passes file permissions) but is not the owner: refused, logged
    // with its pid and uid, and never served.
    let err = BlkClient::connect(&socket, 1).err();
    assert!(
        err.is_some(),
        "root was served a volume owned by {OWNER_UID}"
    );
    s.wait_for_log("refused a frontend of another uid");
    let line = s
        .log_text()
        .lines()
        .find(|l| l.contains("refused a frontend of another uid"))
        .unwrap()
        .to_string();
    assert!(
        line.contains(&format!("pid={}", std::process::id())) && line.contains("uid=0 "),
        "{line}"
    );
    assert!(line.contains(&format!("owner_uid={OWNER_UID}")), "{line}");
    assert!(
        !s.log_text().contains("frontend attached"),
        "{}",
        s.log_text()
    );

    // The owner's uid is served (a fresh volume reads as zeros).
    let (ok, out) = blkcheck_as(OWNER_UID, &socket, 65536, "00");
    assert!(
        ok,
        "uid {OWNER_UID} was not served: {out}\n{}",
        s.log_text()
    );
    s.wait_for_log("frontend attached");
    assert!(
        s.log_text()
            .lines()
            .any(|l| l.contains("frontend attached") && l.contains(&format!("uid={OWNER_UID}"))),
        "{}",
        s.log_text()
    );
    let got = s.admin().get("/v1/volumes/own").unwrap().json();
    assert_eq!(got["owner"], v["owner"]);
}

#[test]
fn an_owner_change_rechowns_the_socket_and_refuses_the_old_owner_even_from_the_backlog() {
    let (mut s, _dir) = start_with_reachable_sockets();
    // First owned by root, the uid of this test: its frontends are served.
    let v = s.create_volume(r#"{"name":"vm","size":"16MiB","owner":{"uid":0,"vm_id":"vm-old"}}"#);
    let socket = PathBuf::from(v["socket"].as_str().unwrap());
    assert_eq!(socket_owner(&socket), (0, 0o600));
    let data: Vec<u8> = [0x5e, 0xed, 0x0f, 0xa1].repeat(16384);
    let mut served = connect_retry(&socket, 1);
    assert_eq!(served.write(0, 0, &data), 0);
    assert_eq!(served.flush(0), 0);

    // A second frontend of the old owner waits in the backlog while the first is attached
    // (a VMM restarting). The volume then goes to another VM's uid.
    let queued_socket = socket.clone();
    let (queued_tx, queued_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = queued_tx.send(BlkClient::connect(&queued_socket, 1).is_ok());
    });
    std::thread::sleep(Duration::from_millis(100));
    let v = patch(
        &s,
        "vm",
        &format!(r#"{{"owner":{{"uid":{OWNER_UID},"vm_id":"vm-new"}}}}"#),
    );
    assert_eq!(
        v["owner"],
        serde_json::json!({"uid": OWNER_UID, "vm_id": "vm-new"})
    );
    assert_eq!(socket_owner(&socket), (OWNER_UID, 0o600));

    // The connection of the old owner is dropped, and the one that waited is refused.
    s.wait_for_log("frontend detached");
    let queued_served = queued_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        !queued_served,
        "a frontend of the old owner, queued before the change, was served:\n{}",
        s.log_text()
    );
    assert_eq!(refusals_of(&s, 0), 1, "{}", s.log_text());
    drop(served);

    // The new owner reads what the old one wrote.
    let (ok, out) = blkcheck_as(OWNER_UID, &socket, data.len() as u64, "5eed0fa1");
    assert!(
        ok,
        "uid {OWNER_UID} was not served: {out}\n{}",
        s.log_text()
    );

    // The owner survives a restart, socket ownership included.
    s.restart();
    assert_eq!(socket_owner(&socket), (OWNER_UID, 0o600));
    let got = s.admin().get("/v1/volumes/vm").unwrap().json();
    assert_eq!(got["owner"]["uid"], OWNER_UID);

    // Without an owner the socket is storaged's again (0660) and root is served.
    let v = patch(&s, "vm", r#"{"owner":null}"#);
    assert_eq!(v["owner"], serde_json::Value::Null);
    assert_eq!(socket_owner(&socket), (0, 0o660));
    let mut c = connect_retry(&socket, 1);
    assert_eq!(c.read(0, 0, 4096).unwrap(), data[..4096].to_vec());
}

#[test]
fn bad_owners_are_refused() {
    let s = Storaged::start();
    let create = |owner: &str| {
        let body = format!(r#"{{"name":"o","size":"4MiB","owner":{owner}}}"#);
        s.admin()
            .request("POST", "/v1/volumes", Some(&body))
            .unwrap()
    };
    for (owner, needle) in [
        (r#"{"uid":4294967295}"#, "uid"),
        (r#"{"uid":-1}"#, "uid"),
        (r#"{"uid":1,"vm_id":"a b"}"#, "vm_id"),
        (r#"{"uid":1,"vm_id":""}"#, "vm_id"),
        (r#"{"uid":1,"gid":2}"#, "unknown field"),
        (r#"{"vm_id":"x"}"#, "uid"),
    ] {
        let r = create(owner);
        assert_eq!(r.status, 400, "{owner}: {}", r.body);
        assert!(r.body.contains(needle), "{owner}: {}", r.body);
    }
    assert_eq!(s.admin().get("/v1/volumes").unwrap().body, "[]");
    s.create_volume(r#"{"name":"o","size":"4MiB"}"#);
    let long = "v".repeat(200);
    let r = s
        .admin()
        .request(
            "PATCH",
            "/v1/volumes/o",
            Some(&format!(r#"{{"owner":{{"uid":7,"vm_id":"{long}"}}}}"#)),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("vm_id"), "{}", r.body);
    assert_eq!(
        s.admin().get("/v1/volumes/o").unwrap().json()["owner"],
        serde_json::Value::Null
    );
}
