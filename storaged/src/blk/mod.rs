//! The vhost-user-blk data path. The files, in the order a request meets them:
//!
//! - [`export`]: the socket of one volume: accepts one frontend at a time (checked against
//!   the volume's owner), refuses others, accepts a new one after a disconnect.
//! - [`backend`]: the `vhost-user-backend` device of one frontend connection; its memory table
//!   is checked by [`memory_guard`].
//! - [`queue`]: the loop of one virtqueue on its epoll worker: a kick pops the available
//!   chains, each goes through the stages and the ring, completions are answered and the
//!   guest signalled once per batch; adaptive polling.
//! - [`request`]: parsing and validating a chain (pure, unit-tested).
//! - [`stage`]: the stages between parsing and the storage: [`stage::limit`] (the volume's
//!   IOPS and bandwidth buckets, [`crate::qos`]) and [`stage::transform`] (encryption).
//! - [`bounce`]: the queue's bounce buffers, pooled and bounded; [`inflight`]: what a request
//!   owns between submission and completion, by slot.
//! - [`ring`]: the operations a request becomes, and the io_uring behind a small trait.
//! - [`failure`]: a volume whose FLUSH failed stays failed, recorded, until an operator clears
//!   it.
//! - Beside the way: [`timer`] (the timerfd a waiting queue sleeps on), [`log_limit`] (the
//!   per-volume budget of log lines about a guest's requests), [`memory_guard`] (a frontend
//!   that shrinks its memory file under the daemon's mapping is refused or disconnected,
//!   never a SIGBUS that ends the daemon).

pub mod backend;
pub mod bounce;
pub mod export;
pub mod failure;
pub mod inflight;
pub mod log_limit;
pub mod memory_guard;
pub mod queue;
pub mod request;
pub mod ring;
pub mod stage;
pub mod timer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::backing::BackingStore;
use crate::config::IoConfig;
use crate::crypto::Xts;
use crate::metrics::VolumeMetrics;
use crate::qos::{self, QosSlot};
use crate::volume::{Backing, VolumeSpec};
use request::{Limits, ID_BYTES, SECTOR_SHIFT};

