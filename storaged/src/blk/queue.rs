//! The loop of one virtqueue: its requests go to the backing storage straight from and into
//! guest memory, through the queue's own io_uring.
//!
//! A kick pops every available chain, parses it ([`super::request`]), passes it through the
//! stages ([`super::stage`]) and queues its operations on the ring ([`super::ring`]), handing
//! them to the kernel two at a time ([`super::ring::SUBMIT_BATCH`]) and the remainder when the
//! burst ends. The ring
//! signals completions through an eventfd registered with the queue's epoll worker, which reaps
//! them, writes the status bytes, fills the used ring and signals the call eventfd once per
//! batch (respecting EVENT_IDX). A busy queue's worker then polls for a while before sleeping
//! ([`QueueEngine::poll`]).
//!
//! A volume with IOPS or bandwidth limits ([`crate::qos`]) draws each request's cost from its
//! buckets before submitting it. A request that must wait stays at the head of its queue: the
//! queue takes nothing more off the virtqueue, arms its timerfd for when the tokens will be
//! there, and goes back to its epoll loop. Other queues and volumes run on their own threads
//! and rings, so a throttled queue delays nobody else.
//!
//! Each in-flight request ([`super::inflight`]) owns what the kernel reads or writes: the iovec
//! array, a bounce buffer ([`super::bounce`]) if one is needed, and a reference to the guest
//! memory mapping, so none of them can go away before its completion is reaped, even if the
//! frontend replaces its memory table.

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bounce::{self, BouncePool};
use super::inflight::{
    advance_iovecs, user_data, InFlight, InFlightTable, ZEROES_OWN, ZEROES_PART, ZEROES_PUNCHED,
    ZEROES_REALLOCATED,
};
use super::request::{self, ChainDesc, Operation, Parsed, Request};
use super::ring::{self, Ring, RingOp, RingQueue, Uring};
use super::stage::limit::{Admit, Owed};
use super::stage::transform::{copy_to_guest, Transform};
use super::stage::Stages;
use super::timer::Timer;
use super::{failure, VolumeIo};
use crate::backing::{AlignedBuf, FALLOC_ALLOCATE, FALLOC_PUNCH};
use crate::crypto;
use crate::metrics::op_index;

/// Guest memory as vhost-user-backend maps it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Errors of the engine itself (not of requests, which are answered with a status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ring(#[from] ring::Error),
    #[error("Cannot create the completion eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot create the throttling timerfd")]
    Timer(#[source] std::io::Error),
}

/// Most iovecs one readv/writev takes (UIO_MAXIOV); more go through a bounce buffer.
const MAX_IOVECS: usize = 1024;

/// Shortest polling window worth spinning for; below it the worker does not poll.
const MIN_POLL_WINDOW: Duration = Duration::from_micros(4);

/// Longest a worker polls without returning to its epoll loop.
const MAX_POLL_SLICE: Duration = Duration::from_millis(2);

/// What became of a read's or write's buffers.
enum Built {
    /// Iovecs (or a bounce buffer) ready for submission.
    Ready,
    /// Guest memory not mapped, or no bounce buffer to be had: answered IOERR.
    Invalid,
    /// The queue's bounce budget is spent: the request waits for completions to free it.
    NoBudget,
}

/// A request waiting for its volume's limits, at the head of its queue.
struct Throttled {
    head: u16,
    req: Request,
    mem: Arc<GuestMem>,
    started: Instant,
    /// What it still has to draw from the buckets.
    owed: Owed,
}

/// The io_uring and in-flight table of one virtqueue.
pub struct QueueEngine<R: Ring = Uring> {
    ring: RingQueue<R>,
    eventfd: EventFd,
    slots: InFlightTable,
    volume: Arc<VolumeIo>,
    /// Used-ring entries added since the last signal.
    pending_signal: bool,
    /// The queue this engine serves, known from its first kick; used to answer in-flight
    /// requests when the frontend stops the queue.
    vring: Option<VringRwLock>,
    /// Bounce buffers, held by requests in flight or kept for reuse.
    bounce: BouncePool,
    /// Popping stopped at the in-flight limit with requests left in the ring; they are taken
    /// when completions make room (no new kick will come for them).
    capped: bool,
    /// Current polling window, adapted between 0 and the volume's `poll_window`.
    poll_window: Duration,
    /// When the worker last went back to sleep.
    slept_at: Option<Instant>,
    /// The limit and transform stages.
    stages: Stages,
    /// The request waiting for tokens; nothing more is taken off the queue meanwhile.
    throttled: Option<Throttled>,
    /// A plain volume's misaligned request (taken and paid) waiting for completions to free
    /// bounce-buffer budget; nothing more is taken off the queue meanwhile.
    parked: Option<InFlight>,
    /// Wakes the worker when the waiting request's tokens are there (or the limits change).
    timer: Arc<Timer>,
    /// Completed changes whose answers wait for the secondary (sync mode), in seq order:
    /// (seq, request, status, data bytes used).
    awaiting_peer: std::collections::VecDeque<(u64, InFlight, u8, u32)>,
    /// The replication log whose sync gate this queue's eventfd is registered with, and the
    /// key it is registered under (unique per engine).
    sync_registered: Option<Arc<crate::replication::log::ReplicationLog>>,
    sync_key: u64,
}

/// Keys of the engines' sync-gate registrations.
static SYNC_KEYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl QueueEngine<Uring> {
    /// The queue of `volume` on an io_uring of `entries`.
    pub fn new(volume: Arc<VolumeIo>, entries: u32) -> Result<Self, Error> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let ring = Uring::new(entries, volume.store.file.as_raw_fd(), &eventfd)?;
        Self::with_ring(volume, ring, eventfd)
    }
}

