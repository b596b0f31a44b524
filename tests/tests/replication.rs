//! Replication between storaged daemons: the link's mutual TLS and its configuration.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::path::Path;

use storaged_api::{ReplicationMode, ReplicationRole, StartReplication};
use storaged_tests::pki::{self, Ca, NodeFiles};
use storaged_tests::{bin, connect_retry, pattern, BlkClient, Storaged};

/// A storaged of CA `ca` named `name`: its certificate (naming 127.0.0.1) and config in
/// `dir/name`, `[replication]` listening on loopback port `port` (0: the kernel's choice).
fn daemon(dir: &Path, ca: &Ca, name: &str, port: u16) -> (Storaged, NodeFiles) {
    daemon_with(dir, ca, name, port, "")
}

/// [`daemon`] with more `[replication]` settings.
fn daemon_with(dir: &Path, ca: &Ca, name: &str, port: u16, more: &str) -> (Storaged, NodeFiles) {
    let node_dir = dir.join(name);
    std::fs::create_dir(&node_dir).unwrap();
    let node = ca.issue(&node_dir, name, &["127.0.0.1"]);
    let config = node_dir.join("storaged.toml");
    std::fs::write(
        &config,
        format!(
            "[replication]\nlisten = \"127.0.0.1:{port}\"\n{more}\n{}",
            node.toml()
        ),
    )
    .unwrap();
    let s = Storaged::start_with(&["--config", config.to_str().unwrap()]);
    (s, node)
}

/// A loopback port nothing listens on now, for a daemon that must keep its address across a
/// restart. Taken below the kernel's ephemeral range (32768 and up), so that no outgoing
/// connection (a sender's) can be given it before the daemon binds it; each test of this
/// process gets its own.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = (std::process::id() % 1000) as u16 * 12;
    loop {
        let port = 20000 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn the_replication_listener_accepts_only_peers_whose_certificate_the_ca_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("zone CA");
    let (s, node) = daemon(tmp.path(), &ca, "node-a", 0);
    let addr = s.replication_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    s.wait_for_log(&format!("replication_listen=\"{addr}\""));

    // A peer of the same CA: the handshake completes both ways.
    let peer = ca.issue(tmp.path(), "node-b", &["127.0.0.1"]);
    pki::connect(addr, "127.0.0.1", Some(&peer), &peer.ca).expect("a peer of the CA is accepted");
    s.wait_for_log("replication peer authenticated");

    // A certificate of another CA, and none at all: refused, and logged with the reason.
    let rogue_ca = Ca::new("rogue CA");
    let rogue = rogue_ca.issue(tmp.path(), "rogue", &["127.0.0.1"]);
    let _ = pki::connect(addr, "127.0.0.1", Some(&rogue), &node.ca).map(|mut t| {
        // TLS 1.3: the server judges the client's certificate after the client is done;
        // its verdict comes as an alert on the first read.
        use std::io::Read;
        let mut b = [0u8; 1];
        t.read(&mut b)
    });
    s.wait_for_log("replication peer refused: TLS handshake failed: invalid peer certificate");
    let _ = pki::connect(addr, "127.0.0.1", None, &node.ca).map(|mut t| {
        use std::io::Read;
        let mut b = [0u8; 1];
        t.read(&mut b)
    });
    s.wait_for_log("peer sent no certificates");
}

#[test]
fn a_daemon_replicating_to_a_peer_of_another_ca_refuses_it_and_so_does_the_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let zone = Ca::new("zone CA");
    let (a, _) = daemon(tmp.path(), &zone, "a", 0);
    let (b, _) = daemon(tmp.path(), &zone, "b", 0);
    let (c, _) = daemon(tmp.path(), &Ca::new("another CA"), "c", 0);
    a.create_volume(r#"{"name":"db","size":"16MiB"}"#);
    let e = a.admin().start_replication("db", &start(&c)).unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    assert!(
        c.volume_names().is_empty(),
        "nothing was created on the other CA's daemon"
    );
    assert_eq!(a.admin().replication("db").unwrap_err().status(), Some(404));
    // A peer of the right CA, dialled by a name its certificate does not carry (it names
    // 127.0.0.1 only), is refused as well.
    let mut req = start(&b);
    req.peer = format!("localhost:{}", b.replication_addr().port());
    let e = a.admin().start_replication("db", &req).unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
    assert!(b.volume_names().is_empty());
    // By the name it carries, it is accepted.
    a.admin().start_replication("db", &start(&b)).unwrap();
    assert_eq!(b.volume_names(), ["db"]);
}

