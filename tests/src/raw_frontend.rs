//! A bare vhost-user-blk frontend for tests: rust-vmm's `Frontend` for the protocol, and a split
//! virtqueue laid out by hand in a memfd "guest memory", so a test can send any descriptor
//! chain, well-formed or not, and read back exactly what the device answered.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size.
pub const MEM_LEN: usize = 4 << 20;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// First guest address free for buffers.
pub const BUF_BASE: u64 = 0x10000;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// One descriptor: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn ro(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

pub fn wr(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// A connected frontend with one started queue.
pub struct RawFrontend {
    pub fe: Frontend,
    mem: *mut u8,
    memfd: OwnedFd,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl RawFrontend {
    pub fn connect(socket: &Path) -> Self {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fd is a new descriptor we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        assert_eq!(unsafe { libc::ftruncate(fd, MEM_LEN as i64) }, 0);
        // SAFETY: a new shared mapping of MEM_LEN bytes of our memfd.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        let mut fe = Frontend::connect(socket, 1).expect("connect");
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_ne!(features & (1 << 32), 0, "VERSION_1 not offered");
        fe.set_features((1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .unwrap();
        let _ = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .unwrap();
        // Every message waits for the device's answer, so the set-up is done when this returns.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_LEN as u64,
            userspace_addr: mem as u64,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        fe.set_vring_num(0, QUEUE_SIZE).unwrap();
        let base = mem as u64;
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: base + DESC_TABLE,
                used_ring_addr: base + USED_RING,
                avail_ring_addr: base + AVAIL_RING,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        RawFrontend {
            fe,
            mem: mem.cast(),
            memfd,
            kick,
            call,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Guest memory as a slice.
    pub fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is MEM_LEN bytes and lives as long as self; the device writes
        // only to buffers of requests we are waiting for.
        unsafe { std::slice::from_raw_parts_mut(self.mem, MEM_LEN) }
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        self.mem()[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }

    fn get(&mut self, at: u64, len: usize) -> Vec<u8> {
        self.mem()[at as usize..at as usize + len].to_vec()
    }

    /// Writes a virtio-blk request header at `at`.
    pub fn header(&mut self, at: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.put(at, &h);
    }

    pub fn write_mem(&mut self, at: u64, bytes: &[u8]) {
        self.put(at, bytes);
    }

    pub fn read_mem(&mut self, at: u64, len: usize) -> Vec<u8> {
        self.get(at, len)
    }

    /// Puts `descs` in the table as one chain (starting at descriptor `first`), makes it
    /// available, kicks, and waits for the device to return it. Returns the used length.
    pub fn submit(&mut self, first: u16, descs: &[Desc]) -> u32 {
        self.chain(first, descs);
        self.make_available(first)
    }

    /// Puts `descs` in the table as one chain starting at descriptor `first`.
    pub fn chain(&mut self, first: u16, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let mut flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.raw_desc(idx, d.addr, d.len, flags, (idx + 1) % QUEUE_SIZE);
        }
    }

    /// Writes one raw descriptor (for chains the helper would not build, like loops).
    pub fn raw_desc(&mut self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(DESC_TABLE + u64::from(idx) * 16, &d);
    }

    /// Makes descriptor `head` available, kicks, and waits for the used entry; returns its
    /// length.
    pub fn make_available(&mut self, head: u16) -> u32 {
        self.post(head);
        self.wait_used(head)
    }

    /// Makes descriptor `head` available and kicks, without waiting for the device.
    pub fn post(&mut self, head: u16) {
        self.publish(head);
        self.kick();
    }

    /// Makes descriptor `head` available without kicking.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.put(AVAIL_RING + 4 + slot * 2, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = self.avail_idx;
        self.put(AVAIL_RING + 2, &idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes an avail index `ahead` entries past what was published (a driver gone wrong).
    pub fn publish_garbage_index(&mut self, ahead: u16) {
        let idx = self.avail_idx.wrapping_add(ahead);
        self.put(AVAIL_RING + 2, &idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Kicks the queue without publishing anything.
    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Shrinks the guest memory file to `len` bytes under the device's mapping of it. The
    /// frontend must not touch its memory past `len` afterwards (it would fault itself).
    pub fn truncate_memory(&self, len: u64) {
        // SAFETY: ftruncate on our own memfd.
        let rc = unsafe { libc::ftruncate(self.memfd.as_raw_fd(), len as i64) };
        assert_eq!(rc, 0);
    }

    /// What a guest's device reset does to the queue: the frontend stops the ring
    /// (GET_VRING_BASE, which answers what was taken), the driver lays out empty rings, and the
    /// ring is started again from index 0. Returns the base the device answered and how many
    /// chains it had returned by then.
    pub fn reset_ring(&mut self) -> (u16, u16) {
        let (base, used) = self.stop_ring();
        let zeros = vec![0u8; (USED_RING + 0x1000 - AVAIL_RING) as usize];
        self.put(AVAIL_RING, &zeros);
        self.avail_idx = 0;
        self.used_seen = 0;
        self.start_ring(0);
        (base, used)
    }

    /// Stops the ring (GET_VRING_BASE); returns the base the device answered and how many
    /// chains it had returned by then.
    pub fn stop_ring(&mut self) -> (u16, u16) {
        let base = self.fe.get_vring_base(0).unwrap() as u16;
        (base, self.used_idx())
    }

    /// Starts the ring again at `base` over the rings as they are (what a frontend does
    /// after a pause), without kicking.
    pub fn start_ring(&mut self, base: u16) {
        let addr = self.mem as u64;
        self.fe.set_vring_num(0, QUEUE_SIZE).unwrap();
        self.fe
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: addr + DESC_TABLE,
                    used_ring_addr: addr + USED_RING,
                    avail_ring_addr: addr + AVAIL_RING,
                    log_addr: None,
                },
            )
            .unwrap();
        self.fe.set_vring_base(0, base).unwrap();
        self.fe.set_vring_call(0, &self.call).unwrap();
        self.fe.set_vring_kick(0, &self.kick).unwrap();
        self.fe.set_vring_enable(0, true).unwrap();
    }

    /// The used ring's index: how many chains the device has returned since the ring started.
    pub fn used_idx(&mut self) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        u16::from_le_bytes(self.get(USED_RING + 2, 2).try_into().unwrap())
    }

    /// Waits for the device to return any chain; returns its head and used length.
    pub fn wait_any_used(&mut self) -> (u16, u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.used_idx() != self.used_seen {
                let slot = u64::from(self.used_seen % QUEUE_SIZE);
                let e = self.get(USED_RING + 4 + slot * 8, 8);
                self.used_seen = self.used_seen.wrapping_add(1);
                let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
                let _ = self.call.read();
                return (id as u16, len);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "device returned no chain"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the device to return chain `head`; returns its used length.
    pub fn wait_used(&mut self, head: u16) -> u32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let used_idx = u16::from_le_bytes(self.get(USED_RING + 2, 2).try_into().unwrap());
            if used_idx != self.used_seen {
                let slot = u64::from(self.used_seen % QUEUE_SIZE);
                let e = self.get(USED_RING + 4 + slot * 8, 8);
                self.used_seen = self.used_seen.wrapping_add(1);
                let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
                assert_eq!(id, u32::from(head), "used entry for another chain");
                let _ = self.call.read();
                return len;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "device did not return chain {head}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for RawFrontend {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in connect(), once.
        unsafe { libc::munmap(self.mem.cast(), MEM_LEN) };
    }
}
