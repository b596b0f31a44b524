//! Backing storage of a volume: a file in the data dir or a block device, opened for the
//! io_uring data path.
//!
//! O_DIRECT is used where the file system allows it; the smallest alignment it needs is probed
//! with real reads, so the block size offered to the guest is one direct I/O accepts. Block
//! devices are opened with O_EXCL: a device that is mounted, part of a device-mapper or RAID
//! device, or opened exclusively elsewhere (another volume on it, on its disk or on one of its
//! partitions) is refused as busy instead of being written under its other user.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors opening, creating or resizing backing storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create backing file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open backing storage {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotBlockOrFile { path: PathBuf },
    #[error("Block device {path} is in use: mounted, held by the kernel (device-mapper, RAID) or opened exclusively by another program or volume")]
    DeviceBusy { path: PathBuf },
    #[error("Cannot size {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Device(#[from] crate::blockdev::Error),
    #[error("Block device {path} holds {actual} bytes, less than the {wanted} bytes asked for")]
    DeviceTooSmall {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
}

/// An open backing file or device.
#[derive(Debug)]
pub struct BackingStore {
    pub path: PathBuf,
    pub file: File,
    pub is_device: bool,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Alignment (offset, length and memory) that direct I/O needs; 512 when buffered.
    pub align: u32,
}

/// A zeroed, aligned heap buffer for probes and bounce buffers.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two); `len` 0 is rounded up.
    /// None if the memory cannot be had.
    pub fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return None;
        }
        Some(AlignedBuf { ptr, layout })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout in new() and is freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Creates a backing file of `size` bytes: sparse, or fully allocated with `preallocate`.
pub fn create_file(path: &Path, size: u64, preallocate: bool) -> Result<(), Error> {
    let err = |source| Error::Create {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let result = if preallocate {
        fallocate(&file, 0, 0, size)
    } else {
        file.set_len(size)
    };
    if let Err(e) = result.and_then(|()| file.sync_all()) {
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(())
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `_IOR(0x12, 114, u64)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size of a block device in bytes.
fn device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

impl BackingStore {
    /// Opens backing storage read-write (or read-only), with O_DIRECT if `direct` and the file
    /// system accepts it. `size` is the volume size: a device must hold at least that much.
    pub fn open(path: &Path, size: u64, read_only: bool, direct: bool) -> Result<Self, Error> {
        let open_err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let is_device = meta.file_type().is_block_device();
        if !is_device && !meta.is_file() {
            return Err(Error::NotBlockOrFile {
                path: path.to_owned(),
            });
        }
        // O_EXCL without O_CREAT on a block device: an exclusive claim, EBUSY if taken.
        let exclusive = if is_device { libc::O_EXCL } else { 0 };
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags | exclusive | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EBUSY) if is_device => Error::DeviceBusy {
                        path: path.to_owned(),
                    },
                    _ => open_err(e),
                })
        };
        let mut store = None;
        if direct {
            match open(libc::O_DIRECT) {
                Ok(file) => match probe_direct_alignment(&file) {
                    Some(align) => {
                        store = Some(BackingStore {
                            path: path.to_owned(),
                            file,
                            is_device,
                            direct: true,
                            align,
                        })
                    }
                    None => tracing::warn!(
                        path = %path.display(),
                        "direct I/O reads fail on this file system; using buffered I/O"
                    ),
                },
                Err(Error::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        path = %path.display(),
                        "file system refuses O_DIRECT; using buffered I/O"
                    )
                }
                Err(e) => return Err(e),
            }
        }
        let store = match store {
            Some(s) => s,
            None => BackingStore {
                path: path.to_owned(),
                file: open(0)?,
                is_device,
                direct: false,
                align: 512,
            },
        };
        if is_device {
            let actual = device_size(&store.file).map_err(|source| Error::Size {
                path: path.to_owned(),
                source,
            })?;
            if actual < size {
                return Err(Error::DeviceTooSmall {
                    path: path.to_owned(),
                    actual,
                    wanted: size,
                });
            }
        }
        Ok(store)
    }

    /// Checks that an open device is the one its volume recorded (see [`crate::blockdev`]).
    pub fn check_identity(&self, recorded: &crate::blockdev::DeviceIdentity) -> Result<(), Error> {
        Ok(crate::blockdev::check_identity(
            &self.file, &self.path, recorded,
        )?)
    }

    /// Grows a backing file to `size` bytes (devices: checks they hold that much).
    pub fn grow(&self, size: u64, preallocate: bool) -> Result<(), Error> {
        let err = |source| Error::Size {
            path: self.path.clone(),
            source,
        };
        if self.is_device {
            let actual = device_size(&self.file).map_err(err)?;
            if actual < size {
                return Err(Error::DeviceTooSmall {
                    path: self.path.clone(),
                    actual,
                    wanted: size,
                });
            }
            return Ok(());
        }
        let current = self.file.metadata().map_err(err)?.len();
        if size > current {
            if preallocate {
                fallocate(&self.file, 0, current, size - current).map_err(err)?;
            } else {
                self.file.set_len(size).map_err(err)?;
            }
            self.file.sync_all().map_err(err)?;
        }
        Ok(())
    }
}

/// Finds the smallest alignment (512 or 4096) that direct reads accept, or None if neither does.
fn probe_direct_alignment(file: &File) -> Option<u32> {
    let mut buf = AlignedBuf::new(8192, 4096)?;
    for align in [512usize, 4096] {
        // A buffer aligned to `align` but, for 512, deliberately not to 4096.
        // SAFETY: offset `align` + `align` bytes stays inside the 8192-byte buffer.
        let ptr = unsafe { buf.as_mut_ptr().add(align) };
        // SAFETY: ptr points to `align` writable bytes owned by buf.
        let rc = unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), align, 0) };
        if rc >= 0 {
            return Some(align as u32);
        }
    }
    None
}

/// Punches a hole (deallocates, reads back zeros) in a file or discards on a device.
pub const FALLOC_PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Zeroes a range, keeping it allocated.
pub const FALLOC_ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// Allocates a range (holes in it then read as zeros), keeping the size.
pub const FALLOC_ALLOCATE: i32 = libc::FALLOC_FL_KEEP_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_and_preallocated_files_of_the_right_size() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("s.img");
        create_file(&sparse, 64 << 20, false).unwrap();
        let m = std::fs::metadata(&sparse).unwrap();
        assert_eq!(m.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            m.blocks() * 512 < 1 << 20,
            "sparse file allocated {}",
            m.blocks()
        );
        let full = dir.path().join("f.img");
        create_file(&full, 8 << 20, true).unwrap();
        assert!(std::fs::metadata(&full).unwrap().blocks() * 512 >= 8 << 20);
        assert!(
            create_file(&full, 4096, false).is_err(),
            "overwrote an existing file"
        );
    }

    #[test]
    fn opens_with_direct_io_and_grows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        create_file(&p, 1 << 20, false).unwrap();
        let s = BackingStore::open(&p, 1 << 20, false, true).unwrap();
        assert!(s.align == 512 || s.align == 4096);
        s.grow(2 << 20, false).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
    }

    #[test]
    fn refuses_directories() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            BackingStore::open(dir.path(), 0, false, true),
            Err(Error::NotBlockOrFile { .. })
        ));
    }
}
