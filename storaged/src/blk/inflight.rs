//! The requests of one queue between submission and completion: what each owns while the
//! kernel may use it, and the table that holds them by slot.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddress;

use super::queue::GuestMem;
use super::request::{GuestRange, Operation};
use crate::backing::AlignedBuf;

/// A request between submission and completion.
pub struct InFlight {
    pub head: u16,
    pub status: GuestAddress,
    pub op: Operation,
    /// Keeps the guest mapping alive while the kernel may still access it.
    pub mem: Arc<GuestMem>,
    pub iovecs: Vec<libc::iovec>,
    /// Guest ranges of the data, for bounce copies and GET_ID.
    pub data: Vec<GuestRange>,
    pub bounce: Option<AlignedBuf>,
    /// Guest memory an encrypted read's data is decrypted into straight from the bounce buffer
    /// (the guest buffer is one piece of host memory); otherwise it is decrypted in place and
    /// copied.
    pub decrypt_into: Option<*mut u8>,
    /// Byte offset on the backing storage where the next resubmission of a short transfer
    /// starts, and bytes still to transfer.
    pub offset: u64,
    pub remaining: u64,
    /// SQEs not yet completed (discard and write-zeroes have one per range).
    pub parts: u32,
    pub failed: bool,
    pub started: Instant,
}

// SAFETY: the raw pointers in `iovecs` point into `mem` or `bounce`, both owned by the
// InFlight; the struct moves between threads only as a whole, under its queue's mutex.
unsafe impl Send for InFlight {}

/// The in-flight requests of one queue, by slot. A slot's number is the low half of its SQEs'
/// user data ([`user_data`]).
#[derive(Default)]
pub struct InFlightTable {
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
}

impl InFlightTable {
    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts a request in a free slot; returns the slot.
    pub fn insert(&mut self, inflight: InFlight) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(inflight);
                i
            }
            None => {
                self.slots.push(Some(inflight));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub fn get(&self, slot: u32) -> Option<&InFlight> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut InFlight> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Takes a completed request out of its slot, which becomes free.
    pub fn remove(&mut self, slot: u32) -> Option<InFlight> {
        let inflight = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        Some(inflight)
    }

    /// Forgets every request without freeing what it owns: the kernel may still write into
    /// its buffers (the ring failed and nothing can be reaped any more).
    pub fn leak_all(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(inflight) = slot.take() {
                std::mem::forget(inflight);
            }
        }
        self.free = (0..self.slots.len() as u32).collect();
    }
}

/// A write-zeroes SQE's part number holds the range's index in its low bits and, above, which
/// step of zeroing it is: the request's own, the hole punched where ZERO_RANGE is not
/// supported, or (preallocated files) the range allocated again after that punch.
pub const ZEROES_PART: u32 = 0xffff;
pub const ZEROES_OWN: u32 = 0;
pub const ZEROES_PUNCHED: u32 = 1 << 16;
pub const ZEROES_REALLOCATED: u32 = 2 << 16;

pub fn user_data(slot: u32, part: u32) -> u64 {
    (u64::from(part) << 32) | u64::from(slot)
}

/// Drops the first `n` bytes from an iovec array.
pub fn advance_iovecs(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop_count = 0;
    for v in iovecs.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop_count += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
    }
    iovecs.drain(..drop_count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_iovecs_skips_whole_and_partial_buffers() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut v = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        advance_iovecs(&mut v, 11);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 5);
        assert_eq!(v[0].iov_base as usize, b.as_ptr() as usize + 3);
    }
}
