//! A running VM: KVM with an in-kernel irqchip and PIT, memfd guest memory, one thread per
//! vCPU, legacy devices on the port bus, a thread writing the serial console out. Ends on a
//! guest reset, a crash, or a signal.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{SerialOut, VmConfig};
use crate::console::{self, Console, ConsoleBuffer, ConsoleWriter, RotatingFile};
use crate::control::{self, Control};
use crate::devices::{Action, PortBus, PowerButton, GED_IRQ, SERIAL_IRQ};
use crate::exit::{Exit, ExitKind};
use crate::layout::{KVM_IDENTITY_MAP, KVM_TSS};
use crate::threads::{self, ThreadKind};
use crate::virtio_mmio::{self, BlkDevice};
use crate::{acpi, api, boot, cpu, memory, sys, vhost_user};

/// Errors starting or running the VM (the configuration was already checked).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM: {0}")]
    KvmSetup(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error("Cannot open the serial output")]
    Serial(#[source] std::io::Error),
    #[error(transparent)]
    Console(#[from] console::Error),
    #[error("Cannot set up an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    #[error("Cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] vhost_user::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
}

impl Error {
    /// A configuration problem found while setting up, before the guest ran.
    pub fn before_guest(&self) -> bool {
        matches!(self, Error::Disk(vhost_user::Error::Connect(..)))
    }
}

/// Boots the VM and runs it until it ends. `started` is when the process started, for the
/// time-to-first-instruction log line.
pub fn run(
    cfg: &VmConfig,
    started: Instant,
    api: Option<&api::Shared>,
    signals: &std::fs::File,
) -> Result<Exit, Error> {
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::KvmSetup("create VM", e))?;
    vm.set_tss_address(KVM_TSS as usize)
        .map_err(|e| Error::KvmSetup("TSS address", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP)
        .map_err(|e| Error::KvmSetup("identity map address", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::KvmSetup("in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(|e| Error::KvmSetup("PIT", e))?;

    let (mem, _memfd) = memory::create(cfg.memory)?;
    match memory::huge_pages_for_shared_memory() {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "guest memory is in 4 KiB pages: the host's \
             /sys/kernel/mm/transparent_hugepage/shmem_enabled does not allow huge pages for \
             shared memory; 'advise' lets vmm use them (fewer page faults, faster boots)"
        ),
        Err(e) => tracing::debug!("no transparent huge pages: {e}"),
    }
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes that `mem` keeps for as
        // long as the VM runs (this function owns both).
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| Error::KvmSetup("guest memory", e))?;
    }
    let mut disks = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let dev = BlkDevice::connect(&d.socket, d.read_only, i as u32)?;
        dev.register(&vm)?;
        disks.push(dev);
    }
    let mmio: Vec<(u64, u32)> = disks.iter().map(|d| (d.base, d.irq)).collect();
    let rsdp = acpi::write(&mem, cfg.vcpus, &mmio).map_err(boot::Error::Write)?;
    let entry = boot::load(
        &mem,
        cfg.memory,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        &cfg.cmdline,
        rsdp,
    )?;

    // Stdout as a file of its own: unbuffered, and not std's, whose flush at exit would wait
    // on a stdout nobody reads.
    let sink: Box<dyn std::io::Write + Send> = match &cfg.serial {
        SerialOut::Stdout => Box::new(std::fs::File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(Error::Serial)?,
        )),
        SerialOut::File { path, max_bytes } => Box::new(RotatingFile::open(path, *max_bytes)?),
    };
    let console = ConsoleBuffer::new(console::BUFFER_BYTES);
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| Error::KvmSetup("serial irqfd", e))?;
    let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&ged_irq, GED_IRQ)
        .map_err(|e| Error::KvmSetup("GED irqfd", e))?;
    let button = Arc::new(PowerButton::new(ged_irq));
    let bus = Arc::new(Mutex::new(PortBus::new(
        serial_irq,
        Console::new(console.clone()),
        button.clone(),
    )));

    let pvm = cpu::host_is_pvm();
    if pvm {
        tracing::info!("host KVM is kvm_pvm: masking cmpxchg16b, the xsave family and AVX from the guest's CPUID");
    }
    let base = cpu::base_cpuid(&kvm, pvm)?;
    control::install_kick_handler().map_err(Error::Signals)?;
    let control = Arc::new(Control::new(usize::from(cfg.vcpus)).map_err(Error::EventFd)?);
    let mut vcpus = Vec::new();
    for id in 0..cfg.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::KvmSetup("create vCPU", e))?;
        cpu::configure(&vcpu, &base, id, cfg.vcpus)?;
        if id == 0 {
            cpu::set_boot_state(&vcpu, entry.rip)?;
        }
        vcpus.push(vcpu);
    }
    tracing::info!(
        vcpus = cfg.vcpus,
        memory = cfg.memory,
        kernel = %cfg.kernel.display(),
        entry = format_args!("{:#x}", entry.rip),
        setup_us = started.elapsed().as_micros() as u64,
        "starting guest"
    );
    let mmio = Arc::new(MmioBus {
        disks: disks.into_iter().map(Mutex::new).collect(),
        mem: mem.clone(),
    });
    // The API sees the VM as running before any vCPU runs (a pause before the threads start
    // parks them at their first loop).
    if let Some(api) = api {
        api.set_running(cfg, control.clone(), mmio.clone(), button.clone());
    }
    let writer = ConsoleWriter::new(console.clone(), sink);
    threads::spawn(ThreadKind::Console, "console", move || writer.run())
        .map_err(|e| Error::Thread("console", e))?;
    // From here on, however this returns, what the guest wrote is written out first.
    let console_end = ConsoleEnd(console.clone());
    let mut vcpu_threads = Vec::new();
    // No vCPU runs the guest before the main thread's seccomp filter is on.
    let gate = Arc::new(std::sync::Barrier::new(vcpus.len() + 1));
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let bus = bus.clone();
        let control = control.clone();
        let mmio = mmio.clone();
        let gate = gate.clone();
        let t = threads::spawn(ThreadKind::Vcpu, format!("vcpu{id}"), move || {
            gate.wait();
            vcpu_loop(vcpu, id, &bus, &mmio, &control)
        })
        .map_err(|e| Error::Thread("vCPU", e))?;
        vcpu_threads.push(t);
    }

    // Set up: from here the main thread only waits for the end and takes the VM down.
    crate::seccomp::apply(ThreadKind::Main)?;
    gate.wait();
    let exit = wait(&control, signals);
    drop(console_end);
    if let Some(first) = console.first_byte() {
        tracing::info!(
            first_serial_byte_us = first.duration_since(started).as_micros() as u64,
            "first serial byte"
        );
    }
    // vCPU threads may be blocked in KVM_RUN; they end with the process.
    Ok(exit)
}

