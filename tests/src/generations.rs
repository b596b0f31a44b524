//! A workload of generations over a set of blocks, and the check that an image of the volume
//! (a replication secondary's, a copy after a crash) is one consistent point of it.
//!
//! The workload ([`GenerationWriter`]): generation g writes every block of a [`Layout`] (4 KiB
//! each, spread over the volume's 1 MiB regions, a few to a region), each stamped with a header
//! (magic, g, the block's index, a CRC32C of the whole block) and a body derived from (g,
//! index), with up to a queue depth of writes in flight; when all have completed it sends a
//! FLUSH, and when that completes it records g with the time (Unix seconds), then goes on with
//! g + 1 over the same blocks. Generation 0 is the volume as created: zeros.
//!
//! What it leaves at any instant t: every block of the last generation whose FLUSH had
//! completed by t, some of them already at the next one (its writes were in flight at t), none
//! older, none newer, none torn. So a consistent image (the volume as a power cut at some t
//! would have left it: see docs/ARCHITECTURE.md, "What consistent means") has every block at g
//! or g + 1 for some g, each block whole: [`check_image`]. And an image said to be the volume
//! as of `consistent_at` holds every generation whose FLUSH completed before that time and no
//! generation whose first write started after it: [`Image::check_time`] (the times are the
//! writer's and the primary's clocks: the same host's, with a slack for the moments between
//! a clock read and the lock it is taken for). Against a recovery point objective: every
//! generation flushed more than `rpo_seconds` before the image was taken (its primary
//! killed) is in it, [`Image::check_recency`].
//!
//! Everything [`check_image`] reads comes from the storage under test: it answers a wrong
//! block with a [`CheckError`] naming it, never a panic.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};

use crate::BlkClient;

/// The size of a block of the workload.
pub const BLOCK: usize = 4096;

/// The size of a region of a replicated volume's dirty map.
pub const REGION: u64 = 1 << 20;

/// The first bytes of every stamped block.
const MAGIC: &[u8; 8] = b"STGGEN01";

/// Where the header's fields are.
const GENERATION_AT: usize = 8;
const INDEX_AT: usize = 16;
const CRC_AT: usize = 24;
const BODY_AT: usize = 32;

/// How many of the blocks share a region.
const PER_REGION: usize = 4;

/// What can be wrong with an image.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CheckError {
    #[error("Expected {expected} blocks, got {got}")]
    WrongCount { expected: usize, got: usize },
    #[error("Block {index} at offset {offset} is {len} bytes, not {BLOCK}")]
    WrongSize {
        index: usize,
        offset: u64,
        len: usize,
    },
    #[error("Block {index} at offset {offset} is neither zeros nor a block of the workload")]
    Garbage { index: usize, offset: u64 },
    #[error("Block {index} at offset {offset} is torn: its header says generation {generation}, its bytes do not match")]
    Torn {
        index: usize,
        offset: u64,
        generation: u64,
    },
    #[error("Block {index} at offset {offset} holds block {found} of generation {generation}")]
    Misplaced {
        index: usize,
        offset: u64,
        found: u64,
        generation: u64,
    },
    #[error("Not one point of the workload: block {min_index} is at generation {min}, block {max_index} at {max}")]
    Spread {
        min: u64,
        min_index: usize,
        max: u64,
        max_index: usize,
    },
    #[error("Stale: generation {flushed} was flushed at {flushed_at:.6}, before consistent_at {consistent_at:.6}, yet the image is at generation {min}")]
    Stale {
        min: u64,
        flushed: u64,
        flushed_at: f64,
        consistent_at: f64,
    },
    #[error("From the future: the image has generation {max}, whose writes started at {started_at:.6}, after consistent_at {consistent_at:.6}")]
    Future {
        max: u64,
        started_at: f64,
        consistent_at: f64,
    },
    #[error("The image has generation {max}, which the writer never started")]
    NeverWritten { max: u64 },
    #[error("Older than the RPO allows: generation {flushed} was flushed at {flushed_at:.6}, more than {rpo_seconds} s before {taken_at:.6}, yet the image is at generation {min}")]
    TooOld {
        min: u64,
        flushed: u64,
        flushed_at: f64,
        taken_at: f64,
        rpo_seconds: u32,
    },
}

