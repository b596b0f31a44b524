//! The real storaged, driven over vhost-user-blk by the blkio crate's client.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::process::Command;

use storaged_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn patterns_written_on_every_queue_read_back_on_every_queue() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"mq","size":"64MiB","num_queues":4}"#);
    let mut c = connect_retry(&s.socket_of("mq"), 4);
    assert_eq!(c.queues.len(), 4);
    assert_eq!(c.get_i32("max-queues"), 4);
    for q in 0..4 {
        let off = q as u64 * MIB;
        assert_eq!(
            c.write(q, off, &pattern(65536, off, q as u8)),
            0,
            "write on queue {q}"
        );
    }
    for q in 0..4 {
        for reader in 0..4 {
            let off = q as u64 * MIB;
            assert_eq!(
                c.read(reader, off, 65536).unwrap(),
                pattern(65536, off, q as u8),
                "queue {q}'s data read on queue {reader}"
            );
        }
    }
}

#[test]
fn many_requests_in_flight_complete_with_right_data() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"qd","size":"64MiB"}"#);
    let mut c = connect_retry(&s.socket_of("qd"), 1);
    // 64 writes of 16 KiB in flight at once, from distinct buffers.
    let n = 64usize;
    let len = 16384usize;
    for i in 0..n {
        let p = pattern(len, (i * len) as u64, 7);
        c.region()[i * len..(i + 1) * len].copy_from_slice(&p);
    }
    for i in 0..n {
        let buf = c.buf(i * len);
        c.queues[0].write((i * len) as u64, buf, len, i, blkio::ReqFlags::empty());
    }
    let done = c.wait(0, n);
    assert!(done.iter().all(|&(_, ret)| ret == 0), "{done:?}");
    c.region()[..n * len].fill(0);
    for i in 0..n {
        let buf = c.buf(i * len);
        c.queues[0].read((i * len) as u64, buf, len, i, blkio::ReqFlags::empty());
    }
    assert!(c.wait(0, n).iter().all(|&(_, ret)| ret == 0));
    for i in 0..n {
        assert_eq!(
            c.region()[i * len..(i + 1) * len],
            pattern(len, (i * len) as u64, 7)[..],
            "request {i}"
        );
    }
}

#[test]
fn flush_discard_and_write_zeroes_read_back_zeros() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"z","size":"16MiB"}"#);
    let mut c = connect_retry(&s.socket_of("z"), 1);
    let zeros = vec![0u8; 65536];
    for (i, op) in ["discard", "write_zeroes", "write_zeroes_unmap"]
        .iter()
        .enumerate()
    {
        let off = i as u64 * MIB;
        assert_eq!(c.write(0, off, &pattern(65536, off, 3)), 0);
        assert_eq!(c.flush(0), 0);
        assert_eq!(c.read(0, off, 65536).unwrap(), pattern(65536, off, 3));
        let ret = match *op {
            "discard" => c.discard(0, off, 65536),
            "write_zeroes" => c.write_zeroes(0, off, 65536, false),
            _ => c.write_zeroes(0, off, 65536, true),
        };
        assert_eq!(ret, 0, "{op}");
        assert_eq!(
            c.read(0, off, 65536).unwrap(),
            zeros,
            "{op} left data behind"
        );
    }
}

