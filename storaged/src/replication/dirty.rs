//! A primary volume's dirty map on disk, `DATA_DIR/replication/ID.dirty`: one bit per
//! [`REGION`] of the volume, set for every region that may hold a write the secondary lacks.
//!
//! A region's bit is made durable *before* the first write to it is submitted (the file is
//! written and `fdatasync`ed; the write waits for that, once per region per dirty period). So
//! after a `kill -9` or a power cut of the primary, every region a lost record touched is
//! marked, and a restart resyncs those regions, never the whole volume: DRBD's activity log,
//! in its simplest form. A region already marked costs a lookup; under a steady workload the
//! marked set stops changing and the file is not written at all.
//!
//! Bits are cleared in memory once the secondary has committed every write to their regions
//! and none is in flight ([`DirtyMap::clear_idle`]; each [`DirtyMap::mark_all`] counts its
//! regions in flight until its [`DirtyMap::done`]): the map in memory is what a resync over a
//! reconnected link sends. On disk a bit is cleared only once no request has marked its
//! region for a while ([`DirtyMap::flush_clears`], [`DISK_CLEAN_AGE`]; at once for a region
//! marked otherwise, by a resync or a peer's map): a region written again before then costs no
//! write and no sync, so the regions a workload keeps writing stay marked on disk (DRBD's
//! activity log, whose extents stay hot), and a bit left set on disk only costs its region in
//! the resync after a restart.
//!
//! The file is the bitmap itself, little-endian 64-bit words, `ceil(regions / 64) * 8` bytes
//! (128 bytes per GiB of volume); a volume that grows gets more words.
//!
//! Beside it, `ID.diverged` exists while the volume has been changed as a primary with no
//! link to its secondary (since the daemon started, or since the link broke), until a resync
//! brings the secondary level again: created (and its directory synced) before the first
//! such write is submitted. When the other side was promoted meanwhile, this says whether
//! both sides were written as primaries (split brain) or only the new one (this side may be
//! made its secondary, sending it the regions of this map: see `roles.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub use super::log::REGION;

/// Regions a sequential writer marks ahead of itself (see [`DirtyMap::mark_all`]).
pub const MARK_AHEAD: u64 = 7;

/// How long a region a request marked stays marked on disk after that request, once it is
/// clean in memory (see the module doc).
pub const DISK_CLEAN_AGE: Duration = Duration::from_secs(30);

/// Errors of the dirty map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open the dirty map {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The volume is fenced for a role change: it takes no writes")]
    Fenced,
    #[error("Cannot write the dirty map {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The persistent dirty map of one primary volume.
pub struct DirtyMap {
    path: PathBuf,
    file: File,
    words: Mutex<Words>,
    /// Signalled when a flush of clears has written the file.
    flushed: Condvar,
    /// `ID.diverged`, and whether it exists.
    diverged_path: PathBuf,
    diverged: AtomicBool,
    /// Whether the secondary is level and the stream runs (set by the sender).
    connected: AtomicBool,
    /// A role change (switchover, demote) refuses every new change from here on.
    fenced: AtomicBool,
}

struct Words {
    /// What is on disk (after the last write), and what is true now: a bit is set in `now`
    /// before it is set on disk; cleared in `now` first, on disk lazily.
    now: Vec<u64>,
    disk: Vec<u64>,
    /// Requests in flight per region (marked, not yet done); absent: none.
    in_flight: std::collections::BTreeMap<u64, u32>,
    /// Per region, when a request last marked it ([`DirtyMap::mark_all`]), in whole seconds
    /// since `opened`, plus one; 0: no request since it was last cleared on disk (or ever).
    written: Vec<u32>,
    opened: Instant,
    /// A flush of clears is writing the file (with the lock released): `disk` already holds
    /// what it writes, and a mark that must write waits for it to end.
    flushing: bool,
}

impl Words {
    /// Whole seconds since the map was opened.
    fn seconds(&self) -> u32 {
        u32::try_from(self.opened.elapsed().as_secs()).unwrap_or(u32::MAX - 1)
    }
}

impl DirtyMap {
    /// Opens the map at `path`, or creates it all clean (see [`DirtyMap::open_or_create`]).
    pub fn open(path: &Path) -> Result<DirtyMap, Error> {
        Self::open_or_create(path).map(|(map, _)| map)
    }

