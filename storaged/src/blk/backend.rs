//! The vhost-user-blk device of one frontend connection, on `vhost-user-backend`'s epoll
//! worker threads: one thread and one io_uring per virtqueue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::memory_guard::{self, MemoryGuard};
use super::queue::{self, GuestMem, QueueEngine};
use super::VolumeIo;

/// A queue worker polls after an event that handled, or left in flight, at least this many
/// requests; a queue serving one request at a time sleeps between them.
const POLL_MIN_BUSY: usize = 2;

/// Virtio features offered for a volume.
pub fn virtio_features(read_only: bool, num_queues: u16) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if num_queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// The device one frontend connection talks to.
pub struct BlkBackend {
    volume: Arc<VolumeIo>,
    mem: GuestMemoryAtomic<GuestMem>,
    engines: Vec<Mutex<QueueEngine>>,
    /// The frontend's request channel, if it set one up (protocol feature BACKEND_REQ).
    frontend_channel: Mutex<Option<Backend>>,
    /// A configuration change notification is on its way.
    notifying: Arc<AtomicBool>,
    /// The frontend's memory regions, as the SIGBUS handler knows them.
    guard: Mutex<MemoryGuard>,
    /// [`memory_guard::faults`] when last checked.
    faults_seen: AtomicU64,
    /// Ends the connection (set once the frontend is accepted).
    connection: Mutex<Option<ShutdownHandle>>,
}

impl BlkBackend {
    pub fn new(
        volume: Arc<VolumeIo>,
        mem: GuestMemoryAtomic<GuestMem>,
    ) -> Result<Self, queue::Error> {
        let entries = u32::from(volume.max_queue_size);
        let engines = (0..volume.num_queues)
            .map(|_| QueueEngine::new(volume.clone(), entries).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(BlkBackend {
            volume,
            mem,
            engines,
            frontend_channel: Mutex::new(None),
            notifying: Arc::new(AtomicBool::new(false)),
            guard: Mutex::new(MemoryGuard::default()),
            faults_seen: AtomicU64::new(memory_guard::faults()),
            connection: Mutex::new(None),
        })
    }

    /// The handle that ends this device's connection.
    pub fn set_connection(&self, handle: Option<ShutdownHandle>) {
        *crate::lock(&self.connection) = handle;
    }

    /// After a SIGBUS the guard contained somewhere in the daemon: if this frontend's memory
    /// file shrank under its mapping, logs it and ends the connection. The fault is taken as
    /// seen only once that is done (or there was nothing to do), so a fault found before the
    /// connection could be ended is acted on at a later event.
    fn check_memory(&self) {
        let now = memory_guard::faults();
        if self.faults_seen.load(Ordering::Acquire) == now {
            return;
        }
        let Some(e) = crate::lock(&self.guard).check() else {
            self.faults_seen.store(now, Ordering::Release);
            return;
        };
        let connection = crate::lock(&self.connection);
        let Some(conn) = connection.as_ref() else {
            return;
        };
        if self.faults_seen.swap(now, Ordering::AcqRel) != now {
            tracing::error!(
                volume = %self.volume.name,
                "guest memory file shrank under its mapping; disconnecting the frontend: {e}"
            );
            self.volume.metrics.invalid_requests.inc();
        }
        conn.shutdown();
    }

    /// Tells the frontend the configuration space changed (the capacity grew), so it raises a
    /// configuration interrupt in the guest. Returns false if the frontend set up no channel
    /// for it; it then sees the new capacity when it next reads the configuration space.
    ///
    /// Sent from a thread of its own: with REPLY_ACK the message waits for the frontend's
    /// answer, and a slow frontend must not hold up the caller.
    pub fn notify_config_change(&self) -> bool {
        let channel = crate::lock(&self.frontend_channel).clone();
        let Some(channel) = channel else {
            return false;
        };
        // One notification at a time: a frontend still handling the last one reads the newest
        // configuration when it does, and a frontend that never answers ties up one thread.
        if self.notifying.swap(true, Ordering::AcqRel) {
            tracing::info!(volume = %self.volume.name, "configuration change notification already pending");
            return true;
        }
        let name = self.volume.name.clone();
        let notifying = self.notifying.clone();
        let sent = std::thread::Builder::new()
            .name(format!("cfg-{name}"))
            .spawn(move || {
                match channel.handle_config_change() {
                    Ok(_) => tracing::info!(volume = %name, "frontend notified of the configuration change"),
                    Err(e) => tracing::warn!(volume = %name, "cannot notify the frontend of the configuration change: {e}"),
                }
                notifying.store(false, Ordering::Release);
            });
        if sent.is_err() {
            self.notifying.store(false, Ordering::Release);
        }
        sent.is_ok()
    }

    fn engine(&self, queue: usize) -> Option<MutexGuard<'_, QueueEngine>> {
        // A poisoned engine means a worker panicked; its state is still consistent enough to
        // drain, so keep serving rather than cascade.
        self.engines.get(queue).map(crate::lock)
    }

