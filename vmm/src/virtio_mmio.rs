//! A virtio-blk device on the virtio-mmio transport (version 2) whose queues are served by a
//! vhost-user-blk backend (storaged): the VMM only handles the transport registers; the
//! backend reads the rings in the shared guest memory, is kicked through an ioeventfd and
//! interrupts the guest through an irqfd, so I/O never passes through a VMM thread.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::threads::{self, ThreadKind};

/// First device's registers; each device has a 4 KiB window.
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = 0x1000;
/// First device's interrupt line (GSI); the next ones follow.
pub const FIRST_IRQ: u32 = 5;

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;
const STATUS_NEEDS_RESET: u32 = 0x40;
/// Largest queue offered (libblkio and Linux both use up to 256).
const QUEUE_MAX: u16 = 256;
/// Device features this transport passes on: VERSION_1, the ring features it handles
/// (INDIRECT_DESC, EVENT_IDX) and virtio-blk's own (bits 0-23). Anything else a backend offers
/// (packed rings, notification data, ring reset, platform access) needs transport support
/// this device does not have.
const TRANSPORT_FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 28) | (1 << 29) | 0x00ff_ffff;

/// Most queues a disk gets (VIRTIO_BLK_F_MQ).
const MAX_QUEUES: usize = 16;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

/// Config space bytes fetched from the backend (struct virtio_blk_config up to
/// write_zeroes_may_unmap).
const CONFIG_LEN: u32 = 60;