/// Where the blocks of the workload are: offsets in the volume, one per block index.
#[derive(Clone, Debug)]
pub struct Layout {
    offsets: Vec<u64>,
}

impl Layout {
    /// `blocks` blocks over a volume of `size` bytes, four to a 1 MiB region (at different
    /// places in it), the regions spread evenly over the volume. Panics if they do not fit
    /// (a test's choice, not input).
    pub fn spread(size: u64, blocks: usize) -> Layout {
        let regions = blocks.div_ceil(PER_REGION) as u64;
        let in_volume = size / REGION;
        assert!(
            regions > 0 && regions <= in_volume,
            "{blocks} blocks need {regions} regions of 1 MiB; the volume has {in_volume}"
        );
        let stride = in_volume / regions;
        let per_region = REGION / BLOCK as u64;
        let offsets = (0..blocks as u64)
            .map(|i| {
                let region = (i / PER_REGION as u64) * stride;
                // 0, 61, 122, 183: blocks far apart in their region.
                let slot = (i % PER_REGION as u64) * 61 % per_region;
                region * REGION + slot * BLOCK as u64
            })
            .collect();
        Layout { offsets }
    }

    /// Each block's offset, by index.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The 1 MiB regions the blocks are in, in order.
    pub fn regions(&self) -> Vec<u64> {
        let mut r: Vec<u64> = self.offsets.iter().map(|o| o / REGION).collect();
        r.dedup();
        r
    }
}

/// Block `index` of generation `generation`, as the writer writes it.
pub fn stamp(generation: u64, index: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    stamp_into(&mut b, generation, index);
    b
}

fn stamp_into(block: &mut [u8], generation: u64, index: u64) {
    block[..8].copy_from_slice(MAGIC);
    block[GENERATION_AT..INDEX_AT].copy_from_slice(&generation.to_le_bytes());
    block[INDEX_AT..CRC_AT].copy_from_slice(&index.to_le_bytes());
    block[CRC_AT..BODY_AT].fill(0);
    body_into(&mut block[BODY_AT..], generation, index);
    let crc = crc32c::crc32c(block);
    block[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The body of block `index` of `generation`: splitmix64 words from a seed of both.
fn body_into(body: &mut [u8], generation: u64, index: u64) {
    let mut x = generation
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    for word in body.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
    }
}

/// The generation block `index` at `offset` holds: 0 for zeros, else its stamp's, checked
/// whole.
pub fn block_generation(index: usize, offset: u64, block: &[u8]) -> Result<u64, CheckError> {
    if block.len() != BLOCK {
        return Err(CheckError::WrongSize {
            index,
            offset,
            len: block.len(),
        });
    }
    if block.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    if &block[..8] != MAGIC {
        return Err(CheckError::Garbage { index, offset });
    }
    let field = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&block[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let generation = field(GENERATION_AT);
    let found = field(INDEX_AT);
    let mut expect = vec![0u8; BLOCK];
    stamp_into(&mut expect, generation, found);
    if expect != block {
        return Err(CheckError::Torn {
            index,
            offset,
            generation,
        });
    }
    if found != index as u64 {
        return Err(CheckError::Misplaced {
            index,
            offset,
            found,
            generation,
        });
    }
    Ok(generation)
}

/// The generations an image's blocks are at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    /// The lowest: every generation up to it is wholly in the image.
    pub min: u64,
    /// The highest: `min` or `min + 1`.
    pub max: u64,
}

/// Checks an image: `blocks[i]` is what it holds at `layout.offsets()[i]`. Every block whole,
/// and the generations within one of each other.
pub fn check_image(layout: &Layout, blocks: &[Vec<u8>]) -> Result<Image, CheckError> {
    if blocks.len() != layout.len() {
        return Err(CheckError::WrongCount {
            expected: layout.len(),
            got: blocks.len(),
        });
    }
    let mut lo = (u64::MAX, 0);
    let mut hi = (0, 0);
    for (index, (block, &offset)) in blocks.iter().zip(layout.offsets()).enumerate() {
        let g = block_generation(index, offset, block)?;
        if g < lo.0 {
            lo = (g, index);
        }
        if g > hi.0 {
            hi = (g, index);
        }
    }
    if hi.0 > lo.0.saturating_add(1) {
        return Err(CheckError::Spread {
            min: lo.0,
            min_index: lo.1,
            max: hi.0,
            max_index: hi.1,
        });
    }
    Ok(Image {
        min: lo.0.min(hi.0),
        max: hi.0,
    })
}

/// One generation of the workload: when its first write was submitted and when its FLUSH
/// completed (Unix seconds; `None`: not yet, the writer stopped in it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Generation {
    pub generation: u64,
    pub started: f64,
    pub flushed: Option<f64>,
}