#[test]
fn replication_settings_that_cannot_work_stop_storaged_at_start_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |toml: &str| {
        let config = tmp.path().join("bad.toml");
        std::fs::write(&config, toml).unwrap();
        let out = std::process::Command::new(bin("storaged"))
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--config")
            .arg(&config)
            .args(["--metrics-addr", "off"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("[replication]\nlisten = \"127.0.0.1:0\"\n");
    assert!(err.contains("replication.cert"), "{err}");
    let missing = tmp.path().join("missing.pem");
    let err = run(&format!(
        "[replication]\ncert = \"{0}\"\nkey = \"{0}\"\nca = \"{0}\"\n",
        missing.display()
    ));
    assert!(
        err.contains("Cannot read certificate") && err.contains("missing.pem"),
        "{err}"
    );
    // A key that is not the certificate's.
    let ca = Ca::new("zone CA");
    let a = ca.issue(tmp.path(), "a", &["127.0.0.1"]);
    let b = ca.issue(tmp.path(), "b", &["127.0.0.1"]);
    let err = run(&format!(
        "[replication]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        a.cert.display(),
        b.key.display(),
        a.ca.display()
    ));
    assert!(err.contains("does the key match the certificate"), "{err}");
}

/// Two daemons of one CA, each listening on a loopback port: (primary, peer).
fn two_daemons(dir: &Path) -> (Storaged, Storaged) {
    let ca = Ca::new("zone CA");
    let (a, _) = daemon(dir, &ca, "zone-a", free_port());
    let (b, _) = daemon(dir, &ca, "zone-b", free_port());
    (a, b)
}

fn start(peer: &Storaged) -> StartReplication {
    StartReplication {
        peer: peer.replication_addr().to_string(),
        mode: ReplicationMode::Async,
        rpo_seconds: 5,
    }
}

#[test]
fn starting_a_replication_creates_the_volume_on_the_peer_as_its_read_only_secondary_with_the_same_key(
) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_daemons(tmp.path());
    a.create_volume(r#"{"name":"db","size":"64MiB","tier":"premium","num_queues":2}"#);
    // Something on the primary before the relationship starts.
    let mut c = connect_retry(&a.socket_of("db"), 1);
    let data = pattern(1 << 20, 0, 7);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);

    let r = a.admin().start_replication("db", &start(&b)).unwrap();
    assert_eq!(r.role, ReplicationRole::Primary);
    assert_eq!(r.peer, b.replication_addr().to_string());
    assert!(!r.consistent, "nothing is shipped yet: {r:?}");
    a.wait_for_log("replication started: this volume is the primary");

    let primary = a.admin().volume("db").unwrap();
    let secondary = b.admin().volume("db").unwrap();
    assert_eq!(primary.replication_role, Some(ReplicationRole::Primary));
    assert_eq!(secondary.replication_role, Some(ReplicationRole::Secondary));
    assert_eq!(
        secondary.id, primary.id,
        "the guest's serial survives a failover"
    );
    assert_eq!(secondary.size_bytes, primary.size_bytes);
    assert_eq!(secondary.tier, primary.tier);
    assert_eq!(secondary.num_queues, primary.num_queues);
    assert_eq!(secondary.block_size, primary.block_size);
    assert_eq!(secondary.encryption, "aes-xts-plain64");
    // The key is the primary's, stored wrapped under the peer's own KEK.
    assert_ne!(secondary.kek_id, primary.kek_id);
    let rb = b.admin().replication("db").unwrap();
    assert_eq!(rb.role, ReplicationRole::Secondary);
    assert_eq!(rb.relationship, r.relationship);
    let listed = b.admin().list_volumes().unwrap();
    assert_eq!(listed[0].replication_role, Some(ReplicationRole::Secondary));

    // The same key: the primary's ciphertext, put in the secondary's file, reads back as
    // what was written.
    let ciphertext = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(primary.backing.path()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    };
    assert_ne!(ciphertext, data, "stored encrypted");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(secondary.backing.path())
            .unwrap();
        f.write_all_at(&ciphertext, 0).unwrap();
        f.sync_all().unwrap();
    }
    // Frontends may only read a secondary: libblkio will not open it read-write.
    assert!(BlkClient::connect(&b.socket_of("db"), 1).is_err());
    let mut ro = BlkClient::connect_read_only(&b.socket_of("db")).unwrap();
    assert_eq!(ro.read(0, 0, 1 << 20).unwrap(), data);
    drop(ro);

    // A secondary is changed only through its relationship.
    let e = b.admin().delete_volume("db", false).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("secondary"), "{e}");
    let r = b
        .admin()
        .request("PATCH", "/v1/volumes/db", Some(r#"{"size":"128MiB"}"#))
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    // Neither side can be replicated again, nor can the secondary be replicated onwards.
    let e = a.admin().start_replication("db", &start(&b)).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("already replicated"), "{e}");
    let e = b.admin().start_replication("db", &start(&a)).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    // The way out for a secondary whose primary is gone: a forced delete, logged.
    b.admin().delete_volume("db", true).unwrap();
    b.wait_for_log("deleting a replication secondary by force");
}

