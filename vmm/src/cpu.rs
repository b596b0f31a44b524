//! vCPU setup: CPUID with per-vCPU topology, MSRs, FPU, the local APIC's LINT pins, and the
//! 64-bit boot state of the boot vCPU.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::GDT;
use crate::layout::{BOOT_GDT, BOOT_STACK, PML4, ZERO_PAGE};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot get the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("Cannot configure vCPU {0}: {1}")]
    Setup(u8, &'static str, #[source] kvm_ioctls::Error),
    #[error("Cannot build the MSR or CPUID list")]
    Msrs,
}

/// Whether the host's KVM is the `kvm_pvm` module, whose instruction emulator lacks
/// cmpxchg16b and the xsave family.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The CPUID every vCPU starts from: what KVM supports, with features PVM cannot run masked.
pub fn base_cpuid(kvm: &Kvm, pvm: bool) -> Result<CpuId, Error> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= 1 << 31; // hypervisor present
                if pvm {
                    // cmpxchg16b (13), xsave (26), osxsave (27), avx (28), f16c (29).
                    e.ecx &= !((1 << 13) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29));
                }
            }
            7 if pvm && e.index == 0 => {
                // avx2 (5), avx512* (16, 17, 21, 26, 27, 28, 30, 31).
                e.ebx &= !((1 << 5)
                    | (1 << 16)
                    | (1 << 17)
                    | (1 << 21)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 30)
                    | (1 << 31));
                // vaes (9), vpclmulqdq (10), avx512 vbmi/vnni/bitalg/vpopcnt (1, 6, 11, 12, 14).
                e.ecx &= !((1 << 1)
                    | (1 << 6)
                    | (1 << 9)
                    | (1 << 10)
                    | (1 << 11)
                    | (1 << 12)
                    | (1 << 14));
            }
            0xd if pvm => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Sets up vCPU `id` of `count`: CPUID with its APIC id, MSRs, FPU, LAPIC LINT pins.
pub fn configure(vcpu: &VcpuFd, base: &CpuId, id: u8, count: u8) -> Result<(), Error> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        // Initial APIC id, logical processor count, HTT when there is more than one.
        e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
        if count > 1 {
            e.edx |= 1 << 28;
        }
    }
    // Extended topology (leaf 0xB): KVM reports only its first subleaf; every level is
    // written here: one thread per core, `count` cores in one package, then the end marker.
    let has_topology = cpuid.as_slice().iter().any(|e| e.function == 0xb);
    if has_topology {
        let mut entries: Vec<kvm_cpuid_entry2> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function != 0xb)
            .copied()
            .collect();
        let core_bits = u32::from(count).next_power_of_two().trailing_zeros();
        let level = |index: u32, eax: u32, ebx: u32, kind: u32| kvm_cpuid_entry2 {
            function: 0xb,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (kind << 8) | index,
            edx: u32::from(id),
            ..Default::default()
        };
        entries.push(level(0, 0, 1, 1));
        entries.push(level(1, core_bits, u32::from(count), 2));
        entries.push(level(2, 0, 0, 0));
        cpuid = CpuId::from_entries(&entries).map_err(|_| Error::Msrs)?;
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| Error::Setup(id, "CPUID", e))?;

    let msrs = [
        (0x174, 0),       // IA32_SYSENTER_CS
        (0x175, 0),       // IA32_SYSENTER_ESP
        (0x176, 0),       // IA32_SYSENTER_EIP
        (0xc000_0081, 0), // STAR
        (0xc000_0082, 0), // LSTAR
        (0xc000_0083, 0), // CSTAR
        (0xc000_0102, 0), // KERNEL_GS_BASE
        (0xc000_0084, 0), // SYSCALL_MASK
        (0x10, 0),        // TSC
        (0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&msrs).map_err(|_| Error::Msrs)?;
    vcpu.set_msrs(&msrs)
        .map_err(|e| Error::Setup(id, "MSRs", e))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Setup(id, "FPU", e))?;

    // LINT0 as ExtINT (the PIC), LINT1 as NMI, as a BIOS leaves them.
    let mut lapic = vcpu.get_lapic().map_err(|e| Error::Setup(id, "LAPIC", e))?;
    for (offset, mode) in [(0x350usize, 0x7u32), (0x360, 0x4)] {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Setup(id, "LAPIC", e))?;
    Ok(())
}

/// The boot vCPU's 64-bit state: long mode, identity paging, the GDT, `rip` = entry,
/// `rsi` = the zero page.
pub fn set_boot_state(vcpu: &VcpuFd, rip: u64) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(|e| Error::Setup(0, "sregs", e))?;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 31); // PE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Setup(0, "sregs", e))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Setup(0, "registers", e))
}

/// The KVM segment for GDT entry `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}
