//! A virtio-blk device on the virtio-mmio transport (version 2) whose queues are served by a
//! vhost-user-blk backend (storaged). This file is the transport: the registers of each
//! disk's 4 KiB window and the device status state machine (features, FEATURES_OK,
//! DRIVER_OK, NEEDS_RESET, reset). What goes to the backend, and when, is
//! [`crate::vhost_user`]: the backend reads the rings in the shared guest memory, is kicked
//! through an ioeventfd and interrupts the guest through an irqfd, so I/O never passes
//! through a VMM thread. A configuration change comes through [`crate::backend_req`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::vhost_user::{Error, Handshake, Ring, VhostUserBlk};

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
/// The QueueNotify register's offset in a device's window.
const QUEUE_NOTIFY: u64 = 0x50;
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

/// One vhost-user-blk disk on virtio-mmio.
pub struct BlkDevice {
    backend: VhostUserBlk,
    read_only: bool,
    pub base: u64,
    pub irq: u32,
    device_features: u64,
    features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: Vec<Ring>,
    status: u32,
    config: Vec<u8>,
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
    /// Connects to the backend and learns its features and configuration: disk `index` gets
    /// the `index`th window and interrupt line.
    pub fn connect(socket: &Path, read_only: bool, index: u32) -> Result<BlkDevice, Error> {
        let mut handshake = Handshake::connect(socket, MAX_QUEUES)?;
        let mut device_features = handshake.features & TRANSPORT_FEATURES;
        if read_only {
            device_features |= VIRTIO_BLK_F_RO;
        }
        let mut config = vec![0u8; CONFIG_LEN as usize];
        handshake.read_config(&mut config)?;
        let num_queues = queue_count(&mut config, device_features);
        let config_changed = Arc::new(AtomicBool::new(false));
        let backend = handshake.finish(num_queues, config_changed.clone())?;
        Ok(BlkDevice {
            backend,
            read_only,
            base: MMIO_BASE + u64::from(index) * MMIO_SIZE,
            irq: FIRST_IRQ + index,
            device_features,
            features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: vec![Ring::default(); num_queues],
            status: 0,
            config,
            active: false,
            config_changed,
            config_pending: false,
            config_generation: 0,
            notifies: 0,
        })
    }

    /// Wires the queue notification register to the queues' ioeventfds and the interrupt
    /// line to the irqfd.
    pub fn register(&self, vm: &VmFd) -> Result<(), Error> {
        self.backend
            .register(vm, self.base + QUEUE_NOTIFY, self.irq)
    }

    pub fn socket(&self) -> &Path {
        self.backend.socket()
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
        match self.backend.read_config(&mut self.config) {
            Ok(()) => {
                queue_count(&mut self.config, self.device_features);
                self.config_generation = self.config_generation.wrapping_add(1);
                self.config_pending = true;
                tracing::info!(disk = %self.socket().display(), "disk configuration changed");
            }
            Err(e) => tracing::warn!(disk = %self.socket().display(), "GET_CONFIG failed: {e}"),
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
            QUEUE_NOTIFY => {
                self.notifies += 1;
                self.backend.kick(v as usize);
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

    fn with_queue(&mut self, sel: usize, f: impl FnOnce(&mut Ring)) {
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
            // RO is this transport's (a `readonly` disk), not the backend's: not passed on.
            let features = if self.read_only {
                self.driver_features & !VIRTIO_BLK_F_RO
            } else {
                self.driver_features
            };
            match self
                .backend
                .activate(features, mem, &self.queues, QUEUE_MAX)
            {
                Ok(()) => self.active = true,
                Err(e) => {
                    tracing::error!("{}", crate::error_chain(&e));
                    // All or nothing: the rings started before the failure are stopped, so
                    // the backend does not go on serving a device the guest must reset.
                    self.backend.stop_rings();
                    self.status |= STATUS_NEEDS_RESET;
                }
            }
        }
    }

    /// Device reset (status 0): the backend stops using the rings it was given (their state
    /// is fetched and dropped), and everything the driver set is forgotten, so it can set the
    /// device up again.
    fn reset(&mut self) {
        self.backend.stop_rings();
        if self.active {
            self.active = false;
            tracing::info!(disk = %self.socket().display(), "disk reset by the driver");
        }
        self.status = 0;
        self.driver_features = 0;
        self.features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.config_pending = false;
        self.queues = vec![Ring::default(); self.queues.len()];
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