#[test]
fn a_peer_that_cannot_take_the_volume_refuses_with_its_reason_and_nothing_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_daemons(tmp.path());
    a.create_volume(r#"{"name":"taken","size":"16MiB","encryption":"none"}"#);
    b.create_volume(r#"{"name":"taken","size":"32MiB"}"#);
    let e = a
        .admin()
        .start_replication("taken", &start(&b))
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");
    // The peer's volume is untouched, and the primary has no relationship.
    assert_eq!(b.admin().volume("taken").unwrap().size_bytes, 32 << 20);
    assert_eq!(b.admin().volume("taken").unwrap().replication_role, None);
    assert_eq!(
        a.admin().replication("taken").unwrap_err().status(),
        Some(404)
    );
    b.wait_for_log("refused to create a secondary");

    // Bad requests: no such volume, a peer that is not HOST:PORT, nobody listening there,
    // an RPO of zero.
    let mut req = start(&b);
    assert_eq!(
        a.admin()
            .start_replication("none", &req)
            .unwrap_err()
            .status(),
        Some(404)
    );
    req.peer = "nowhere".into();
    assert_eq!(
        a.admin()
            .start_replication("taken", &req)
            .unwrap_err()
            .status(),
        Some(400)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    req.peer = closed.local_addr().unwrap().to_string();
    drop(closed);
    let e = a.admin().start_replication("taken", &req).unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
    req = start(&b);
    req.rpo_seconds = 0;
    assert_eq!(
        a.admin()
            .start_replication("taken", &req)
            .unwrap_err()
            .status(),
        Some(400)
    );
    let r = a
        .admin()
        .request(
            "POST",
            "/v1/volumes/taken/replication",
            Some(r#"{"peer":"127.0.0.1:1","mode":"eventually"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("mode"), "{}", r.body);
}

#[test]
fn replication_without_tls_settings_is_refused_saying_what_to_configure() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"v","size":"16MiB"}"#);
    let e = s
        .admin()
        .start_replication(
            "v",
            &StartReplication {
                peer: "127.0.0.1:7420".into(),
                mode: ReplicationMode::Async,
                rpo_seconds: 5,
            },
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(
        e.to_string().contains("[replication] cert, key and ca"),
        "{e}"
    );
}

#[test]
fn malformed_or_unexpected_frames_from_an_authenticated_peer_close_the_connection_with_a_log_line()
{
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("zone CA");
    let (s, _) = daemon(tmp.path(), &ca, "node-a", 0);
    let addr = s.replication_addr();
    let peer = ca.issue(tmp.path(), "node-b", &["127.0.0.1"]);

    // Not a frame: the header's magic is wrong.
    let mut t = pki::connect(addr, "127.0.0.1", Some(&peer), &peer.ca).unwrap();
    t.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no answer to garbage");
    s.wait_for_log("replication peer closed: malformed frame from the peer: ");

    // A frame whose checksum does not hold.
    let mut frame = Vec::new();
    storaged::replication::wire::encode(
        &storaged::replication::wire::Message::Ping { time_unix_ns: 1 },
        &mut frame,
    )
    .unwrap();
    let mut bad = frame.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let mut t = pki::connect(addr, "127.0.0.1", Some(&peer), &peer.ca).unwrap();
    t.write_all(&bad).unwrap();
    let _ = t.read_to_end(&mut rest);
    s.wait_for_log("Checksum mismatch");

    // A well-formed frame a session does not start with: answered Goodbye, then closed.
    let mut t = pki::connect(addr, "127.0.0.1", Some(&peer), &peer.ca).unwrap();
    t.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    let _ = t.read_to_end(&mut answer);
    let (msg, _) = storaged::replication::wire::decode(&answer)
        .unwrap()
        .expect("one whole frame");
    assert!(
        matches!(msg, storaged::replication::wire::Message::Goodbye { .. }),
        "{msg:?}"
    );
    s.wait_for_log("its first message is not one a session starts with");
    // The daemon is still serving.
    s.admin().info().unwrap();
}

/// The regions marked in a primary's dirty map file (one bit per MiB, little-endian words).
fn dirty_regions(s: &Storaged, id: &str) -> Vec<u64> {
    let bytes = std::fs::read(s.data_dir.join("replication").join(format!("{id}.dirty"))).unwrap();
    let mut regions = Vec::new();
    for (w, word) in bytes.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(word.try_into().unwrap());
        for b in 0..64 {
            if word & (1 << b) != 0 {
                regions.push(w as u64 * 64 + b);
            }
        }
    }
    regions
}

/// How many "replication: resync" lines `s` has logged.
fn resyncs(s: &Storaged) -> usize {
    s.log_text()
        .lines()
        .filter(|l| l.contains("replication: resync"))
        .count()
}

/// The `regions=` and `bytes=` of the resync line of `s`'s log after the first `skip`.
fn resync_regions(s: &Storaged, skip: usize) -> Option<(u64, u64)> {
    let log = s.log_text();
    let line = log
        .lines()
        .filter(|l| l.contains("replication: resync"))
        .nth(skip)?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
    };
    Some((field("regions=")?, field("bytes=")?))
}

#[test]
fn writes_past_the_configured_log_capacity_overflow_it_the_lag_grows_and_a_resync_sends_them() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("zone CA");
    let (a, _) = daemon_with(
        tmp.path(),
        &ca,
        "zone-a",
        free_port(),
        "log_capacity = \"1MiB\"",
    );
    let (b, _) = daemon(tmp.path(), &ca, "zone-b", free_port());
    a.create_volume(r#"{"name":"db","size":"32MiB"}"#);
    a.admin().start_replication("db", &start(&b)).unwrap();
    wait_replication(&a, "db", "the initial sync", |r| {
        r.state == "replicating" && r.consistent
    });
    let before = resyncs(&a);
    // 8 MiB at once: more than the log holds before the sender takes it (every 100 ms).
    let mut c = connect_retry(&a.socket_of("db"), 1);
    for i in 0..8u64 {
        assert_eq!(c.write(0, i << 20, &pattern(1 << 20, i << 20, 5)), 0);
    }
    assert_eq!(c.flush(0), 0);
    let flushed = unix_now();
    drop(c);
    wait_replication(&b, "db", "the writes on the secondary", |r| {
        r.consistent_at.is_some_and(|t| t >= flushed)
    });
    assert!(resyncs(&a) > before, "no resync:\n{}", a.log_text());
    for i in 0..8u64 {
        assert_eq!(
            read_back(&b, "db", i << 20, 1 << 20),
            pattern(1 << 20, i << 20, 5),
            "MiB {i}"
        );
    }
    // With the secondary frozen, writes past the log overflow it: the records are dropped,
    // and the lag still grows (the regions are not on the secondary).
    freeze(&b, true);
    let mut c = connect_retry(&a.socket_of("db"), 1);
    for i in 0..16u64 {
        assert_eq!(c.write(0, (i % 32) << 20, &pattern(1 << 20, i, 6)), 0);
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    wait_replication(&a, "db", "the lag grows", |r| {
        r.lag_seconds.is_some_and(|l| l > 2.0)
    });
    freeze(&b, false);
}

#[test]
fn the_primarys_dirty_map_survives_its_kill_9_and_a_resync_sends_only_the_changed_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = two_daemons(tmp.path());
    a.create_volume(r#"{"name":"db","size":"32MiB"}"#);
    let id = a.admin().volume("db").unwrap().id;
    a.admin().start_replication("db", &start(&b)).unwrap();
    // A new relationship knows nothing of the secondary: the first resync sends every region.
    storaged_tests::wait_until(
        "the initial sync",
        std::time::Duration::from_secs(30),
        || resync_regions(&a, 0).is_some(),
    );
    assert_eq!(resync_regions(&a, 0), Some((32, 32 << 20)));
    wait_replication(&b, "db", "the initial sync ends", |r| r.consistent);
    // Its commit cleans the map.
    storaged_tests::wait_until("a clean map", std::time::Duration::from_secs(30), || {
        dirty_regions(&a, &id).is_empty()
    });

    // The secondary frozen (no commit can come), the primary writes three regions: they are
    // on disk in the map by the time the writes are answered, and stay there across a kill -9.
    // SAFETY: SIGSTOP to the secondary's process, which this test started.
    unsafe { libc::kill(b.pid() as i32, libc::SIGSTOP) };
    let mut c = connect_retry(&a.socket_of("db"), 1);
    for (i, offset) in [1u64 << 20, 9 << 20, (20 << 20) + 4096]
        .into_iter()
        .enumerate()
    {
        assert_eq!(c.write(0, offset, &pattern(8192, offset, i as u8)), 0);
    }
    assert_eq!(dirty_regions(&a, &id), vec![1, 9, 20]);
    drop(c);
    let before = resyncs(&a);
    a.kill_and_restart();
    assert_eq!(dirty_regions(&a, &id), vec![1, 9, 20]);
    // SAFETY: SIGCONT to the same process.
    unsafe { libc::kill(b.pid() as i32, libc::SIGCONT) };

    // The restarted primary's resync sends those three regions, not the volume.
    storaged_tests::wait_until("the resync", std::time::Duration::from_secs(60), || {
        resync_regions(&a, before).is_some()
    });
    assert_eq!(resync_regions(&a, before), Some((3, 3 << 20)));
    let r = wait_replication(&b, "db", "the secondary has the resync", |r| {
        r.consistent && r.state == "replicating" && r.consistent_at.is_some()
    });
    assert!(r.consistent);
    storaged_tests::wait_until(
        "the resync's commit",
        std::time::Duration::from_secs(30),
        || dirty_regions(&a, &id).is_empty(),
    );
    let mut ro = BlkClient::connect_read_only(&b.socket_of("db")).unwrap();
    for (i, offset) in [1u64 << 20, 9 << 20, (20 << 20) + 4096]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            ro.read(0, offset, 8192).unwrap(),
            pattern(8192, offset, i as u8)
        );
    }
    drop(ro);

    // A map that is gone is not taken for a clean one: everything is sent again.
    let map = a.data_dir.join("replication").join(format!("{id}.dirty"));
    std::fs::remove_file(&map).unwrap();
    let before = resyncs(&a);
    a.kill_and_restart();
    storaged_tests::wait_until(
        "the full resync",
        std::time::Duration::from_secs(60),
        || resync_regions(&a, before).is_some(),
    );
    assert_eq!(resync_regions(&a, before), Some((32, 32 << 20)));
}