    /// Opens the map at `path`, or creates it all clean and made durable in its directory;
    /// says whether it was created. A primary whose map is new has nothing recorded: its
    /// caller marks the whole volume.
    pub fn open_or_create(path: &Path) -> Result<(DirtyMap, bool), Error> {
        let open_err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        if !existed {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(open_err)?;
            }
        }
        let len = file.metadata().map_err(open_err)?.len() as usize;
        let mut bytes = vec![0u8; len - len % 8];
        file.read_exact_at(&mut bytes, 0).map_err(open_err)?;
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let diverged_path = path.with_extension("diverged");
        let map = DirtyMap {
            path: path.to_owned(),
            file,
            words: Mutex::new(Words {
                now: words.clone(),
                disk: words,
                in_flight: Default::default(),
                written: Vec::new(),
                opened: Instant::now(),
                flushing: false,
            }),
            flushed: Condvar::new(),
            diverged: AtomicBool::new(diverged_path.exists()),
            diverged_path,
            connected: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
        };
        Ok((map, !existed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Words> {
        self.words.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the regions of `len` bytes at `offset`, durably: returns once the map on disk
    /// has them (at once if it had them already).
    pub fn mark(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.mark_locked(self.lock(), &[(offset, len)]).map(drop)
    }

    /// Marks the regions of a request's `ranges` durably, as [`mark`](Self::mark), and counts
    /// them in flight until [`done`](Self::done) with the same ranges; on an error nothing is
    /// counted.
    pub fn mark_all(&self, ranges: &[(u64, u64)]) -> Result<Vec<u64>, Error> {
        let w = self.lock();
        // Under the lock: once `fence` returns, every change is either marked (and seen by
        // whoever then reads the map) or refused.
        if self.fenced.load(Ordering::Acquire) {
            return Err(Error::Fenced);
        }
        if !self.connected.load(Ordering::Acquire) && !self.diverged.load(Ordering::Acquire) {
            self.record_diverged()?;
        }
        // A write that goes on from a marked region into an unmarked one (a sequential
        // writer) marks the next regions with it, in the same sync: one sync per
        // MARK_AHEAD regions instead of one per region. They hold no write: the caller
        // takes them for clean once what is committed now is.
        let mut ahead = Vec::new();
        for r in regions(ranges) {
            let (i, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            let marked = |r: u64| {
                w.now
                    .get((r / 64) as usize)
                    .is_some_and(|word| word & (1 << (r % 64)) != 0)
            };
            let unmarked = w.now.get(i).is_none_or(|word| word & bit == 0);
            if unmarked && r > 0 && marked(r - 1) {
                ahead.extend((r + 1..=r + MARK_AHEAD).filter(|&a| !marked(a)));
            }
        }
        ahead.retain(|a| !regions(ranges).any(|r| r == *a));
        let mut w = if ahead.is_empty() {
            self.mark_locked(w, ranges)?
        } else {
            let extra: Vec<(u64, u64)> = ahead.iter().map(|&a| (a * REGION, REGION)).collect();
            self.mark_locked(w, &[ranges, &extra].concat())?
        };
        let now = w.seconds() + 1;
        for r in regions(ranges) {
            if r as usize >= w.written.len() {
                w.written.resize(r as usize + 1, 0);
            }
            w.written[r as usize] = now;
            *w.in_flight.entry(r).or_insert(0) += 1;
        }
        Ok(ahead)
    }

    /// The request of [`mark_all`](Self::mark_all) with these `ranges` is no longer in flight.
    pub fn done(&self, ranges: &[(u64, u64)]) {
        let mut w = self.lock();
        for r in regions(ranges) {
            if let std::collections::btree_map::Entry::Occupied(mut e) = w.in_flight.entry(r) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Clears those of `regions` (region numbers) that no request has in flight; returns how
    /// many were cleared. On disk at the next [`flush_clears`](Self::flush_clears).
    pub fn clear_idle(&self, regions: impl IntoIterator<Item = u64>) -> usize {
        let mut w = self.lock();
        let mut cleared = 0;
        for r in regions {
            if w.in_flight.contains_key(&r) {
                continue;
            }
            let (i, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            if let Some(word) = w.now.get_mut(i) {
                if *word & bit != 0 {
                    *word &= !bit;
                    cleared += 1;
                }
            }
        }
        cleared
    }

    fn mark_locked<'a>(
        &self,
        mut w: std::sync::MutexGuard<'a, Words>,
        ranges: &[(u64, u64)],
    ) -> Result<std::sync::MutexGuard<'a, Words>, Error> {
        let mut changed: Option<(usize, usize)> = None;
        for r in regions(ranges) {
            let i = (r / 64) as usize;
            let bit = 1u64 << (r % 64);
            if i >= w.now.len() {
                w.now.resize(i + 1, 0);
                w.disk.resize(i + 1, 0);
            }
            w.now[i] |= bit;
            if w.disk[i] & bit == 0 {
                changed = Some(changed.map_or((i, i), |(a, b)| (a.min(i), b.max(i))));
            }
        }
        let Some((a, b)) = changed else {
            return Ok(w);
        };
        // A flush writing the file now could land after this write: wait for it.
        while w.flushing {
            w = self.flushed.wait(w).unwrap_or_else(|p| p.into_inner());
        }
        // The words that gain a bit keep the bits cleared in memory but not yet on disk: a
        // write never clears on disk what flush_clears has not decided to clear.
        let words: Vec<u64> = (a..=b).map(|i| w.disk[i] | w.now[i]).collect();
        self.write_words(a, &words)?;
        w.disk[a..=b].copy_from_slice(&words);
        Ok(w)
    }

    /// Writes to disk the clears of regions clean in memory that no request marked for at
    /// least `age` (to the second); returns how many regions it cleared there. Marks of regions already on
    /// disk go on meanwhile (the lock is not held while the file is written).
    pub fn flush_clears(&self, age: Duration) -> Result<usize, Error> {
        let mut w = self.lock();
        if w.flushing {
            return Ok(0);
        }
        let now = w.seconds();
        let age = age.as_secs();
        let mut due = Vec::new();
        for (i, (&disk, &mem)) in w.disk.iter().zip(&w.now).enumerate() {
            let mut bits = disk & !mem;
            while bits != 0 {
                let r = i as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match w.written.get(r as usize).copied().unwrap_or(0) {
                    0 => due.push(r),
                    marked if u64::from(now - (marked - 1)) >= age => due.push(r),
                    _ => {}
                }
            }
        }
        if due.is_empty() {
            return Ok(0);
        }
        let (mut a, mut b) = (usize::MAX, 0);
        for r in &due {
            if let Some(t) = w.written.get_mut(*r as usize) {
                *t = 0;
            }
            let i = (r / 64) as usize;
            w.disk[i] &= !(1u64 << (r % 64));
            (a, b) = (a.min(i), b.max(i));
        }
        // From here on `disk` says what the file will hold: a mark of a region cleared here
        // sees it unmarked, and writes it after this write (it waits for `flushing`).
        let words = w.disk[a..=b].to_vec();
        w.flushing = true;
        drop(w);
        let written = self.write_words(a, &words);
        // Whether or not all of it reached the file, the file holds at least these bits.
        self.lock().flushing = false;
        self.flushed.notify_all();
        written.map(|()| due.len())
    }

    /// Says whether the secondary is level and the stream runs: from `false` on, the first
    /// change (its [`mark_all`](Self::mark_all)) records the volume diverged.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// Refuses (`true`) or takes again every change from the next [`mark_all`](Self::mark_all)
    /// on; a change already marked is in flight or done, its regions dirty.
    pub fn fence(&self, fenced: bool) {
        let _w = self.lock();
        self.fenced.store(fenced, Ordering::Release);
    }

    /// Records the volume diverged now: its writes were answered without the secondary (a
    /// sync relationship that fell back to async).
    pub fn mark_diverged(&self) -> Result<(), Error> {
        let _w = self.lock();
        if self.diverged() {
            return Ok(());
        }
        self.record_diverged()
    }

    /// Whether the volume was changed with no link to its secondary since they were last
    /// level.
    pub fn diverged(&self) -> bool {
        self.diverged.load(Ordering::Acquire)
    }

    fn record_diverged(&self) -> Result<(), Error> {
        let err = |source| Error::Write {
            path: self.diverged_path.clone(),
            source,
        };
        File::create(&self.diverged_path).map_err(err)?;
        sync_dir(&self.diverged_path).map_err(err)?;
        self.diverged.store(true, Ordering::Release);
        Ok(())
    }

    /// The secondary is level again: the volume is no longer diverged.
    pub fn clear_diverged(&self) -> Result<(), Error> {
        let _w = self.lock();
        if !self.diverged.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let err = |source| Error::Write {
            path: self.diverged_path.clone(),
            source,
        };
        match std::fs::remove_file(&self.diverged_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        sync_dir(&self.diverged_path).map_err(err)
    }

    /// The map as the link carries it: its words, little-endian.
    pub fn bitmap(&self) -> Vec<u8> {
        self.lock()
            .now
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    /// Marks, durably, every region set in `bitmap` (another map's [`bitmap`](Self::bitmap))
    /// that lies in the first `size` bytes of the volume.
    pub fn mark_bitmap(&self, bitmap: &[u8], size: u64) -> Result<(), Error> {
        let mut ranges = Vec::new();
        for (i, c) in bitmap.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..c.len()].copy_from_slice(c);
            let mut bits = u64::from_le_bytes(word);
            while bits != 0 {
                let offset = (i as u64 * 64 + u64::from(bits.trailing_zeros())) * REGION;
                bits &= bits - 1;
                if offset < size {
                    ranges.push((offset, REGION.min(size - offset)));
                }
            }
        }
        self.mark_locked(self.lock(), &ranges).map(drop)
    }

    /// Bytes of the dirty regions (a count, without listing them).
    pub fn dirty_bytes(&self) -> u64 {
        let w = self.lock();
        w.now
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum::<u64>()
            * REGION
    }

    /// The dirty regions, as byte ranges `(offset, REGION)`, in order.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let w = self.lock();
        let mut out = Vec::new();
        for (i, word) in w.now.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                out.push(((i as u64 * 64 + b) * REGION, REGION));
            }
        }
        out
    }

    /// The map file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_words(&self, first: usize, words: &[u64]) -> Result<(), Error> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let write_err = |source| Error::Write {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&bytes, first as u64 * 8)
            .map_err(write_err)?;
        self.file.sync_data().map_err(write_err)
    }
}

/// The region numbers `ranges` touch (a region may repeat).
fn regions(ranges: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .flat_map(|&(offset, len)| offset / REGION..=(offset + len - 1) / REGION)
}

/// Syncs the directory holding `path`, so that its creation or removal is durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_writer_marks_the_regions_ahead_of_it_in_one_sync_a_random_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let map = DirtyMap::open(&dir.path().join("v.dirty")).unwrap();
        assert_eq!(map.mark_all(&[(0, 4096)]).unwrap(), Vec::<u64>::new());
        assert_eq!(
            map.mark_all(&[(40 * REGION, 4096)]).unwrap(),
            Vec::<u64>::new()
        );
        // From region 0 into 1: 2..=8 come with it.
        let ahead = map.mark_all(&[(REGION - 4096, 8192)]).unwrap();
        assert_eq!(ahead, (2..=1 + MARK_AHEAD).collect::<Vec<_>>());
        assert_eq!(map.dirty_bytes(), (3 + MARK_AHEAD) * REGION);
        // Into an already marked region: nothing more.
        assert!(map.mark_all(&[(2 * REGION, 4096)]).unwrap().is_empty());
        // Only the written regions are in flight: the ones ahead can be cleared.
        assert_eq!(map.clear_idle(2..=1 + MARK_AHEAD), MARK_AHEAD as usize - 1);
    }

    #[test]
    fn a_change_while_disconnected_records_the_volume_diverged_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::open(&path).unwrap();
        map.set_connected(true);
        map.mark_all(&[(0, 4096)]).unwrap();
        assert!(!map.diverged(), "a change while connected is streamed");
        map.set_connected(false);
        map.mark_all(&[(0, 4096)]).unwrap();
        assert!(map.diverged());
        // What a kill -9 leaves says so too.
        assert!(DirtyMap::open(&path).unwrap().diverged());
        map.clear_diverged().unwrap();
        assert!(!map.diverged());
        assert!(!DirtyMap::open(&path).unwrap().diverged());
        // Marks that are not a frontend's change (a resync's, a peer's regions) do not count.
        map.mark(REGION, 1).unwrap();
        assert!(!map.diverged());
    }

    #[test]
    fn a_bitmap_marks_the_same_regions_in_another_map_within_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirtyMap::open(&dir.path().join("a.dirty")).unwrap();
        a.mark(0, 1).unwrap();
        a.mark(70 * REGION, 1).unwrap();
        a.mark(200 * REGION, 1).unwrap();
        let b = DirtyMap::open(&dir.path().join("b.dirty")).unwrap();
        b.mark_bitmap(&a.bitmap(), 100 * REGION).unwrap();
        assert_eq!(b.dirty_ranges(), vec![(0, REGION), (70 * REGION, REGION)]);
        b.mark_bitmap(&[0xff; 3], 4 * REGION + 10).unwrap();
        assert_eq!(b.dirty_bytes(), 6 * REGION, "regions 0..=4, 70");
    }

    #[test]
    fn marked_regions_are_on_disk_before_mark_returns_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::open(&path).unwrap();
        map.mark(0, 4096).unwrap();
        map.mark(5 * REGION - 512, 1024).unwrap(); // across regions 4 and 5
        map.mark(130 * REGION, 1).unwrap(); // a third word
                                            // What a kill -9 right now leaves: the file alone.
        let reopened = DirtyMap::open(&path).unwrap();
        assert_eq!(
            reopened.dirty_ranges(),
            vec![
                (0, REGION),
                (4 * REGION, REGION),
                (5 * REGION, REGION),
                (130 * REGION, REGION)
            ]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * 8);
    }

    #[test]
    fn a_region_with_a_request_in_flight_is_never_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let map = DirtyMap::open(&dir.path().join("v.dirty")).unwrap();
        map.mark_all(&[(0, 4096), (3 * REGION, REGION + 1)])
            .unwrap();
        assert_eq!(map.clear_idle([0, 3, 4]), 0, "all three are in flight");
        map.done(&[(0, 4096), (3 * REGION, REGION + 1)]);
        assert_eq!(map.clear_idle([0, 3]), 2);
        assert_eq!(map.dirty_ranges(), vec![(4 * REGION, REGION)]);
        assert_eq!(map.dirty_bytes(), REGION);
    }

    #[test]
    fn a_region_already_marked_is_not_written_again_and_clears_reach_disk_lazily() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::open(&path).unwrap();
        map.mark(0, 2 * REGION).unwrap();
        // Nothing to write for a marked region: the file is left as it is.
        std::fs::write(&path, [0u8; 8]).unwrap();
        map.mark(REGION, 4096).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [0u8; 8]);
        std::fs::write(&path, 3u64.to_le_bytes()).unwrap();

        assert_eq!(map.clear_idle([0]), 1);
        assert_eq!(map.dirty_ranges(), vec![(REGION, REGION)]);
        assert_eq!(
            DirtyMap::open(&path).unwrap().dirty_ranges().len(),
            2,
            "a clear is not on disk before flush_clears"
        );
        // A mark in the same word keeps the cleared bit set on disk until the flush.
        map.mark(2 * REGION, 1).unwrap();
        assert_eq!(DirtyMap::open(&path).unwrap().dirty_ranges().len(), 3);
        // Marked by no request: cleared on disk at once.
        assert_eq!(map.flush_clears(Duration::from_secs(60)).unwrap(), 1);
        assert_eq!(
            DirtyMap::open(&path).unwrap().dirty_ranges(),
            vec![(REGION, REGION), (2 * REGION, REGION)]
        );
    }

    #[test]
    fn a_region_written_again_before_its_clear_reaches_disk_costs_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::open(&path).unwrap();
        map.mark_all(&[(0, 4096)]).unwrap();
        map.done(&[(0, 4096)]);
        assert_eq!(map.clear_idle([0]), 1);
        assert_eq!(
            map.dirty_bytes(),
            0,
            "clean in memory: a resync would not send it"
        );
        // The file no longer says so; a mark that wrote it would put the bit back.
        std::fs::write(&path, [0u8; 8]).unwrap();
        map.mark_all(&[(4096, 4096)]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [0u8; 8]);
        assert_eq!(map.dirty_bytes(), REGION);
        // Marked again, it is no longer due to be cleared on disk; clean again, it is due
        // once no request marked it for the age asked.
        map.done(&[(4096, 4096)]);
        assert_eq!(map.flush_clears(Duration::ZERO).unwrap(), 0);
        assert_eq!(map.clear_idle([0]), 1);
        assert_eq!(map.flush_clears(Duration::from_secs(60)).unwrap(), 0);
        assert_eq!(map.flush_clears(Duration::ZERO).unwrap(), 1);
    }

    #[test]
    fn a_mark_during_a_flush_of_clears_reaches_disk_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = std::sync::Arc::new(DirtyMap::open(&path).unwrap());
        for round in 0..200u64 {
            let r = round % 64;
            map.mark(r * REGION, 1).unwrap();
            assert_eq!(map.clear_idle([r]), 1);
            let flusher = {
                let map = map.clone();
                std::thread::spawn(move || map.flush_clears(Duration::ZERO).unwrap())
            };
            map.mark(r * REGION, 1).unwrap();
            flusher.join().unwrap();
            let on_disk = DirtyMap::open(&path).unwrap().dirty_ranges();
            assert_eq!(on_disk, vec![(r * REGION, REGION)], "round {round}");
            assert_eq!(map.clear_idle([r]), 1);
            map.flush_clears(Duration::ZERO).unwrap();
        }
    }
}
