//! A microVM monitor on the rust-vmm crates: KVM (`kvm-ioctls`), memfd-backed guest memory
//! (`vm-memory`), the Linux boot protocol (`linux-loader`), a 16550 console (`vm-superio`),
//! disks served over vhost-user (`vhost`).
//!
//! - [`launch`]: the process, from its parsed command line (`main.rs` parses it) to its exit
//!   code; [`config`]: the VM's configuration, checked before anything starts.
//! - [`memory`], [`layout`]: guest memory and where things go in it.
//! - [`acpi`]: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT.
//! - [`boot`]: kernel, initrd, command line, zero page with the e820 map, page tables, GDT.
//! - [`cpu`]: CPUID (per-vCPU topology, kvm_pvm masking), MSRs, FPU, LAPIC, boot registers.
//! - [`devices`]: the serial port and the i8042 reset line; [`console`]: where the serial
//!   port's output goes, through a buffer and a writer thread, so no vCPU waits on it.
//! - A disk: [`virtio_mmio`], the transport (registers, device status); [`vhost_user`], what
//!   goes to its backend and when (features, memory table, rings); [`backend_req`], the
//!   backend's request channel (configuration changes) and its thread.
//! - [`vm`]: KVM setup, the vCPU threads and how the VM ends; [`control`]: pause, the end
//!   latch and the exit counters shared with [`api`], the HTTP API on a Unix socket;
//!   [`exit`]: why the VM ended, the process's exit codes, the vCPU exit kinds counted.
//! - [`threads`]: every thread is started there, by its kind (vCPU, API, console, device;
//!   the main thread is the process's own), and [`seccomp`]: each kind's seccomp filter,
//!   which the thread installs; [`sys`]: the raw system calls, behind small wrappers.

pub mod acpi;
pub mod api;
pub mod backend_req;
pub mod boot;
pub mod config;
pub mod console;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod exit;
pub mod launch;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod sys;
pub mod threads;
pub mod vhost_user;
pub mod virtio_mmio;
pub mod vm;

/// Formats an error with its whole chain of sources: "a: b: c".
pub use errors::chain as error_chain;