impl<R: Ring> QueueEngine<R> {
    /// The queue of `volume` on `ring`, whose completions are signalled on `eventfd`.
    pub fn with_ring(volume: Arc<VolumeIo>, ring: R, eventfd: EventFd) -> Result<Self, Error> {
        let max_window = volume.poll_window;
        let ring = RingQueue::new(ring);
        let timer = Arc::new(Timer::new().map_err(Error::Timer)?);
        volume.qos.add_waker(&timer);
        let stages = Stages::new(&volume.qos);
        Ok(QueueEngine {
            ring,
            eventfd,
            slots: InFlightTable::default(),
            volume,
            pending_signal: false,
            vring: None,
            bounce: BouncePool::default(),
            capped: false,
            poll_window: max_window,
            slept_at: None,
            stages,
            throttled: None,
            parked: None,
            timer,
            awaiting_peer: Default::default(),
            sync_registered: None,
            sync_key: SYNC_KEYS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The eventfd that becomes readable when completions are ready.
    pub fn completion_fd(&self) -> &EventFd {
        &self.eventfd
    }

    /// The timerfd that becomes readable when a throttled request may go.
    pub fn timer_fd(&self) -> &Timer {
        &self.timer
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// A request is waiting for the volume's limits.
    pub fn throttled(&self) -> bool {
        self.throttled.is_some()
    }

    /// A request waits at the head of the queue (for tokens or bounce-buffer budget), so
    /// nothing more is taken off it.
    fn blocked(&self) -> bool {
        self.throttled.is_some() || self.parked.is_some()
    }

    /// Handles a kick: takes every available chain off the queue, then submits the batch.
    /// Returns how many there were.
    pub fn process_queue(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
    ) -> usize {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let mut taken = 0;
        let mut empty_passes = 0;
        loop {
            if let Err(e) = vring.disable_notification() {
                crate::volume_log!(warn, &self.volume, "cannot disable notifications: {e}");
            }
            let n = self.pop_available(vring, mem);
            taken += n;
            if self.blocked() {
                // Leave the rest in the virtqueue, notifications off: the timer or the
                // completions that free bounce buffers come back.
                break;
            }
            empty_passes = if n == 0 { empty_passes + 1 } else { 0 };
            match vring.enable_notification() {
                // New requests arrived while notifications were off: take them. Twice nothing
                // although the ring says there is more means it cannot be taken now (a stopped
                // or disabled queue, a bad avail index, the in-flight limit): wait for the next
                // event instead of spinning.
                Ok(true) if empty_passes < 2 && !self.capped => continue,
                Ok(_) => break,
                Err(e) => {
                    crate::volume_log!(warn, &self.volume, "cannot enable notifications: {e}");
                    break;
                }
            }
        }
        self.submit_and_signal(vring);
        taken
    }

    /// Takes every available chain off the queue and starts it. Returns how many there were.
    ///
    /// The memory map is loaded after the avail index is read: a region the driver added
    /// (ADD_MEM_REG, acknowledged) before it published a request is then in the map that
    /// request is translated with, even if this worker was preempted in between.
    fn pop_available(&mut self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMem>) -> usize {
        self.capped = false;
        let mut taken = 0;
        if let Some(parked) = self.parked.take() {
            self.start_transfer(parked, vring);
            if self.parked.is_some() {
                return 0;
            }
            taken += 1;
        }
        loop {
            if self.blocked() {
                return taken;
            }
            let (published, queue_size) = {
                let state = vring.get_ref();
                if !state.is_enabled() || !state.get_queue().ready() {
                    // SET_VRING_ENABLE 0, or stopped by GET_VRING_BASE (a kick read from epoll
                    // before the stop): the device must not take requests from this ring.
                    return taken;
                }
                let queue = state.get_queue();
                let published = match queue.avail_idx(&*mem.memory(), Ordering::Acquire) {
                    Ok(idx) => (idx - Wrapping(queue.next_avail())).0,
                    Err(_) => 0,
                };
                (published, queue.size())
            };
            if published > queue_size {
                // More published than the ring holds: the index is garbage, and taking from it
                // would only give garbage (and a library log line per try). Nothing is taken
                // until the driver resets the queue.
                crate::volume_log!(
                    warn,
                    &self.volume,
                    published,
                    queue_size,
                    "avail index ahead of the device by more than the queue size: nothing taken"
                );
                return taken;
            }
            if published == 0 {
                return taken;
            }
            let snapshot = mem.memory().into_inner();
            for _ in 0..published {
                let bounce_full =
                    self.volume.crypt.is_some() && self.bounce.held() >= bounce::BUDGET;
                if self.in_flight() >= usize::from(self.volume.max_queue_size) || bounce_full {
                    // A well-behaved driver cannot have more requests outstanding than its
                    // queue has entries; an encrypted volume's bounce buffers are bounded too.
                    // Leave the rest until completions make room.
                    self.capped = true;
                    return taken;
                }
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(snapshot.clone());
                let Some(chain) = chain else { return taken };
                taken += 1;
                if chain.head_index() >= queue_size {
                    // No descriptor has that index, so there is nothing to return to the
                    // driver either: the entry is skipped.
                    crate::volume_log!(
                        debug,
                        &self.volume,
                        head = chain.head_index(),
                        queue_size,
                        "skipped an available entry: head index past the queue size"
                    );
                    self.volume.metrics.invalid_requests.inc();
                    continue;
                }
                self.start_request(chain, vring, &snapshot);
                if self.blocked() {
                    return taken;
                }
            }
        }
    }

    fn submit_and_signal(&mut self, vring: &VringRwLock) {
        self.ring.submit(&self.volume);
        self.signal(vring);
    }

    /// Adaptive polling: after work, keep checking the virtqueue and the completion ring
    /// without sleeping until `window` passes with nothing new. Each sleep and wake-up costs
    /// tens of microseconds, more in a VM; a client that answers completions with new requests
    /// within the window is served without either side being woken. Guest notifications are
    /// off while polling.
    pub fn poll(&mut self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMem>) {
        let window = self.poll_window;
        if window.is_zero() {
            return;
        }
        if let Err(e) = vring.disable_notification() {
            crate::volume_log!(warn, &self.volume, "cannot disable notifications: {e}");
        }
        let started = Instant::now();
        let mut last_work = started;
        let mut idle_spins = 0u32;
        loop {
            let mut did = 0;
            if self.ring.has_completions() {
                did += self.reap(Some(vring));
            }
            did += self.pop_available(vring, mem);
            if self.blocked() {
                // Nothing more will be taken until the timer fires or completions free bounce
                // buffers; either wakes the worker.
                if did > 0 {
                    self.submit_and_signal(vring);
                }
                break;
            }
            if did > 0 {
                self.submit_and_signal(vring);
                last_work = Instant::now();
                idle_spins = 0;
            } else {
                std::hint::spin_loop();
                idle_spins += 1;
                // The clock is read every few idle rounds only: it costs more than a round.
                if idle_spins.is_multiple_of(16) && last_work.elapsed() >= window {
                    break;
                }
            }
            // Back to the epoll loop now and then even under constant load, so its other
            // events (the exit event above all) are seen.
            if did > 0 && started.elapsed() >= MAX_POLL_SLICE {
                break;
            }
        }
        // Completions reaped while polling left the eventfd readable: clear it, then take
        // what arrived meanwhile, so the next wake-up is for new work.
        let _ = self.eventfd.read();
        if self.ring.has_completions() {
            self.reap(Some(vring));
        }
        // The read may have taken a sync gate's wake-up too.
        self.release_acked(vring);
        // Notifications back on, and anything that slipped in before that is taken.
        self.process_queue(vring, mem);
    }

    /// Parses one chain and either answers it at once or queues its I/O.
    fn start_request(
        &mut self,
        chain: DescriptorChain<Arc<GuestMem>>,
        vring: &VringRwLock,
        mem: &Arc<GuestMem>,
    ) {
        let head = chain.head_index();
        let descs = chain.map(|d| ChainDesc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        });
        let started = Instant::now();
        let req = match request::parse(mem.as_ref(), descs, &self.volume.limits()) {
            Parsed::Request(r) => r,
            Parsed::Reject {
                status,
                code,
                error,
            } => {
                crate::volume_log!(debug, &self.volume, "refused request: {error}");
                self.volume.metrics.invalid_requests.inc();
                let used = match mem.write_obj(code, status) {
                    Ok(()) => 1,
                    Err(_) => 0,
                };
                self.add_used(vring, head, used);
                return;
            }
            Parsed::Drop(error) => {
                crate::volume_log!(debug, &self.volume, "dropped chain: {error}");
                self.volume.metrics.invalid_requests.inc();
                self.add_used(vring, head, 0);
                return;
            }
        };
        let admit =
            self.stages
                .limit
                .admit(&self.volume.qos, &req.op, self.volume.zeroes_are_writes());
        if let Admit::Wait(wait, owed) = admit {
            self.volume.metrics.throttled.inc();
            let waiting = Throttled {
                head,
                req,
                mem: mem.clone(),
                started,
                owed,
            };
            self.wait_for_tokens(waiting, wait, vring);
            return;
        }
        self.submit_request(head, req, mem.clone(), started, vring);
    }

    /// Parks a request until its tokens are there. With requests queued behind it, the wake-up
    /// is put off a little so they can go in the same batch ([`Limiter::batch_wait`]).
    fn wait_for_tokens(&mut self, waiting: Throttled, wait: Duration, vring: &VringRwLock) {
        let behind = published_behind(vring, &waiting.mem);
        let extra = self.stages.limit.batch_wait(behind);
        if let Err(e) = self.timer.arm(wait + extra) {
            // Without a timer nothing would wake the queue: let the request go.
            crate::volume_log!(
                error,
                &self.volume,
                "cannot arm the throttling timer, not throttling: {e}"
            );
            self.release(waiting, vring);
            return;
        }
        self.throttled = Some(waiting);
    }

    /// Submits a request that waited (or stops waiting), recording how long it waited.
    fn release(&mut self, waiting: Throttled, vring: &VringRwLock) {
        self.stages.limit.forget();
        let waited = waiting.started.elapsed().as_secs_f64();
        self.volume.metrics.throttle_wait.observe(waited);
        self.volume.metrics.throttled_seconds.inc_by(waited);
        self.submit_request(
            waiting.head,
            waiting.req,
            waiting.mem,
            waiting.started,
            vring,
        );
    }

    /// Handles the throttling timer: lets the waiting request go if its tokens are there (or
    /// waits again), then takes what followed it. Returns how many requests were started.
    pub fn timer_fired(&mut self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMem>) -> usize {
        self.timer.clear();
        let Some(mut waiting) = self.throttled.take() else {
            return 0;
        };
        let zeroes_are_writes = self.volume.zeroes_are_writes();
        let paid = self.stages.limit.readmit(
            &self.volume.qos,
            &waiting.req.op,
            zeroes_are_writes,
            &mut waiting.owed,
        );
        if let Err(wait) = paid {
            self.wait_for_tokens(waiting, wait, vring);
            return 0;
        }
        self.release(waiting, vring);
        1 + self.process_queue(vring, mem)
    }

    /// Builds the in-flight entry and pushes its SQEs. Requests without I/O complete at once.
    fn submit_request(
        &mut self,
        head: u16,
        req: Request,
        mem: Arc<GuestMem>,
        started: Instant,
        vring: &VringRwLock,
    ) {
        let Request { op, data, status } = req;
        let inflight = InFlight {
            head,
            status,
            op,
            mem,
            iovecs: Vec::new(),
            data,
            bounce: None,
            decrypt_into: None,
            offset: 0,
            remaining: 0,
            parts: 1,
            failed: false,
            started,
        };
        let Some(mut inflight) = self.refuse_if_failed(inflight, vring) else {
            return;
        };
        match &inflight.op {
            Operation::Read { offset, len } | Operation::Write { offset, len } => {
                let (offset, len) = (*offset, *len);
                let encrypted = self.volume.crypt.is_some();
                let unit = crypto::UNIT as u64;
                if encrypted && (offset % unit != 0 || len % unit != 0) {
                    // The device offers 4096-byte blocks; a request that ignores them would
                    // need a read-modify-write of partial units: refused instead.
                    crate::volume_log!(
                        debug,
                        &self.volume,
                        offset,
                        len,
                        "refused request: not aligned to the 4096-byte encryption unit"
                    );
                    self.volume.metrics.invalid_requests.inc();
                    self.finish(vring, inflight, VIRTIO_BLK_S_IOERR as u8, 0);
                    return;
                }
                self.start_transfer(inflight, vring);
                return;
            }
            Operation::GetId { len } => {
                let n = (*len as usize).min(self.volume.serial.len());
                let ok = copy_to_guest(&inflight.mem, &inflight.data, &self.volume.serial[..n]);
                let (code, used) = if ok {
                    (VIRTIO_BLK_S_OK as u8, n as u32)
                } else {
                    (VIRTIO_BLK_S_IOERR as u8, 0)
                };
                self.finish(vring, inflight, code, used);
                return;
            }
            Operation::Discard(ranges) | Operation::WriteZeroes(ranges) => {
                inflight.parts = ranges.len() as u32;
            }
            Operation::Flush => {}
        }
        self.queue(inflight, vring);
    }

    /// Builds a read's or write's buffers (the transform stage encrypts a write into its
    /// bounce buffer) and queues it. A plain volume's misaligned request that finds the queue's
    /// bounce budget spent is parked until completions free it: back-pressure, not an error.
    fn start_transfer(&mut self, inflight: InFlight, vring: &VringRwLock) {
        // Checked again for a request that waited (parked) while the volume failed.
        let Some(mut inflight) = self.refuse_if_failed(inflight, vring) else {
            return;
        };
        let (offset, len, write) = match inflight.op {
            Operation::Read { offset, len } => (offset, len, false),
            Operation::Write { offset, len } => (offset, len, true),
            _ => return self.queue(inflight, vring),
        };
        let encrypt = self
            .volume
            .crypt
            .is_some()
            .then_some(offset / crypto::UNIT as u64);
        match self.build_iovecs(&mut inflight, write, encrypt) {
            Built::Ready => {}
            Built::NoBudget => {
                self.parked = Some(inflight);
                return;
            }
            Built::Invalid => {
                self.volume.metrics.invalid_requests.inc();
                self.finish(vring, inflight, VIRTIO_BLK_S_IOERR as u8, 0);
                return;
            }
        }
        inflight.offset = offset;
        inflight.remaining = len;
        self.queue(inflight, vring);
    }

    /// A failed volume takes nothing more that writes: such a request is answered IOERR
    /// without touching the storage (see [`failure`]). Gives the request back otherwise.
    fn refuse_if_failed(&mut self, inflight: InFlight, vring: &VringRwLock) -> Option<InFlight> {
        if failure::refused(&inflight.op) && self.volume.failure.is_failed() {
            self.volume.metrics.io_errors.inc();
            self.finish(vring, inflight, VIRTIO_BLK_S_IOERR as u8, 0);
            return None;
        }
        Some(inflight)
    }

    /// Puts a built request in the in-flight table and pushes its SQEs.
    fn queue(&mut self, inflight: InFlight, vring: &VringRwLock) {
        // Replicate stage: a primary's change is tracked on disk before it is made. Without
        // the tracking a crash could leave the secondary behind unknown: not submitted.
        if let Err(e) = self.stages.replicate(&self.volume).before_submit(&inflight) {
            crate::volume_log!(
                error,
                &self.volume,
                "{} answered IOERR: {}",
                inflight.op.label(),
                crate::error_chain(&e)
            );
            self.volume.metrics.io_errors.inc();
            // Its bounce buffer was charged when it was built: give the budget back.
            self.bounce
                .discharge(inflight.bounce.as_ref().map_or(0, AlignedBuf::len));
            self.finish(vring, inflight, VIRTIO_BLK_S_IOERR as u8, 0);
            return;
        }
        let slot = self.slots.insert(inflight);
        self.volume.metrics.inflight.inc();
        self.push_ops(slot);
        if self.ring.has_set_aside() {
            self.reap(Some(vring));
        }
        self.ring.submit_batch(&self.volume);
    }

    /// Translates the data ranges into iovecs, or sets up a bounce buffer where direct I/O
    /// cannot use guest memory as it is, or where the data is encrypted (`encrypt`: the first
    /// unit of the request). Encrypted writes are encrypted into the bounce buffer here.
    fn build_iovecs(
        &mut self,
        inflight: &mut InFlight,
        write: bool,
        encrypt: Option<u64>,
    ) -> Built {
        let bounce = encrypt.is_some();
        let align = self.volume.store.align as usize;
        let direct = self.volume.store.direct;
        let mut iovecs = Vec::with_capacity(inflight.data.len());
        let mut aligned = true;
        for r in &inflight.data {
            for slice in inflight.mem.get_slices(r.addr, r.len as usize) {
                let Ok(slice) = slice else {
                    crate::volume_log!(
                        debug,
                        &self.volume,
                        addr = r.addr.0,
                        len = r.len,
                        "refused request: data buffer is not in guest memory"
                    );
                    return Built::Invalid;
                };
                let ptr = slice.ptr_guard_mut().as_ptr();
                if direct && (!(ptr as usize).is_multiple_of(align) || slice.len() % align != 0) {
                    aligned = false;
                }
                iovecs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
            }
        }
        if aligned && iovecs.len() <= MAX_IOVECS && !bounce {
            inflight.iovecs = iovecs;
            return Built::Ready;
        }
        let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
        // Encrypted volumes bounce everything: their queue stops taking requests at the budget
        // instead (pop_available). A misaligned request of a plain volume waits for the
        // budget; with nothing in flight the whole budget is free, and it is larger than any
        // request.
        if !bounce && self.bounce.over_budget(len) && self.in_flight() > 0 {
            return Built::NoBudget;
        }
        let Some(mut buf) = self.bounce.take(len, align.max(4096)) else {
            crate::volume_log!(warn, &self.volume, len, "cannot allocate a bounce buffer");
            return Built::Invalid;
        };
        // A guest buffer that is one piece of host memory is encrypted from, or decrypted
        // into, directly: one pass over the data instead of two.
        let contiguous = match iovecs.as_slice() {
            [one] if one.iov_len == len => Some(one.iov_base.cast::<u8>()),
            _ => None,
        };
        let transform = self.stages.transform(&self.volume);
        if write {
            // Transform stage: an encrypted volume's write is encrypted into the bounce buffer.
            // SAFETY: `contiguous` is `len` bytes of mapped guest memory (from get_slices),
            // kept mapped by `inflight.mem`.
            let filled = unsafe {
                transform.fill(
                    inflight.mem.as_ref(),
                    &inflight.data,
                    contiguous.map(|p| p.cast_const()),
                    &mut buf.as_mut_slice()[..len],
                    encrypt.unwrap_or(0),
                )
            };
            if !filled {
                return Built::Invalid;
            }
        } else if transform.active() {
            inflight.decrypt_into = contiguous;
        }
        inflight.iovecs = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        }];
        self.bounce.charge(buf.len());
        inflight.bounce = Some(buf);
        Built::Ready
    }

    /// Pushes the operations of a slot's request (all its parts).
    fn push_ops(&mut self, slot: u32) {
        let Some(inflight) = self.slots.get(slot) else {
            return;
        };
        for (op, ud) in ring::request_ops(inflight, slot, self.volume.preallocated) {
            // SAFETY: every buffer and iovec array the operation points to is owned by the
            // InFlight in `slots`, which is freed only after its last completion is reaped.
            unsafe { self.ring.push(&op, ud, &self.volume) };
        }
    }

    /// Handles the completion eventfd: reaps every CQE and signals the guest once. Returns
    /// how many there were.
    pub fn process_completions(&mut self, vring: &VringRwLock) -> usize {
        let _ = self.eventfd.read();
        let reaped = self.reap(Some(vring));
        self.release_acked(vring);
        self.submit_and_signal(vring);
        reaped
    }

    fn reap(&mut self, vring: Option<&VringRwLock>) -> usize {
        let mut reaped = 0;
        loop {
            let cqes = self.ring.reap();
            if cqes.is_empty() {
                return reaped;
            }
            reaped += cqes.len();
            for (ud, res) in cqes {
                self.complete(vring, (ud & 0xffff_ffff) as u32, (ud >> 32) as u32, res);
            }
        }
    }

    /// Accounts one CQE; when a request's last part is done, answers it.
    fn complete(&mut self, vring: Option<&VringRwLock>, slot: u32, part: u32, res: i32) {
        let Some(inflight) = self.slots.get_mut(slot) else {
            crate::volume_log!(error, &self.volume, slot, "completion for an empty slot");
            return;
        };
        match &inflight.op {
            Operation::Read { .. } | Operation::Write { .. } => {
                if res > 0 && (res as u64) < inflight.remaining {
                    // Short transfer: resubmit the rest.
                    advance_iovecs(&mut inflight.iovecs, res as usize);
                    inflight.offset += res as u64;
                    inflight.remaining -= res as u64;
                    self.push_ops(slot);
                    return;
                }
                if res <= 0 {
                    crate::volume_log!(
                        warn,
                        &self.volume,
                        offset = inflight.offset,
                        "{} failed: {}",
                        inflight.op.label(),
                        if res < 0 {
                            std::io::Error::from_raw_os_error(-res).to_string()
                        } else {
                            "end of file".into()
                        }
                    );
                    inflight.failed = true;
                }
            }
            Operation::WriteZeroes(ranges) => {
                let (step, part) = (part & !ZEROES_PART, part & ZEROES_PART);
                let r = ranges[part as usize];
                let preallocated = self.volume.preallocated;
                // The request's own SQE zeroed the range, unless it punched a sparse one.
                let zeroed = preallocated || !r.unmap;
                let next = match step {
                    // No ZERO_RANGE here: a punched hole also reads zeros...
                    ZEROES_OWN if res == -libc::EOPNOTSUPP && zeroed => {
                        Some((FALLOC_PUNCH, ZEROES_PUNCHED))
                    }
                    // ...and a preallocated file takes the blocks back at once.
                    ZEROES_PUNCHED if res == 0 && preallocated => {
                        Some((FALLOC_ALLOCATE, ZEROES_REALLOCATED))
                    }
                    _ => None,
                };
                if let Some((mode, step)) = next {
                    let op = RingOp::fallocate(&r, mode);
                    // SAFETY: a fallocate points to no memory.
                    unsafe {
                        self.ring
                            .push(&op, user_data(slot, part | step), &self.volume)
                    };
                    return;
                }
                if res < 0 {
                    crate::volume_log!(
                        warn,
                        &self.volume,
                        offset = r.offset,
                        "write_zeroes failed: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    inflight.failed = true;
                }
            }
            Operation::Discard(_) if res == -libc::EOPNOTSUPP => {
                // Discard is a hint: storage that cannot deallocate (nor, for a preallocated
                // file, zero in place) keeps the data.
            }
            _ => {
                if res < 0 {
                    let err = std::io::Error::from_raw_os_error(-res);
                    crate::volume_log!(warn, &self.volume, "{} failed: {err}", inflight.op.label());
                    if inflight.op == Operation::Flush && res != ring::NOT_SUBMITTED {
                        // The kernel reports a lost write-back once: the volume stays failed.
                        let reason = format!("fdatasync failed: {err}");
                        self.volume.failure.fail(&self.volume.name, reason);
                    }
                    inflight.failed = true;
                }
            }
        }
        inflight.parts -= 1;
        if inflight.parts > 0 {
            return;
        }
        let Some(mut inflight) = self.slots.remove(slot) else {
            return;
        };
        self.bounce
            .discharge(inflight.bounce.as_ref().map_or(0, AlignedBuf::len));
        self.volume.metrics.inflight.dec();
        let mut used = 0;
        let mut code = VIRTIO_BLK_S_OK as u8;
        if inflight.failed || (self.volume.failure.is_failed() && failure::refused(&inflight.op)) {
            code = VIRTIO_BLK_S_IOERR as u8;
            self.volume.metrics.io_errors.inc();
        } else if let Operation::Read { offset, len } = inflight.op {
            used = len as u32;
            let first = offset / crypto::UNIT as u64;
            let len = len as usize;
            if let Some(bounce) = inflight.bounce.as_mut() {
                // Transform stage of read data: decrypted (or copied) into guest memory.
                let transform = Transform::of(&self.volume);
                // SAFETY: `decrypt_into` is `len` bytes of guest memory mapped while
                // `inflight.mem` lives (checked contiguous when the request was built).
                let emptied = unsafe {
                    transform.empty(
                        inflight.mem.as_ref(),
                        &inflight.data,
                        inflight.decrypt_into,
                        &mut bounce.as_mut_slice()[..len],
                        first,
                    )
                };
                if !emptied {
                    code = VIRTIO_BLK_S_IOERR as u8;
                    used = 0;
                }
            }
        }
        // Replicate stage: what reached the storage is shipped, answered or not; what may
        // have reached it in part is left to a resync.
        // In sync mode a change's answer waits for the secondary's commit.
        let replicate = self.stages.replicate(&self.volume);
        let mut held = None;
        if code == VIRTIO_BLK_S_OK as u8 {
            held = replicate.completed(&inflight).filter(|&seq| {
                replicate.holds(seq, &self.eventfd, self.sync_key, &mut self.sync_registered)
            });
        } else {
            replicate.failed(&inflight);
        }
        match (vring, held) {
            (Some(_), Some(seq)) => self.awaiting_peer.push_back((seq, inflight, code, used)),
            (Some(vring), None) => self.finish(vring, inflight, code, used),
            (None, _) => drop(inflight),
        }
    }

    /// Answers the requests held for the secondary (sync mode) that may go now: their seq is
    /// committed there, or the relationship runs async (or is gone).
    fn release_acked(&mut self, vring: &VringRwLock) {
        if self.awaiting_peer.is_empty() {
            return;
        }
        let replicate = self.stages.replicate(&self.volume);
        while let Some(&(seq, ..)) = self.awaiting_peer.front() {
            if replicate.holds(seq, &self.eventfd, self.sync_key, &mut self.sync_registered) {
                break;
            }
            if let Some((_, inflight, code, used)) = self.awaiting_peer.pop_front() {
                self.finish(vring, inflight, code, used);
            }
        }
    }

    /// Writes the status, returns the chain to the guest and records metrics.
    fn finish(&mut self, vring: &VringRwLock, mut inflight: InFlight, code: u8, data_used: u32) {
        if let Some(buf) = inflight.bounce.take() {
            self.bounce.recycle(buf);
        }
        let used = match inflight.mem.write_obj(code, inflight.status) {
            Ok(()) => data_used + 1,
            Err(_) => 0,
        };
        if code == VIRTIO_BLK_S_OK as u8 {
            let i = op_index(&inflight.op);
            let m = &self.volume.metrics;
            m.requests[i].inc();
            let bytes = match &inflight.op {
                Operation::Read { len, .. } | Operation::Write { len, .. } => *len,
                Operation::Discard(r) | Operation::WriteZeroes(r) => r.iter().map(|r| r.len).sum(),
                Operation::Flush | Operation::GetId { .. } => 0,
            };
            m.bytes[i].inc_by(bytes);
            m.latency[i].observe(inflight.started.elapsed().as_secs_f64());
        }
        self.add_used(vring, inflight.head, used);
    }

    fn add_used(&mut self, vring: &VringRwLock, head: u16, len: u32) {
        if let Err(e) = vring.add_used(head, len) {
            crate::volume_log!(error, &self.volume, "cannot add to the used ring: {e}");
        }
        self.pending_signal = true;
    }

    fn signal(&mut self, vring: &VringRwLock) {
        if !self.pending_signal {
            return;
        }
        self.pending_signal = false;
        match vring.needs_notification() {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = vring.signal_used_queue() {
                    crate::volume_log!(debug, &self.volume, "cannot signal the guest: {e}");
                }
            }
        }
    }

    /// Waits for every in-flight request, answering them through `vring` if given (the queue
    /// is being stopped) or discarding the answers (the frontend is gone).
    pub fn drain(&mut self, vring: Option<&VringRwLock>) {
        if let Some(waiting) = self.throttled.take() {
            let _ = self.timer.disarm();
            self.stages.limit.forget();
            // The request has not paid, so it is not run: letting it go would let a driver
            // that resets its device in a loop escape the limit. It was the last chain taken
            // (nothing is taken while one waits), so the ring is wound back over it: the base
            // the frontend reads next says it was never taken, and a ring restarted from that
            // base offers it again (vhost-user-backend processes a ring when it is enabled), to
            // pay then. With the frontend gone, it is dropped.
            if let Some(vring) = vring {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
            }
            drop(waiting);
        }
        loop {
            self.wait_in_flight(vring);
            // A request parked for bounce budget was taken: it goes now (nothing is in flight,
            // so the budget is free), or is dropped with the frontend.
            match (self.parked.take(), vring) {
                (Some(parked), Some(vring)) if self.in_flight() == 0 => {
                    self.start_transfer(parked, vring);
                    self.ring.submit(&self.volume);
                }
                _ => break,
            }
        }
        // Answers held for the secondary (the queue stops): the change is on this side only,
        // so it is not acknowledged: IOERR, as sync mode promises (or dropped with the
        // frontend).
        if let Some(vring) = vring {
            self.release_acked(vring);
        }
        while let Some((_, inflight, _, _)) = self.awaiting_peer.pop_front() {
            match vring {
                Some(vring) => {
                    self.volume.metrics.io_errors.inc();
                    self.finish(vring, inflight, VIRTIO_BLK_S_IOERR as u8, 0);
                }
                None => drop(inflight),
            }
        }
        if let Some(vring) = vring {
            // A request that waited (for tokens or bounce budget) left guest notifications
            // off: a ring restarted from here must be kicked.
            if let Err(e) = vring.enable_notification() {
                crate::volume_log!(warn, &self.volume, "cannot enable notifications: {e}");
            }
            self.signal(vring);
        }
    }

    /// Waits until nothing is in flight, answering through `vring` if given.
    fn wait_in_flight(&mut self, vring: Option<&VringRwLock>) {
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.wait_one() {
                // The kernel may still use the buffers of what is in flight: leak them rather
                // than free memory it could write into.
                crate::volume_log!(
                    error,
                    &self.volume,
                    in_flight = self.in_flight(),
                    "io_uring wait failed, leaking in-flight buffers: {e}"
                );
                self.slots.leak_all();
                return;
            }
            self.reap(vring);
        }
    }

