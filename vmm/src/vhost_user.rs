//! The vhost-user frontend of a disk: what the VMM tells the backend (storaged) and when.
//!
//! - At start, [`Handshake::connect`]: SET_OWNER, the device features (GET_FEATURES), the
//!   protocol features both sides have (CONFIG, MQ, BACKEND_REQ, REPLY_ACK; with REPLY_ACK
//!   every request waits for the backend's verdict), the config space (GET_CONFIG); then
//!   [`Handshake::finish`], once the transport knows how many queues the disk gets: an
//!   ioeventfd per queue (the guest's kick), one irqfd (the backend's interrupt), and the
//!   backend request channel ([`crate::backend_req`]).
//! - At the guest's DRIVER_OK, [`VhostUserBlk::activate`]: the features the driver took, the
//!   memory table (the memfd and each region's offset in it), and each ready ring (size,
//!   addresses, base 0, call and kick eventfds, enable). The rings handed over are recorded
//!   as they go, so that a failure halfway can stop them.
//! - At a reset or a failed activation, [`VhostUserBlk::stop_rings`]: each ring the backend
//!   was given is disabled and stopped (GET_VRING_BASE), its state dropped.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend_req;

/// Errors attaching or activating a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Disk {0}: nobody serves this vhost-user socket")]
    Connect(PathBuf, #[source] vhost::Error),
    #[error("Disk {0}: vhost-user {1} failed")]
    Protocol(PathBuf, &'static str, #[source] vhost::Error),
    #[error("Disk {0}")]
    BackendRequest(PathBuf, #[source] backend_req::Error),
    #[error("Disk {0}: cannot set up eventfds")]
    EventFd(PathBuf, #[source] std::io::Error),
    #[error("Disk {0}: KVM {1}")]
    Kvm(PathBuf, &'static str, #[source] kvm_ioctls::Error),
    #[error("Disk {0}: queue {1} has a bad size or is not in guest memory")]
    BadQueue(PathBuf, u32),
}

/// A ring as the driver set it up on the transport.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ring {
    pub num: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A backend connected, its features known and the protocol features set, before the number
/// of queues is known.
pub struct Handshake {
    socket: PathBuf,
    frontend: Frontend,
    /// The device features the backend offers.
    pub features: u64,
    /// The protocol features the backend offers.
    supported: VhostUserProtocolFeatures,
    /// The protocol features in use.
    negotiated: VhostUserProtocolFeatures,
}

impl Handshake {
    /// Connects to the backend on `socket` (at most `max_queues` queues) and negotiates the
    /// protocol features.
    pub fn connect(socket: &Path, max_queues: usize) -> Result<Handshake, Error> {
        let s = socket.to_owned();
        let proto = |what| {
            let s = s.clone();
            move |e| Error::Protocol(s, what, e)
        };
        let mut frontend = Frontend::connect(socket, max_queues as u64)
            .map_err(|e| Error::Connect(s.clone(), e))?;
        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        let features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
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
        Ok(Handshake {
            socket: s,
            frontend,
            features,
            supported,
            negotiated,
        })
    }

    /// Fills `config` with the start of the backend's config space, if it has one (CONFIG);
    /// otherwise leaves it as it is.
    pub fn read_config(&mut self, config: &mut [u8]) -> Result<(), Error> {
        if self.supported.contains(VhostUserProtocolFeatures::CONFIG) {
            get_config(&mut self.frontend, config)
                .map_err(|e| Error::Protocol(self.socket.clone(), "GET_CONFIG", e))?;
        }
        Ok(())
    }

    /// Makes the eventfds of `queues` queues and, if the backend has it, serves its request
    /// channel: a configuration change sets `config_changed` and interrupts the guest.
    pub fn finish(
        mut self,
        queues: usize,
        config_changed: Arc<AtomicBool>,
    ) -> Result<VhostUserBlk, Error> {
        let s = self.socket;
        let ev = |e| Error::EventFd(s.clone(), e);
        let kicks = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ev)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(ev)?;
        if self
            .negotiated
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            let watch = backend_req::ConfigWatch {
                changed: config_changed,
                irq: call.try_clone().map_err(ev)?,
            };
            let reply_ack = self
                .negotiated
                .contains(VhostUserProtocolFeatures::REPLY_ACK);
            backend_req::serve(&mut self.frontend, &s, watch, reply_ack)
                .map_err(|e| Error::BackendRequest(s.clone(), e))?;
        }
        Ok(VhostUserBlk {
            socket: s,
            frontend: self.frontend,
            kicks,
            call,
            started: vec![false; queues],
        })
    }
}

/// GET_CONFIG of `config.len()` bytes from offset 0, copied into `config` (as much as came).
fn get_config(frontend: &mut Frontend, config: &mut [u8]) -> Result<(), vhost::Error> {
    let len = u32::try_from(config.len()).unwrap_or(u32::MAX);
    let buf = vec![0u8; config.len()];
    let (_, payload) = frontend.get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)?;
    let n = payload.len().min(config.len());
    config[..n].copy_from_slice(&payload[..n]);
    Ok(())
}

/// A disk's vhost-user backend, its queues' eventfds and the rings it was handed.
pub struct VhostUserBlk {
    socket: PathBuf,
    frontend: Frontend,
    kicks: Vec<EventFd>,
    call: EventFd,
    /// The rings handed to the backend (their first vring message sent) and not stopped
    /// since, by queue: what a failed activation or a reset stops, whether or not the
    /// activation that started them got to the end.
    started: Vec<bool>,
}

impl VhostUserBlk {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Has KVM signal queue `i`'s kick eventfd on a write of `i` to `notify` (the transport's
    /// queue notification register), and raise `irq` when the backend signals the call
    /// eventfd.
    pub fn register(&self, vm: &VmFd, notify: u64, irq: u32) -> Result<(), Error> {
        for (i, kick) in self.kicks.iter().enumerate() {
            vm.register_ioevent(kick, &IoEventAddress::Mmio(notify), i as u32)
                .map_err(|e| Error::Kvm(self.socket.clone(), "ioeventfd", e))?;
        }
        vm.register_irqfd(&self.call, irq)
            .map_err(|e| Error::Kvm(self.socket.clone(), "irqfd", e))
    }

    /// Kicks queue `queue` (a notification the ioeventfd did not catch).
    pub fn kick(&self, queue: usize) {
        if let Some(kick) = self.kicks.get(queue) {
            let _ = kick.write(1);
        }
    }

    /// Fetches the config space again (GET_CONFIG) into `config`.
    pub fn read_config(&mut self, config: &mut [u8]) -> Result<(), vhost::Error> {
        get_config(&mut self.frontend, config)
    }

    /// Hands the backend the driver's `features`, the memory table and the ready `rings`
    /// (each at most `queue_max` entries, a power of two). On an error, the rings handed over
    /// so far are recorded for [`VhostUserBlk::stop_rings`].
    pub fn activate(
        &mut self,
        features: u64,
        mem: &GuestMemoryMmap,
        rings: &[Ring],
        queue_max: u16,
    ) -> Result<(), Error> {
        let s = self.socket.clone();
        for (i, q) in rings.iter().enumerate() {
            if q.ready && (q.num == 0 || !q.num.is_power_of_two() || q.num > queue_max) {
                return Err(Error::BadQueue(s.clone(), i as u32));
            }
        }
        let proto = |what| {
            let s = s.clone();
            move |e| Error::Protocol(s, what, e)
        };
        let features = features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
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
        for (i, q) in rings.iter().enumerate() {
            if !q.ready {
                continue;
            }
            let host = |a: u64| {
                mem.get_host_address(GuestAddress(a))
                    .map(|p| p as u64)
                    .map_err(|_| Error::BadQueue(s.clone(), i as u32))
            };
            let config = VringConfigData {
                queue_max_size: queue_max,
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

    /// Has the backend stop every ring it was given: disabled, then stopped (GET_VRING_BASE).
    pub fn stop_rings(&mut self) {
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
}