/// Waits until the volume's relationship on `s` says `cond`.
fn wait_replication(
    s: &Storaged,
    name: &str,
    what: &str,
    mut cond: impl FnMut(&storaged_api::ReplicationInfo) -> bool,
) -> storaged_api::ReplicationInfo {
    let mut last = None;
    storaged_tests::wait_until(what, std::time::Duration::from_secs(60), || {
        let r = s.admin().replication(name).unwrap();
        let ok = cond(&r);
        last = Some(r);
        ok
    });
    last.unwrap()
}

#[test]
fn a_primarys_data_reaches_its_secondary_through_the_initial_sync_and_then_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_daemons(tmp.path());
    for (name, encryption) in [("plain", "none"), ("sealed", "aes-xts-plain64")] {
        a.create_volume(&format!(
            r#"{{"name":"{name}","size":"64MiB","encryption":"{encryption}"}}"#
        ));
        // Data before the relationship: the initial sync's to carry.
        let mut c = connect_retry(&a.socket_of(name), 1);
        let before = pattern(3 << 20, 0, 1);
        assert_eq!(c.write(0, 10 << 20, &before), 0);
        assert_eq!(c.flush(0), 0);

        a.admin().start_replication(name, &start(&b)).unwrap();
        let r = wait_replication(&b, name, "the secondary becomes consistent", |r| {
            r.consistent
        });
        assert_eq!(r.state, "replicating", "{r:?}");
        // The secondary knows where its primary listens (for the day roles change).
        assert_eq!(r.peer, a.replication_addr().to_string(), "{r:?}");

        // Data after it: the stream's, up to a flush.
        let after = pattern(1 << 20, 0, 2);
        assert_eq!(c.write(0, 40 << 20, &after), 0);
        assert_eq!(c.write(0, 10 << 20, &after[..4096]), 0); // over the initial sync's data
        assert_eq!(c.flush(0), 0);
        let flushed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let r = wait_replication(&b, name, "the secondary passes the flush", |r| {
            r.consistent_at.is_some_and(|t| t >= flushed)
        });
        assert!(r.consistent, "{r:?}");
        let p = wait_replication(&a, name, "the primary sees its secondary caught up", |r| {
            r.lag_seconds == Some(0.0)
        });
        assert_eq!(p.state, "replicating", "{p:?}");
        assert!(!p.rpo_exceeded, "{p:?}");
        drop(c);

        let mut ro = BlkClient::connect_read_only(&b.socket_of(name)).unwrap();
        let mut expect = before.clone();
        expect[..4096].copy_from_slice(&after[..4096]);
        assert_eq!(
            ro.read(0, 10 << 20, 3 << 20).unwrap(),
            expect,
            "{name}: initial sync"
        );
        assert_eq!(
            ro.read(0, 40 << 20, 1 << 20).unwrap(),
            after,
            "{name}: stream"
        );
        assert_eq!(
            ro.read(0, 0, 4096).unwrap(),
            vec![0u8; 4096],
            "{name}: a hole stays zeros"
        );
        drop(ro);
        // The peer stores what the primary stores: for an encrypted volume, the ciphertext.
        let file = |s: &Storaged| {
            let v = s.admin().volume(name).unwrap();
            let f = std::fs::File::open(v.backing.path()).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 40 << 20).unwrap();
            buf
        };
        assert_eq!(file(&a), file(&b), "{name}: the same bytes at rest");
        if encryption != "none" {
            assert_ne!(file(&b), after, "{name}: the peer holds ciphertext");
        }

        // Each side's metrics say what it is and what crossed the link.
        let pm = storaged_tests::http_get(&a.metrics_url());
        let sm = storaged_tests::http_get(&b.metrics_url());
        let v = |scrape: &str, series: &str| {
            storaged_tests::metric_value(scrape, series)
                .unwrap_or_else(|| panic!("no {series} in:\n{scrape}"))
        };
        assert_eq!(
            v(
                &pm,
                &format!(r#"storaged_volume_replication_role{{role="primary",volume="{name}"}}"#)
            ),
            1.0
        );
        assert_eq!(
            v(
                &sm,
                &format!(r#"storaged_volume_replication_role{{role="secondary",volume="{name}"}}"#)
            ),
            1.0
        );
        assert_eq!(
            v(
                &pm,
                &format!(
                    r#"storaged_volume_replication_state{{state="replicating",volume="{name}"}}"#
                )
            ),
            1.0
        );
        assert_eq!(
            v(
                &sm,
                &format!(r#"storaged_volume_replication_consistent{{volume="{name}"}}"#)
            ),
            1.0
        );
        assert_eq!(
            v(
                &pm,
                &format!(r#"storaged_volume_replication_rpo_exceeded{{volume="{name}"}}"#)
            ),
            0.0
        );
        // At least the 3 MiB written before and the 1 MiB after, each way's own count.
        let sent = v(
            &pm,
            &format!(r#"storaged_volume_replication_sent_bytes_total{{volume="{name}"}}"#),
        );
        let received = v(
            &sm,
            &format!(r#"storaged_volume_replication_received_bytes_total{{volume="{name}"}}"#),
        );
        assert!(sent >= f64::from(4u32 << 20), "{sent}");
        assert!(received >= f64::from(4u32 << 20), "{received}");
        storaged_tests::promtool_check(&pm);
        storaged_tests::promtool_check(&sm);
    }
}

#[test]
fn after_a_kill_9_of_either_side_the_link_comes_back_resyncs_and_the_secondary_is_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, mut b) = two_daemons(tmp.path());
    a.create_volume(r#"{"name":"db","size":"32MiB"}"#);
    a.admin().start_replication("db", &start(&b)).unwrap();
    wait_replication(&b, "db", "the initial sync ends", |r| r.consistent);
    let mut c = connect_retry(&a.socket_of("db"), 1);
    // The secondary is killed while the primary writes.
    for i in 0..8u64 {
        assert_eq!(c.write(0, i << 20, &pattern(1 << 20, i, 4)), 0);
        if i == 3 {
            b.kill_and_restart();
        }
    }
    assert_eq!(c.flush(0), 0);
    let flushed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let r = wait_replication(
        &b,
        "db",
        "the secondary catches up after its restart",
        |r| r.consistent && r.consistent_at.is_some_and(|t| t >= flushed),
    );
    assert_eq!(r.state, "replicating", "{r:?}");
    a.wait_for_log("replication link down");
    // The primary is killed; the secondary keeps its consistent image and says so.
    drop(c);
    a.kill_and_restart();
    let r = b.admin().replication("db").unwrap();
    assert!(r.consistent, "{r:?}");
    let mut c = connect_retry(&a.socket_of("db"), 1);
    assert_eq!(c.write(0, 20 << 20, &pattern(4096, 20, 5)), 0);
    assert_eq!(c.flush(0), 0);
    let flushed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    wait_replication(
        &b,
        "db",
        "the secondary follows the restarted primary",
        |r| r.consistent && r.consistent_at.is_some_and(|t| t >= flushed),
    );
    drop(c);
    let mut ro = BlkClient::connect_read_only(&b.socket_of("db")).unwrap();
    for i in 0..8u64 {
        let got = ro.read(0, i << 20, 1 << 20).unwrap();
        assert_eq!(got, pattern(1 << 20, i, 4), "MiB {i}");
    }
    assert_eq!(ro.read(0, 20 << 20, 4096).unwrap(), pattern(4096, 20, 5));
}

#[test]
fn a_secondary_that_goes_silent_is_noticed_by_its_pings_and_the_link_comes_back_when_it_wakes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_daemons(tmp.path());
    a.create_volume(r#"{"name":"db","size":"16MiB"}"#);
    a.admin().start_replication("db", &start(&b)).unwrap();
    wait_replication(&a, "db", "replicating", |r| r.state == "replicating");
    // Frozen, the secondary keeps its connection open but answers nothing.
    // SAFETY: SIGSTOP to the secondary's process, which this test started.
    unsafe { libc::kill(b.pid() as i32, libc::SIGSTOP) };
    a.wait_for_log("the secondary sent nothing for 5 s");
    let r = wait_replication(&a, "db", "disconnected", |r| r.state == "disconnected");
    assert!(r.disconnected_since.is_some(), "{r:?}");
    // SAFETY: SIGCONT to the same process.
    unsafe { libc::kill(b.pid() as i32, libc::SIGCONT) };
    let r = wait_replication(&a, "db", "replicating again", |r| r.state == "replicating");
    assert_eq!(r.disconnected_since, None, "{r:?}");
}

#[test]
fn a_stopping_daemon_does_not_wait_for_a_peer_that_sends_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("zone CA");
    let (mut s, _) = daemon(tmp.path(), &ca, "node-a", 0);
    let peer = ca.issue(tmp.path(), "node-b", &["127.0.0.1"]);
    let _idle = pki::connect(s.replication_addr(), "127.0.0.1", Some(&peer), &peer.ca).unwrap();
    s.wait_for_log("replication peer authenticated");
    let status = s.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status}");
    let log = s.log_text();
    assert!(log.contains("stopped"), "{log}");
    // Neither the session's own wait nor the listener's drain ran out: the session ended
    // with the stop.
    assert!(!log.contains("nothing sent within"), "{log}");
    assert!(!log.contains("still under way"), "{log}");
}

// Role changes: failover, failback, switchover, split brain, unreplicate.

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// SIGSTOP or SIGCONT to a daemon this test started.
fn freeze(s: &Storaged, frozen: bool) {
    let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
    // SAFETY: a signal to a child process of this test.
    unsafe { libc::kill(s.pid() as i32, sig) };
}

/// Writes `data` at `offset` of volume `name` through a frontend of its own, and flushes.
fn write_flushed(s: &Storaged, name: &str, offset: u64, data: &[u8]) {
    let mut c = connect_retry(&s.socket_of(name), 1);
    assert_eq!(c.write(0, offset, data), 0);
    assert_eq!(c.flush(0), 0);
}

/// `len` bytes at `offset` of volume `name`, read through a read-only frontend.
fn read_back(s: &Storaged, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut last = None;
    for _ in 0..100 {
        match BlkClient::connect_read_only(&s.socket_of(name)) {
            Ok(mut c) => return c.read(0, offset, len).unwrap(),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("cannot read {name}: {last:?}");
}

/// Promotes secondary `name` on `s` once its stream from the primary has ended (the
/// receiver notices a dead primary at once, a silent one within 5 s).
fn promote_when_free(s: &Storaged, name: &str, force: bool) -> storaged_api::ReplicationInfo {
    let mut out = None;
    storaged_tests::wait_until(
        "the promote, once the stream has ended",
        std::time::Duration::from_secs(30),
        || match s.admin().promote(name, force) {
            Ok(r) => {
                out = Some(r);
                true
            }
            Err(e) if e.to_string().contains("is receiving") => false,
            Err(e) => panic!("promote: {e}"),
        },
    );
    out.unwrap()
}

/// A replicating pair with volume `db` of 32 MiB, regions 0..8 written (seed 1) and on the
/// secondary.
fn replicating_pair(dir: &Path) -> (Storaged, Storaged) {
    let (a, b) = two_daemons(dir);
    a.create_volume(r#"{"name":"db","size":"32MiB"}"#);
    for i in 0..8u64 {
        write_flushed(&a, "db", i << 20, &pattern(1 << 20, i, 1));
    }
    let flushed = unix_now();
    a.admin().start_replication("db", &start(&b)).unwrap();
    wait_replication(&b, "db", "the secondary has the data", |r| {
        r.consistent && r.consistent_at.is_some_and(|t| t >= flushed)
    });
    (a, b)
}

#[test]
fn failover_serves_the_secondarys_consistent_image_and_failback_sends_only_the_diverged_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = replicating_pair(tmp.path());
    // A write the secondary never gets: it is frozen, then the primary is killed.
    freeze(&b, true);
    write_flushed(&a, "db", 10 << 20, &pattern(4096, 10, 2));
    a.signal_and_wait(libc::SIGKILL);
    freeze(&b, false);

    // Failover: writable at its socket, from its last consistent image.
    let r = promote_when_free(&b, "db", false);
    assert_eq!(r.role, ReplicationRole::Primary);
    assert_eq!(r.generation, 1);
    b.wait_for_log("volume promoted");
    for i in 0..8u64 {
        assert_eq!(
            read_back(&b, "db", i << 20, 1 << 20),
            pattern(1 << 20, i, 1)
        );
    }
    assert_eq!(read_back(&b, "db", 10 << 20, 4096), vec![0; 4096]);
    write_flushed(&b, "db", 12 << 20, &pattern(4096, 12, 3));
    assert_eq!(
        b.admin().volume("db").unwrap().replication_role,
        Some(ReplicationRole::Primary)
    );
    let before = resyncs(&b);

    // The old primary comes back, took no writes since: it sees it was superseded and becomes
    // the new primary's secondary by itself.
    a.restart_after_stop();
    a.wait_for_log("this side becomes its secondary");
    let r = wait_replication(&a, "db", "the old primary follows the new one", |r| {
        r.role == ReplicationRole::Secondary && r.consistent && r.state == "replicating"
    });
    assert_eq!(r.generation, 1);
    // Only the regions that diverged: the new primary's write and the old one's lost write.
    storaged_tests::wait_until(
        "the failback's resync",
        std::time::Duration::from_secs(30),
        || resync_regions(&b, before).is_some(),
    );
    let (regions, bytes) = resync_regions(&b, before).unwrap();
    assert_eq!(
        (regions, bytes),
        (2, 2 << 20),
        "regions 10 and 12, not the 32 MiB"
    );
    let flushed = unix_now();
    wait_replication(&a, "db", "the resync committed", |r| {
        r.consistent_at.is_some_and(|t| t >= flushed)
    });
    assert_eq!(
        read_back(&a, "db", 10 << 20, 4096),
        vec![0; 4096],
        "the old primary's unshipped write is replaced by the new primary's data"
    );
    assert_eq!(read_back(&a, "db", 12 << 20, 4096), pattern(4096, 12, 3));
    for i in 0..8u64 {
        assert_eq!(
            read_back(&a, "db", i << 20, 1 << 20),
            pattern(1 << 20, i, 1)
        );
    }
    // A secondary refuses writing frontends.
    assert!(BlkClient::connect(&a.socket_of("db"), 1).is_err());
}

#[test]
fn a_switchover_swaps_the_roles_with_no_acknowledged_write_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = replicating_pair(tmp.path());
    // Writes answered, not flushed, right before the call.
    let mut c = connect_retry(&a.socket_of("db"), 1);
    for i in 16..24u64 {
        assert_eq!(c.write(0, i << 20, &pattern(1 << 20, i, 4)), 0);
    }
    let r = a.admin().switchover("db").unwrap();
    assert_eq!(r.role, ReplicationRole::Secondary);
    assert_eq!(r.generation, 1);
    // The fenced frontend was disconnected; a writer is refused from now on.
    drop(c);
    assert!(BlkClient::connect(&a.socket_of("db"), 1).is_err());
    let r = b.admin().replication("db").unwrap();
    assert_eq!(r.role, ReplicationRole::Primary, "{r:?}");
    for i in (0..8u64).chain(16..24) {
        let seed = if i < 8 { 1 } else { 4 };
        assert_eq!(
            read_back(&b, "db", i << 20, 1 << 20),
            pattern(1 << 20, i, seed),
            "MiB {i} on the new primary"
        );
    }
    // And the other way: the new primary's writes reach the old one.
    write_flushed(&b, "db", 30 << 20, &pattern(4096, 30, 5));
    let flushed = unix_now();
    wait_replication(&a, "db", "the old primary follows", |r| {
        r.consistent && r.consistent_at.is_some_and(|t| t >= flushed)
    });
    assert_eq!(read_back(&a, "db", 30 << 20, 4096), pattern(4096, 30, 5));
    // Back again.
    let r = b.admin().switchover("db").unwrap();
    assert_eq!((r.role, r.generation), (ReplicationRole::Secondary, 2));
    write_flushed(&a, "db", 31 << 20, &pattern(4096, 31, 6));
    assert_eq!(read_back(&a, "db", 30 << 20, 4096), pattern(4096, 30, 5));
}

/// Makes a split brain of a replicating pair: the secondary is killed, the primary writes
/// region `ra` while it knows the link down, then (frozen) cannot reach the secondary, which
/// restarts, is promoted and writes region `rb`; then the primary wakes. Returns `(a, b)`
/// with `a` the old primary.
fn split(a: &Storaged, b: &mut Storaged, ra: u64, rb: u64, seed: u8) {
    b.signal_and_wait(libc::SIGKILL);
    wait_replication(a, "db", "the primary sees the link down", |r| {
        r.state == "disconnected"
    });
    write_flushed(a, "db", ra << 20, &pattern(4096, ra, seed));
    freeze(a, true);
    b.restart_after_stop();
    promote_when_free(b, "db", false);
    write_flushed(b, "db", rb << 20, &pattern(4096, rb, seed + 1));
    freeze(a, false);
    for s in [a, &*b] {
        wait_replication(s, "db", "the split brain is seen", |r| {
            r.state == "split_brain"
        });
    }
}

#[test]
fn a_split_brain_is_detected_on_both_sides_and_resolved_either_way_without_either_overwriting_first(
) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b) = replicating_pair(tmp.path());
    split(&a, &mut b, 20, 21, 10);
    a.wait_for_log("split brain");
    // Neither side overwrote the other.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(read_back(&a, "db", 20 << 20, 4096), pattern(4096, 20, 10));
    assert_eq!(read_back(&a, "db", 21 << 20, 4096), vec![0; 4096]);
    assert_eq!(read_back(&b, "db", 21 << 20, 4096), pattern(4096, 21, 11));
    assert_eq!(read_back(&b, "db", 20 << 20, 4096), vec![0; 4096]);
    // Both are still primaries, writable.
    write_flushed(&a, "db", 22 << 20, &pattern(4096, 22, 12));

    // keep = local on the old primary: the other side becomes its secondary and gets its data.
    let r = a.admin().resolve("db", storaged_api::Keep::Local).unwrap();
    assert_eq!((r.role, r.generation), (ReplicationRole::Primary, 2));
    let flushed = unix_now();
    let r = wait_replication(&b, "db", "the loser follows the winner", |r| {
        r.role == ReplicationRole::Secondary
            && r.consistent
            && r.consistent_at.is_some_and(|t| t >= flushed)
    });
    assert_eq!(r.generation, 2);
    assert_eq!(read_back(&b, "db", 20 << 20, 4096), pattern(4096, 20, 10));
    assert_eq!(read_back(&b, "db", 22 << 20, 4096), pattern(4096, 22, 12));
    assert_eq!(
        read_back(&b, "db", 21 << 20, 4096),
        vec![0; 4096],
        "the loser's own write is overwritten by the winner's data"
    );

    // Again, and keep = peer on the old primary: it becomes the secondary of the other.
    split(&a, &mut b, 24, 25, 20);
    let r = a.admin().resolve("db", storaged_api::Keep::Peer).unwrap();
    assert_eq!(r.role, ReplicationRole::Secondary);
    let flushed = unix_now();
    wait_replication(&a, "db", "the old primary follows the kept side", |r| {
        r.consistent && r.consistent_at.is_some_and(|t| t >= flushed)
    });
    assert_eq!(read_back(&a, "db", 25 << 20, 4096), pattern(4096, 25, 21));
    assert_eq!(read_back(&a, "db", 24 << 20, 4096), vec![0; 4096]);
    assert_eq!(read_back(&a, "db", 20 << 20, 4096), pattern(4096, 20, 10));
}