/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Most sectors in one discard or write-zeroes segment (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most sectors (32 MiB, the largest read or write) and segments (one) of a discard or
/// write-zeroes request to a device-backed volume: the device may write the zeros for real
/// (a punched hole on a block device is a zero-out), so the request is charged as that write,
/// and one request may cost no more than the largest write.
pub const DEVICE_MAX_ZEROING_SECTORS: u32 = (request::MAX_TRANSFER >> SECTOR_SHIFT) as u32;
pub const DEVICE_MAX_ZEROING_SEG: u32 = 1;

/// What the data path of one volume needs, shared by its queues and connections.
pub struct VolumeIo {
    pub name: String,
    pub serial: [u8; ID_BYTES],
    pub store: BackingStore,
    capacity: AtomicU64,
    /// Whether frontends may not write: a read-only volume's, a secondary's, or a primary's
    /// being fenced for a switchover. Read at each request and at each frontend's feature
    /// negotiation.
    read_only: AtomicBool,
    /// A backing file allocated in full: DISCARD and WRITE_ZEROES zero its ranges in place
    /// and never give blocks back to the file system, so its writes never meet a full one.
    pub preallocated: bool,
    pub num_queues: u16,
    pub max_queue_size: u16,
    pub seg_max: u32,
    /// Adaptive polling window of the queue workers (0: never poll).
    pub poll_window: Duration,
    /// The volume's IOPS and bandwidth buckets, shared by its queues.
    pub qos: QosSlot,
    /// XTS-AES-256 with the volume's key, for encrypted volumes.
    pub crypt: Option<Xts>,
    pub metrics: VolumeMetrics,
    /// Budget of the data path's log lines about this volume's requests.
    pub log_limit: log_limit::LogLimit,
    /// Set when a FLUSH failed; refuses FLUSH and writes until cleared.
    pub failure: failure::FailureState,
    /// The replication log while the volume is the primary of a relationship: the replicate
    /// stage appends what completes to it. Set by a promote, taken away by an unreplicate.
    pub replication: arc_swap::ArcSwapOption<crate::replication::log::ReplicationLog>,
}

impl VolumeIo {
    /// The data-path view of a catalog volume; `failure_record` is where its failure is
    /// recorded ([`failure::record_path`]).
    pub fn new(
        spec: &VolumeSpec,
        store: BackingStore,
        io: &IoConfig,
        limits: &qos::Limits,
        crypt: Option<Xts>,
        metrics: VolumeMetrics,
        failure_record: PathBuf,
    ) -> Self {
        let mut serial = [0u8; ID_BYTES];
        let n = spec.id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&spec.id.as_bytes()[..n]);
        metrics.size.set(spec.size_bytes as i64);
        let failure = failure::FailureState::load(failure_record, metrics.failed.clone());
        let volume = VolumeIo {
            name: spec.name.to_string(),
            serial,
            store,
            capacity: AtomicU64::new(spec.size_bytes),
            // A secondary's data comes from its primary, never from its frontend.
            read_only: AtomicBool::new(spec.read_only || spec.is_secondary()),
            preallocated: matches!(
                spec.backing,
                Backing::File {
                    preallocated: true,
                    ..
                }
            ),
            num_queues: spec.num_queues,
            max_queue_size: io.max_queue_size,
            seg_max: io.seg_max,
            poll_window: Duration::from_micros(u64::from(io.poll_us)),
            qos: QosSlot::default(),
            crypt,
            metrics,
            log_limit: log_limit::LogLimit::default(),
            failure,
            replication: arc_swap::ArcSwapOption::empty(),
        };
        volume.set_limits(limits);
        volume
    }

    /// Applies new IOPS and bandwidth limits; each queue picks them up at its next request.
    pub fn set_limits(&self, limits: &qos::Limits) {
        self.qos.set(limits);
        let gauge = |v: Option<u64>| i64::try_from(v.unwrap_or(0)).unwrap_or(i64::MAX);
        self.metrics.iops_limit.set(gauge(limits.iops));
        self.metrics
            .bandwidth_limit
            .set(gauge(limits.bandwidth_bytes_per_second));
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Publishes a new (larger) capacity to the data path and the config space.
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Release);
        self.metrics.size.set(bytes as i64);
    }

    /// Logical block size offered to the guest: what direct I/O on the backing store needs,
    /// and the encryption unit for encrypted volumes.
    pub fn block_size(&self) -> u32 {
        if self.crypt.is_some() {
            crate::crypto::UNIT as u32
        } else {
            self.store.align.max(512)
        }
    }

    /// Whether a discard or write-zeroes makes the backing storage write the zeros: a block
    /// device may (ZERO_RANGE falls back to writing zero pages where the device has no
    /// offload, and a punched hole is the device's own zero-out); a file system records
    /// unwritten extents or punches a hole instead.
    pub fn zeroes_are_writes(&self) -> bool {
        self.store.is_device
    }

    /// Largest discard or write-zeroes request: sectors per segment and segments.
    fn zeroing_max(&self) -> (u32, u32) {
        if self.zeroes_are_writes() {
            (DEVICE_MAX_ZEROING_SECTORS, DEVICE_MAX_ZEROING_SEG)
        } else {
            (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG)
        }
    }

    /// Largest data segment offered (VIRTIO_BLK_F_SIZE_MAX): with `seg_max` segments, a driver
    /// that keeps to both (Linux, libblkio) never sends more than the largest request taken
    /// ([`request::MAX_TRANSFER`]).
    pub fn size_max(&self) -> u32 {
        let per_segment = request::MAX_TRANSFER / u64::from(self.seg_max.max(1));
        (per_segment & !4095).max(4096) as u32
    }

    /// Whether frontends may not write now.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Lets frontends write (`false`) or not: the next request sees it. A frontend that
    /// connects sees it in the features offered.
    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::Release);
    }

    pub fn limits(&self) -> Limits {
        let (max_sectors, max_seg) = self.zeroing_max();
        Limits {
            capacity_sectors: self.capacity() >> SECTOR_SHIFT,
            read_only: self.read_only(),
            seg_max: self.seg_max,
            block_size: self.block_size(),
            max_discard_seg: max_seg,
            max_discard_sectors: max_sectors,
            max_write_zeroes_sectors: max_sectors,
            max_write_zeroes_seg: max_seg,
        }
    }

    /// The virtio-blk configuration space (`struct virtio_blk_config`, up to
    /// `write_zeroes_may_unmap`), little-endian.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put32 =
            |c: &mut Vec<u8>, at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&(self.capacity() >> SECTOR_SHIFT).to_le_bytes());
        put32(&mut c, 8, self.size_max());
        put32(&mut c, 12, self.seg_max);
        // geometry (16..20) unused.
        put32(&mut c, 20, self.block_size());
        // topology (24..32): physical_block_exp, alignment_offset, min_io_size, opt_io_size left 0.
        // writeback (32) 0, unused0 (33).
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        let (max_sectors, max_seg) = self.zeroing_max();
        put32(&mut c, 36, max_sectors);
        put32(&mut c, 40, max_seg);
        put32(&mut c, 44, self.block_size() >> SECTOR_SHIFT);
        put32(&mut c, 48, max_sectors);
        put32(&mut c, 52, max_seg);
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}