    /// Called when the worker wakes for an event: adapts the polling window to how long it
    /// slept. A sleep shorter than the longest window would have been avoided by polling
    /// longer, so the window grows; a longer one would not, so it shrinks, down to not polling
    /// at all (a queue whose events are far apart, like large sequential reads, then costs no
    /// spinning). The same rule as QEMU's adaptive polling.
    pub fn woke(&mut self) {
        let max = self.volume.poll_window;
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        if slept_at.elapsed() <= max {
            self.poll_window = (self.poll_window * 2).clamp(MIN_POLL_WINDOW, max);
        } else {
            self.poll_window /= 2;
            if self.poll_window < MIN_POLL_WINDOW {
                self.poll_window = Duration::ZERO;
            }
        }
    }

    /// Called when the worker goes back to its epoll wait.
    pub fn sleeping(&mut self) {
        self.slept_at = Some(Instant::now());
    }

    /// Takes the requests left in the ring at the in-flight limit, or the one parked for bounce
    /// budget, once completions made room.
    pub fn resume_capped(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMem>,
    ) -> usize {
        if self.capped || self.parked.is_some() {
            self.process_queue(vring, mem)
        } else {
            0
        }
    }

    /// Answers every in-flight request through the used ring (the frontend stops the queue).
    pub fn drain_to_guest(&mut self) {
        let vring = self.vring.take();
        self.drain(vring.as_ref());
    }
}

