//! Guest memory: memfd-backed and mapped shared, so vhost-user backends can map it too.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create the guest memory file (memfd)")]
    Memfd(#[source] std::io::Error),
    #[error("Cannot size the guest memory file to {0} bytes")]
    Size(u64, #[source] std::io::Error),
    #[error("Cannot map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::MmapRegionError),
    #[error("Invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// The RAM ranges of a guest of `size` bytes: below the MMIO gap, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Creates `size` bytes of guest memory in one memfd, mapped shared.
pub fn create(size: u64) -> Result<(GuestMemoryMmap, File), Error> {
    // SAFETY: the name is a NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::Size(size, e))?;
    let mut regions = Vec::new();
    let mut offset = 0;
    for (addr, len) in ram_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(Error::Memfd)?, offset);
        let map = MmapRegion::from_file(fo, len as usize).map_err(|e| Error::Map(len, e))?;
        regions.push(GuestRegionMmap::new(map, addr).ok_or(Error::Map(
            len,
            vm_memory::mmap::MmapRegionError::InvalidPointer,
        ))?);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(Error::Layout)?;
    Ok((mem, file))
}
