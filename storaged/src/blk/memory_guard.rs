//! Containment of a frontend that shrinks its guest memory file under the daemon's mapping.
//!
//! The daemon maps each frontend's memory regions from the files the frontend passes. Reading
//! or writing a mapped page that lies past the end of its file raises SIGBUS, whose default
//! action ends the process: every tenant's disks with it. Two defences:
//!
//! - At SET_MEM_TABLE and ADD_MEM_REG ([`MemoryGuard::admit`]) each region is checked against
//!   its file's size; a table with a region that extends past the end is refused, and the
//!   connection keeps no memory.
//! - A file can still be shrunk later unless it is sealed (`F_SEAL_SHRINK`; vmm seals its
//!   memfd, libblkio and some QEMU set-ups do not). A process-wide SIGBUS handler
//!   ([`install`]) catches a fault on a page past the end of its file (`BUS_ADRERR`) and maps
//!   private anonymous memory over that one page (4 KiB; where the mapping is of huge pages,
//!   which cannot be split, the 2 MiB or 1 GiB page around it), so the access completes,
//!   reading zeros, and the daemon goes on. The handler touches nothing but the faulting page
//!   and a counter: it needs no table of mappings, so nothing a connection does to its
//!   memory table can make it act on memory that is not the faulting one's. Each connection
//!   notices the count change at its next event ([`MemoryGuard::check`]); the one whose file
//!   is now too short logs it and is disconnected. Its requests in flight finish on the
//!   anonymous pages; io_uring's own accesses to pages past the end fail with EFAULT,
//!   answered IOERR.
//!
//! Only files frontends pass are mapped from files others can shrink, so a BUS_ADRERR is
//! taken to be one of theirs. (A program file truncated under the running daemon would fault
//! the same way; its page then reads zeros, which ends the daemon as surely.) A SIGBUS of any
//! other kind, or one whose page cannot be replaced, goes to the handler that was there before
//! (Rust's stack-overflow reporter), and from there to the default action.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::queue::GuestMem;

/// Errors of the memory guard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot install the SIGBUS handler")]
    Install(#[source] std::io::Error),
    #[error(
        "Memory region at guest address {gpa:#x} ({len} bytes from file offset {offset}) \
         extends past the end of its file ({file_len} bytes)"
    )]
    PastEndOfFile {
        gpa: u64,
        len: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("Cannot check the file of the memory region at guest address {gpa:#x}")]
    Stat {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Faults the handler contained, since start.
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// The SIGBUS disposition before [`install`].
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The page size, read at [`install`] (sysconf is not async-signal-safe).
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);

/// Huge page sizes a mapping may use (x86-64), tried when a base page cannot be replaced.
const HUGE_PAGES: [usize; 2] = [2 << 20, 1 << 30];