    /// Event id under which queue `queue`'s completion eventfd is registered with its worker.
    pub fn completion_event_id(&self, queue: usize) -> u64 {
        (self.engines.len() + 1 + queue) as u64
    }

    /// Event id under which queue `queue`'s throttling timerfd is registered with its worker.
    pub fn timer_event_id(&self, queue: usize) -> u64 {
        (2 * self.engines.len() + 1 + queue) as u64
    }

    /// Each queue's completion eventfd and throttling timerfd, to register with its worker's
    /// epoll.
    pub fn queue_fds(&self) -> Vec<(i32, i32)> {
        use std::os::fd::AsRawFd;
        (0..self.engines.len())
            .filter_map(|q| {
                self.engine(q)
                    .map(|e| (e.completion_fd().as_raw_fd(), e.timer_fd().as_raw_fd()))
            })
            .collect()
    }

    /// Waits for every queue's in-flight I/O (after the connection's workers have stopped).
    pub fn drain(&self) {
        for q in 0..self.engines.len() {
            if let Some(mut e) = self.engine(q) {
                e.drain(None);
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.volume.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.volume.max_queue_size)
    }

    fn features(&self) -> u64 {
        virtio_features(self.volume.read_only(), self.volume.num_queues)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend configures EVENT_IDX on the vrings; the engine asks them whether
        // to notify.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.volume.config_space();
        let start = (offset as usize).min(config.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the virtio-blk configuration space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // vhost-user-backend hands the same atomic it was created with, holding the new table;
        // in-flight requests keep their own reference to the mapping they were built from.
        let admitted = crate::lock(&self.guard).admit(&mem.memory());
        if let Err(e) = admitted {
            tracing::warn!(volume = %self.volume.name, "refused the frontend's memory table: {e}");
            // The table is already in place: take it away, so nothing is translated with it.
            if let Ok(guard) = mem.lock() {
                guard.replace(GuestMemoryMmap::new());
            }
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()));
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, channel: Backend) {
        *crate::lock(&self.frontend_channel) = Some(channel);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.volume.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: finish what was taken off the ring so the used ring the frontend
        // reads next is complete (a request still waiting for tokens is given back to the
        // ring instead). The kick fd is already unregistered, so nothing new arrives.
        if let Some(mut e) = self.engine(queue_index as usize) {
            e.drain_to_guest();
        }
        self.check_memory();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let Some(mut engine) = self.engine(thread_id) else {
            return Ok(());
        };
        let num_queues = self.engines.len() as u16;
        engine.woke();
        let work = if device_event < num_queues {
            engine.process_queue(vring, &self.mem)
        } else if u64::from(device_event) == self.timer_event_id(thread_id) {
            engine.timer_fired(vring, &self.mem)
        } else {
            engine.process_completions(vring) + engine.resume_capped(vring, &self.mem)
        };
        // Poll only a busy queue: with one request at a time, a wake-up per request costs less
        // CPU than spinning through the device's latency, for the same IOPS. A throttled queue
        // has nothing to poll for until its timer fires.
        if work > 0 && !engine.throttled() && work.max(engine.in_flight()) >= POLL_MIN_BUSY {
            engine.poll(vring, &self.mem);
        }
        engine.sleeping();
        drop(engine);
        self.check_memory();
        Ok(())
    }
}
