//! The admin API and the daemon's start-up checks, against the real binary.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::process::Command;

use storaged_tests::*;

/// Volume list and backing files, to check that a refused request changed nothing.
fn snapshot(s: &Storaged) -> (String, Vec<String>) {
    let list = s.admin().get("/v1/volumes").unwrap().body;
    let mut files: Vec<String> = std::fs::read_dir(s.data_dir.join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    (list, files)
}

fn expect_error(
    s: &Storaged,
    method: &str,
    target: &str,
    body: Option<&str>,
    status: u16,
    needle: &str,
) {
    let before = snapshot(s);
    let r = s.admin().request(method, target, body).unwrap();
    assert_eq!(r.status, status, "{method} {target} {body:?}: {}", r.body);
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "{method} {target} {body:?}: error '{msg}' lacks '{needle}'"
    );
    assert_eq!(
        snapshot(s),
        before,
        "{method} {target} {body:?} changed state"
    );
}

#[test]
fn create_returns_the_volume_and_get_and_list_show_it() {
    let s = Storaged::start();
    let v = s.create_volume(r#"{"name":"db1","size":"2TiB","tier":"premium"}"#);
    assert_eq!(v["name"], "db1");
    assert_eq!(v["size_bytes"], 2u64 << 40);
    assert_eq!(v["tier"], "premium");
    assert_eq!(v["attached"], false);
    let socket = v["socket"].as_str().unwrap();
    assert!(
        socket.starts_with('/') && socket.ends_with("db1.sock"),
        "{socket}"
    );
    assert!(std::path::Path::new(socket).exists());
    assert!(!v["id"].as_str().unwrap().is_empty());
    let got = s.admin().get("/v1/volumes/db1").unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), v);
    let list = s.admin().get("/v1/volumes").unwrap().json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Default tier and size given as a plain number of bytes.
    let w = s.create_volume(r#"{"name":"w","size":1048576}"#);
    assert_eq!(w["tier"], "standard");
}

#[test]
fn bad_names_are_refused_and_nothing_changes() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"ok","size":"1MiB"}"#);
    let long = "x".repeat(64);
    for name in [
        "../etc",
        "a/b",
        "..",
        "",
        ".hidden",
        long.as_str(),
        "sp ace",
    ] {
        let body = serde_json::json!({ "name": name, "size": "1MiB" }).to_string();
        expect_error(&s, "POST", "/v1/volumes", Some(&body), 400, "name");
    }
}

#[test]
fn bad_sizes_tiers_fields_and_duplicates_are_refused() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"dup","size":"1MiB"}"#);
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size":0}"#),
        400,
        "greater than zero",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size":"4097"}"#),
        400,
        "multiple of 4096",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size":"12 parsecs"}"#),
        400,
        "unit",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size":-5}"#),
        400,
        "negative",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size":"1MiB","tier":"gold"}"#),
        400,
        "unknown tier 'gold'",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size":"1MiB","colour":"red"}"#),
        400,
        "unknown field `colour`",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a"}"#),
        400,
        "missing field `size`",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some("{not json"),
        400,
        "invalid request body",
    );
    expect_error(&s, "POST", "/v1/volumes", None, 400, "empty");
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size":"1MiB","num_queues":0}"#),
        400,
        "num_queues",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"dup","size":"2MiB"}"#),
        409,
        "already exists",
    );
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"dev","size":"1MiB","device":"/nonexistent/disk"}"#),
        400,
        "/nonexistent/disk",
    );
    // A regular file (the catalog itself, say) is not a device.
    let catalog = s.data_dir.join("catalog.json");
    let body = serde_json::json!({"name": "dev", "size": "4096", "device": catalog}).to_string();
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(&body),
        400,
        "not a block device",
    );
}