#[test]
fn flushed_data_survives_sigterm_restart_and_kill_9() {
    let mut s = Storaged::start();
    let v = s.create_volume(r#"{"name":"keep","size":"32MiB"}"#);
    let socket = s.socket_of("keep");
    {
        let mut c = connect_retry(&socket, 1);
        assert_eq!(c.write(0, 0, &pattern(4096 * 8, 0, 9)), 0);
        assert_eq!(c.flush(0), 0);
    }
    s.restart();
    assert_eq!(
        s.socket_of("keep"),
        socket,
        "socket path changed across restart"
    );
    {
        let mut c = connect_retry(&socket, 1);
        assert_eq!(c.read(0, 0, 4096 * 8).unwrap(), pattern(4096 * 8, 0, 9));
        assert_eq!(c.write(0, 8 * MIB, &pattern(4096, 8 * MIB, 10)), 0);
        assert_eq!(c.flush(0), 0);
        // Still connected when the daemon is killed.
        s.kill_and_restart();
    }
    let after = s.admin().get("/v1/volumes/keep").unwrap().json();
    assert_eq!(after["id"], v["id"]);
    let mut c = connect_retry(&socket, 1);
    assert_eq!(c.read(0, 0, 4096 * 8).unwrap(), pattern(4096 * 8, 0, 9));
    assert_eq!(
        c.read(0, 8 * MIB, 4096).unwrap(),
        pattern(4096, 8 * MIB, 10)
    );
}

#[test]
fn client_can_reconnect_after_disconnecting() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"rc","size":"16MiB"}"#);
    let socket = s.socket_of("rc");
    for round in 0..3u8 {
        let mut c = connect_retry(&socket, 1);
        if round > 0 {
            let off = u64::from(round - 1) * 4096;
            let got = c
                .read(0, off, 4096)
                .unwrap_or_else(|e| panic!("read failed: {e}\n{}", s.log_text()));
            assert_eq!(got, pattern(4096, off, round - 1));
        }
        let off = u64::from(round) * 4096;
        assert_eq!(c.write(0, off, &pattern(4096, off, round)), 0);
        assert_eq!(c.flush(0), 0);
        drop(c);
        s.wait_for_log("frontend detached");
    }
}

#[test]
fn second_concurrent_client_is_refused_and_first_keeps_working() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"ded","size":"16MiB"}"#);
    let socket = s.socket_of("ded");
    let mut first = connect_retry(&socket, 1);
    assert!(
        BlkClient::connect(&socket, 1).is_err(),
        "a second frontend was accepted"
    );
    s.wait_for_log("refused a second frontend");
    assert_eq!(first.write(0, 0, &pattern(4096, 0, 5)), 0);
    assert_eq!(first.read(0, 0, 4096).unwrap(), pattern(4096, 0, 5));
    let info = s.admin().get("/v1/volumes/ded").unwrap().json();
    assert_eq!(info["attached"], true);
    drop(first);
    let mut again = connect_retry(&socket, 1);
    assert_eq!(again.read(0, 0, 4096).unwrap(), pattern(4096, 0, 5));
}

#[test]
fn online_grow_is_seen_by_the_connected_client() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"grow","size":"16MiB"}"#);
    let mut c = connect_retry(&s.socket_of("grow"), 1);
    assert_eq!(c.capacity(), 16 * MIB);
    assert_ne!(
        c.write(0, 20 * MIB, &pattern(4096, 0, 1)),
        0,
        "write past the end succeeded"
    );
    let r = s
        .admin()
        .request("PATCH", "/v1/volumes/grow", Some(r#"{"size":"32MiB"}"#))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["size_bytes"], 32 * MIB);
    assert_eq!(c.capacity(), 32 * MIB);
    assert_eq!(c.write(0, 20 * MIB, &pattern(4096, 20 * MIB, 1)), 0);
    assert_eq!(
        c.read(0, 20 * MIB, 4096).unwrap(),
        pattern(4096, 20 * MIB, 1)
    );
}

#[test]
fn read_only_volume_serves_reads_and_refuses_writes() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"ro","size":"16MiB","read_only":true}"#);
    let socket = s.socket_of("ro");
    // The device says it is read-only (VIRTIO_BLK_F_RO): libblkio refuses to open it for writing.
    let err = BlkClient::connect(&socket, 1)
        .err()
        .expect("read-write client accepted");
    assert_eq!(err.errno(), blkio::Errno::ROFS, "{err:?}");
    s.wait_for_log("frontend detached");
    let mut c = BlkClient::connect_read_only(&socket).expect("read-only client");
    assert!(c.get_bool("read-only"));
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
    assert_ne!(
        c.write(0, 0, &pattern(4096, 0, 1)),
        0,
        "write to a read-only volume succeeded"
    );
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
}

#[test]
fn reads_past_the_end_fail_without_touching_the_volume() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"end","size":"1MiB"}"#);
    let mut c = connect_retry(&s.socket_of("end"), 1);
    assert!(c.read(0, MIB - 4096, 8192).is_err());
    assert!(c.read(0, MIB, 512).is_err());
    assert_eq!(c.read(0, MIB - 4096, 4096).unwrap(), vec![0u8; 4096]);
    let backing = s.admin().get("/v1/volumes/end").unwrap().json();
    let path = backing["backing"]["path"].as_str().unwrap().to_string();
    assert_eq!(std::fs::metadata(path).unwrap().len(), MIB);
}

