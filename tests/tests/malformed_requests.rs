//! Malformed and hostile requests sent over a real vhost-user socket to the real daemon: each
//! is answered as the virtio spec says (IOERR, UNSUPP, or returned without a status when there
//! is no status byte), nothing outside the volume is read or written, and the daemon keeps
//! serving.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::time::Duration;

use storaged_tests::raw_frontend::*;
use storaged_tests::*;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const VOLUME: u64 = 1 << 20;
const HDR: u64 = BUF_BASE;
const DATA: u64 = BUF_BASE + 0x1000;
const STATUS: u64 = BUF_BASE + 0x100;

/// A plain (unencrypted) volume and a raw frontend on it: the data lands on disk as sent.
fn setup() -> (Storaged, RawFrontend, String) {
    setup_with(r#"{"name":"hostile","size":"1MiB","encryption":"none"}"#)
}

fn setup_with(body: &str) -> (Storaged, RawFrontend, String) {
    let s = Storaged::start();
    let v = s.create_volume(body);
    let fe = RawFrontend::connect(&s.socket_of("hostile"));
    let backing = v["backing"]["path"].as_str().unwrap().to_string();
    (s, fe, backing)
}

/// Sends a chain and returns (used length, status byte).
fn send(fe: &mut RawFrontend, descs: &[Desc]) -> (u32, u8) {
    fe.write_mem(STATUS, &[0xff]);
    let used = fe.submit(0, descs);
    (used, fe.read_mem(STATUS, 1)[0])
}

/// A well-formed write and read still work: the daemon survived what came before.
fn still_serving(fe: &mut RawFrontend) {
    let data = pattern(4096, 0, 0x77);
    fe.write_mem(DATA, &data);
    fe.header(HDR, T_OUT, 8);
    assert_eq!(
        send(fe, &[ro(HDR, 16), ro(DATA, 4096), wr(STATUS, 1)]),
        (1, S_OK)
    );
    fe.write_mem(DATA, &[0u8; 4096]);
    fe.header(HDR, T_IN, 8);
    assert_eq!(
        send(fe, &[ro(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]),
        (4097, S_OK)
    );
    assert_eq!(fe.read_mem(DATA, 4096), data);
}

#[test]
fn short_header_is_an_io_error() {
    let (_s, mut fe, _) = setup();
    fe.header(HDR, T_IN, 0);
    assert_eq!(send(&mut fe, &[ro(HDR, 8), wr(STATUS, 1)]), (1, S_IOERR));
    still_serving(&mut fe);
}

#[test]
fn chain_without_status_byte_is_returned_unanswered() {
    let (_s, mut fe, _) = setup();
    fe.header(HDR, T_OUT, 0);
    let used = fe.submit(0, &[ro(HDR, 16), ro(DATA, 512)]);
    assert_eq!(used, 0);
    still_serving(&mut fe);
}

#[test]
fn wrong_direction_buffers_are_io_errors() {
    let (_s, mut fe, _) = setup();
    fe.header(HDR, T_IN, 0);
    assert_eq!(
        send(&mut fe, &[ro(HDR, 16), ro(DATA, 512), wr(STATUS, 1)]),
        (1, S_IOERR)
    );
    fe.header(HDR, T_OUT, 0);
    assert_eq!(
        send(&mut fe, &[ro(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]),
        (1, S_IOERR)
    );
    // A device-readable descriptor after a device-writable one.
    fe.header(HDR, T_IN, 0);
    assert_eq!(
        send(
            &mut fe,
            &[
                ro(HDR, 16),
                wr(DATA, 512),
                ro(DATA + 4096, 16),
                wr(STATUS, 1)
            ]
        ),
        (1, S_IOERR)
    );
    still_serving(&mut fe);
}

#[test]
fn io_past_the_end_is_refused_and_the_backing_file_is_untouched() {
    let (_s, mut fe, backing) = setup();
    let before = std::fs::read(&backing).unwrap();
    fe.write_mem(DATA, &[0xab; 8192]);
    let last = VOLUME / 512;
    for (t, sector, write) in [
        (T_OUT, last, false),
        (T_OUT, last - 1, false),
        (T_OUT, u64::MAX - 3, false),
        (T_IN, last, true),
        (T_IN, last - 8, true),
    ] {
        fe.header(HDR, t, sector);
        let data = if write {
            wr(DATA, 8192)
        } else {
            ro(DATA, 8192)
        };
        assert_eq!(
            send(&mut fe, &[ro(HDR, 16), data, wr(STATUS, 1)]),
            (1, S_IOERR),
            "type {t} sector {sector}"
        );
    }
    assert_eq!(std::fs::read(&backing).unwrap(), before);
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), VOLUME);
    still_serving(&mut fe);
}

#[test]
fn too_many_segments_are_refused() {
    let (_s, mut fe, _) = setup();
    fe.header(HDR, T_IN, 0);
    // seg_max is 128 by default: 129 segments of 512 bytes.
    let mut chain = vec![ro(HDR, 16)];
    chain.extend((0..129).map(|i| wr(DATA + i * 512, 512)));
    chain.push(wr(STATUS, 1));
    assert_eq!(send(&mut fe, &chain), (1, S_IOERR));
    still_serving(&mut fe);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let (_s, mut fe, _) = setup();
    fe.header(HDR, 0x1234, 0);
    assert_eq!(send(&mut fe, &[ro(HDR, 16), wr(STATUS, 1)]), (1, S_UNSUPP));
    still_serving(&mut fe);
}

#[test]
fn buffers_outside_guest_memory_are_io_errors() {
    let (_s, mut fe, backing) = setup();
    let before = std::fs::read(&backing).unwrap();
    // Header beyond guest memory.
    assert_eq!(
        send(&mut fe, &[ro(MEM_LEN as u64 + 0x1000, 16), wr(STATUS, 1)]),
        (1, S_IOERR)
    );
    // Data straddling the end of guest memory.
    fe.header(HDR, T_OUT, 0);
    let end = MEM_LEN as u64 - 2048;
    assert_eq!(
        send(&mut fe, &[ro(HDR, 16), ro(end, 4096), wr(STATUS, 1)]),
        (1, S_IOERR)
    );
    assert_eq!(std::fs::read(&backing).unwrap(), before);
    still_serving(&mut fe);
}

#[test]
fn descriptor_loop_does_not_hang_the_queue() {
    let (_s, mut fe, _) = setup();
    fe.header(HDR, T_IN, 0);
    // Descriptor 0 points at itself.
    fe.raw_desc(0, HDR, 16, VIRTQ_DESC_F_NEXT, 0);
    let used = fe.make_available(0);
    assert_eq!(used, 0);
    still_serving(&mut fe);
}

#[test]
fn get_id_returns_the_volume_id_and_flush_succeeds() {
    let (s, mut fe, _) = setup();
    let id = s.admin().get("/v1/volumes/hostile").unwrap().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    fe.header(HDR, T_GET_ID, 0);
    assert_eq!(
        send(&mut fe, &[ro(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]),
        (21, S_OK)
    );
    assert_eq!(fe.read_mem(DATA, 20), id.as_bytes()[..20].to_vec());
    fe.header(HDR, T_FLUSH, 0);
    assert_eq!(send(&mut fe, &[ro(HDR, 16), wr(STATUS, 1)]), (1, S_OK));
}

#[test]
fn unaligned_guest_buffers_are_served_through_a_bounce_buffer() {
    // O_DIRECT needs aligned memory; a driver may hand any address. Data must still be right.
    let (s, mut fe, backing) = setup();
    let info = s.admin().get("/v1/volumes/hostile").unwrap().json();
    assert_eq!(
        info["direct_io"], true,
        "this test needs O_DIRECT on the test file system"
    );
    let data = pattern(8192, 16384, 0x3c);
    let odd = DATA + 3;
    fe.write_mem(odd, &data);
    fe.header(HDR, T_OUT, 32);
    // Two segments, neither aligned, split at an odd length.
    assert_eq!(
        send(
            &mut fe,
            &[
                ro(HDR, 16),
                ro(odd, 1000),
                ro(odd + 1000, 7192),
                wr(STATUS, 1)
            ]
        ),
        (1, S_OK)
    );
    fe.header(HDR, T_FLUSH, 0);
    assert_eq!(send(&mut fe, &[ro(HDR, 16), wr(STATUS, 1)]), (1, S_OK));
    let on_disk = std::fs::read(&backing).unwrap();
    assert_eq!(&on_disk[16384..16384 + 8192], &data[..]);
    let back = DATA + 0x10000 + 5;
    fe.header(HDR, T_IN, 32);
    assert_eq!(
        send(
            &mut fe,
            &[
                ro(HDR, 16),
                wr(back, 4096),
                wr(back + 4096, 4096),
                wr(STATUS, 1)
            ]
        ),
        (8193, S_OK)
    );
    assert_eq!(fe.read_mem(back, 8192), data);
}

#[test]
fn encrypted_volumes_refuse_requests_not_aligned_to_4096_bytes_and_store_ciphertext() {
    let (s, mut fe, backing) = setup_with(r#"{"name":"hostile","size":"1MiB"}"#);
    let info = s.admin().get("/v1/volumes/hostile").unwrap().json();
    assert_eq!(info["encryption"], "aes-xts-plain64");
    assert_eq!(info["block_size"], 4096);
    // 512 bytes at sector 1, and 4096 bytes at sector 1: both straddle encryption units.
    fe.header(HDR, T_IN, 1);
    assert_eq!(
        send(&mut fe, &[ro(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]),
        (1, S_IOERR)
    );
    fe.write_mem(DATA, &pattern(4096, 512, 9));
    fe.header(HDR, T_OUT, 1);
    assert_eq!(
        send(&mut fe, &[ro(HDR, 16), ro(DATA, 4096), wr(STATUS, 1)]),
        (1, S_IOERR)
    );
    // Nothing reached the disk; aligned requests work and are stored encrypted.
    assert!(std::fs::read(&backing).unwrap().iter().all(|b| *b == 0));
    still_serving(&mut fe);
    // still_serving wrote sector 8: the second unit.
    let on_disk = std::fs::read(&backing).unwrap();
    assert_ne!(&on_disk[4096..8192], &pattern(4096, 0, 0x77)[..]);
    assert!(on_disk[4096..8192].iter().any(|b| *b != 0));
}

/// The volumes a hostile frontend shares the daemon with: one it truncates its memory under,
/// one a well-behaved client uses throughout.
fn two_volumes() -> (Storaged, BlkClient) {
    let s = Storaged::start();
    for name in ["hostile", "bystander"] {
        s.create_volume(&format!(
            r#"{{"name":"{name}","size":"1MiB","encryption":"none"}}"#
        ));
    }
    let mut other = BlkClient::connect(&s.socket_of("bystander"), 1).unwrap();
    assert_eq!(other.write(0, 0, &pattern(4096, 0, 0x42)), 0);
    (s, other)
}

#[test]
fn a_frontend_that_truncates_its_memory_is_disconnected_and_other_volumes_keep_serving() {
    let (s, mut other) = two_volumes();
    let mut fe = RawFrontend::connect(&s.socket_of("hostile"));
    // A read is published, then the memory under the ring and its buffers goes away.
    fe.header(HDR, T_IN, 0);
    fe.chain(0, &[ro(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
    fe.publish(0);
    fe.truncate_memory(0);
    fe.kick();
    s.wait_for_log("guest memory file shrank under its mapping");
    s.wait_for_log("frontend detached");
    // The daemon is alive and serves the other volume...
    assert_eq!(other.read(0, 0, 4096).unwrap(), pattern(4096, 0, 0x42));
    assert_eq!(other.write(0, 4096, &pattern(4096, 4096, 0x43)), 0);
    // ...and the truncated volume's socket serves the next frontend.
    drop(fe);
    let mut fe = RawFrontend::connect(&s.socket_of("hostile"));
    still_serving(&mut fe);
}

#[test]
fn a_memory_table_larger_than_its_file_is_refused() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

    let (s, mut other) = two_volumes();
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"short".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a new descriptor we own.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd: 1 MiB of file for a table that claims 4 MiB.
    assert_eq!(unsafe { libc::ftruncate(fd, 1 << 20) }, 0);
    let mut fe = Frontend::connect(s.socket_of("hostile"), 1).unwrap();
    fe.set_owner().unwrap();
    let _ = fe.get_features().unwrap();
    fe.set_features((1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let _ = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 4 << 20,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: memfd.as_raw_fd(),
    };
    assert!(fe.set_mem_table(&[region]).is_err());
    s.wait_for_log("extends past the end of its file");
    assert_eq!(other.read(0, 0, 4096).unwrap(), pattern(4096, 0, 0x42));
}

#[test]
fn bad_heads_and_empty_transfers_in_a_loop_log_a_bounded_number_of_lines() {
    // The harness logs storaged at debug level, where every refused request has a line.
    let (s, mut fe, _) = setup();
    for _ in 0..1000 {
        // A head index past the queue size: nothing the device can return.
        fe.post(QUEUE_SIZE + 7);
        // A read of no data: an I/O error, not an empty transfer.
        fe.header(HDR, T_IN, 0);
        assert_eq!(send(&mut fe, &[ro(HDR, 16), wr(STATUS, 1)]), (1, S_IOERR));
    }
    still_serving(&mut fe);
    let log = s.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("volume=hostile"))
        .collect();
    assert!(
        lines.len() < 50,
        "{} log lines for 2000 bad requests",
        lines.len()
    );
    // The lines left out are counted in the next one written.
    std::thread::sleep(storaged::blk::log_limit::WINDOW);
    fe.header(HDR, T_IN, 0);
    assert_eq!(send(&mut fe, &[ro(HDR, 16), wr(STATUS, 1)]), (1, S_IOERR));
    let suppressed = |l: &str| -> u64 {
        l.split_whitespace()
            .find_map(|f| f.strip_prefix("suppressed="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    wait_until(
        "a line that counts what was left out",
        Duration::from_secs(5),
        || {
            s.log_text()
                .lines()
                .any(|l| l.contains("volume=hostile") && suppressed(l) >= 1900)
        },
    );
    // An avail index further ahead than the ring holds, kicked over and over: the queue takes
    // nothing from it, and says so within its budget (virtio-queue would log each try).
    let before = s.log_text().lines().count();
    fe.publish_garbage_index(QUEUE_SIZE * 4);
    for _ in 0..1000 {
        fe.kick();
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = s.log_text().lines().count();
    assert!(
        after - before < 25,
        "{} log lines for 1000 kicks",
        after - before
    );
    assert!(s.log_text().contains("avail index ahead of the device"));
}

#[test]
fn misaligned_requests_beyond_the_bounce_budget_wait_for_it_instead_of_failing() {
    // 80 reads of 1 MiB into a misaligned buffer, all at once: 80 MiB of bounce buffers, over
    // the queue's 64 MiB budget.
    let s = Storaged::start();
    s.create_volume(r#"{"name":"hostile","size":"128MiB","encryption":"none","tier":"mass"}"#);
    let mut fe = RawFrontend::connect(&s.socket_of("hostile"));
    let info = s.admin().get("/v1/volumes/hostile").unwrap().json();
    assert_eq!(
        info["direct_io"], true,
        "this test needs O_DIRECT on the test file system"
    );
    let odd = BUF_BASE + 0x10000 + 3;
    let requests: u16 = 80;
    for i in 0..requests {
        let (hdr, status) = (HDR + u64::from(i) * 16, STATUS + 0x800 + u64::from(i));
        fe.header(hdr, T_IN, u64::from(i) * 2048);
        fe.write_mem(status, &[0xff]);
        fe.chain(i * 3, &[ro(hdr, 16), wr(odd, 1 << 20), wr(status, 1)]);
        fe.publish(i * 3);
    }
    fe.kick();
    for _ in 0..requests {
        let (head, used) = fe.wait_any_used();
        let i = head / 3;
        let status = fe.read_mem(STATUS + 0x800 + u64::from(i), 1)[0];
        assert_eq!((status, used), (S_OK, (1 << 20) + 1), "read {i}");
    }
}

#[test]
fn the_device_offers_a_transfer_limit_a_driver_can_keep_to() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"hostile","size":"64MiB","encryption":"none"}"#);
    let mut c = BlkClient::connect(&s.socket_of("hostile"), 1).unwrap();
    // libblkio, as Linux, derives it from SIZE_MAX × SEG_MAX.
    let max = c.get_i32("max-transfer");
    assert!(
        max > 0 && max <= 32 << 20,
        "max-transfer {max}: the device refuses requests over 32 MiB"
    );
    let data = pattern(max as usize, 0, 0x51);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.read(0, 0, max as usize).unwrap(), data);
}
