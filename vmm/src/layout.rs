//! Guest physical memory layout (x86_64), as Linux's boot protocol and Firecracker use it.

/// GDT used to enter long mode.
pub const BOOT_GDT: u64 = 0x500;
/// `struct boot_params` (the zero page).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables identity-mapping the first 4 GiB with 2 MiB pages: PML4, PDPT, four PDs.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line (at most [`CMDLINE_MAX`] bytes with its NUL).
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: RAM below 1 MiB ends here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at 1 MiB.
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// RAM below 4 GiB ends here; above is the MMIO gap (devices, LAPIC, IOAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// KVM's TSS and identity-map pages, in the MMIO gap.
pub const KVM_TSS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