impl Image {
    /// Checks the image against the time it is said to be of (`consistent_at`, the primary's
    /// clock), given the writer's record: every generation whose FLUSH completed more than
    /// `slack` seconds before it is in the image (`min` is at least the last of them), and
    /// none whose writes started more than `slack` after it (nor any the writer never
    /// started).
    pub fn check_time(
        &self,
        generations: &[Generation],
        consistent_at: f64,
        slack: f64,
    ) -> Result<(), CheckError> {
        if let Some((g, flushed_at)) = last_flushed_before(generations, consistent_at - slack) {
            if self.min < g {
                return Err(CheckError::Stale {
                    min: self.min,
                    flushed: g,
                    flushed_at,
                    consistent_at,
                });
            }
        }
        if self.max == 0 {
            return Ok(());
        }
        match generations.iter().find(|g| g.generation == self.max) {
            None => Err(CheckError::NeverWritten { max: self.max }),
            Some(g) if g.started > consistent_at + slack => Err(CheckError::Future {
                max: self.max,
                started_at: g.started,
                consistent_at,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Checks that the image misses at most the last `rpo_seconds` of the workload before
    /// `taken_at` (e.g. the moment its primary was killed): every generation whose FLUSH
    /// completed before `taken_at - rpo_seconds` is in it. (Not that its `consistent_at` is
    /// that recent: a volume nobody writes loses nothing however old its last cut is.)
    pub fn check_recency(
        &self,
        generations: &[Generation],
        taken_at: f64,
        rpo_seconds: u32,
    ) -> Result<(), CheckError> {
        let bound = taken_at - f64::from(rpo_seconds);
        match last_flushed_before(generations, bound) {
            Some((g, flushed_at)) if self.min < g => Err(CheckError::TooOld {
                min: self.min,
                flushed: g,
                flushed_at,
                taken_at,
                rpo_seconds,
            }),
            _ => Ok(()),
        }
    }
}

/// The last generation whose FLUSH completed before `t`, and when.
fn last_flushed_before(generations: &[Generation], t: f64) -> Option<(u64, f64)> {
    generations
        .iter()
        .filter_map(|g| g.flushed.filter(|&f| f < t).map(|f| (g.generation, f)))
        .max_by_key(|&(g, _)| g)
}

/// Why the writer stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("Cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: blkio::Error,
    },
    #[error("Waiting for the completions of generation {generation}")]
    Io {
        generation: u64,
        #[source]
        source: blkio::Error,
    },
    #[error("A request of generation {generation} failed: {what}, ret {ret}")]
    Failed {
        generation: u64,
        what: String,
        ret: i32,
    },
    #[error("No completion for {} s in generation {generation}", STALL.as_secs())]
    Stalled { generation: u64 },
}

/// What the writer did: every generation it started, in order (the last perhaps unflushed),
/// and why it ended, if not because it was told to.
#[derive(Debug)]
pub struct WriterReport {
    pub generations: Vec<Generation>,
    pub error: Option<WriterError>,
}

impl WriterReport {
    /// The last generation whose FLUSH completed (0, the volume as created, if none).
    pub fn last_flushed(&self) -> u64 {
        self.generations
            .iter()
            .rev()
            .find(|g| g.flushed.is_some())
            .map_or(0, |g| g.generation)
    }
}

/// How the writer writes.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Writes in flight at once (at least 1).
    pub queue_depth: usize,
    /// A pause after each generation's FLUSH (zero: full speed).
    pub pause: Duration,
    /// The first generation it writes: 1 on a volume as created; the one after the last a
    /// previous writer flushed, to go on with the workload (the two reports' generations
    /// together are then its record).
    pub first_generation: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            queue_depth: 16,
            pause: Duration::ZERO,
            first_generation: 1,
        }
    }
}