/// Closes the console when dropped: the writer writes what the guest wrote, and the VM's end
/// waits for it as long as the output takes bytes (see [`ConsoleBuffer::close`]).
struct ConsoleEnd(Arc<ConsoleBuffer>);

impl Drop for ConsoleEnd {
    fn drop(&mut self) {
        self.0.close(console::STALL);
    }
}

/// The virtio-mmio devices, by address.
pub struct MmioBus {
    pub disks: Vec<Mutex<BlkDevice>>,
    pub mem: vm_memory::GuestMemoryMmap,
}

impl MmioBus {
    /// The disk whose window holds `addr`: windows are fixed by index, so only that disk is
    /// locked (a vCPU waiting on one backend does not hold up the others).
    fn disk(&self, addr: u64) -> Option<std::sync::MutexGuard<'_, BlkDevice>> {
        let offset = addr.checked_sub(virtio_mmio::MMIO_BASE)?;
        let d = self
            .disks
            .get(usize::try_from(offset / virtio_mmio::MMIO_SIZE).ok()?)?;
        Some(d.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(mut d) = self.disk(addr) {
            d.read(addr, data);
        }
    }

    fn write(&self, addr: u64, data: &[u8]) {
        if let Some(mut d) = self.disk(addr) {
            d.write(addr, data, &self.mem);
        }
    }
}

