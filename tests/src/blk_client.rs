//! A vhost-user-blk client on the `blkio` crate (libblkio's virtio-blk-vhost-user driver,
//! written by the QEMU authors), so a volume is checked by a client we did not write: one
//! memory region for buffers, one request at a time per call, completions awaited with a
//! timeout.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A vhost-user-blk client on the blkio crate, with one memory region for buffers.
pub struct BlkClient {
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

/// Size of the client's buffer region.
pub const REGION_LEN: usize = 32 << 20;

impl BlkClient {
    pub fn connect(socket: &Path, num_queues: i32) -> blkio::Result<Self> {
        Self::connect_with(socket, num_queues, 256)
    }

    pub fn connect_with(socket: &Path, num_queues: i32, queue_size: i32) -> blkio::Result<Self> {
        Self::connect_opts(socket, num_queues, queue_size, false)
    }

    /// Connects as a read-only client (libblkio refuses a read-write client on a read-only
    /// device).
    pub fn connect_read_only(socket: &Path) -> blkio::Result<Self> {
        Self::connect_opts(socket, 1, 256, true)
    }

    fn connect_opts(
        socket: &Path,
        num_queues: i32,
        queue_size: i32,
        read_only: bool,
    ) -> blkio::Result<Self> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().expect("utf-8 path"))?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        b.set_i32("queue-size", queue_size)?;
        let outcome = b.start()?;
        let region = b.alloc_mem_region(REGION_LEN)?;
        b.map_mem_region(&region)?;
        Ok(BlkClient {
            queues: outcome.queues,
            region,
            blkio: b,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.get_u64("capacity")
    }

    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
    }

    pub fn get_bool(&self, name: &str) -> bool {
        self.blkio.get_bool(name).expect(name)
    }

    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio.get_i32(name).expect(name)
    }

    /// Pointer into the buffer region at `offset`.
    pub fn buf(&mut self, offset: usize) -> *mut u8 {
        assert!(offset < REGION_LEN);
        (self.region.addr + offset) as *mut u8
    }

    /// The buffer region as a slice.
    pub fn region(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped read-write for REGION_LEN bytes while self lives, and
        // &mut self keeps other users (requests) from running concurrently in this process.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, REGION_LEN) }
    }

    /// Waits for `n` completions on queue `q`; returns their results (`ret`, 0 = success).
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let mut timeout = Duration::from_secs(30);
            let k = self.queues[q]
                .do_io(&mut comps[..n - got.len()], 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(k > 0, "no completion within 30 s");
            for c in &comps[..k] {
                // SAFETY: do_io initialised the first k completions.
                let c = unsafe { c.assume_init_ref() };
                got.push((c.user_data, c.ret));
            }
        }
        got
    }

    fn one(&mut self, q: usize) -> i32 {
        self.wait(q, 1)[0].1
    }

    /// Writes `data` at byte `offset` through queue `q`; returns the completion's `ret`.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.region()[..data.len()].copy_from_slice(data);
        let buf = self.buf(0);
        self.queues[q].write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.one(q)
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.region()[..len].fill(0xee);
        let buf = self.buf(0);
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        match self.one(q) {
            0 => Ok(self.region()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.one(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.one(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.one(q)
    }
}

/// Connects, retrying while the socket is still being set up or was just released.
pub fn connect_retry(socket: &Path, num_queues: i32) -> BlkClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match BlkClient::connect(socket, num_queues) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to {}: {e:?}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