impl<R: Ring> Drop for QueueEngine<R> {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by in-flight entries.
        self.drain(None);
        if let Some(log) = self.sync_registered.take() {
            log.sync().unregister(self.sync_key);
        }
    }
}

/// Requests the driver published that the queue has not taken yet.
fn published_behind(vring: &VringRwLock, mem: &GuestMem) -> u64 {
    let state = vring.get_ref();
    let queue = state.get_queue();
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => u64::from((idx - Wrapping(queue.next_avail())).0),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    //! The queue against a fake ring that does what disks do: short transfers, errors, a full
    //! submission queue, no ZERO_RANGE, syncs that take their time.
    #![allow(clippy::unwrap_used)]

    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::backing::BackingStore;
    use crate::config::IoConfig;
    use crate::metrics::Metrics;
    use crate::qos::{Limits, Overrides, QosConfig};
    use crate::replication::log::ReplicationLog;
    use crate::volume::{Backing, Tier, VolumeSpec};

    const QUEUE: u16 = 16;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const HDR: u64 = 0x4000;
    const STATUS: u64 = 0x4100;
    const DATA: u64 = 0x10000;
    const DISK: usize = 1 << 20;

    /// What the fake disk does with the next operation of a kind.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Answer {
        /// Transfer at most this many bytes.
        Short(usize),
        /// Fail with this errno.
        Fail(i32),
        /// Complete only when the test releases it.
        Hold,
    }

    /// The fake ring's state, shared with the test.
    #[derive(Default)]
    struct Disk {
        data: Vec<u8>,
        /// Operations queued, not yet submitted.
        queued: Vec<(RingOp, u64)>,
        /// Room in the submission queue.
        room: usize,
        /// Pushes to refuse before taking one (a full submission queue).
        refuse: usize,
        /// Every operation submitted, in order.
        submitted: Vec<RingOp>,
        /// Answers for the next operations, in order (else they succeed in full).
        answers: VecDeque<Answer>,
        held: Vec<(u64, i32)>,
        done: Vec<(u64, i32)>,
    }

    impl Disk {
        fn run(&mut self, op: &RingOp, ud: u64) {
            let answer = self.answers.pop_front();
            if answer == Some(Answer::Hold) {
                let res = self.execute(op, usize::MAX);
                self.held.push((ud, res));
                return;
            }
            let res = match answer {
                Some(Answer::Fail(errno)) => -errno,
                Some(Answer::Short(n)) => self.execute(op, n),
                _ => self.execute(op, usize::MAX),
            };
            self.done.push((ud, res));
        }

        /// Carries out a transfer of at most `limit` bytes, or a fallocate.
        fn execute(&mut self, op: &RingOp, limit: usize) -> i32 {
            match *op {
                RingOp::Readv {
                    iovecs,
                    count,
                    offset,
                }
                | RingOp::Writev {
                    iovecs,
                    count,
                    offset,
                } => {
                    let write = matches!(op, RingOp::Writev { .. });
                    // SAFETY: the queue keeps the iovec array and what it points to alive until
                    // the completion is reaped (the Ring contract).
                    let iovecs = unsafe { std::slice::from_raw_parts(iovecs, count as usize) };
                    let mut at = offset as usize;
                    let mut left = limit;
                    for v in iovecs {
                        let n = v.iov_len.min(left).min(DISK - at);
                        // SAFETY: as above; the iovec is `iov_len` bytes of live memory.
                        let buf = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast(), n) };
                        if write {
                            self.data[at..at + n].copy_from_slice(buf);
                        } else {
                            buf.copy_from_slice(&self.data[at..at + n]);
                        }
                        at += n;
                        left -= n;
                    }
                    (at - offset as usize) as i32
                }
                RingOp::Fdatasync => 0,
                RingOp::Fallocate { offset, len, .. } => {
                    self.data[offset as usize..(offset + len) as usize].fill(0);
                    0
                }
            }
        }
    }

    struct FakeRing(Rc<RefCell<Disk>>);

    impl Ring for FakeRing {
        unsafe fn push(&mut self, op: &RingOp, user_data: u64) -> bool {
            let mut d = self.0.borrow_mut();
            if d.refuse > 0 {
                d.refuse -= 1;
                return false;
            }
            if d.queued.len() >= d.room {
                return false;
            }
            d.queued.push((*op, user_data));
            true
        }
        fn queued(&mut self) -> usize {
            self.0.borrow_mut().queued.len()
        }
        fn submit(&mut self) -> std::io::Result<usize> {
            let mut d = self.0.borrow_mut();
            let ops = std::mem::take(&mut d.queued);
            for (op, ud) in &ops {
                d.submitted.push(*op);
                d.run(op, *ud);
            }
            Ok(ops.len())
        }
        fn submit_and_wait(&mut self, _want: usize) -> std::io::Result<usize> {
            self.submit()
        }
        fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
            out.append(&mut self.0.borrow_mut().done);
        }
        fn has_completions(&mut self) -> bool {
            !self.0.borrow_mut().done.is_empty()
        }
    }

    /// A queue on the fake ring, its guest memory and virtqueue.
    struct Harness {
        engine: QueueEngine<FakeRing>,
        disk: Rc<RefCell<Disk>>,
        volume: Arc<VolumeIo>,
        mem: GuestMemoryAtomic<GuestMem>,
        vring: VringRwLock,
        avail: u16,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_crypt(None)
        }

        /// A harness whose volume is encrypted with a fixed test key.
        fn encrypted() -> Self {
            let dek = crate::crypto::Dek::from_bytes(&[7u8; crate::crypto::DEK_LEN]).unwrap();
            Self::with_crypt(Some(crate::crypto::Xts::new(&dek)))
        }

        /// Makes the volume a primary: its replication log, over the dirty map at `map`
        /// (a file of the harness's directory if `None`).
        fn primary(&self, map: Option<&std::path::Path>) -> Arc<ReplicationLog> {
            let path = map.map_or_else(|| self._dir.path().join("v.dirty"), ToOwned::to_owned);
            let map = crate::replication::dirty::DirtyMap::open(&path).unwrap();
            let log = Arc::new(ReplicationLog::new(1 << 20, map));
            self.volume.replication.store(Some(log.clone()));
            log
        }

        /// A harness whose volume is encrypted with `crypt`, if given.
        fn with_crypt(crypt: Option<crate::crypto::Xts>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.img");
            crate::backing::create_file(&path, DISK as u64, false).unwrap();
            let store = BackingStore::open(&path, DISK as u64, false, false).unwrap();
            let spec = VolumeSpec {
                name: "fake".parse().unwrap(),
                id: "00000000-0000-0000-0000-000000000000".into(),
                size_bytes: DISK as u64,
                tier: Tier::Mass,
                read_only: false,
                num_queues: 1,
                backing: Backing::File {
                    path,
                    preallocated: false,
                },
                created_at: 0,
                iops_limit: None,
                bandwidth_limit: None,
                encryption: None,
                owner: None,
                replication: None,
            };
            let limits = Limits::compute(
                &QosConfig::default(),
                Tier::Mass,
                DISK as u64,
                Overrides::default(),
            );
            let io = IoConfig {
                poll_us: 0,
                ..IoConfig::default()
            };
            let volume = Arc::new(VolumeIo::new(
                &spec,
                store,
                &io,
                &limits,
                crypt,
                Metrics::new().unwrap().volume("fake"),
                dir.path().join("failed.json"),
            ));
            let disk = Rc::new(RefCell::new(Disk {
                data: vec![0; DISK],
                room: 64,
                ..Disk::default()
            }));
            let engine = QueueEngine::with_ring(
                volume.clone(),
                FakeRing(disk.clone()),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            )
            .unwrap();
            let mem = GuestMemoryAtomic::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            );
            let vring = VringRwLock::new(mem.clone(), QUEUE).unwrap();
            vring.set_queue_size(QUEUE);
            vring.set_queue_info(DESC, AVAIL, USED).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            Harness {
                engine,
                disk,
                volume,
                mem,
                vring,
                avail: 0,
                _dir: dir,
            }
        }

        fn put<T: vm_memory::ByteValued>(&self, at: u64, v: T) {
            self.mem.memory().write_obj(v, GuestAddress(at)).unwrap();
        }

        /// Publishes a request of `req_type` at `sector` with `data` bytes (device-writable
        /// for reads) and kicks; returns its head.
        fn request(&mut self, req_type: u32, sector: u64, data: u32, to_device: bool) -> u16 {
            let head = (self.avail * 3) % QUEUE;
            let hdr = HDR + u64::from(head) * 16;
            let status = STATUS + u64::from(head);
            self.put(hdr, req_type);
            self.put(hdr + 8, sector);
            self.put(status, 0xffu8);
            let mut descs = vec![(hdr, 16u32, false)];
            if data > 0 {
                descs.push((DATA, data, !to_device));
            }
            descs.push((status, 1, true));
            let n = descs.len() as u16;
            for (i, (addr, len, writable)) in descs.into_iter().enumerate() {
                let idx = head + i as u16;
                let d = DESC + u64::from(idx) * 16;
                let mut flags = if writable { 2u16 } else { 0 };
                if i + 1 < n as usize {
                    flags |= 1;
                }
                self.put(d, addr);
                self.put(d + 8, len);
                self.put(d + 12, flags);
                self.put(d + 14, idx + 1);
            }
            self.put(AVAIL + 4 + u64::from(self.avail % QUEUE) * 2, head);
            self.avail = self.avail.wrapping_add(1);
            self.put(AVAIL + 2, self.avail);
            self.engine.process_queue(&self.vring, &self.mem);
            head
        }

        /// Processes the completions the fake ring has.
        fn complete(&mut self) {
            self.engine.process_completions(&self.vring);
        }

        fn status(&self, head: u16) -> u8 {
            self.mem
                .memory()
                .read_obj(GuestAddress(STATUS + u64::from(head)))
                .unwrap()
        }

        fn used(&self) -> u16 {
            self.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn ops(&self) -> Vec<RingOp> {
            self.disk.borrow().submitted.clone()
        }
    }

    const T_IN: u32 = 0;
    const T_OUT: u32 = 1;
    const T_FLUSH: u32 = 4;
    const T_WRITE_ZEROES: u32 = 13;

    #[test]
    fn a_short_transfer_is_resubmitted_for_its_remainder() {
        let mut h = Harness::new();
        h.disk.borrow_mut().data[8192..8192 + 8192].fill(0x5a);
        h.disk.borrow_mut().answers.push_back(Answer::Short(3000));
        let head = h.request(T_IN, 16, 8192, false);
        h.complete();
        h.complete();
        assert_eq!(h.status(head), 0);
        let ops = h.ops();
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(ops[1], RingOp::Readv { offset, .. } if offset == 8192 + 3000));
        let mut got = vec![0u8; 8192];
        h.mem
            .memory()
            .read_slice(&mut got, GuestAddress(DATA))
            .unwrap();
        assert!(got.iter().all(|b| *b == 0x5a));
    }

    #[test]
    fn an_io_error_is_answered_ioerr_and_counted() {
        let mut h = Harness::new();
        h.disk
            .borrow_mut()
            .answers
            .push_back(Answer::Fail(libc::EIO));
        let head = h.request(T_OUT, 0, 4096, true);
        h.complete();
        assert_eq!(h.status(head), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(h.volume.metrics.io_errors.get(), 1);
        // A read after it is served: one failed request does not fail the volume.
        let head = h.request(T_IN, 0, 4096, false);
        h.complete();
        assert_eq!(h.status(head), 0);
    }

    #[test]
    fn a_full_submission_queue_is_emptied_and_the_push_retried() {
        let mut h = Harness::new();
        h.disk.borrow_mut().refuse = 3;
        let head = h.request(T_OUT, 0, 4096, true);
        h.complete();
        assert_eq!(h.status(head), 0);
        assert_eq!(h.ops().len(), 1);
        assert_eq!(h.disk.borrow_mut().refuse, 0);
    }

    #[test]
    fn write_zeroes_without_zero_range_falls_back_to_a_punched_hole() {
        let mut h = Harness::new();
        h.disk.borrow_mut().data[..4096].fill(0x77);
        h.disk
            .borrow_mut()
            .answers
            .push_back(Answer::Fail(libc::EOPNOTSUPP));
        // One segment: sector 0, 8 sectors, no UNMAP.
        let seg = DATA;
        h.put(seg, 0u64);
        h.put(seg + 8, 8u32);
        h.put(seg + 12, 0u32);
        let head = h.request(T_WRITE_ZEROES, 0, 16, true);
        h.complete();
        h.complete();
        assert_eq!(h.status(head), 0);
        let modes: Vec<i32> = h
            .ops()
            .iter()
            .filter_map(|op| match op {
                RingOp::Fallocate { mode, .. } => Some(*mode),
                _ => None,
            })
            .collect();
        assert_eq!(modes, [crate::backing::FALLOC_ZERO, FALLOC_PUNCH]);
        assert!(h.disk.borrow_mut().data[..4096].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_primarys_writes_are_recorded_as_they_complete_with_their_data_and_flushes_end_epochs() {
        use crate::replication::log::Record;
        let mut h = Harness::new();
        let log = h.primary(None);
        h.mem
            .memory()
            .write_slice(&[0xc3; 4096], GuestAddress(DATA))
            .unwrap();
        // A write that fails may have reached part of the disk, unrecorded: a gap in the
        // stream, left to a resync of its region.
        h.disk
            .borrow_mut()
            .answers
            .push_back(Answer::Fail(libc::EIO));
        let failed = h.request(T_OUT, 0, 4096, true);
        h.complete();
        assert_eq!(h.status(failed), VIRTIO_BLK_S_IOERR as u8);
        assert!(log.overflowed());
        assert_eq!(
            log.start_resync().0,
            vec![(0, crate::replication::log::REGION)]
        );
        let write = h.request(T_OUT, 8, 4096, true);
        h.complete();
        assert_eq!(h.status(write), 0);
        // A read changes nothing; a flush ends the epoch.
        h.request(T_IN, 8, 4096, false);
        h.complete();
        let flush = h.request(T_FLUSH, 0, 0, true);
        h.complete();
        assert_eq!(h.status(flush), 0);
        let records = log.drain();
        assert_eq!(records.len(), 2, "{records:?}");
        assert!(
            matches!(&records[0], Record::Write { seq: 1, offset: 4096, data } if data.len() == 4096 && data.iter().all(|b| *b == 0xc3)),
            "{records:?}"
        );
        assert!(
            matches!(records[1], Record::Cut { seq: 1, .. }),
            "{records:?}"
        );
        assert!(!log.overflowed());
        assert_eq!(
            log.start_resync().0,
            vec![(0, crate::replication::log::REGION)]
        );
    }

    #[test]
    fn a_write_whose_region_cannot_be_tracked_is_refused_unsubmitted_and_gives_its_bounce_budget_back(
    ) {
        let mut h = Harness::encrypted();
        // A dirty map whose every write fails (ENOSPC).
        let log = h.primary(Some(std::path::Path::new("/dev/full")));
        for _ in 0..3 {
            let write = h.request(T_OUT, 8, 4096, true);
            assert_eq!(h.status(write), VIRTIO_BLK_S_IOERR as u8);
        }
        assert!(
            h.ops().is_empty(),
            "nothing reached the disk: {:?}",
            h.ops()
        );
        assert_eq!(
            h.engine.bounce.held(),
            0,
            "the bounce budget is whole again"
        );
        assert!(log.drain().is_empty());
        // Reads go on.
        let read = h.request(T_IN, 8, 4096, false);
        h.complete();
        assert_eq!(h.status(read), 0);
    }

    #[test]
    fn an_encrypted_primarys_writes_are_recorded_as_the_ciphertext_the_disk_holds() {
        use crate::replication::log::Record;
        let mut h = Harness::encrypted();
        let log = h.primary(None);
        h.mem
            .memory()
            .write_slice(&[0x11; 4096], GuestAddress(DATA))
            .unwrap();
        let write = h.request(T_OUT, 8, 4096, true);
        h.complete();
        assert_eq!(h.status(write), 0);
        let on_disk = h.disk.borrow().data[4096..8192].to_vec();
        assert_ne!(on_disk, vec![0x11; 4096], "the disk holds ciphertext");
        match &log.drain()[..] {
            [Record::Write {
                offset: 4096, data, ..
            }] => assert_eq!(*data, on_disk),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_flush_is_answered_only_when_its_sync_has_completed_after_the_writes_before_it() {
        let mut h = Harness::new();
        let write = h.request(T_OUT, 0, 4096, true);
        h.complete();
        assert_eq!((h.status(write), h.used()), (0, 1));
        h.disk.borrow_mut().answers.push_back(Answer::Hold);
        let flush = h.request(T_FLUSH, 0, 0, true);
        h.complete();
        // The sync is with the disk: nothing is answered yet.
        assert_eq!((h.status(flush), h.used()), (0xff, 1));
        assert_eq!(h.ops().last(), Some(&RingOp::Fdatasync));
        {
            let mut d = h.disk.borrow_mut();
            let held = std::mem::take(&mut d.held);
            d.done.extend(held);
        }
        h.complete();
        assert_eq!((h.status(flush), h.used()), (0, 2));
    }
}
