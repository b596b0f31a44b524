//! Bounce buffers of one queue: aligned buffers for what direct I/O cannot take straight from
//! guest memory (misaligned buffers, too many segments) and for every encrypted transfer, kept
//! for reuse and bounded in the bytes a queue holds at once.

use crate::backing::AlignedBuf;

/// Bounce-buffer bytes one queue may have in flight; a request beyond it waits for completions
/// rather than let a guest make the daemon allocate without bound.
pub const BUDGET: usize = 64 << 20;

/// Bounce buffers a queue keeps for reuse, and the largest it keeps (bigger ones are rare).
const POOL_BUFFERS: usize = 256;
const POOL_MAX_LEN: usize = 128 << 10;

/// The bounce buffers of one queue: those held by requests in flight (counted) and those kept
/// for reuse. Allocating and zeroing one per request of an encrypted volume costs more than
/// encrypting its data.
#[derive(Default)]
pub struct BouncePool {
    pool: Vec<AlignedBuf>,
    /// Bytes of the buffers handed out and not given back.
    held: usize,
}

impl BouncePool {
    /// Bytes held by requests in flight.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether `len` more bytes held would exceed the budget.
    pub fn over_budget(&self, len: usize) -> bool {
        self.held + len > BUDGET
    }

    /// A buffer of `len` bytes aligned to `align`: a recycled one if there is one of that size.
    pub fn take(&mut self, len: usize, align: usize) -> Option<AlignedBuf> {
        match self.pool.iter().rposition(|b| b.len() == len) {
            Some(i) => Some(self.pool.swap_remove(i)),
            None => AlignedBuf::new(len, align),
        }
    }

    /// Keeps a buffer whose request is answered (the kernel is done with it) for reuse.
    pub fn recycle(&mut self, buf: AlignedBuf) {
        if self.pool.len() < POOL_BUFFERS && buf.len() <= POOL_MAX_LEN {
            self.pool.push(buf);
        }
    }

    /// Counts `len` bytes as held by a request in flight.
    pub fn charge(&mut self, len: usize) {
        self.held += len;
    }

    /// Counts `len` bytes as no longer held (their request completed).
    pub fn discharge(&mut self, len: usize) {
        self.held -= len;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn buffers_are_counted_while_held_and_reused_when_recycled() {
        let mut pool = BouncePool::default();
        let mut a = pool.take(4096, 4096).unwrap();
        pool.charge(a.len());
        assert_eq!(pool.held(), 4096);
        assert!(!pool.over_budget(BUDGET - 4096));
        assert!(pool.over_budget(BUDGET - 4095));
        let ptr = a.as_mut_ptr();
        pool.discharge(a.len());
        pool.recycle(a);
        assert_eq!(pool.held(), 0);
        assert_eq!(pool.take(4096, 4096).unwrap().as_mut_ptr(), ptr);
    }
}