#[test]
fn sigterm_finishes_and_exits_zero_removing_sockets() {
    let mut s = Storaged::start();
    s.create_volume(r#"{"name":"t","size":"16MiB"}"#);
    let socket = s.socket_of("t");
    let mut c = connect_retry(&socket, 1);
    assert_eq!(c.write(0, 0, &pattern(4096, 0, 2)), 0);
    let status = s.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "volume socket left behind");
    assert!(!s.admin_socket().exists(), "admin socket left behind");
    assert!(s.log_text().contains("shutting down"));
}

#[test]
fn metrics_count_operations_and_bytes_exactly() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"m","size":"16MiB"}"#);
    let mut c = connect_retry(&s.socket_of("m"), 1);
    for i in 0..3u64 {
        assert_eq!(c.write(0, i * 8192, &pattern(8192, 0, 1)), 0);
    }
    for _ in 0..2 {
        c.read(0, 0, 4096).unwrap();
    }
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.discard(0, 0, 4096), 0);
    let _ = c.read(0, 32 * MIB, 4096);
    let scrape = http_get(&s.metrics_url());
    let expected: [(&str, f64); 11] = [
        (
            r#"storaged_volume_requests_total{op="write",volume="m"}"#,
            3.0,
        ),
        (
            r#"storaged_volume_bytes_total{op="write",volume="m"}"#,
            3.0 * 8192.0,
        ),
        (
            r#"storaged_volume_requests_total{op="read",volume="m"}"#,
            2.0,
        ),
        (
            r#"storaged_volume_bytes_total{op="read",volume="m"}"#,
            8192.0,
        ),
        (
            r#"storaged_volume_requests_total{op="flush",volume="m"}"#,
            1.0,
        ),
        (
            r#"storaged_volume_bytes_total{op="discard",volume="m"}"#,
            4096.0,
        ),
        (
            r#"storaged_volume_errors_total{kind="invalid_request",volume="m"}"#,
            1.0,
        ),
        (
            r#"storaged_volume_request_duration_seconds_count{op="write",volume="m"}"#,
            3.0,
        ),
        (r#"storaged_volume_attached{volume="m"}"#, 1.0),
        (
            r#"storaged_volume_size_bytes{volume="m"}"#,
            16.0 * MIB as f64,
        ),
        (r#"storaged_volume_inflight_requests{volume="m"}"#, 0.0),
    ];
    for (series, want) in expected {
        let got =
            metric_value(&scrape, series).unwrap_or_else(|| panic!("{series} missing:\n{scrape}"));
        assert_eq!(got, want, "{series}");
    }
}

fn create_on_device(s: &Storaged, name: &str, dev: &str, size: &str) -> storaged_tests::Response {
    let body = serde_json::json!({"name": name, "size": size, "device": dev, "encryption": "none"})
        .to_string();
    s.admin()
        .request("POST", "/v1/volumes", Some(&body))
        .unwrap()
}

/// Major and minor number of a block device node.
fn rdev(path: &str) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path).unwrap().rdev();
    (libc::major(rdev), libc::minor(rdev))
}