fn vcpu_loop(mut vcpu: VcpuFd, id: usize, bus: &Mutex<PortBus>, mmio: &MmioBus, control: &Control) {
    control.register_vcpu_thread();
    let port_bus = || bus.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        control.park_if_paused();
        if control.ended().is_some() {
            return;
        }
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                control.count(ExitKind::IoIn);
                port_bus().read(port, data);
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                control.count(ExitKind::IoOut);
                match port_bus().write(port, data) {
                    Action::None => continue,
                    Action::Reset => Exit::Reset,
                    Action::PowerOff => Exit::PowerOff,
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                control.count(ExitKind::MmioRead);
                mmio.read(addr, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                control.count(ExitKind::MmioWrite);
                mmio.write(addr, data);
                continue;
            }
            Ok(VcpuExit::Hlt) => {
                control.count(ExitKind::Hlt);
                continue;
            }
            Ok(VcpuExit::Shutdown) => {
                control.count(ExitKind::Shutdown);
                Exit::Crash(format!("vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN)"))
            }
            // kvm_pvm reports a triple fault as an internal error.
            Ok(VcpuExit::InternalError) => {
                control.count(ExitKind::Other);
                Exit::Crash(format!(
                    "vCPU {id}: KVM could not go on running the guest (KVM_EXIT_INTERNAL_ERROR)"
                ))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                control.count(ExitKind::Other);
                tracing::info!(vcpu = id, kind, "system event");
                system_event_exit(id, kind)
            }
            Ok(other) => {
                control.count(ExitKind::Other);
                Exit::Crash(format!("vCPU {id}: unexpected exit {other:?}"))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (pause) or interrupted: look at the pause flag again.
                control.count(ExitKind::Interrupted);
                if control.is_paused() {
                    if let Ok(regs) = vcpu.get_regs() {
                        tracing::debug!(
                            vcpu = id,
                            rip = format_args!("{:#x}", regs.rip),
                            "vCPU paused"
                        );
                    }
                }
                continue;
            }
            Err(e) => Exit::Crash(format!("vCPU {id}: KVM_RUN failed: {e}")),
        };
        control.end(exit);
        return;
    }
}

/// Blocks the signals that stop the VMM (SIGTERM, SIGINT) and returns a signalfd to read them
/// from. Call before starting any thread: threads inherit the mask, so the signals reach only
/// the signalfd.
pub fn block_stop_signals() -> Result<std::fs::File, Error> {
    sys::block_signals_to_signalfd(&[libc::SIGTERM, libc::SIGINT]).map_err(Error::Signals)
}

/// Waits for the VM's end: a vCPU or the API reporting one, or a stop signal.
fn wait(control: &Control, signals: &std::fs::File) -> Exit {
    loop {
        let Ok([_, signalled]) =
            sys::poll_readable([control.exit_event.as_raw_fd(), signals.as_raw_fd()], -1)
        else {
            continue;
        };
        if signalled {
            if let Some(sig) = read_signal(signals) {
                control.end(Exit::Signal(sig));
            }
        }
        if let Some(e) = control.ended() {
            return e;
        }
    }
}

/// A stop signal waiting on the signalfd, if there is one (does not block).
pub fn pending_signal(signals: &std::fs::File) -> Option<i32> {
    match sys::poll_readable([signals.as_raw_fd()], 0) {
        Ok([true]) => read_signal(signals),
        _ => None,
    }
}

fn read_signal(signals: &std::fs::File) -> Option<i32> {
    let sig = sys::read_signal(signals).ok()?;
    tracing::info!(signal = sig, "stopping on signal");
    Some(sig)
}

/// How a KVM system event ends the VM: a shutdown is a power-off, a reset a reset, and a
/// crash (the guest's own report, e.g. through the Hyper-V crash MSRs) or anything unknown a
/// crash, with the crash exit code.
fn system_event_exit(vcpu: usize, kind: u32) -> Exit {
    match kind {
        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Exit::PowerOff,
        kvm_bindings::KVM_SYSTEM_EVENT_RESET => Exit::Reset,
        kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Exit::Crash(format!(
            "vCPU {vcpu}: the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"
        )),
        other => Exit::Crash(format!("vCPU {vcpu}: unknown KVM system event {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_system_event_ends_the_vm_as_a_crash_not_as_a_reset() {
        let code = |kind| system_event_exit(0, kind).code();
        assert_eq!(code(kvm_bindings::KVM_SYSTEM_EVENT_CRASH), 3);
        assert_eq!(code(99), 3);
        assert_eq!(code(kvm_bindings::KVM_SYSTEM_EVENT_RESET), 0);
        assert_eq!(code(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN), 0);
        assert!(matches!(
            system_event_exit(0, kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN),
            Exit::PowerOff
        ));
    }
}
