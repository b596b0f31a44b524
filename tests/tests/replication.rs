//! Replication between storaged daemons: the link's mutual TLS and its configuration.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::path::Path;

use storaged_tests::pki::{self, Ca, NodeFiles};
use storaged_tests::{bin, Storaged};

/// A config file with `[replication]` listening on a loopback port of the kernel's choice.
fn listening_config(dir: &Path, node: &NodeFiles) -> std::path::PathBuf {
    let path = dir.join("storaged.toml");
    std::fs::write(
        &path,
        format!("[replication]\nlisten = \"127.0.0.1:0\"\n{}", node.toml()),
    )
    .unwrap();
    path
}

#[test]
fn the_replication_listener_accepts_only_peers_whose_certificate_the_ca_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("zone CA");
    let node = ca.issue(tmp.path(), "node-a", &["127.0.0.1"]);
    let config = listening_config(tmp.path(), &node);
    let s = Storaged::start_with(&["--config", config.to_str().unwrap()]);
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

    // The daemon checks the peer as a client too: a listener with another CA's certificate
    // is not trusted by our peer.
    let err = pki::connect(addr, "127.0.0.1", Some(&peer), &rogue.ca)
        .expect_err("a server of another CA is not trusted");
    assert!(err.contains("invalid peer certificate"), "{err}");
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