/// Installs the SIGBUS handler (once per process; later calls do nothing).
pub fn install() -> Result<(), Error> {
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    // SAFETY: sysconf only reads a system constant.
    if let Ok(page) = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }) {
        if page.is_power_of_two() {
            PAGE_SIZE.store(page, Ordering::Release);
        }
    }
    // SAFETY: zeroed sigaction structs are valid (empty mask, no flags); the handler is an
    // extern "C" fn with the SA_SIGINFO signature and stays valid for the process's life.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        // The previous disposition is recorded before the handler can run.
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
            return Err(Error::Install(std::io::Error::last_os_error()));
        }
        let _ = PREVIOUS.set(previous);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            return Err(Error::Install(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Faults contained since start.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// The SIGBUS handler. Only async-signal-safe work: atomics, mmap, sigaction.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is this thread's; it is restored before returning to the interrupted code.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR && contain(addr) {
        FAULTS.fetch_add(1, Ordering::AcqRel);
    } else {
        chain(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Maps anonymous memory over the page holding `addr`: a base page, or the huge page around
/// it where the mapping cannot be split at base pages. False if none can be replaced.
fn contain(addr: usize) -> bool {
    let base = PAGE_SIZE.load(Ordering::Acquire);
    std::iter::once(base)
        .chain(HUGE_PAGES)
        .any(|page| replace(addr & !(page - 1), page))
}

/// Replaces `[start, start + len)`, the page that faulted, by private anonymous memory.
fn replace(start: usize, len: usize) -> bool {
    // SAFETY: the range is the page (of the mapping's page size) holding an address this
    // thread just faulted on as past the end of its file: a frontend's memory, which is only
    // ever accessed as guest memory. Replacing it keeps it mapped, so no access becomes one
    // to unmapped memory; a range that is not one whole page of that mapping is refused by
    // the kernel (EINVAL) and nothing changes.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    p as usize == start
}

/// Passes a fault this guard does not handle on to the disposition it replaced.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS.get().map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    let siginfo = PREVIOUS
        .get()
        .is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
        // Back to the default action: the faulting instruction runs again and ends the process,
        // as if no handler had been there.
        // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask; sigaction is
        // async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        return;
    }
    if siginfo {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(previous) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO has the one-argument signature.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
        f(sig);
    }
}

/// One region of a connection's memory, as admitted.
struct Admitted {
    gpa: u64,
    len: u64,
    file: Option<(Arc<File>, u64)>,
}

/// The guest memory regions of one frontend connection and the files they are mapped from.
#[derive(Default)]
pub struct MemoryGuard {
    regions: Vec<Admitted>,
}

impl MemoryGuard {
    /// Checks a new memory table against its files; on success its regions are the ones
    /// [`MemoryGuard::check`] looks at. On failure nothing is kept.
    pub fn admit(&mut self, mem: &GuestMem) -> Result<(), Error> {
        self.regions.clear();
        let mut admitted = Vec::with_capacity(mem.num_regions());
        for r in mem.iter() {
            let gpa = r.start_addr().0;
            let len = r.len();
            let file = r.file_offset().map(|fo| (fo.arc().clone(), fo.start()));
            if let Some((file, offset)) = &file {
                check_file(file, *offset, gpa, len)?;
            }
            admitted.push(Admitted { gpa, len, file });
        }
        self.regions = admitted;
        Ok(())
    }

    /// After a contained fault anywhere in the daemon ([`faults`] changed): the first region
    /// of this connection whose file is now too short for it.
    pub fn check(&self) -> Option<Error> {
        self.regions.iter().find_map(|a| {
            let (file, offset) = a.file.as_ref()?;
            check_file(file, *offset, a.gpa, a.len).err()
        })
    }
}

/// A region of `len` bytes from `offset` of a regular file must lie inside the file.
fn check_file(file: &File, offset: u64, gpa: u64, len: u64) -> Result<(), Error> {
    let meta = file
        .metadata()
        .map_err(|source| Error::Stat { gpa, source })?;
    if !meta.file_type().is_file() {
        return Ok(());
    }
    let file_len = meta.len();
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(Error::PastEndOfFile {
            gpa,
            len,
            offset,
            file_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

    fn memory_on_file(len: usize) -> (GuestMem, File) {
        let file = tempfile::tempfile().unwrap();
        file.set_len(len as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        (mem, file)
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let (mem, file) = memory_on_file(1 << 20);
        file.set_len(4096).unwrap();
        let err = MemoryGuard::default().admit(&mem).unwrap_err();
        assert!(
            matches!(err, Error::PastEndOfFile { file_len: 4096, .. }),
            "{err}"
        );
    }

    #[test]
    fn accesses_after_the_file_shrank_are_contained_and_reported() {
        install().unwrap();
        let (mem, file) = memory_on_file(1 << 20);
        let mut guard = MemoryGuard::default();
        guard.admit(&mem).unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x2000))
            .unwrap();
        assert!(guard.check().is_none());
        let before = faults();
        file.set_len(0).unwrap();
        // Without the guard this read would end the test process with SIGBUS.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0);
        mem.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        assert!(faults() > before);
        assert!(matches!(guard.check(), Some(Error::PastEndOfFile { .. })));

        // A mapping the guard was never told about is contained page by page.
        let (other, other_file) = memory_on_file(1 << 20);
        other_file.set_len(0).unwrap();
        assert_eq!(other.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0);
    }
}
