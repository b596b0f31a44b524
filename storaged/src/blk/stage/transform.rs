//! The transform stage: an encrypted volume's data is encrypted on its way to the backing
//! storage and decrypted on its way back (XTS-AES-256 per 4096-byte unit, [`crate::crypto`]),
//! through the request's bounce buffer. A plain volume's bounce buffer (misaligned or too
//! fragmented guest buffers under direct I/O) is filled and emptied the same way, as a copy.

use crate::blk::queue::GuestMem;
use crate::blk::request::{self, GuestRange};
use crate::blk::VolumeIo;
use crate::crypto::Xts;

/// The transform of one volume: XTS with its key, or none.
pub struct Transform<'a> {
    xts: Option<&'a Xts>,
}

impl<'a> Transform<'a> {
    pub fn of(volume: &'a VolumeIo) -> Self {
        Transform {
            xts: volume.crypt.as_ref(),
        }
    }

    /// Whether data is transformed (the volume is encrypted): every transfer then goes
    /// through a bounce buffer.
    pub fn active(&self) -> bool {
        self.xts.is_some()
    }

    /// Fills a write's bounce buffer `dst` from guest memory: encrypted from unit `first` on
    /// an encrypted volume, copied otherwise. False if guest memory is not mapped.
    ///
    /// # Safety
    ///
    /// `contiguous`, if given, points to `dst.len()` bytes of mapped guest memory (the whole of
    /// the write's data, in one piece) that stay mapped during the call.
    pub unsafe fn fill(
        &self,
        mem: &GuestMem,
        data: &[GuestRange],
        contiguous: Option<*const u8>,
        dst: &mut [u8],
        first: u64,
    ) -> bool {
        match (self.xts, contiguous) {
            // One pass over the data instead of two.
            // SAFETY: `src` is `dst.len()` bytes of mapped guest memory (this fn's contract).
            (Some(xts), Some(src)) => unsafe { xts.encrypt_units_from(src, dst, first) },
            (Some(xts), None) => {
                if request::gather(mem, data, dst).is_err() {
                    return false;
                }
                xts.encrypt_units(dst, first);
            }
            (None, _) => {
                if request::gather(mem, data, dst).is_err() {
                    return false;
                }
            }
        }
        true
    }

    /// Empties a read's bounce buffer `src` into guest memory: decrypted from unit `first` on
    /// an encrypted volume (straight into the guest's buffer when it is one piece,
    /// `contiguous`), copied otherwise. False if guest memory is not mapped.
    ///
    /// # Safety
    ///
    /// `contiguous`, if given, points to `src.len()` bytes of mapped guest memory (the whole of
    /// the read's data, in one piece) that stay mapped during the call.
    pub unsafe fn empty(
        &self,
        mem: &GuestMem,
        data: &[GuestRange],
        contiguous: Option<*mut u8>,
        src: &mut [u8],
        first: u64,
    ) -> bool {
        if let (Some(xts), Some(dst)) = (self.xts, contiguous) {
            // SAFETY: `dst` is `src.len()` bytes of mapped guest memory (this fn's contract).
            unsafe { xts.decrypt_units_into(src, dst, first) };
            return true;
        }
        if let Some(xts) = self.xts {
            xts.decrypt_units(src, first);
        }
        copy_to_guest(mem, data, src)
    }
}

/// Copies `src` into the guest ranges, in order.
pub fn copy_to_guest(mem: &GuestMem, ranges: &[GuestRange], mut src: &[u8]) -> bool {
    use vm_memory::Bytes;
    for r in ranges {
        if src.is_empty() {
            break;
        }
        let n = src.len().min(r.len as usize);
        if mem.write_slice(&src[..n], r.addr).is_err() {
            return false;
        }
        src = &src[n..];
    }
    true
}