#[test]
fn role_changes_that_cannot_apply_are_refused_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = replicating_pair(tmp.path());
    a.create_volume(r#"{"name":"lone","size":"16MiB"}"#);
    let status = |r: Result<storaged_api::ReplicationInfo, storaged_api::client::Error>| {
        let e = r.unwrap_err();
        (e.status().unwrap_or(0), e.to_string())
    };
    let (code, why) = status(a.admin().promote("db", false));
    assert_eq!(code, 409, "{why}");
    assert!(why.contains("already the primary"), "{why}");
    let (code, why) = status(b.admin().promote("db", false));
    assert_eq!(code, 409, "{why}");
    assert!(why.contains("switchover"), "{why}");
    assert_eq!(status(a.admin().promote("lone", false)).0, 404);
    assert_eq!(status(a.admin().promote("nope", false)).0, 404);
    let (code, why) = status(a.admin().demote("db"));
    assert_eq!(code, 409, "{why}");
    assert!(why.contains("has not met"), "{why}");
    assert_eq!(status(b.admin().demote("db")).0, 409);
    let (code, why) = status(a.admin().resolve("db", storaged_api::Keep::Local));
    assert_eq!(code, 409, "{why}");
    assert!(why.contains("not in a split brain"), "{why}");
    assert_eq!(status(b.admin().switchover("db")).0, 409);
    // Replicating a secondary, or a primary again.
    assert_eq!(
        b.admin()
            .start_replication("db", &start(&a))
            .unwrap_err()
            .status(),
        Some(409)
    );
    // A bad body.
    let resp = a
        .admin()
        .request("POST", "/v1/volumes/db/resolve", Some(r#"{"keep":"both"}"#))
        .unwrap();
    assert_eq!(resp.status, 400, "{}", resp.body);
    // A secondary with no consistent image is promoted only by force.
    a.create_volume(r#"{"name":"big","size":"256MiB"}"#);
    {
        let mut c = connect_retry(&a.socket_of("big"), 1);
        for i in 0..64u64 {
            assert_eq!(c.write(0, i << 22, &pattern(4 << 20, i, 7)), 0);
        }
        assert_eq!(c.flush(0), 0);
    }
    a.admin().start_replication("big", &start(&b)).unwrap();
    freeze(&b, true);
    a.signal_and_wait(libc::SIGKILL);
    freeze(&b, false);
    let mut forced = None;
    storaged_tests::wait_until(
        "the stream ends",
        std::time::Duration::from_secs(30),
        || match b.admin().promote("big", false) {
            Err(e) if e.to_string().contains("is receiving") => false,
            Err(e) => {
                forced = Some(e);
                true
            }
            Ok(r) => panic!("promoted with no consistent image: {r:?}"),
        },
    );
    let e = forced.unwrap();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("force=true"), "{e}");
    let r = b.admin().promote("big", true).unwrap();
    assert_eq!(r.role, ReplicationRole::Primary);
    write_flushed(&b, "big", 0, &pattern(4096, 0, 8));
    a.restart_after_stop();
}

#[test]
fn unreplicate_ends_the_relationship_on_both_sides_and_both_keep_their_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = replicating_pair(tmp.path());
    let r = a.admin().unreplicate("db").unwrap();
    assert!(r.peer_ended, "{r:?}");
    assert_eq!(a.admin().replication("db").unwrap_err().status(), Some(404));
    assert_eq!(b.admin().replication("db").unwrap_err().status(), Some(404));
    assert_eq!(b.admin().volume("db").unwrap().replication_role, None);
    // The former secondary is an ordinary volume: writable, its data kept.
    assert_eq!(
        read_back(&b, "db", 3 << 20, 1 << 20),
        pattern(1 << 20, 3, 1)
    );
    write_flushed(&b, "db", 0, &pattern(4096, 0, 9));
    write_flushed(&a, "db", 0, &pattern(4096, 0, 10));
    assert_eq!(read_back(&b, "db", 0, 4096), pattern(4096, 0, 9));
    // It can be deleted without force now, and the primary replicated anew.
    storaged_tests::wait_until(
        "the delete, once the last frontend is gone",
        std::time::Duration::from_secs(10),
        || match b.admin().delete_volume("db", false) {
            Ok(_) => true,
            Err(e) if e.to_string().contains("attached") => false,
            Err(e) => panic!("delete: {e}"),
        },
    );
    // What the primary shows of the new relationship, from its start, is the new one's: no
    // consistent point before it began (the old one's sender may not have ended yet).
    let restarted = unix_now();
    a.admin().start_replication("db", &start(&b)).unwrap();
    let mut seen = Vec::new();
    wait_replication(&a, "db", "a new relationship syncs", |r| {
        seen.push(r.clone());
        r.consistent && r.state == "replicating"
    });
    for r in &seen {
        assert!(
            r.consistent_at.is_none_or(|t| t >= restarted),
            "the ended relationship's consistent point shown for the new one: {r:?}"
        );
        assert!(!r.consistent || r.consistent_at.is_some(), "{r:?}");
    }
    wait_replication(&b, "db", "a new relationship syncs", |r| r.consistent);
}

#[test]
fn a_relationship_started_while_the_ended_ones_sender_waits_to_reconnect_gets_a_sender_of_its_own()
{
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b) = replicating_pair(tmp.path());
    let old = a.admin().replication("db").unwrap();
    // The peer dies: the sender fails to reconnect and backs off (1 s, 2 s, 4 s...).
    b.signal_and_wait(libc::SIGKILL);
    wait_replication(&a, "db", "the link down", |r| r.state == "disconnected");
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Ended on both sides while it waits, and started again, to a fresh copy.
    assert!(!a.admin().unreplicate("db").unwrap().peer_ended);
    b.restart_after_stop();
    b.admin().unreplicate("db").unwrap();
    b.admin().delete_volume("db", false).unwrap();
    let restarted = unix_now();
    a.admin().start_replication("db", &start(&b)).unwrap();
    let mut seen = Vec::new();
    let last = wait_replication(&a, "db", "the new relationship syncs", |r| {
        seen.push(r.clone());
        r.consistent && r.state == "replicating"
    });
    assert_ne!(last.relationship, old.relationship);
    // Never the ended relationship's consistent point for the new one.
    for r in &seen {
        assert!(r.consistent_at.is_none_or(|t| t >= restarted), "{r:?}");
        assert!(!r.consistent || r.consistent_at.is_some(), "{r:?}");
    }
    // Served by one sender: the stream runs, the secondary holds the data.
    write_flushed(&a, "db", 9 << 20, &pattern(4096, 9 << 20, 7));
    let flushed = unix_now();
    wait_replication(&b, "db", "the write on the secondary", |r| {
        r.consistent_at.is_some_and(|t| t >= flushed)
    });
    assert_eq!(a.log_text().matches("replication started").count(), 2);
}

