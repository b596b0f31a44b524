//! Guest memory: memfd-backed and mapped shared, so vhost-user backends can map it too. The
//! memfd is sealed at its size once it has it ([`SEALS`]): a backend cannot shrink it under
//! the guest.
//!
//! The mapping is advised for transparent huge pages (`MADV_HUGEPAGE`). Shared memory gets
//! them only where the host allows it (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`
//! set to `advise`, `within_size` or `always`; Linux's default is `never`). Where it does,
//! KVM maps the guest's memory 2 MiB at a time instead of 4 KiB, 512 times fewer nested page
//! faults: that is most of what a guest spends unpacking its initramfs, several seconds of a
//! boot where exits are slow (as in the emulated host of the full-boot tests).
//! [`huge_pages_for_shared_memory`] says whether the host allows it.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::sys;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create the guest memory file (memfd)")]
    Memfd(#[source] std::io::Error),
    #[error("Cannot size the guest memory file to {0} bytes")]
    Size(u64, #[source] std::io::Error),
    #[error("Cannot seal the guest memory file")]
    Seal(#[source] std::io::Error),
    #[error("Cannot map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::MmapRegionError),
    #[error("Invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// Seals on the guest memory file once it is sized. The file goes to every vhost-user backend:
/// no holder of it can shrink it (which would take pages from under the guest's mapping, and
/// the next access to them a SIGBUS in vmm or the backend) or grow it (the size is the
/// guest's), nor change these seals (e.g. add `F_SEAL_FUTURE_WRITE`, which would stop the next
/// backend from mapping it writable). Writes and writable mappings stay allowed.
pub const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

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

/// Creates `size` bytes of guest memory in one memfd, mapped shared. The memfd is sealed at
/// that size ([`SEALS`]).
pub fn create(size: u64) -> Result<(GuestMemoryMmap, File), Error> {
    let file = sys::memfd_create_sealable(c"vmm-guest-ram").map_err(Error::Memfd)?;
    file.set_len(size).map_err(|e| Error::Size(size, e))?;
    sys::add_seals(&file, SEALS).map_err(Error::Seal)?;
    let mut regions = Vec::new();
    let mut offset = 0;
    for (addr, len) in ram_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(Error::Memfd)?, offset);
        let map = MmapRegion::from_file(fo, len as usize).map_err(|e| Error::Map(len, e))?;
        // A kernel without THP refuses it: no harm.
        let _ = sys::advise_huge_pages(map.as_ptr(), map.size());
        regions.push(GuestRegionMmap::new(map, addr).ok_or(Error::Map(
            len,
            vm_memory::mmap::MmapRegionError::InvalidPointer,
        ))?);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(Error::Layout)?;
    Ok((mem, file))
}

/// What the host's `shmem_enabled` setting makes of the `MADV_HUGEPAGE` on guest memory:
/// `Ok(true)` when it gets huge pages, `Ok(false)` when it does not, `Err` when the host has
/// no transparent huge pages at all.
pub fn huge_pages_for_shared_memory() -> Result<bool, String> {
    const SETTING: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let text = std::fs::read_to_string(SETTING).map_err(|e| format!("{SETTING}: {e}"))?;
    Ok(selected_setting(&text)
        .is_some_and(|s| ["advise", "within_size", "always", "force"].contains(&s)))
}

/// The bracketed word of a sysfs choice list: "always [never] advise" -> "never".
fn selected_setting(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_memory_file_refuses_to_shrink_or_grow() {
        let size = 16 << 20;
        let (_mem, file) = create(size).unwrap();
        // A backend holding the fd could otherwise cut pages from under the guest's mapping.
        let e = file.set_len(size / 2).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        let e = file.set_len(size * 2).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        assert_eq!(file.metadata().unwrap().len(), size);
        assert_eq!(sys::seals(&file).unwrap(), SEALS);
    }

    #[test]
    fn reads_the_selected_word_of_a_sysfs_choice_list() {
        assert_eq!(
            selected_setting("always within_size advise [never] deny force\n"),
            Some("never")
        );
        assert_eq!(selected_setting("[advise] never"), Some("advise"));
        assert_eq!(selected_setting("always never"), None);
    }
}