#[test]
fn a_device_is_refused_under_a_second_path_and_as_its_own_partition() {
    let (Some(lo), Some(parted)) = (
        LoopDevice::new(16 * MIB),
        LoopDevice::partitioned(32 * MIB, 16 * MIB),
    ) else {
        skip("a_device_is_refused_under_a_second_path_and_as_its_own_partition: cannot set up loop devices (needs root and losetup)");
        return;
    };
    let s = Storaged::start();
    let r = create_on_device(&s, "one", &lo.dev, "16MiB");
    assert_eq!(r.status, 201, "{}", r.body);
    // A second node for the same device (what /dev/block/MAJ:MIN or a copied /dev gives),
    // and a symbolic link to it.
    let nodes = tempfile::tempdir().unwrap();
    let node = nodes.path().join("again");
    let (major, minor) = rdev(&lo.dev);
    let c_node = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: mknod reads a NUL-terminated path and integers.
    let rc = unsafe {
        libc::mknod(
            c_node.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    let link = nodes.path().join("link");
    std::os::unix::fs::symlink(&lo.dev, &link).unwrap();
    for (name, path) in [("two", &node), ("three", &link)] {
        let r = create_on_device(&s, name, path.to_str().unwrap(), "16MiB");
        assert_eq!(r.status, 400, "{} accepted: {}", path.display(), r.body);
        assert!(r.body.contains("volume 'one'"), "{}", r.body);
    }
    // A whole disk and its partition share blocks: whichever comes second is refused.
    let r = create_on_device(&s, "disk", &parted.dev, "16MiB");
    assert_eq!(r.status, 201, "{}", r.body);
    let r = create_on_device(&s, "part", &parted.partition(), "16MiB");
    assert_eq!(
        r.status, 400,
        "partition accepted beside its disk: {}",
        r.body
    );
    assert!(r.body.contains("volume 'disk'"), "{}", r.body);
    assert_eq!(
        s.admin()
            .request("DELETE", "/v1/volumes/disk", None)
            .unwrap()
            .status,
        200
    );
    let r = create_on_device(&s, "part", &parted.partition(), "16MiB");
    assert_eq!(r.status, 201, "{}", r.body);
    let r = create_on_device(&s, "disk", &parted.dev, "16MiB");
    assert_eq!(
        r.status, 400,
        "disk accepted beside its partition: {}",
        r.body
    );
    assert!(r.body.contains("volume 'part'"), "{}", r.body);
    assert_eq!(s.volume_names(), ["one", "part"]);
}

#[test]
fn a_device_opened_exclusively_or_mounted_elsewhere_is_refused() {
    let (Some(held), Some(mounted)) = (LoopDevice::new(16 * MIB), LoopDevice::new(16 * MIB)) else {
        skip("a_device_opened_exclusively_or_mounted_elsewhere_is_refused: cannot set up loop devices (needs root and losetup)");
        return;
    };
    let s = Storaged::start();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _exclusive = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&held.dev)
            .unwrap();
        let r = create_on_device(&s, "held", &held.dev, "16MiB");
        assert_eq!(
            r.status, 409,
            "a device held elsewhere was accepted: {}",
            r.body
        );
        assert!(r.body.contains("in use"), "{}", r.body);
    }
    // Once the other holder lets go, the device is served.
    let r = create_on_device(&s, "held", &held.dev, "16MiB");
    assert_eq!(r.status, 201, "{}", r.body);

    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", &mounted.dev])
        .status()
        .unwrap();
    assert!(mkfs.success());
    let dir = tempfile::tempdir().unwrap();
    let mount = std::process::Command::new("mount")
        .arg(&mounted.dev)
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(mount.success());
    let r = create_on_device(&s, "mounted", &mounted.dev, "16MiB");
    let _ = std::process::Command::new("umount")
        .arg(dir.path())
        .status();
    assert_eq!(r.status, 409, "a mounted device was accepted: {}", r.body);
    assert!(r.body.contains("in use"), "{}", r.body);
}