#[test]
fn in_sync_mode_an_answered_write_is_on_the_secondary_and_a_silent_secondary_falls_back_to_async() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("zone CA");
    let (mut a, _) = daemon_with(
        tmp.path(),
        &ca,
        "zone-a",
        free_port(),
        "sync_timeout_seconds = 2",
    );
    let (b, _) = daemon_with(
        tmp.path(),
        &ca,
        "zone-b",
        free_port(),
        "sync_timeout_seconds = 2",
    );
    a.create_volume(r#"{"name":"db","size":"32MiB"}"#);
    let mut req = start(&b);
    req.mode = ReplicationMode::Sync;
    a.admin().start_replication("db", &req).unwrap();
    wait_replication(&a, "db", "the sync relationship is in sync", |r| {
        r.state == "replicating" && !r.sync_suspended
    });
    a.wait_for_log("sync mode: writes are answered once the secondary has committed them");

    // The secondary frozen, a write waits for it, then the relationship falls back to async
    // and the write is answered.
    let mut c = connect_retry(&a.socket_of("db"), 1);
    freeze(&b, true);
    assert_eq!(c.write(0, 4 << 20, &pattern(4096, 4, 1)), 0);
    a.wait_for_log("sync mode suspended");
    let r = a.admin().replication("db").unwrap();
    assert!(r.sync_suspended, "{r:?}");
    let scrape = storaged_tests::http_get(&a.metrics_url());
    assert_eq!(
        storaged_tests::metric_value(
            &scrape,
            r#"storaged_volume_replication_sync_suspensions_total{volume="db"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        storaged_tests::metric_value(
            &scrape,
            r#"storaged_volume_replication_sync_suspended{volume="db"}"#
        ),
        Some(1.0)
    );
    // Async meanwhile: writes are answered without the secondary.
    assert_eq!(c.write(0, 5 << 20, &pattern(4096, 5, 1)), 0);
    freeze(&b, false);
    // Back in sync once the stream has caught up.
    a.wait_for_log("sync mode resumed");
    wait_replication(&a, "db", "sync again", |r| !r.sync_suspended);

    // In sync: every answered write is committed on the secondary. The primary is killed
    // the moment the last is answered, with no FLUSH: the promoted secondary has them all.
    for i in 0..16u64 {
        assert_eq!(c.write(0, (8 + i) << 20, &pattern(8192, 8 + i, 2)), 0);
    }
    a.signal_and_wait(libc::SIGKILL);
    drop(c);
    promote_when_free(&b, "db", false);
    for i in 0..16u64 {
        assert_eq!(
            read_back(&b, "db", (8 + i) << 20, 8192),
            pattern(8192, 8 + i, 2),
            "write {i}: answered, so on the secondary"
        );
    }
    assert_eq!(read_back(&b, "db", 4 << 20, 4096), pattern(4096, 4, 1));
}

#[test]
fn growing_the_primary_grows_its_secondary_and_writes_beyond_the_old_end_reach_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = replicating_pair(tmp.path());
    let r = a
        .admin()
        .request("PATCH", "/v1/volumes/db", Some(r#"{"size":"64MiB"}"#))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    b.wait_for_log("the secondary grew with its primary");
    storaged_tests::wait_until(
        "the secondary's new size",
        std::time::Duration::from_secs(30),
        || b.admin().volume("db").unwrap().size_bytes == 64 << 20,
    );
    write_flushed(&a, "db", 60 << 20, &pattern(4096, 60, 3));
    let flushed = unix_now();
    wait_replication(&b, "db", "the write beyond the old end", |r| {
        r.state == "replicating" && r.consistent_at.is_some_and(|t| t >= flushed)
    });
    assert_eq!(read_back(&b, "db", 60 << 20, 4096), pattern(4096, 60, 3));
    assert_eq!(
        read_back(&b, "db", 3 << 20, 1 << 20),
        pattern(1 << 20, 3, 1)
    );
}
