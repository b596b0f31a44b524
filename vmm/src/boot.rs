//! Loading a kernel and building what the 64-bit Linux boot protocol expects: page tables, a
//! GDT, the zero page with the e820 map, the command line, an initrd.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(String),
    #[error("Cannot load kernel {path}")]
    Load {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("Kernel command line is longer than {CMDLINE_MAX} bytes")]
    CmdlineTooLong,
    #[error("Initrd {path} of {size} bytes does not fit in guest memory")]
    InitrdTooBig { path: String, size: u64 },
    #[error("Cannot write boot data into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The kinds of kernel image we boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Elf,
    BzImage,
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn kernel_kind(path: &Path) -> Result<KernelKind, Error> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|source| Error::Open {
        path: name.clone(),
        source,
    })?;
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut f, &mut head).map_err(|source| Error::Open {
        path: name.clone(),
        source,
    })?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelKind::Elf);
    }
    // The setup header's "HdrS" at 0x202 and the 0xaa55 boot flag at 0x1fe.
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa] {
        return Ok(KernelKind::BzImage);
    }
    Err(Error::NotAKernel(name))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where the boot vCPU starts.
pub struct Entry {
    pub rip: u64,
}

/// Loads the kernel, command line, initrd and boot structures. Returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<Entry, Error> {
    let name = kernel.display().to_string();
    let kind = kernel_kind(kernel)?;
    let mut f = File::open(kernel).map_err(|source| Error::Open {
        path: name.clone(),
        source,
    })?;
    let load_err = |source| Error::Load {
        path: name.clone(),
        source,
    };
    let (rip, setup_header, kernel_end) = match kind {
        KernelKind::Elf => {
            let r =
                Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY))).map_err(load_err)?;
            // Loaded where its headers say, linux-loader reports the entry point (e_entry).
            (r.kernel_load.raw_value(), None, r.kernel_end)
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(load_err)?;
            // 64-bit entry: startup_64, 0x200 past the protected-mode kernel.
            (
                r.kernel_load.raw_value() + 0x200,
                r.setup_header,
                r.kernel_end,
            )
        }
    };

    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(Error::CmdlineTooLong);
    }
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE))
        .map_err(Error::Write)?;

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, mem_size, initrd, kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let e820 = e820_map(mem_size);
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = rsdp;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(Error::Write)?;
    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(Entry { rip })
}

/// Puts the initrd at the top of low RAM, page-aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), Error> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|source| Error::Open {
        path: name.clone(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| Error::Open {
            path: name.clone(),
            source,
        })?
        .len();
    let top = mem_size.min(MMIO_GAP_START);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let Some(addr) = addr.filter(|a| *a >= kernel_end.max(HIGH_MEMORY)) else {
        return Err(Error::InitrdTooBig { path: name, size });
    };
    let mut data = Vec::with_capacity(size as usize);
    f.read_to_end(&mut data)
        .map_err(|source| Error::Open { path: name, source })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(Error::Write)?;
    Ok((addr, size))
}

/// E820 type of usable RAM, and of reserved ranges.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map: low RAM up to the EBDA, RAM from 1 MiB to the MMIO gap (or the end), the
/// rest above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    map.push((HIGH_MEMORY, low_end - HIGH_MEMORY, E820_RAM));
    if mem_size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_obj(PDPT | 0x03, GuestAddress(PML4))
        .map_err(Error::Write)?;
    for i in 0..4u64 {
        mem.write_obj((PD + i * 0x1000) | 0x03, GuestAddress(PDPT + i * 8))
            .map_err(Error::Write)?;
    }
    for i in 0..2048u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
            .map_err(Error::Write)?;
    }
    Ok(())
}

/// GDT entries: null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT + 8 * i as u64))
            .map_err(Error::Write)?;
    }
    Ok(())
}