/// How long the writer waits for a completion before it takes the daemon for gone.
const STALL: Duration = Duration::from_secs(30);

/// How long a writer told to stop waits for the completions of requests in flight (its
/// daemon may have been killed under it: they never come).
const STOP_GRACE: Duration = Duration::from_secs(1);

/// The workload, on a thread of its own, over a vhost-user-blk socket.
pub struct GenerationWriter {
    stop: Arc<AtomicBool>,
    last_flushed: Arc<AtomicU64>,
    thread: JoinHandle<WriterReport>,
}

impl GenerationWriter {
    /// Starts writing generations `options.first_generation`, the next, ... of `layout` to
    /// the volume at `socket`.
    pub fn start(socket: &Path, layout: Layout, options: WriterOptions) -> GenerationWriter {
        assert!(
            layout.len() * BLOCK <= crate::REGION_LEN,
            "{} blocks do not fit the client's buffers",
            layout.len()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let last_flushed = Arc::new(AtomicU64::new(options.first_generation.saturating_sub(1)));
        let (s, l, path) = (stop.clone(), last_flushed.clone(), socket.to_owned());
        let thread = std::thread::Builder::new()
            .name("generation-writer".into())
            .spawn(move || {
                let mut generations = Vec::new();
                let error = write(&path, &layout, &options, &s, &l, &mut generations).err();
                WriterReport { generations, error }
            })
            .expect("spawn the generation writer");
        GenerationWriter {
            stop,
            last_flushed,
            thread,
        }
    }

    /// The last generation whose FLUSH completed.
    pub fn last_flushed(&self) -> u64 {
        self.last_flushed.load(Ordering::Acquire)
    }

    /// Whether the writer ended (on an error: see [`GenerationWriter::stop`]).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits until generation `generation` is flushed (true), the writer ended or `timeout`
    /// passed (false).
    pub fn wait_flushed(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.last_flushed() < generation {
            if self.is_finished() || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Tells the writer to stop after the generation under way, and returns its report.
    pub fn stop(self) -> WriterReport {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The writer's loop: generations until `stop`, each recorded in `generations`.
fn write(
    socket: &Path,
    layout: &Layout,
    options: &WriterOptions,
    stop: &AtomicBool,
    last_flushed: &AtomicU64,
    generations: &mut Vec<Generation>,
) -> Result<(), WriterError> {
    let mut c = BlkClient::connect(socket, 1).map_err(|source| WriterError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let depth = options.queue_depth.max(1);
    let mut generation = options.first_generation.max(1);
    while !stop.load(Ordering::Acquire) {
        generations.push(Generation {
            generation,
            started: unix_now(),
            flushed: None,
        });
        for (i, block) in c.region()[..layout.len() * BLOCK]
            .chunks_mut(BLOCK)
            .enumerate()
        {
            stamp_into(block, generation, i as u64);
        }
        let mut in_flight = 0;
        for (i, &offset) in layout.offsets().iter().enumerate() {
            if in_flight == depth {
                in_flight -= reap(&mut c, 1, generation, stop)?;
            }
            let buf = c.buf(i * BLOCK);
            c.queues[0].write(offset, buf, BLOCK, i, ReqFlags::empty());
            in_flight += 1;
        }
        while in_flight > 0 {
            in_flight -= reap(&mut c, in_flight, generation, stop)?;
        }
        c.queues[0].flush(usize::MAX, ReqFlags::empty());
        reap(&mut c, 1, generation, stop)?;
        let flushed = unix_now();
        if let Some(g) = generations.last_mut() {
            g.flushed = Some(flushed);
        }
        last_flushed.store(generation, Ordering::Release);
        generation += 1;
        if !options.pause.is_zero() {
            std::thread::sleep(options.pause);
        }
    }
    Ok(())
}

/// Waits for at least one and at most `n` completions on queue 0; returns how many came.
fn reap(
    c: &mut BlkClient,
    n: usize,
    generation: u64,
    stop: &AtomicBool,
) -> Result<usize, WriterError> {
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let since = Instant::now();
    loop {
        let mut timeout = Duration::from_millis(200);
        let k = match c.queues[0].do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(k) => k,
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(source) => return Err(WriterError::Io { generation, source }),
        };
        if k > 0 {
            for comp in &comps[..k] {
                // SAFETY: do_io initialised the first k completions.
                let comp = unsafe { comp.assume_init_ref() };
                if comp.ret != 0 {
                    let what = match comp.user_data {
                        usize::MAX => "the FLUSH".to_string(),
                        i => format!("the write of block {i}"),
                    };
                    return Err(WriterError::Failed {
                        generation,
                        what,
                        ret: comp.ret,
                    });
                }
            }
            return Ok(k);
        }
        let grace = if stop.load(Ordering::Acquire) {
            STOP_GRACE
        } else {
            STALL
        };
        if since.elapsed() > grace {
            return Err(WriterError::Stalled { generation });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::spread(64 << 20, 10)
    }

    fn image(layout: &Layout, gens: &[u64]) -> Vec<Vec<u8>> {
        gens.iter()
            .enumerate()
            .map(|(i, &g)| {
                if g == 0 {
                    vec![0; BLOCK]
                } else {
                    stamp(g, i as u64)
                }
            })
            .take(layout.len())
            .collect()
    }

    #[test]
    fn the_layout_puts_four_blocks_in_each_region_apart_and_spreads_the_regions() {
        let l = layout();
        assert_eq!(l.len(), 10);
        assert_eq!(l.regions(), vec![0, 21, 42]);
        assert_eq!(l.offsets()[1], 61 * 4096);
        let mut sorted = l.offsets().to_vec();
        sorted.dedup();
        assert_eq!(sorted.len(), 10, "no two blocks at one place");
        assert!(l.offsets().iter().all(|o| o + BLOCK as u64 <= 64 << 20));
    }

    #[test]
    fn an_image_at_one_generation_or_the_next_is_consistent() {
        let l = layout();
        let img = image(&l, &[5, 6, 5, 5, 6, 6, 5, 5, 5, 6]);
        assert_eq!(check_image(&l, &img), Ok(Image { min: 5, max: 6 }));
        let img = image(&l, &[0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(check_image(&l, &img), Ok(Image { min: 0, max: 1 }));
    }

    #[test]
    fn generations_two_apart_are_not_one_point() {
        let l = layout();
        let img = image(&l, &[5, 6, 7, 5, 5, 5, 5, 5, 5, 5]);
        assert!(matches!(
            check_image(&l, &img),
            Err(CheckError::Spread {
                min: 5,
                max: 7,
                max_index: 2,
                ..
            })
        ));
    }

    #[test]
    fn a_block_half_one_generation_half_another_is_torn() {
        let l = layout();
        let mut img = image(&l, &[5; 10]);
        let newer = stamp(6, 3);
        img[3][2048..].copy_from_slice(&newer[2048..]);
        assert!(matches!(
            check_image(&l, &img),
            Err(CheckError::Torn {
                index: 3,
                generation: 5,
                ..
            })
        ));
        // A torn header: the new generation's header over the old body.
        let mut img = image(&l, &[5; 10]);
        img[4][..512].copy_from_slice(&stamp(6, 4)[..512]);
        assert!(matches!(
            check_image(&l, &img),
            Err(CheckError::Torn { index: 4, .. })
        ));
    }

    #[test]
    fn a_block_of_another_index_or_of_nothing_is_refused() {
        let l = layout();
        let mut img = image(&l, &[5; 10]);
        img[2] = stamp(5, 7);
        assert!(matches!(
            check_image(&l, &img),
            Err(CheckError::Misplaced {
                index: 2,
                found: 7,
                ..
            })
        ));
        img[2] = vec![0xee; BLOCK];
        assert!(matches!(
            check_image(&l, &img),
            Err(CheckError::Garbage { index: 2, .. })
        ));
        img[2] = vec![0; 512];
        assert!(matches!(
            check_image(&l, &img),
            Err(CheckError::WrongSize { len: 512, .. })
        ));
        assert!(matches!(
            check_image(&l, &img[..3]),
            Err(CheckError::WrongCount {
                expected: 10,
                got: 3
            })
        ));
    }

    fn record() -> Vec<Generation> {
        (1..=4)
            .map(|g| Generation {
                generation: g,
                started: 100.0 + g as f64,
                flushed: (g < 4).then_some(100.5 + g as f64),
            })
            .collect()
    }

    #[test]
    fn every_generation_flushed_before_consistent_at_must_be_in_the_image() {
        let gens = record();
        // Generation 2 was flushed at 102.5: an image of 103.0 has it.
        let at_2 = Image { min: 2, max: 3 };
        assert_eq!(at_2.check_time(&gens, 103.0, 0.01), Ok(()));
        let at_1 = Image { min: 1, max: 2 };
        assert!(matches!(
            at_1.check_time(&gens, 103.0, 0.01),
            Err(CheckError::Stale {
                min: 1,
                flushed: 2,
                ..
            })
        ));
        // Zeros (generation 0) only before the first FLUSH completed.
        let zeros = Image { min: 0, max: 1 };
        assert_eq!(zeros.check_time(&gens, 101.4, 0.01), Ok(()));
        assert!(zeros.check_time(&gens, 101.6, 0.01).is_err());
        // Within the slack, a FLUSH just before the time may be missing.
        assert_eq!(at_1.check_time(&gens, 102.505, 0.01), Ok(()));
    }

    #[test]
    fn no_generation_started_after_consistent_at_may_be_in_the_image() {
        let gens = record();
        let at_3 = Image { min: 3, max: 4 };
        // Generation 4 started at 104.0.
        assert_eq!(at_3.check_time(&gens, 104.2, 0.01), Ok(()));
        assert!(matches!(
            at_3.check_time(&gens, 103.9, 0.01),
            Err(CheckError::Future { max: 4, .. })
        ));
        let beyond = Image { min: 5, max: 5 };
        assert_eq!(
            beyond.check_time(&gens, 200.0, 0.01),
            Err(CheckError::NeverWritten { max: 5 })
        );
    }

    #[test]
    fn an_image_that_misses_generations_flushed_more_than_the_rpo_before_it_was_taken_is_too_old() {
        let gens = record();
        // Generation 2 was flushed at 102.5, generation 3 at 103.5.
        let at_2 = Image { min: 2, max: 2 };
        assert_eq!(at_2.check_recency(&gens, 108.0, 5), Ok(()));
        assert!(matches!(
            at_2.check_recency(&gens, 108.6, 5),
            Err(CheckError::TooOld {
                min: 2,
                flushed: 3,
                rpo_seconds: 5,
                ..
            })
        ));
        // An old image of a volume nobody wrote since is not too old.
        let at_3 = Image { min: 3, max: 3 };
        assert_eq!(at_3.check_recency(&gens, 1000.0, 5), Ok(()));
    }
}