#[test]
fn shrinking_unknown_volumes_and_bad_updates_are_refused() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"v","size":"8MiB"}"#);
    expect_error(
        &s,
        "PATCH",
        "/v1/volumes/v",
        Some(r#"{"size":"4MiB"}"#),
        400,
        "cannot shrink",
    );
    expect_error(
        &s,
        "PATCH",
        "/v1/volumes/v",
        Some(r#"{"size":"9000"}"#),
        400,
        "multiple of 4096",
    );
    expect_error(
        &s,
        "PATCH",
        "/v1/volumes/v",
        Some(r#"{"tier":"platinum"}"#),
        400,
        "unknown tier",
    );
    expect_error(
        &s,
        "PATCH",
        "/v1/volumes/v",
        Some(r#"{"iops":5}"#),
        400,
        "unknown field",
    );
    expect_error(
        &s,
        "PATCH",
        "/v1/volumes/nope",
        Some(r#"{"size":"16MiB"}"#),
        404,
        "does not exist",
    );
    expect_error(&s, "GET", "/v1/volumes/nope", None, 404, "does not exist");
    expect_error(
        &s,
        "DELETE",
        "/v1/volumes/nope",
        None,
        404,
        "does not exist",
    );
    expect_error(&s, "GET", "/v1/nothing-here", None, 404, "no such endpoint");
    expect_error(&s, "PUT", "/v1/volumes", None, 405, "not allowed");
    // A valid tier change is applied and persisted.
    let r = s
        .admin()
        .request("PATCH", "/v1/volumes/v", Some(r#"{"tier":"ultra"}"#))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["tier"], "ultra");
}

#[test]
fn deleting_an_attached_volume_needs_force() {
    let s = Storaged::start();
    let v = s.create_volume(r#"{"name":"att","size":"8MiB"}"#);
    let backing = v["backing"]["path"].as_str().unwrap().to_string();
    let socket = s.socket_of("att");
    let mut c = connect_retry(&socket, 1);
    assert_eq!(c.write(0, 0, &pattern(4096, 0, 1)), 0);
    expect_error(&s, "DELETE", "/v1/volumes/att", None, 409, "attached");
    expect_error(
        &s,
        "DELETE",
        "/v1/volumes/att?force=maybe",
        None,
        400,
        "invalid query",
    );
    assert_eq!(
        c.read(0, 0, 4096).unwrap(),
        pattern(4096, 0, 1),
        "refused delete disturbed I/O"
    );
    let r = s
        .admin()
        .request("DELETE", "/v1/volumes/att?force=true", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data_removed"], true);
    assert!(!std::path::Path::new(&backing).exists());
    assert!(!socket.exists());
    assert_eq!(
        s.admin().get("/v1/volumes").unwrap().json(),
        serde_json::json!([])
    );
    drop(c);
    // A detached volume is deleted without force.
    s.create_volume(r#"{"name":"free","size":"8MiB"}"#);
    let r = s
        .admin()
        .request("DELETE", "/v1/volumes/free", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn pool_capacity_refuses_overcommit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("storaged.toml");
    std::fs::write(&cfg, "pool_capacity = \"10MiB\"\n").unwrap();
    let s = Storaged::start_with(&["--config", cfg.to_str().unwrap()]);
    s.create_volume(r#"{"name":"a","size":"6MiB"}"#);
    expect_error(
        &s,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"b","size":"6MiB"}"#),
        507,
        "pool capacity exceeded",
    );
    expect_error(
        &s,
        "PATCH",
        "/v1/volumes/a",
        Some(r#"{"size":"12MiB"}"#),
        507,
        "pool capacity exceeded",
    );
    s.create_volume(r#"{"name":"b","size":"4MiB"}"#);
    let info = s.admin().get("/v1/info").unwrap().json();
    assert_eq!(info["allocated_bytes"], 10u64 << 20);
}

#[test]
fn volumes_and_their_sockets_survive_restart() {
    let mut s = Storaged::start();
    let a = s.create_volume(r#"{"name":"a","size":"8MiB","tier":"ultra","num_queues":2}"#);
    let b = s.create_volume(r#"{"name":"b","size":"4MiB","read_only":true}"#);
    s.restart();
    assert_eq!(s.admin().get("/v1/volumes/a").unwrap().json(), a);
    assert_eq!(s.admin().get("/v1/volumes/b").unwrap().json(), b);
    s.kill_and_restart();
    assert_eq!(s.admin().get("/v1/volumes/a").unwrap().json(), a);
    let catalog = std::fs::read_to_string(s.data_dir.join("catalog.json")).unwrap();
    assert!(catalog.contains("\"ultra\""));
}

#[test]
fn a_volume_with_missing_backing_is_reported_and_the_rest_served() {
    let mut s = Storaged::start();
    let lost = s.create_volume(r#"{"name":"lost","size":"4MiB"}"#);
    s.create_volume(r#"{"name":"fine","size":"4MiB"}"#);
    let status = s.signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    std::fs::remove_file(lost["backing"]["path"].as_str().unwrap()).unwrap();
    s.restart_after_stop();
    let l = s.admin().get("/v1/volumes/lost").unwrap().json();
    assert_eq!(l["state"], "failed");
    assert!(l["error"].as_str().unwrap().contains("No such file"), "{l}");
    let mut c = connect_retry(&s.socket_of("fine"), 1);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
}

fn run_storaged(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("storaged")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_config_keys_and_bad_settings_stop_startup_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("c.toml");
    for (content, named) in [
        ("[io]\nmax_queue_sise = 512\n", "max_queue_sise"),
        ("[io]\nmax_queue_size = 100\n", "io.max_queue_size"),
        ("[volume_defaults]\ntier = \"gold\"\n", "gold"),
        ("pool_capacity = \"1000\"\n", "pool_capacity"),
    ] {
        std::fs::write(&cfg, content).unwrap();
        let (code, err) = run_storaged(&[
            "--data-dir",
            data.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ]);
        assert_ne!(code, 0, "{content} accepted");
        assert!(err.contains(named), "{content}: {err}");
    }
    let (code, err) = run_storaged(&[]);
    assert_ne!(code, 0);
    assert!(err.contains("--data-dir"), "{err}");
    let (code, err) = run_storaged(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--metrics-addr",
        "nowhere",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("metrics_addr"), "{err}");
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let s = Storaged::start();
    let (code, err) = run_storaged(&[
        "--data-dir",
        s.data_dir.to_str().unwrap(),
        "--metrics-addr",
        "off",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("in use by another storaged"), "{err}");
    assert_eq!(s.admin().get("/v1/info").unwrap().status, 200);
}

#[test]
fn admin_socket_is_private_and_storagectl_drives_the_api() {
    use std::os::unix::fs::PermissionsExt;
    let s = Storaged::start();
    let mode = std::fs::metadata(s.admin_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let ctl = |args: &[&str]| {
        let out = Command::new(bin("storagectl"))
            .arg("--socket")
            .arg(s.admin_socket())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = ctl(&["create", "cli1", "--size", "16MiB", "--tier", "enterprise"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"enterprise\""), "{out}");
    let (ok, out, _) = ctl(&["resize", "cli1", "32MiB"]);
    assert!(ok && out.contains(&(32u64 << 20).to_string()), "{out}");
    let (ok, out, _) = ctl(&["list"]);
    assert!(ok && out.contains("cli1"));
    let (ok, out, err) = ctl(&[
        "set-limits",
        "cli1",
        "--iops",
        "1234",
        "--bandwidth",
        "8MiB",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["limits"]["iops"], 1234);
    assert_eq!(v["limits"]["bandwidth_bytes_per_second"], 8 << 20);
    let (ok, out, err) = ctl(&["set-limits", "cli1", "--iops", "none"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["limits"]["iops_source"], "floor");
    let (ok, _, err) = ctl(&["set-limits", "cli1", "--iops", "0"]);
    assert!(!ok && err.contains("iops_limit"), "{err}");
    let (ok, out, err) = ctl(&["set-owner", "cli1", "--uid", "1234", "--vm-id", "vm-7"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["owner"],
        serde_json::json!({"uid": 1234, "vm_id": "vm-7"})
    );
    let (ok, out, err) = ctl(&["set-owner", "cli1", "--none"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["owner"], serde_json::Value::Null);
    let (ok, _, _) = ctl(&["set-owner", "cli1"]);
    assert!(!ok, "set-owner without --uid or --none was accepted");
    let (ok, out, err) = ctl(&[
        "create",
        "cli2",
        "--size",
        "1MiB",
        "--owner-uid",
        "77",
        "--vm-id",
        "vm-2",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["owner"], serde_json::json!({"uid": 77, "vm_id": "vm-2"}));
    let (ok, _, err) = ctl(&["create", "bad/name", "--size", "1MiB"]);
    assert!(!ok && err.contains("HTTP 400"), "{err}");
    let (ok, _, _) = ctl(&["delete", "cli1"]);
    assert!(ok);
    let (ok, out, _) = ctl(&["info"]);
    assert!(ok && out.contains("metrics_url"), "{out}");
}

/// Sends a request from a thread of its own; `None` if no answer came within `limit`.
fn answer_within(
    s: &Storaged,
    limit: std::time::Duration,
    method: &'static str,
    target: &str,
    body: Option<&str>,
) -> Option<Response> {
    let admin = s.admin();
    let (target, body) = (target.to_string(), body.map(str::to_string));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(admin.request(method, &target, body.as_deref()).unwrap());
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn a_forced_delete_stuck_on_a_hung_device_leaves_the_api_answering() {
    use std::time::Duration;
    let s = Storaged::start();
    let Some(mut disk) = FreezableDevice::new(16 << 20) else {
        skip("a_forced_delete_stuck_on_a_hung_device_leaves_the_api_answering: cannot set up a freezable device (needs root, losetup, mkfs.ext4, mount, fsfreeze)");
        return;
    };
    let body = serde_json::json!({"name": "hung", "size": "16MiB", "device": disk.dev}).to_string();
    s.create_volume(&body);
    s.create_volume(r#"{"name":"other","size":"8MiB"}"#);

    // A frontend with a write in flight on the frozen device: the write cannot complete, so a
    // forced delete waits for it (a drain never abandons I/O the kernel still holds).
    let socket = s.socket_of("hung");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut c = connect_retry(&socket, 1);
        assert_eq!(c.write(0, 0, &pattern(4096, 0, 1)), 0);
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        // Completes (or fails) once the device is thawed and the connection gone.
        c.write(0, 4096, &pattern(4096, 4096, 2));
    });
    ready_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    disk.freeze();
    go_tx.send(()).unwrap();
    wait_until(
        "the write never reached the device",
        Duration::from_secs(10),
        || disk.inflight() > 0,
    );
    let admin = s.admin();
    let (deleted_tx, deleted_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = deleted_tx.send(
            admin
                .request("DELETE", "/v1/volumes/hung?force=true", None)
                .unwrap(),
        );
    });
    std::thread::sleep(Duration::from_millis(500));

    // Meanwhile the API answers: reads, the other volume's changes, a new volume.
    let limit = Duration::from_secs(5);
    let must_answer = |method: &'static str, target: &str, body: Option<&str>| {
        answer_within(&s, limit, method, target, body).unwrap_or_else(|| {
            panic!("{method} {target}: no answer within {limit:?} while a forced delete waits on a hung device")
        })
    };
    let list = must_answer("GET", "/v1/volumes", None);
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(must_answer("GET", "/v1/volumes/hung", None).status, 200);
    assert_eq!(must_answer("GET", "/v1/info", None).status, 200);
    let r = must_answer("PATCH", "/v1/volumes/other", Some(r#"{"size":"12MiB"}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = must_answer(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"more","size":"4MiB"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(must_answer("DELETE", "/v1/volumes/more", None).status, 200);
    // A second operation on the volume being deleted is refused, not queued behind it.
    let r = must_answer("PATCH", "/v1/volumes/hung", Some(r#"{"tier":"ultra"}"#));
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("busy"), "{}", r.body);
    assert!(
        deleted_rx.try_recv().is_err(),
        "the delete finished while its frontend's write was still in flight"
    );

    // Once the device answers, the delete finishes.
    disk.thaw();
    let r = deleted_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.volume_names(), ["other"]);
}

fn fields(v: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn the_openapi_file_names_every_field_the_api_answers_with() {
    let s = Storaged::start();
    let v = s.create_volume(
        r#"{"name":"doc","size":"64MiB","owner":{"uid":0,"vm_id":"vm-1"},"bandwidth_limit":1000000}"#,
    );
    let volume = openapi_properties(
        "storaged/openapi.yaml",
        &["components", "schemas", "Volume"],
    );
    for f in fields(&v) {
        assert!(
            volume.contains(&f),
            "Volume field '{f}' is not in openapi.yaml: {volume:?}"
        );
    }
    for f in fields(&v["limits"]) {
        let limits = openapi_properties(
            "storaged/openapi.yaml",
            &["components", "schemas", "Limits"],
        );
        assert!(
            limits.contains(&f),
            "Limits field '{f}' is not in openapi.yaml: {limits:?}"
        );
    }
    // What the file says an encrypted volume offers, it offers: WRITE_ZEROES among them.
    {
        let mut c = BlkClient::connect(&s.socket_of("doc"), 1).unwrap();
        assert!(c.get_u64("max-write-zeroes-len") > 0);
        assert_eq!(c.write(0, 0, &pattern(8192, 0, 3)), 0);
        assert_eq!(c.write_zeroes(0, 0, 8192, false), 0);
        assert_eq!(c.read(0, 0, 8192).unwrap(), vec![0u8; 8192]);
    }
    s.wait_for_log("frontend detached");
    let deleted = s
        .admin()
        .request("DELETE", "/v1/volumes/doc", None)
        .unwrap()
        .json();
    let answer = openapi_properties(
        "storaged/openapi.yaml",
        &[
            "paths",
            "/v1/volumes/{name}",
            "delete",
            "responses",
            "200",
            "content",
            "application/json",
            "schema",
        ],
    );
    assert_eq!(
        fields(&deleted),
        answer,
        "the delete answer and openapi.yaml differ"
    );
}
