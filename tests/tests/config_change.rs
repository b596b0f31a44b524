//! Online grow seen by a frontend that set up the backend request channel: storaged sends
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, and GET_CONFIG then reports the new capacity.
//! The frontend here is rust-vmm's (the vhost crate's `Frontend`), as a VMM uses it.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use storaged_tests::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;

#[derive(Default)]
struct ConfigChanges(AtomicUsize);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

fn capacity_sectors(fe: &mut Frontend) -> u64 {
    let (_, payload) = fe
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
        .unwrap();
    u64::from_le_bytes(payload[..8].try_into().unwrap())
}

#[test]
fn grow_sends_config_change_message_and_new_capacity() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"cc","size":"16MiB"}"#);
    let mut fe = Frontend::connect(s.socket_of("cc"), 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
    fe.set_features(VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    let protocol = fe.get_protocol_features().unwrap();
    assert!(
        protocol.contains(wanted | VhostUserProtocolFeatures::MQ),
        "{protocol:?}"
    );
    fe.set_protocol_features(wanted).unwrap();

    let changes = Arc::new(ConfigChanges::default());
    let mut channel = FrontendReqHandler::new(changes.clone()).unwrap();
    channel.set_reply_ack_flag(true);
    fe.set_backend_request_fd(&channel.get_tx_raw_fd()).unwrap();
    assert_eq!(capacity_sectors(&mut fe), (16 << 20) / 512);

    // Serve the channel on a thread: the message arrives while the API call is answered.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = channel.handle_request();
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let r = s
        .admin()
        .request("PATCH", "/v1/volumes/cc", Some(r#"{"size":"48MiB"}"#))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("no message on the backend request channel")
        .expect("bad message");
    assert_eq!(changes.0.load(Ordering::SeqCst), 1);
    assert_eq!(capacity_sectors(&mut fe), (48 << 20) / 512);
    s.wait_for_log("frontend notified of the configuration change");
}
