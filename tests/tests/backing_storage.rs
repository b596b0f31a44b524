//! What the storage under a volume does to the guest: a preallocated volume keeps its blocks,
//! a sparse one on a full file system fails the writes that need new blocks, and a write-back
//! the kernel lost fails the volume until an operator clears it.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use storaged_tests::*;

const MIB: u64 = 1 << 20;

/// Bytes allocated to a file.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn backing_path(volume: &serde_json::Value) -> PathBuf {
    PathBuf::from(volume["backing"]["path"].as_str().unwrap())
}

#[test]
fn a_preallocated_volume_keeps_its_blocks_through_discard_and_write_zeroes() {
    let s = Storaged::start();
    for (name, encryption) in [("thick", "none"), ("thick-enc", "aes-xts-plain64")] {
        let body = serde_json::json!({"name": name, "size": "16MiB", "preallocate": true,
                                      "encryption": encryption})
        .to_string();
        let v = s.create_volume(&body);
        let path = backing_path(&v);
        let before = allocated(&path);
        assert!(before >= 16 * MIB, "{name}: {before} bytes allocated");
        let mut c = connect_retry(&s.socket_of(name), 1);
        for off in [0, 4 * MIB, 8 * MIB] {
            assert_eq!(c.write(0, off, &pattern(65536, off, 5)), 0, "{name}");
        }
        assert_eq!(c.flush(0), 0, "{name}");
        assert_eq!(c.discard(0, 0, 4 * MIB), 0, "{name}: discard");
        // Encrypted volumes do not offer WRITE_ZEROES.
        if encryption == "none" {
            assert_eq!(c.write_zeroes(0, 4 * MIB, 4 * MIB, true), 0, "{name}");
            assert_eq!(c.write_zeroes(0, 8 * MIB, 4 * MIB, false), 0, "{name}");
        }
        assert_eq!(c.flush(0), 0, "{name}");
        let after = allocated(&path);
        assert!(
            after >= before,
            "{name}: discard and write-zeroes gave {} bytes back to the file system",
            before - after
        );
        // Zeroed in place: what was discarded reads as zeros, encrypted or not.
        let zeros = vec![0u8; 65536];
        assert_eq!(c.read(0, 0, 65536).unwrap(), zeros, "{name}");
        if encryption == "none" {
            assert_eq!(c.read(0, 4 * MIB, 65536).unwrap(), zeros, "{name}");
            assert_eq!(c.read(0, 8 * MIB, 65536).unwrap(), zeros, "{name}");
        }
    }
}