#[test]
fn a_device_renumbered_while_storaged_was_stopped_is_not_served() {
    let Some(mut lo) = LoopDevice::new(16 * MIB) else {
        skip("a_device_renumbered_while_storaged_was_stopped_is_not_served: cannot set up a loop device (needs root and losetup)");
        return;
    };
    let mut s = Storaged::start();
    let r = create_on_device(&s, "dev", &lo.dev, "16MiB");
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    assert_eq!(v["backing"]["identity"]["source"], "loop", "{v}");
    s.create_volume(r#"{"name":"file","size":"1MiB"}"#);
    assert!(s.signal_and_wait(libc::SIGTERM).success());

    // Another disk at the same /dev/loopN.
    let other = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    other.as_file().set_len(16 * MIB).unwrap();
    let Some(first) = lo.swap_backing_file(other) else {
        eprintln!("SKIPPED a_device_renumbered_while_storaged_was_stopped_is_not_served: {} was taken by another test", lo.dev);
        return;
    };
    s.restart_after_stop();
    let dev = s.admin().get("/v1/volumes/dev").unwrap().json();
    assert_eq!(dev["state"], "failed", "a different disk was served: {dev}");
    assert!(
        dev["error"].as_str().unwrap().contains("not the device"),
        "{dev}"
    );
    assert!(std::os::unix::net::UnixStream::connect(s.socket_of("dev")).is_err());
    assert!(s.log_text().contains("cannot serve volume"));
    let file = s.admin().get("/v1/volumes/file").unwrap().json();
    assert_eq!(file["state"], "serving", "{file}");

    // The volume's own disk, now at another number: no other volume may take it.
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(first.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let r = create_on_device(&s, "thief", &moved, "16MiB");
    let _ = Command::new("losetup").args(["-d", &moved]).status();
    assert_eq!(
        r.status, 400,
        "the disk of volume 'dev' was taken: {}",
        r.body
    );
    assert!(r.body.contains("backs volume 'dev'"), "{}", r.body);

    // The volume's own disk back at that number: served again.
    assert!(s.signal_and_wait(libc::SIGTERM).success());
    if lo.swap_backing_file(first).is_none() {
        eprintln!("SKIPPED the second half of a_device_renumbered_while_storaged_was_stopped_is_not_served: {} was taken by another test", lo.dev);
        return;
    }
    s.restart_after_stop();
    let dev = s.admin().get("/v1/volumes/dev").unwrap().json();
    assert_eq!(dev["state"], "serving", "{dev}");
}

#[test]
fn block_device_volume_serves_the_device_and_survives_delete() {
    let Some(lo) = LoopDevice::new(32 * MIB) else {
        skip("block_device_volume_serves_the_device_and_survives_delete: cannot set up a loop device (needs root and losetup)");
        return;
    };
    let s = Storaged::start();
    // A device smaller than the volume is refused.
    let too_big = serde_json::json!({"name": "dev", "size": "64MiB", "device": lo.dev}).to_string();
    let r = s
        .admin()
        .request("POST", "/v1/volumes", Some(&too_big))
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("less than"), "{}", r.body);
    // Plain, so the device holds what the client wrote (encrypted volumes are tested elsewhere).
    let body =
        serde_json::json!({"name": "dev", "size": "32MiB", "device": lo.dev, "encryption": "none"})
            .to_string();
    let v = s.create_volume(&body);
    assert_eq!(v["backing"]["kind"], "device");
    let mut c = connect_retry(&s.socket_of("dev"), 1);
    assert_eq!(c.capacity(), 32 * MIB);
    assert_eq!(c.write(0, 4 * MIB, &pattern(8192, 4 * MIB, 4)), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    // The data is on the device (read back through the loop device's backing file).
    let bytes = std::fs::read(lo.backing_file()).unwrap();
    assert_eq!(
        &bytes[4 * MIB as usize..4 * MIB as usize + 8192],
        &pattern(8192, 4 * MIB, 4)[..]
    );
    s.wait_for_log("frontend detached");
    let r = s
        .admin()
        .request("DELETE", "/v1/volumes/dev", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data_removed"], false);
    assert_eq!(r.json()["data"], "left on the device");
    assert_eq!(r.json()["key"], "none (not encrypted)");
    assert!(
        std::path::Path::new(&lo.dev).exists(),
        "a device was removed"
    );
}

#[test]
fn immediate_reconnects_are_served_and_their_first_request_succeeds() {
    // A frontend that reconnects as soon as it closed its socket (a restarting VMM) is served,
    // not refused, and its first request is translated with its own, new memory map.
    let s = Storaged::start();
    s.create_volume(r#"{"name":"again","size":"16MiB"}"#);
    let socket = s.socket_of("again");
    let mut c = connect_retry(&socket, 1);
    assert_eq!(c.write(0, 0, &pattern(4096, 0, 8)), 0);
    drop(c);
    for round in 0..40 {
        let mut c = BlkClient::connect(&socket, 1)
            .unwrap_or_else(|e| panic!("round {round}: reconnect refused: {e}\n{}", s.log_text()));
        let got = c
            .read(0, 0, 4096)
            .unwrap_or_else(|e| panic!("round {round}: first read failed: {e}\n{}", s.log_text()));
        assert_eq!(got, pattern(4096, 0, 8), "round {round}");
    }
    assert!(!s.log_text().contains("refused"), "{}", s.log_text());
}

#[test]
fn buffered_io_serves_the_same_data_when_direct_io_is_off() {
    // The path taken where a file system refuses O_DIRECT (storaged then warns and falls back).
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("storaged.toml");
    std::fs::write(&cfg, "[io]\ndirect = false\n").unwrap();
    let mut s = Storaged::start_with(&["--config", cfg.to_str().unwrap()]);
    let v = s.create_volume(r#"{"name":"buf","size":"16MiB"}"#);
    assert_eq!(v["direct_io"], false);
    let socket = s.socket_of("buf");
    {
        let mut c = connect_retry(&socket, 1);
        assert_eq!(c.write(0, 12288, &pattern(65536, 12288, 6)), 0);
        assert_eq!(c.flush(0), 0);
    }
    s.kill_and_restart();
    let mut c = connect_retry(&socket, 1);
    assert_eq!(c.read(0, 12288, 65536).unwrap(), pattern(65536, 12288, 6));
}

/// The CPUs each of `pid`'s threads may run on, by thread name (a volume's threads by their
/// kind: `export-NAME` as `export`).
fn cpus_by_thread(
    pid: u32,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut by = std::collections::BTreeMap::<_, std::collections::BTreeSet<_>>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .trim()
                .to_owned()
        };
        let name = field("Name:");
        let name = match name.split_once('-') {
            Some((kind @ ("export" | "wait" | "vu"), _)) => kind.to_owned(),
            _ => name,
        };
        by.entry(name)
            .or_default()
            .insert(field("Cpus_allowed_list:"));
    }
    by
}

#[test]
fn queues_run_on_the_data_planes_cpus_and_the_rest_on_the_control_planes() {
    let allowed = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap();
    let ncpus = std::thread::available_parallelism().unwrap().get();
    if ncpus < 2 {
        skip("CPU affinity: one CPU only, the two planes cannot be told apart");
        return;
    }
    // The last CPU this test may use for the data plane, the first for the control plane.
    let first = allowed.split([',', '-']).next().unwrap().to_owned();
    let last = allowed.rsplit([',', '-']).next().unwrap().to_owned();
    assert_ne!(first, last, "{allowed}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("storaged.toml");
    std::fs::write(
        &cfg,
        format!("[cpus]\ndata_plane = \"{last}\"\ncontrol_plane = \"{first}\"\n"),
    )
    .unwrap();
    let s = Storaged::start_with(&["--config", cfg.to_str().unwrap()]);
    assert!(
        s.log_text().contains(&format!(
            "data_plane_cpus={last} control_plane_cpus={first}"
        )),
        "{}",
        s.log_text()
    );
    s.create_volume(r#"{"name":"pinned","size":"8MiB","num_queues":2}"#);
    let mut c = connect_retry(&s.socket_of("pinned"), 2);
    assert_eq!(c.write(0, 0, &pattern(4096, 0, 1)), 0);
    assert_eq!(c.write(1, 4096, &pattern(4096, 4096, 2)), 0);

    let by = cpus_by_thread(s.pid());
    let only = |name: &str, cpus: &str| {
        let got = by
            .get(name)
            .unwrap_or_else(|| panic!("no {name} thread: {by:?}"));
        assert_eq!(got.iter().collect::<Vec<_>>(), [cpus], "{name}: {by:?}");
    };
    only("vring_worker", &last);
    only("export", &last);
    only("storaged-ctl", &first);
    only("storaged", &first);
    drop(c);

    // A control plane alone moves the queues back to every CPU the daemon may use.
    std::fs::write(&cfg, format!("[cpus]\ncontrol_plane = \"{first}\"\n")).unwrap();
    let mut s = s;
    s.restart();
    let mut c = connect_retry(&s.socket_of("pinned"), 2);
    assert_eq!(c.write(0, 0, &pattern(4096, 0, 3)), 0);
    let by = cpus_by_thread(s.pid());
    assert_eq!(
        by["vring_worker"].iter().collect::<Vec<_>>(),
        [&allowed],
        "{by:?}"
    );
    assert_eq!(by["storaged-ctl"].iter().collect::<Vec<_>>(), [&first]);
    drop(c);

    // A CPU the daemon may not use is refused at start, naming the key.
    std::fs::write(&cfg, "[cpus]\ndata_plane = \"1023\"\n").unwrap();
    let out = Command::new(bin("storaged"))
        .args(["--data-dir", dir.path().join("other").to_str().unwrap()])
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cpus.data_plane") && err.contains("1023"),
        "{err}"
    );
}