/// Errors attaching or activating a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Disk {0}: nobody serves this vhost-user socket")]
    Connect(PathBuf, #[source] vhost::Error),
    #[error("Disk {0}: vhost-user {1} failed")]
    Protocol(PathBuf, &'static str, #[source] vhost::Error),
    #[error("Disk {0}: cannot set up eventfds")]
    EventFd(PathBuf, #[source] std::io::Error),
    #[error("Disk {0}: KVM {1}")]
    Kvm(PathBuf, &'static str, #[source] kvm_ioctls::Error),
    #[error("Disk {0}: queue {1} has a bad size or is not in guest memory")]
    BadQueue(PathBuf, u32),
}

#[derive(Clone, Copy, Default)]
struct Queue {
    num: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

/// Receives the backend's configuration-change messages (a storaged volume grew): marks the
/// configuration stale and interrupts the guest, which then reads it again.
struct ConfigWatch {
    changed: Arc<AtomicBool>,
    irq: EventFd,
}

impl VhostUserFrontendReqHandler for ConfigWatch {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.changed.store(true, Ordering::Release);
        self.irq.write(1)?;
        Ok(0)
    }
}

/// One vhost-user-blk disk on virtio-mmio.
pub struct BlkDevice {
    socket: PathBuf,
    read_only: bool,
    frontend: Frontend,
    pub base: u64,
    pub irq: u32,
    device_features: u64,
    features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    config: Vec<u8>,
    kicks: Vec<EventFd>,
    call: EventFd,
    /// The rings handed to the backend (their first vring message sent) and not stopped
    /// since, by queue: what a failed activation or a reset stops, whether or not the
    /// activation that started them got to the end.
    started: Vec<bool>,
    active: bool,
    /// The backend said the configuration changed; it is fetched again at the guest's next
    /// look at it.
    config_changed: Arc<AtomicBool>,
    /// A configuration interrupt the guest has not acknowledged.
    config_pending: bool,
    config_generation: u32,
    /// Requests the guest made on this disk's queue notification register (counter for the
    /// API; only those that reached the VMM: ioeventfd catches the rest).
    pub notifies: u64,
}

impl BlkDevice {
    /// Connects to the backend and learns its features and configuration.
    pub fn connect(socket: &Path, read_only: bool, index: u32) -> Result<BlkDevice, Error> {
        let s = socket.to_owned();
        let proto = |what| {
            let s = s.clone();
            move |e| Error::Protocol(s, what, e)
        };
        let mut frontend = Frontend::connect(socket, MAX_QUEUES as u64)
            .map_err(|e| Error::Connect(s.clone(), e))?;
        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        let mut device_features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
        device_features &= TRANSPORT_FEATURES;
        if read_only {
            device_features |= VIRTIO_BLK_F_RO;
        }
        let mut config = vec![0u8; CONFIG_LEN as usize];
        let supported = frontend
            .get_protocol_features()
            .map_err(proto("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        let negotiated = supported & wanted;
        frontend
            .set_protocol_features(negotiated)
            .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        if negotiated.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request waits for the backend's verdict, so a refused activation is seen.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if supported.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, payload) = frontend
                .get_config(0, CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &config)
                .map_err(proto("GET_CONFIG"))?;
            let n = payload.len().min(config.len());
            config[..n].copy_from_slice(&payload[..n]);
        }
        let ev = |e| Error::EventFd(s.clone(), e);
        let num_queues = queue_count(&mut config, device_features);
        let kicks = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ev)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(ev)?;
        let config_changed = Arc::new(AtomicBool::new(false));
        if negotiated.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let watch = ConfigWatch {
                changed: config_changed.clone(),
                irq: call.try_clone().map_err(ev)?,
            };
            let mut handler = FrontendReqHandler::new(Arc::new(watch)).map_err(|e| {
                Error::Protocol(
                    s.clone(),
                    "backend request channel",
                    vhost::Error::VhostUserProtocol(e),
                )
            })?;
            handler.set_reply_ack_flag(negotiated.contains(VhostUserProtocolFeatures::REPLY_ACK));
            frontend
                .set_backend_request_fd(&handler.get_tx_raw_fd())
                .map_err(proto("SET_BACKEND_REQ_FD"))?;
            let name = s.display().to_string();
            threads::spawn(ThreadKind::Device, "disk-cfg", move || {
                // Ends when the backend closes the channel; a message it cannot handle
                // is logged and skipped.
                let mut failures = 0;
                loop {
                    match handler.handle_request() {
                        Ok(_) => failures = 0,
                        Err(
                            vhost::vhost_user::Error::Disconnected
                            | vhost::vhost_user::Error::SocketBroken(_)
                            | vhost::vhost_user::Error::PartialMessage,
                        ) => break,
                        Err(e) => {
                            tracing::warn!(disk = %name, "backend request: {e}");
                            failures += 1;
                            if failures > 100 {
                                break;
                            }
                        }
                    }
                }
                tracing::debug!(disk = %name, "backend request channel closed");
            })
            .map_err(ev)?;
        }
        Ok(BlkDevice {
            socket: s.clone(),
            read_only,
            frontend,
            base: MMIO_BASE + u64::from(index) * MMIO_SIZE,
            irq: FIRST_IRQ + index,
            device_features,
            features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: vec![Queue::default(); num_queues],
            status: 0,
            config,
            kicks,
            call,
            started: vec![false; num_queues],
            active: false,
            config_changed,
            config_pending: false,
            config_generation: 0,
            notifies: 0,
        })
    }

    /// Wires the queue notification register to an ioeventfd and the interrupt to an irqfd.
    pub fn register(&self, vm: &VmFd) -> Result<(), Error> {
        for (i, kick) in self.kicks.iter().enumerate() {
            vm.register_ioevent(kick, &IoEventAddress::Mmio(self.base + 0x50), i as u32)
                .map_err(|e| Error::Kvm(self.socket.clone(), "ioeventfd", e))?;
        }
        vm.register_irqfd(&self.call, self.irq)
            .map_err(|e| Error::Kvm(self.socket.clone(), "irqfd", e))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The driver set DRIVER_OK and the backend has the rings.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Requests the backend has completed on queue 0, modulo 2^16 (the used ring's index in
    /// guest memory): I/O bypasses the VMM, so this is where it can be counted.
    pub fn completed(&self, mem: &GuestMemoryMmap) -> Option<u16> {
        use vm_memory::Bytes;
        let q = self.queues.first()?;
        if !self.active || !q.ready {
            return None;
        }
        mem.read_obj::<u16>(GuestAddress(q.used + 2)).ok()
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + MMIO_SIZE).contains(&addr)
    }

    /// Fetches the configuration again if the backend said it changed.
    fn refresh_config(&mut self) {
        if !self.config_changed.swap(false, Ordering::AcqRel) {
            return;
        }
        let buf = vec![0u8; CONFIG_LEN as usize];
        match self
            .frontend
            .get_config(0, CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &buf)
        {
            Ok((_, payload)) => {
                let n = payload.len().min(self.config.len());
                self.config[..n].copy_from_slice(&payload[..n]);
                queue_count(&mut self.config, self.device_features);
                self.config_generation = self.config_generation.wrapping_add(1);
                self.config_pending = true;
                tracing::info!(disk = %self.socket.display(), "disk configuration changed");
            }
            Err(e) => tracing::warn!(disk = %self.socket.display(), "GET_CONFIG failed: {e}"),
        }
    }

    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        self.refresh_config();
        let offset = addr - self.base;
        if offset >= 0x100 {
            let start = (offset - 0x100) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let q = self.queues.get(self.queue_sel as usize).copied();
        let v: u32 = match offset {
            0x000 => 0x7472_6976, // "virt"
            0x004 => 2,
            0x008 => VIRTIO_ID_BLOCK,
            0x00c => 0x554d_4551, // vendor
            0x010 => {
                (self.device_features >> (32 * self.features_sel.min(1))) as u32
                    & if self.features_sel > 1 { 0 } else { u32::MAX }
            }
            0x034 => q.map_or(0, |_| u32::from(QUEUE_MAX)),
            0x044 => q.map_or(0, |q| u32::from(q.ready)),
            // The backend signals the irqfd directly: once active, any interrupt may be the
            // queue's; a configuration change is known here.
            0x060 => {
                let vring = if self.active { INT_VRING } else { 0 };
                let config = if self.config_pending { INT_CONFIG } else { 0 };
                vring | config
            }
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub fn write(&mut self, addr: u64, data: &[u8], mem: &GuestMemoryMmap) {
        let offset = addr - self.base;
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let sel = self.queue_sel as usize;
        let set_lo = |x: &mut u64, v: u32| *x = (*x & !0xffff_ffff) | u64::from(v);
        let set_hi = |x: &mut u64, v: u32| *x = (*x & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            0x014 => self.features_sel = v,
            0x020 if self.status & STATUS_FEATURES_OK != 0 => {}
            0x020 => match self.driver_features_sel {
                0 => set_lo(&mut self.driver_features, v),
                1 => set_hi(&mut self.driver_features, v),
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    // Checked at DRIVER_OK: a power of two up to QUEUE_MAX.
                    q.num = u16::try_from(v).unwrap_or(0);
                }
            }
            0x044 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.ready = v == 1;
                }
            }
            // Normally caught by the ioeventfd; if not, passed on, so the queue does not stall.
            0x050 => {
                self.notifies += 1;
                if let Some(kick) = self.kicks.get(v as usize) {
                    let _ = kick.write(1);
                }
            }
            0x064 if v & INT_CONFIG != 0 => self.config_pending = false,
            0x070 => self.set_status(v, mem),
            0x080 => self.with_queue(sel, |q| set_lo(&mut q.desc, v)),
            0x084 => self.with_queue(sel, |q| set_hi(&mut q.desc, v)),
            0x090 => self.with_queue(sel, |q| set_lo(&mut q.avail, v)),
            0x094 => self.with_queue(sel, |q| set_hi(&mut q.avail, v)),
            0x0a0 => self.with_queue(sel, |q| set_lo(&mut q.used, v)),
            0x0a4 => self.with_queue(sel, |q| set_hi(&mut q.used, v)),
            _ => {}
        }
    }

    fn with_queue(&mut self, sel: usize, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queues.get_mut(sel) {
            f(q);
        }
    }

    fn set_status(&mut self, v: u32, mem: &GuestMemoryMmap) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Features the device does not offer make FEATURES_OK fail.
            if self.driver_features & !self.device_features != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        let became_ready = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        if became_ready && v & STATUS_FEATURES_OK == 0 {
            // DRIVER_OK without FEATURES_OK: the driver skipped negotiation.
            self.status = v | STATUS_NEEDS_RESET;
            return;
        }
        self.status = v;
        if became_ready && !self.active {
            match self.activate(mem) {
                Ok(()) => self.active = true,
                Err(e) => {
                    tracing::error!("{}", crate::error_chain(&e));
                    // All or nothing: the rings started before the failure are stopped, so
                    // the backend does not go on serving a device the guest must reset.
                    self.stop_rings();
                    self.status |= STATUS_NEEDS_RESET;
                }
            }
        }
    }

    /// Device reset (status 0): the backend stops using the rings it was given (their state
    /// is fetched and dropped), and everything the driver set is forgotten, so it can set the
    /// device up again.
    fn reset(&mut self) {
        self.stop_rings();
        if self.active {
            self.active = false;
            tracing::info!(disk = %self.socket.display(), "disk reset by the driver");
        }
        self.status = 0;
        self.driver_features = 0;
        self.features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.config_pending = false;
        self.queues = vec![Queue::default(); self.queues.len()];
    }

    /// Has the backend stop every ring it was given: disabled, then stopped (GET_VRING_BASE).
    fn stop_rings(&mut self) {
        for (i, started) in self.started.iter_mut().enumerate() {
            if !std::mem::take(started) {
                continue;
            }
            if let Err(e) = self.frontend.set_vring_enable(i, false) {
                tracing::warn!(disk = %self.socket.display(), queue = i, "SET_VRING_ENABLE 0 failed: {e}");
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                tracing::warn!(disk = %self.socket.display(), queue = i, "GET_VRING_BASE failed: {e}");
            }
        }
    }

    /// DRIVER_OK: hands the memory table and the rings to the backend. On an error, the
    /// rings handed over so far are in `started`.
    fn activate(&mut self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        let s = self.socket.clone();
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready && (q.num == 0 || !q.num.is_power_of_two() || q.num > QUEUE_MAX) {
                return Err(Error::BadQueue(s.clone(), i as u32));
            }
        }
        let proto = |what| {
            let s = s.clone();
            move |e| Error::Protocol(s, what, e)
        };
        let features = self.driver_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = if self.read_only {
            features & !VIRTIO_BLK_F_RO
        } else {
            features
        };
        self.frontend
            .set_features(features)
            .map_err(proto("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                })
            })
            .collect();
        self.frontend
            .set_mem_table(&regions)
            .map_err(proto("SET_MEM_TABLE"))?;
        for (i, q) in self.queues.clone().iter().enumerate() {
            if !q.ready {
                continue;
            }
            let host = |a: u64| {
                mem.get_host_address(GuestAddress(a))
                    .map(|p| p as u64)
                    .map_err(|_| Error::BadQueue(s.clone(), i as u32))
            };
            let config = VringConfigData {
                queue_max_size: QUEUE_MAX,
                queue_size: q.num,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            };
            self.started[i] = true;
            self.frontend
                .set_vring_num(i, q.num)
                .map_err(proto("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(proto("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(proto("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &self.call)
                .map_err(proto("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &self.kicks[i])
                .map_err(proto("SET_VRING_KICK"))?;
            self.frontend
                .set_vring_enable(i, true)
                .map_err(proto("SET_VRING_ENABLE"))?;
        }
        tracing::info!(disk = %self.socket.display(), "disk activated");
        Ok(())
    }
}

/// The queues a disk gets: what the backend's config space says when it offers MQ (at most
/// [`MAX_QUEUES`]), else one. The config space the guest reads is made to say the same, so a
/// guest never sees queues it cannot set up.
fn queue_count(config: &mut [u8], device_features: u64) -> usize {
    if device_features & VIRTIO_BLK_F_MQ == 0 {
        return 1;
    }
    let Some(field) = config.get_mut(34..36) else {
        return 1;
    };
    let n = usize::from(u16::from_le_bytes([field[0], field[1]])).clamp(1, MAX_QUEUES);
    field.copy_from_slice(&(n as u16).to_le_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_sees_no_more_queues_than_the_disk_gets() {
        let mut config = vec![0u8; CONFIG_LEN as usize];
        config[34..36].copy_from_slice(&64u16.to_le_bytes());
        assert_eq!(queue_count(&mut config, VIRTIO_BLK_F_MQ), MAX_QUEUES);
        assert_eq!(
            u16::from_le_bytes([config[34], config[35]]),
            MAX_QUEUES as u16
        );
        config[34..36].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(queue_count(&mut config, VIRTIO_BLK_F_MQ), 4);
        assert_eq!(queue_count(&mut config, 0), 1);
    }
}