#[test]
fn a_sparse_volume_gives_discarded_blocks_back_to_the_file_system() {
    let s = Storaged::start();
    let v = s.create_volume(r#"{"name":"thin","size":"16MiB","encryption":"none"}"#);
    let path = backing_path(&v);
    let mut c = connect_retry(&s.socket_of("thin"), 1);
    for off in (0..4 * MIB).step_by(MIB as usize) {
        assert_eq!(c.write(0, off, &pattern(MIB as usize, off, 6)), 0);
    }
    assert_eq!(c.flush(0), 0);
    let written = allocated(&path);
    assert!(written >= 4 * MIB, "{written}");
    assert_eq!(c.discard(0, 0, 4 * MIB), 0);
    assert!(
        allocated(&path) < written - 3 * MIB,
        "discard punched no holes: {} bytes still allocated",
        allocated(&path)
    );
}

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: u64) -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("stgfull")
            .tempdir_in("/var/tmp")
            .ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    /// Writes a file until the file system is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.path().join("filler")).unwrap();
        for chunk in [1 << 20, 4096] {
            let buf = vec![0x5au8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_preallocated_volume_keeps_its_blocks_where_the_file_system_cannot_zero_a_range() {
    // tmpfs punches holes and allocates, but has no FALLOC_FL_ZERO_RANGE.
    let Some(fs) = Tmpfs::mount(64 * MIB) else {
        skip("a_preallocated_volume_keeps_its_blocks_where_the_file_system_cannot_zero_a_range: cannot mount a tmpfs (needs root)");
        return;
    };
    let s = Storaged::start_in(fs.dir.path(), &[]);
    let v = s
        .create_volume(r#"{"name":"thick","size":"16MiB","preallocate":true,"encryption":"none"}"#);
    let path = backing_path(&v);
    let before = allocated(&path);
    assert!(before >= 16 * MIB, "{before} bytes allocated");
    let mut c = connect_retry(&s.socket_of("thick"), 1);
    for off in [0, 4 * MIB, 8 * MIB] {
        assert_eq!(c.write(0, off, &pattern(65536, off, 5)), 0);
    }
    assert_eq!(c.write_zeroes(0, 0, 4 * MIB, true), 0);
    assert_eq!(c.write_zeroes(0, 4 * MIB, 4 * MIB, false), 0);
    // Nothing to zero with: the discard is answered and the data left as it is.
    assert_eq!(c.discard(0, 8 * MIB, 4 * MIB), 0);
    assert_eq!(c.flush(0), 0);
    assert!(
        allocated(&path) >= before,
        "{} bytes given back to the file system",
        before - allocated(&path)
    );
    let zeros = vec![0u8; 65536];
    assert_eq!(c.read(0, 0, 65536).unwrap(), zeros);
    assert_eq!(c.read(0, 4 * MIB, 65536).unwrap(), zeros);
}

#[test]
fn a_sparse_volume_on_a_full_file_system_fails_writes_with_ioerr_and_says_so() {
    let Some(fs) = Tmpfs::mount(16 * MIB) else {
        skip("a_sparse_volume_on_a_full_file_system_fails_writes_with_ioerr_and_says_so: cannot mount a tmpfs (needs root)");
        return;
    };
    let s = Storaged::start_in(fs.dir.path(), &[]);
    // Nothing stops a sparse volume larger than the file system (no pool_capacity set).
    s.create_volume(r#"{"name":"over","size":"64MiB"}"#);
    let mut c = connect_retry(&s.socket_of("over"), 1);
    assert_eq!(c.write(0, 0, &pattern(65536, 0, 7)), 0);
    fs.fill();
    assert_ne!(
        c.write(0, 32 * MIB, &pattern(65536, 32 * MIB, 7)),
        0,
        "a write needing blocks of a full file system succeeded"
    );
    s.wait_for_log("No space left on device");
    let scrape = http_get(&s.metrics_url());
    assert_eq!(
        metric_value(
            &scrape,
            r#"storaged_volume_errors_total{kind="io",volume="over"}"#
        ),
        Some(1.0),
        "{scrape}"
    );
    // Blocks it has are still written; the volume is not failed, and works again with room.
    assert_eq!(c.write(0, 0, &pattern(65536, 0, 8)), 0);
    assert_eq!(c.flush(0), 0);
    let v = s.admin().get("/v1/volumes/over").unwrap().json();
    assert_eq!(v["state"], "serving", "{v}");
    std::fs::remove_file(fs.dir.path().join("filler")).unwrap();
    assert_eq!(c.write(0, 32 * MIB, &pattern(65536, 32 * MIB, 7)), 0);
    assert_eq!(
        c.read(0, 32 * MIB, 65536).unwrap(),
        pattern(65536, 32 * MIB, 7)
    );
}

fn create_on(s: &Storaged, name: &str, dev: &str) {
    let body = serde_json::json!({"name": name, "size": "16MiB", "device": dev,
                                  "encryption": "none"})
    .to_string();
    s.create_volume(&body);
}

fn failed_gauge(s: &Storaged, name: &str) -> Option<f64> {
    let scrape = http_get(&s.metrics_url());
    metric_value(
        &scrape,
        &format!("storaged_volume_failed{{volume=\"{name}\"}}"),
    )
}

#[test]
fn a_lost_write_back_fails_every_later_flush_and_write_and_shows_in_the_api_and_metrics() {
    let Some(fault) = WritebackFault::new(16 * MIB) else {
        skip("a_lost_write_back_fails_every_later_flush_and_write_and_shows_in_the_api_and_metrics: cannot set up loop devices, tmpfs and ext4 (needs root, losetup, mkfs.ext4)");
        return;
    };
    let s = Storaged::start();
    create_on(&s, "lost", &fault.dev);
    let mut c = connect_retry(&s.socket_of("lost"), 1);
    assert_eq!(c.write(0, 0, &pattern(65536, 0, 1)), 0);
    assert_eq!(c.flush(0), 0, "healthy storage failed a flush");
    fault.fill();
    // The write lands in the page cache under the device: answered OK.
    assert_eq!(c.write(0, 4 * MIB, &pattern(65536, 4 * MIB, 2)), 0);
    assert_ne!(c.flush(0), 0, "the flush after a lost write-back succeeded");
    // The kernel reports the error once; the data is gone all the same.
    for i in 1..=3 {
        assert_ne!(c.flush(0), 0, "flush {i} after the failed one succeeded");
    }
    assert_ne!(
        c.write(0, 8 * MIB, &pattern(4096, 8 * MIB, 3)),
        0,
        "a failed volume accepted a write"
    );
    assert_ne!(
        c.discard(0, 8 * MIB, MIB),
        0,
        "a failed volume accepted a discard"
    );
    // Reads are still served, so the guest can copy off what it can.
    assert_eq!(c.read(0, 0, 65536).unwrap(), pattern(65536, 0, 1));
    let v = s.admin().get("/v1/volumes/lost").unwrap().json();
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("Input/output error"), "{v}");
    assert!(v["failed_at"].as_u64().is_some_and(|t| t > 0), "{v}");
    assert_eq!(failed_gauge(&s, "lost"), Some(1.0));
    assert_eq!(
        s.log_text().matches("volume marked failed").count(),
        1,
        "{}",
        s.log_text()
    );
}

#[test]
fn a_failed_volume_stays_failed_across_restart_until_the_operator_clears_it() {
    let Some(fault) = WritebackFault::new(16 * MIB) else {
        skip("a_failed_volume_stays_failed_across_restart_until_the_operator_clears_it: cannot set up loop devices, tmpfs and ext4 (needs root, losetup, mkfs.ext4)");
        return;
    };
    let mut s = Storaged::start();
    create_on(&s, "lost", &fault.dev);
    let socket = s.socket_of("lost");
    let failed_at = {
        let mut c = connect_retry(&socket, 1);
        fault.fill();
        assert_eq!(c.write(0, 0, &pattern(65536, 0, 1)), 0);
        assert_ne!(c.flush(0), 0, "the flush after a lost write-back succeeded");
        let v = s.admin().get("/v1/volumes/lost").unwrap().json();
        assert_eq!(v["state"], "failed", "{v}");
        v["failed_at"].clone()
    };
    s.wait_for_log("frontend detached");
    // A restart drops the page cache's view: only the record says the data may be lost.
    s.restart();
    let v = s.admin().get("/v1/volumes/lost").unwrap().json();
    assert_eq!(
        v["state"], "failed",
        "the failure was forgotten at restart: {v}"
    );
    assert_eq!(v["failed_at"], failed_at, "{v}");
    assert_eq!(failed_gauge(&s, "lost"), Some(1.0));
    {
        let mut c = connect_retry(&socket, 1);
        assert_ne!(
            c.flush(0),
            0,
            "a failed volume answered a flush OK after restart"
        );
        // Nor does a write reach the storage.
        assert_ne!(c.write(0, 8 * MIB, &pattern(65536, 8 * MIB, 9)), 0);
    }
    // The operator dealt with the storage (here: gave the file system room again).
    fault.release();
    let out = Command::new(bin("storagectl"))
        .arg("--socket")
        .arg(s.admin_socket())
        .args(["clear-failure", "lost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "serving", "{v}");
    assert!(v["error"].is_null() && v["failed_at"].is_null(), "{v}");
    assert_eq!(failed_gauge(&s, "lost"), Some(0.0));
    let mut c = connect_retry(&socket, 1);
    assert!(
        c.read(0, 8 * MIB, 65536).unwrap() != pattern(65536, 8 * MIB, 9),
        "a write refused while the volume was failed reached the storage"
    );
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.write(0, 4 * MIB, &pattern(65536, 4 * MIB, 4)), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    s.restart();
    let v = s.admin().get("/v1/volumes/lost").unwrap().json();
    assert_eq!(v["state"], "serving", "the cleared failure came back: {v}");
    // Clearing a volume that has no failure, or no volume, is refused.
    let r = s
        .admin()
        .request("POST", "/v1/volumes/lost/clear-failure", None)
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    let r = s
        .admin()
        .request("POST", "/v1/volumes/nope/clear-failure", None)
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}
