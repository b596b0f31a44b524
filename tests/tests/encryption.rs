//! Encryption at rest against the real daemon: what the `blkio` client writes is stored as
//! dm-crypt's aes-xts-plain64 (checked by Python's `cryptography`, code we did not write), the
//! key hierarchy rotates and its files are durable, deletion removes the wrapped key (and says
//! what that does not cover), and bad keys are refused.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use storaged_tests::*;

const MIB: u64 = 1 << 20;
const MARKER: &[u8] = b"PLAINTEXT-MARKER-0123456789abcdef";

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// 4 KiB of a recognisable plaintext.
fn marked_block(seed: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    while b.len() < 4096 {
        b.extend_from_slice(MARKER);
        b.push(seed);
    }
    b.truncate(4096);
    b
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn backing_of(v: &serde_json::Value) -> PathBuf {
    PathBuf::from(v["backing"]["path"].as_str().unwrap())
}

/// Writes blocks at these 4 KiB offsets, flushes; returns the expected image of `size` bytes.
fn write_blocks(c: &mut BlkClient, size: u64, blocks: &[u64]) -> Vec<u8> {
    let mut image = vec![0u8; size as usize];
    for (i, &blk) in blocks.iter().enumerate() {
        let data = marked_block(i as u8);
        assert_eq!(c.write(0, blk * 4096, &data), 0);
        image[(blk * 4096) as usize..((blk + 1) * 4096) as usize].copy_from_slice(&data);
    }
    assert_eq!(c.flush(0), 0);
    image
}

/// The operator's emergency path: `scripts/unwrap-dek` writes the DEK from the catalog and KEK
/// file, then Python's `cryptography` decrypts the backing file as dm-crypt would.
fn decrypt_with_python(s: &Storaged, name: &str, backing: &Path, image: &[u8]) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let dek = scratch.path().join("dek.bin");
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/unwrap-dek"
        ))
        .arg("--data-dir")
        .arg(&s.data_dir)
        .arg(name)
        .arg(&dek)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "unwrap-dek: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("cryptsetup open --type plain --cipher aes-xts-plain64"),
        "{said}"
    );
    assert_eq!(
        std::fs::metadata(&dek).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let expected = scratch.path().join("expected.img");
    std::fs::write(&expected, image).unwrap();
    let out = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/xts_decrypt.py"))
        .arg(&dek)
        .arg(backing)
        .arg(&expected)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python check failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn python_decrypts_what_the_client_wrote_and_the_file_holds_no_plaintext() {
    let s = Storaged::start();
    let v = s.create_volume(r#"{"name":"e","size":"4MiB"}"#);
    assert_eq!(v["encryption"], "aes-xts-plain64");
    assert_eq!(v["block_size"], 4096);
    assert!(s.log_text().contains("created a local key-encryption key"));
    let mut c = connect_retry(&s.socket_of("e"), 1);
    assert_eq!(c.get_i32("request-alignment"), 4096);
    let blocks = [0, 1, 7, 300, 1023];
    let image = write_blocks(&mut c, 4 * MIB, &blocks);
    // The client reads its plaintext back, and zeros where it wrote nothing.
    for (i, &blk) in blocks.iter().enumerate() {
        assert_eq!(c.read(0, blk * 4096, 4096).unwrap(), marked_block(i as u8));
    }
    assert_eq!(c.read(0, 2 * 4096, 4096).unwrap(), vec![0u8; 4096]);
    let backing = backing_of(&v);
    let disk = std::fs::read(&backing).unwrap();
    assert!(
        !contains(&disk, MARKER),
        "plaintext found in the backing file"
    );
    let report = decrypt_with_python(&s, "e", &backing, &image);
    assert!(
        report.contains("units compared: 1024, decrypted: 5"),
        "{report}"
    );

    // Control: the same writes on a plain volume do show the marker, so the scan works.
    let p = s.create_volume(r#"{"name":"p","size":"1MiB","encryption":"none"}"#);
    assert_eq!(p["encryption"], "none");
    let mut c = connect_retry(&s.socket_of("p"), 1);
    write_blocks(&mut c, MIB, &[3]);
    assert!(contains(&std::fs::read(backing_of(&p)).unwrap(), MARKER));
}

#[test]
fn discard_and_write_zeroes_read_back_zeros_on_encrypted_volumes() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"e","size":"1MiB"}"#);
    let mut c = connect_retry(&s.socket_of("e"), 1);
    write_blocks(&mut c, MIB, &[0, 1, 2, 3]);
    assert_eq!(c.write_zeroes(0, 0, 8192, false), 0);
    assert_eq!(c.discard(0, 8192, 4096), 0);
    assert_eq!(c.read(0, 0, 8192).unwrap(), vec![0u8; 8192]);
    assert_eq!(c.read(0, 3 * 4096, 4096).unwrap(), marked_block(3));
}

fn add_kek(dir: &Path, id: &str, fill: u8) {
    let path = dir.join(format!("{id}.key"));
    std::fs::write(&path, format!("{:02x}", fill).repeat(32)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn set_current(dir: &Path, id: &str) {
    std::fs::write(dir.join("current"), id).unwrap();
}

#[test]
fn rotation_rewraps_keys_and_the_old_kek_can_be_removed() {
    let mut s = Storaged::start();
    let v = s.create_volume(r#"{"name":"r","size":"1MiB"}"#);
    let old = v["kek_id"].as_str().unwrap().to_string();
    let mut c = connect_retry(&s.socket_of("r"), 1);
    let image = write_blocks(&mut c, MIB, &[5, 6]);
    drop(c);

    let keys = s.data_dir.join("keys");
    add_kek(&keys, "kek-2026", 0x5a);
    set_current(&keys, "kek-2026");
    let r = s.admin().request("POST", "/v1/keys/rotate", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["current_kek"], "kek-2026");
    assert_eq!(j["rewrapped"], serde_json::json!(["r"]));
    let status = s.admin().get("/v1/keys").unwrap().json();
    assert_eq!(status["volumes_by_kek"], serde_json::json!({"kek-2026": 1}));
    // Rotating again changes nothing.
    let again = s
        .admin()
        .request("POST", "/v1/keys/rotate", None)
        .unwrap()
        .json();
    assert_eq!(again["already_current"], 1);
    assert!(s.log_text().contains("volume key re-wrapped"));

    // The old KEK goes; after a restart the volume is served with the same data.
    std::fs::remove_file(keys.join(format!("{old}.key"))).unwrap();
    s.restart();
    let v = s.admin().get("/v1/volumes/r").unwrap().json();
    assert_eq!(v["state"], "serving", "{v}");
    assert_eq!(v["kek_id"], "kek-2026");
    let mut c = connect_retry(&s.socket_of("r"), 1);
    assert_eq!(c.read(0, 5 * 4096, 4096).unwrap(), marked_block(0));
    assert_eq!(c.read(0, 6 * 4096, 4096).unwrap(), marked_block(1));
    let report = decrypt_with_python(&s, "r", &backing_of(&v), &image);
    assert!(report.contains("decrypted: 2"), "{report}");
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

#[test]
fn deleting_an_encrypted_volume_removes_its_wrapped_key_and_says_what_that_does_not_cover() {
    let s = Storaged::start();
    let v = s.create_volume(r#"{"name":"gone","size":"1MiB"}"#);
    s.create_volume(r#"{"name":"stays","size":"1MiB"}"#);
    let catalog: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.data_dir.join("catalog.json")).unwrap()).unwrap();
    let wrapped = catalog["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "gone")
        .unwrap()["encryption"]["wrapped_dek"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .admin()
        .request("DELETE", "/v1/volumes/gone", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // The answer says what was done and what that does not protect against.
    let j = r.json();
    assert_eq!(j["key"], "wrapped key removed from the catalog", "{j}");
    assert_eq!(j["data"], "backing file removed", "{j}");
    assert_eq!(j["data_removed"], true, "{j}");
    assert!(j.get("crypto_erased").is_none(), "{j}");
    let caveats = j["not_protected_against"].to_string();
    for said in ["taken before", "flash", "same file system"] {
        assert!(caveats.contains(said), "no '{said}' in {caveats}");
    }
    assert!(!backing_of(&v).exists());
    let raw: Vec<u8> = (0..wrapped.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&wrapped[i..i + 2], 16).unwrap())
        .collect();
    for f in files_under(&s.data_dir) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !contains(&bytes, wrapped.as_bytes()) && !contains(&bytes, &raw),
            "the wrapped key of the deleted volume is still in {}",
            f.display()
        );
    }
    assert!(s
        .log_text()
        .contains("wrapped key removed from the catalog"));
    // The other volume still has its key.
    let stays = s.admin().get("/v1/volumes/stays").unwrap().json();
    assert_eq!(stays["state"], "serving");
}

fn storaged_fails_to_start(args: &[&str]) -> String {
    let out = Command::new(bin("storaged"))
        .args(args)
        .args(["--metrics-addr", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "storaged started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn insecure_key_directories_and_files_stop_startup_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
    add_kek(&keys, "k1", 1);
    set_current(&keys, "k1");
    let config = tmp.path().join("storaged.toml");
    std::fs::write(
        &config,
        format!("[encryption]\nkey_dir = \"{}\"\n", keys.display()),
    )
    .unwrap();
    let data = tmp.path().join("data");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let err = storaged_fails_to_start(&args);
    assert!(err.contains("0755") && err.contains("keys"), "{err}");

    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(keys.join("k1.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = storaged_fails_to_start(&args);
    assert!(err.contains("k1.key") && err.contains("0640"), "{err}");

    std::fs::set_permissions(keys.join("k1.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    set_current(&keys, "missing");
    let err = storaged_fails_to_start(&args);
    assert!(err.contains("Unknown KEK 'missing'"), "{err}");

    std::fs::write(keys.join("k1.key"), "not hex").unwrap();
    set_current(&keys, "k1");
    let err = storaged_fails_to_start(&args);
    assert!(err.contains("64 hex digits"), "{err}");
}

/// Edits the catalog of a stopped daemon.
fn edit_catalog(s: &Storaged, name: &str, edit: impl Fn(&mut serde_json::Value)) {
    let path = s.data_dir.join("catalog.json");
    let mut catalog: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for v in catalog["volumes"].as_array_mut().unwrap() {
        if v["name"] == name {
            edit(&mut v["encryption"]);
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&catalog).unwrap()).unwrap();
}

#[test]
fn a_volume_whose_key_does_not_unwrap_is_not_served() {
    let mut s = Storaged::start();
    for name in ["corrupt", "unknown", "fine"] {
        s.create_volume(&format!(r#"{{"name":"{name}","size":"1MiB"}}"#));
    }
    let status = s.signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    edit_catalog(&s, "corrupt", |e| {
        let w = e["wrapped_dek"].as_str().unwrap().to_string();
        let flipped = if w.starts_with('0') { "1" } else { "0" };
        e["wrapped_dek"] = format!("{flipped}{}", &w[1..]).into();
    });
    edit_catalog(&s, "unknown", |e| e["kek_id"] = "nope".into());
    s.restart_after_stop();
    let corrupt = s.admin().get("/v1/volumes/corrupt").unwrap().json();
    assert_eq!(corrupt["state"], "failed");
    assert!(
        corrupt["error"]
            .as_str()
            .unwrap()
            .contains("does not unwrap"),
        "{corrupt}"
    );
    let unknown = s.admin().get("/v1/volumes/unknown").unwrap().json();
    assert_eq!(unknown["state"], "failed");
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("Unknown KEK 'nope'"),
        "{unknown}"
    );
    // Not served at all: nobody listens on their sockets.
    for name in ["corrupt", "unknown"] {
        let sock = s.socket_of(name);
        assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
    }
    let mut c = connect_retry(&s.socket_of("fine"), 1);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
}

#[test]
fn bad_encryption_requests_are_refused() {
    let s = Storaged::start();
    let r = s
        .admin()
        .request(
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"a","size":"1MiB","encryption":"rot13"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("unknown encryption 'rot13'"), "{}", r.body);

    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    std::fs::write(&config, "[encryption]\nallow_plaintext = false\n").unwrap();
    let strict = Storaged::start_with(&["--config", config.to_str().unwrap()]);
    let r = strict
        .admin()
        .request(
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"a","size":"1MiB","encryption":"none"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("allow_plaintext"), "{}", r.body);
    assert_eq!(
        strict.admin().get("/v1/volumes").unwrap().json(),
        serde_json::json!([])
    );
}

#[test]
fn key_material_never_reaches_the_log_or_a_core_dump() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"k","size":"1MiB"}"#);
    let keys = s.data_dir.join("keys");
    let current = std::fs::read_to_string(keys.join("current")).unwrap();
    let kek = std::fs::read_to_string(keys.join(format!("{}.key", current.trim()))).unwrap();
    let log = s.log_text();
    assert!(!log.contains(kek.trim()), "the KEK is in the log");
    assert!(!log.contains(&kek.trim()[..16]));
    // No core dumps: storaged set its core size limit, soft and hard, to 0.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let core: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!((core[4], core[5]), ("0", "0"), "{core:?}");
}

/// storaged started under `strace -f`, which writes the calls it is told to trace, with the
/// path behind every file descriptor (`-y`), into a file. Stopped (storaged first, so strace
/// never detaches from a live daemon) on drop.
struct Traced {
    strace: std::process::Child,
    data_dir: tempfile::TempDir,
    out: PathBuf,
}

impl Traced {
    fn start(calls: &str) -> Traced {
        let ok = Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "strace is needed (scripts/test installs it)");
        let data_dir = tempfile::Builder::new().prefix("stg").tempdir().unwrap();
        let out = data_dir.path().with_extension("strace");
        let strace = Command::new("strace")
            .args(["-f", "-qq", "-y", "-e", "signal=none", "-e"])
            .arg(format!("trace={calls}"))
            .arg("-o")
            .arg(&out)
            .arg(bin("storaged"))
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--metrics-addr", "off"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Traced {
            strace,
            data_dir,
            out,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !t.admin().get("/v1/info").is_ok_and(|r| r.status == 200) {
            assert!(std::time::Instant::now() < deadline, "storaged not ready");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        t
    }

    fn admin(&self) -> AdminClient {
        AdminClient::new(self.data_dir.path().join("admin.sock"))
    }

    /// Pid of storaged, strace's child.
    fn daemon_pid(&self) -> Option<i32> {
        let pid = self.strace.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Stops storaged with SIGTERM and returns the trace.
    fn stop(mut self) -> String {
        let pid = self.daemon_pid().unwrap();
        // SAFETY: kill() with the pid of our child's child, which is still running.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        assert!(self.strace.wait().unwrap().success());
        std::fs::read_to_string(&self.out).unwrap()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid() {
            // SAFETY: as in stop().
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.strace.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

/// Index of the first trace line at or after `from` with all of `needles`.
fn line_with(lines: &[&str], from: usize, needles: &[&str]) -> Option<usize> {
    (from..lines.len()).find(|&i| needles.iter().all(|n| lines[i].contains(n)))
}

#[test]
fn key_files_and_their_directory_are_fsynced_before_the_catalog_depends_on_them() {
    let t = Traced::start("fsync,fdatasync,rename,renameat,renameat2");
    let dir = t.data_dir.path().to_owned();
    let keys = dir.join("keys");
    let first = std::fs::read_to_string(keys.join("current")).unwrap();
    let first = first.trim().to_string();
    t.admin()
        .request("POST", "/v1/volumes", Some(r#"{"name":"a","size":"1MiB"}"#))
        .map(|r| assert_eq!(r.status, 201, "{}", r.body))
        .unwrap();
    // The operator's rotation: a key file written without fsync, then rotate-keys.
    add_kek(&keys, "kek-2", 0x42);
    set_current(&keys, "kek-2");
    let r = t.admin().request("POST", "/v1/keys/rotate", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let trace = t.stop();
    let lines: Vec<&str> = trace.lines().collect();
    let catalog = format!("\"{}\"", dir.join("catalog.json").display());
    let fsync = |p: &Path| format!("<{}>)", p.display());
    let renames: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("rename") && lines[i].contains(&catalog))
        .collect();
    assert_eq!(renames.len(), 2, "catalog writes:\n{trace}");
    let before = |what: &str, needles: &[&str], from: usize, to: usize| {
        let at = line_with(&lines, from, needles);
        assert!(
            at.is_some_and(|i| i < to),
            "{what} is not fsynced before the catalog names it:\n{trace}"
        );
    };
    let first_key = keys.join(format!("{first}.key"));
    before(
        "the first KEK",
        &["fsync(", &fsync(&first_key)],
        0,
        renames[0],
    );
    before(
        "the key directory",
        &["fsync(", &fsync(&keys)],
        0,
        renames[0],
    );
    before(
        "the data dir holding keys/",
        &["fsync(", &fsync(&dir)],
        0,
        renames[0],
    );
    before(
        "the rotated-to KEK",
        &["fsync(", &fsync(&keys.join("kek-2.key"))],
        renames[0],
        renames[1],
    );
    before(
        "the key directory at rotation",
        &["fsync(", &fsync(&keys)],
        renames[0],
        renames[1],
    );
}

/// A file system mounted for a test, unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    /// `mount ARGS... DIR` on a new temporary directory; None (after saying why) where the
    /// test may not mount (not root, no loop devices).
    fn new(args: &[&str]) -> Option<Mount> {
        let dir = tempfile::Builder::new()
            .prefix("mnt")
            .tempdir_in("/var/tmp")
            .unwrap();
        let out = Command::new("mount")
            .args(args)
            .arg(dir.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("mount {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(Mount { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn unmount(&self) {
        let status = Command::new("umount").arg(self.path()).status().unwrap();
        assert!(status.success(), "umount {}", self.path().display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(self.path())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

const SAME_FS_WARNING: &str = "key directory is on the same file system as the volumes";

#[test]
fn a_key_directory_on_the_volumes_file_system_is_warned_about_and_one_elsewhere_is_not() {
    // The default layout: DATA_DIR/keys beside DATA_DIR/volumes.
    let s = Storaged::start();
    s.wait_for_log(SAME_FS_WARNING);
    drop(s);

    let Some(tmpfs) = Mount::new(&["-t", "tmpfs", "-o", "size=4M,mode=0700", "tmpfs"]) else {
        skip("the key-directory-elsewhere half: cannot mount a tmpfs (needs root)");
        return;
    };
    let keys = tmpfs.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    add_kek(&keys, "k1", 7);
    set_current(&keys, "k1");
    let scratch = tempfile::tempdir().unwrap();
    let config = scratch.path().join("storaged.toml");
    std::fs::write(
        &config,
        format!("[encryption]\nkey_dir = \"{}\"\n", keys.display()),
    )
    .unwrap();
    let s = Storaged::start_with(&["--config", config.to_str().unwrap()]);
    s.create_volume(r#"{"name":"v","size":"1MiB"}"#);
    let r = s.admin().request("DELETE", "/v1/volumes/v", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["key"], "wrapped key removed from the catalog", "{j}");
    assert!(
        !j["not_protected_against"]
            .to_string()
            .contains("same file system"),
        "{j}"
    );
    assert!(s.log_text().contains("storaged ready"));
    assert!(!s.log_text().contains(SAME_FS_WARNING), "{}", s.log_text());
}

#[test]
fn a_rewritten_catalog_leaves_no_old_wrapped_key_in_its_file_systems_blocks() {
    // The data dir on a file system of its own, in an image file we can read whole afterwards.
    let image = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    image.as_file().set_len(64 * MIB).unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "nodiscard"])
        .arg(image.path())
        .status()
        .unwrap();
    assert!(mkfs.success(), "mkfs.ext4");
    let Some(fs) = Mount::new(&["-o", "loop", image.path().to_str().unwrap()]) else {
        skip("a_rewritten_catalog_leaves_no_old_wrapped_key_in_its_file_systems_blocks: cannot loop-mount (needs root)");
        return;
    };
    let data = fs.path().join("data");
    let mut s = Storaged::start_in(&data, &[]);
    s.create_volume(r#"{"name":"gone","size":"1MiB"}"#);
    s.create_volume(r#"{"name":"stays","size":"1MiB"}"#);
    let catalog: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("catalog.json")).unwrap()).unwrap();
    let wrapped = catalog["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "gone")
        .unwrap()["encryption"]["wrapped_dek"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .admin()
        .request("DELETE", "/v1/volumes/gone", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(s.signal_and_wait(libc::SIGTERM).success());
    fs.unmount();
    let blocks = std::fs::read(image.path()).unwrap();
    assert!(
        !contains(&blocks, wrapped.as_bytes()),
        "the deleted volume's wrapped key is still in the file system's blocks"
    );
    // Control: the kept volume's wrapped key is found, so the scan works.
    let kept = catalog["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "stays")
        .unwrap()["encryption"]["wrapped_dek"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(contains(&blocks, kept.as_bytes()));
}
