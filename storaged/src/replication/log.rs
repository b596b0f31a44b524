//! A primary volume's replication log: the records its queues append as writes complete, in
//! completion order, for the link to ship; with the volume's dirty map ([`super::dirty`]) of
//! the regions the secondary may lack, marked before each write is submitted.
//!
//! Every write, discard and write-zeroes that completes is given the next sequence number
//! (one counter per volume, under the log's lock, so the order is the one the guest saw its
//! answers in) and appended: a write with a copy of its data as stored (the ciphertext of an
//! encrypted volume), a zeroed range as its range only. A successful FLUSH appends a cut, the
//! end of an epoch. The records hold at most the log's capacity of data; a write that would
//! pass it drops every record instead (the link has fallen behind): the log is then
//! *overflowed* until the link starts a resync ([`ReplicationLog::start_resync`]) from the
//! dirty map and the log again. Every record's regions were marked in the dirty map before its
//! write was submitted ([`ReplicationLog::before_submit`]), so dropped records lose nothing the
//! resync will not send.
//!
//! Memory: each record is charged its data plus [`RECORD_OVERHEAD`] against the log's
//! capacity (default [`DEFAULT_CAPACITY`]), a zeroed range and a cut too, so a guest sending
//! only discards and flushes is bounded as well; the dirty map is one bit per [`REGION`] of the
//! volume (128 bytes per GiB).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::dirty::{self, DirtyMap};
use super::sync::SyncGate;

/// Bytes of one region of the dirty map.
pub const REGION: u64 = 1 << 20;

/// Default bytes of data the log holds before it overflows.
pub const DEFAULT_CAPACITY: usize = 64 << 20;

/// What a record is charged beyond its data: its place in the queue and its fields.
pub const RECORD_OVERHEAD: usize = 64;

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A completed write, its data as stored.
    Write {
        seq: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// A completed discard (`discard`) or write-zeroes of a range.
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
        discard: bool,
    },
    /// The end of an epoch: every record up to `seq` is in it. `time_unix_ns` is the wall
    /// clock at the cut, the `consistent_at` of the image the epoch ends in.
    Cut { seq: u64, time_unix_ns: u64 },
}

/// The replication log of one primary volume, shared by its queues and its link.
pub struct ReplicationLog {
    inner: Mutex<Inner>,
    capacity: usize,
    dirty: DirtyMap,
    /// Sync mode's gate: whether answers wait for the secondary.
    sync: SyncGate,
}

struct Inner {
    /// The sequence number the next record gets (the first is 1).
    next_seq: u64,
    records: VecDeque<Record>,
    /// Bytes of data in `records`.
    bytes: usize,
    overflowed: bool,
    /// Raised by every [`ReplicationLog::start_resync`].
    generation: u64,
    /// Per region, the seq of the last record that touched it (kept or dropped), or of the
    /// resync that sends it: a region is clean once an epoch up to that seq is committed.
    /// `u64::MAX`: untouched since this daemon started. The top bit ([`PENDING`]) of a
    /// touched region's says it is in `pending`.
    region_seq: Vec<u64>,
    /// The regions touched since a commit last found them clean, each once: what a commit
    /// looks at, rather than every region of the volume.
    pending: Vec<u64>,
    /// The last seq taken when the log was last emptied for a resync's pass, and how many
    /// regions records after it touched: what the pass's successor would send.
    pass_start: u64,
    touched_in_pass: u64,
    /// Bytes of every write, discard and write-zeroes appended, kept or dropped: what the
    /// volume's writer has changed.
    written: u64,
}

/// In a region's `region_seq`: the region is in `pending`. Seqs stay below it.
const PENDING: u64 = 1 << 63;

impl ReplicationLog {
    /// The log of a volume holding at most `capacity` bytes of data, over its dirty map.
    pub fn new(capacity: usize, dirty: DirtyMap) -> Self {
        ReplicationLog {
            inner: Mutex::new(Inner {
                next_seq: 1,
                records: VecDeque::new(),
                bytes: 0,
                overflowed: false,
                generation: 0,
                region_seq: Vec::new(),
                pending: Vec::new(),
                pass_start: 0,
                touched_in_pass: 0,
                written: 0,
            }),
            capacity,
            dirty,
            sync: SyncGate::default(),
        }
    }

    /// Marks the regions a write, discard or write-zeroes (its byte ranges) is about to
    /// change, durably, before it is submitted; they count as in flight until
    /// [`done`](Self::done).
    pub fn before_submit(&self, ranges: &[(u64, u64)]) -> Result<(), dirty::Error> {
        let ahead = self.dirty.mark_all(ranges)?;
        if !ahead.is_empty() {
            // Marked ahead of a sequential writer, written by nothing yet: clean once what
            // has completed so far is committed.
            let mut inner = self.lock();
            let at = inner.next_seq - 1;
            for r in ahead {
                inner.touch(r * REGION, REGION, at);
            }
        }
        Ok(())
    }

    /// The request marked with these `ranges` has completed (its record, if any, appended).
    pub fn done(&self, ranges: &[(u64, u64)]) {
        self.dirty.done(ranges);
    }

    /// The secondary committed an epoch whose cut is at `seq`: every region whose last record
    /// is at or before it, and that no request has in flight, is clean. Returns how many
    /// regions were cleared; the map on disk follows at the next
    /// [`DirtyMap::flush_clears`].
    pub fn committed(&self, seq: u64) -> usize {
        let mut inner = self.lock();
        let Inner {
            region_seq,
            pending,
            ..
        } = &mut *inner;
        // Only the regions touched since the last commits: a region that one of them found
        // clean and that a request in flight kept dirty is touched again as that request
        // ends (or the resync its failure starts touches it).
        let mut clean = Vec::new();
        pending.retain(|&r| {
            let s = &mut region_seq[r as usize];
            if *s & !PENDING <= seq {
                *s &= !PENDING;
                clean.push(r);
                false
            } else {
                true
            }
        });
        // Under the log's lock: no record can be appended between the check and the clear.
        self.dirty.clear_idle(clean)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a completed write of `len` bytes at `offset`; `fill` copies its data as stored
    /// into the buffer it is given (false: the data could not be read, and only the dirty map
    /// records the write). Returns the record's sequence number.
    pub fn write(&self, offset: u64, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> u64 {
        let cost = len + RECORD_OVERHEAD;
        // Whether the data is kept is decided under the lock, the copy made outside it.
        let (generation, keep) = {
            let inner = self.lock();
            (inner.generation, inner.fits(cost, self.capacity))
        };
        let data = keep
            .then(|| vec![0u8; len])
            .and_then(|mut d| fill(&mut d).then_some(d));
        let mut inner = self.lock();
        let seq = inner.take_seq();
        inner.touch(offset, len as u64, seq);
        inner.written += len as u64;
        let fits = inner.fits(cost, self.capacity);
        match data {
            Some(data) if fits => {
                inner.bytes += cost;
                inner.records.push_back(Record::Write { seq, offset, data });
                self.sync.appended();
            }
            // A resync started since this write reached the storage: it reads the write's
            // region (marked before the write was submitted) after that, so the record would
            // only repeat what the resync sends. No gap.
            None if keep && inner.generation == generation => inner.overflow(),
            None if inner.generation != generation => {}
            _ => inner.overflow(),
        }
        seq
    }

    /// Appends a completed discard or write-zeroes of `len` bytes at `offset`.
    pub fn zero(&self, offset: u64, len: u64, discard: bool) -> u64 {
        let mut inner = self.lock();
        let seq = inner.take_seq();
        inner.touch(offset, len, seq);
        inner.written += len;
        if !inner.fits(RECORD_OVERHEAD, self.capacity) {
            inner.overflow();
        } else {
            inner.bytes += RECORD_OVERHEAD;
            inner.records.push_back(Record::Zero {
                seq,
                offset,
                len,
                discard,
            });
            self.sync.appended();
        }
        seq
    }

    /// Appends a cut after the records so far (a FLUSH completed, or an epoch's time is up).
    pub fn cut(&self) {
        // The clock is read under the lock: no record after the cut completed before its time.
        let mut inner = self.lock();
        let time_unix_ns = crate::unix_time().as_nanos() as u64;
        let seq = inner.next_seq - 1;
        if inner.overflowed {
            return;
        }
        if let Some(Record::Cut { seq: last, .. }) = inner.records.back() {
            if *last == seq {
                return;
            }
        }
        if !inner.fits(RECORD_OVERHEAD, self.capacity) {
            inner.overflow();
            return;
        }
        inner.bytes += RECORD_OVERHEAD;
        inner.records.push_back(Record::Cut { seq, time_unix_ns });
    }

    /// A change that may have reached the storage without a record (a write that failed part
    /// way, answered IOERR): the stream has a gap only a resync of the dirty map can fill, so
    /// the records are dropped as for an overflow.
    pub fn gap(&self) {
        self.lock().overflow();
    }

    /// Whether records were dropped since the last [`start_resync`](Self::start_resync).
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Takes the records so far, oldest first.
    pub fn drain(&self) -> Vec<Record> {
        self.drain_to().0
    }

    /// Takes the records so far, oldest first, and the last seq taken at that instant: every
    /// record up to it is among them (or was dropped, and is left to a resync).
    pub fn drain_to(&self) -> (Vec<Record>, u64) {
        let mut inner = self.lock();
        inner.bytes = 0;
        let seq = inner.next_seq - 1;
        (inner.records.drain(..).collect(), seq)
    }

    /// Whether records are waiting to be taken.
    pub fn has_records(&self) -> bool {
        !self.lock().records.is_empty()
    }

    /// Bytes the records are charged: their data and [`RECORD_OVERHEAD`] each.
    pub fn pending_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Bytes of every write, discard and write-zeroes appended since the log was made,
    /// whether its record was kept or dropped: the volume's changes, as a meter reads them.
    pub fn written_bytes(&self) -> u64 {
        self.lock().written
    }

    /// Bytes of the regions that records touched since the current resync pass began
    /// ([`start_resync`](Self::start_resync), [`continue_resync`](Self::continue_resync)):
    /// about what the next pass would send, were the log to overflow.
    pub fn touched_in_pass(&self) -> u64 {
        self.lock().touched_in_pass * REGION
    }

    /// The start of a resync: the regions it sends (the dirty ones, as byte ranges), and a
    /// fresh log: emptied and no longer overflowed, so that the records from now on follow
    /// the regions. The regions stay dirty until the secondary has committed the resync.
    /// Also returns the last seq taken: the pass's start, for
    /// [`continue_resync`](Self::continue_resync).
    pub fn start_resync(&self) -> (Vec<(u64, u64)>, u64) {
        let mut inner = self.lock();
        inner.generation += 1;
        let ranges = self.dirty.dirty_ranges();
        let at = inner.restart();
        for &(offset, len) in &ranges {
            inner.touch(offset, len, at);
        }
        (ranges, at)
    }

    /// Another pass of a resync whose log overflowed during the last pass (begun at
    /// `since`): the dirty regions touched after `since` (what the others hold was sent,
    /// and nothing changed it), and a fresh log, as [`start_resync`](Self::start_resync).
    /// A write that completes during this call and whose data the overflowed log did not
    /// keep overflows the fresh log (same generation): its region is touched after this
    /// pass's start, so the next pass sends it.
    pub fn continue_resync(&self, since: u64) -> (Vec<(u64, u64)>, u64) {
        let mut inner = self.lock();
        let ranges: Vec<(u64, u64)> = self
            .dirty
            .dirty_ranges()
            .into_iter()
            .filter(|&(offset, _)| {
                inner
                    .region_seq
                    .get((offset / REGION) as usize)
                    .is_some_and(|&s| s != u64::MAX && s & !PENDING > since)
            })
            .collect();
        let at = inner.restart();
        for &(offset, len) in &ranges {
            inner.touch(offset, len, at);
        }
        (ranges, at)
    }

    /// The volume's dirty map.
    pub fn dirty(&self) -> &DirtyMap {
        &self.dirty
    }

    /// The volume's sync gate.
    pub fn sync(&self) -> &SyncGate {
        &self.sync
    }
}

impl Inner {
    /// Records that `seq` touched the regions of `len` bytes at `offset`.
    fn touch(&mut self, offset: u64, len: u64, seq: u64) {
        if len == 0 {
            return;
        }
        for r in offset / REGION..=(offset + len - 1) / REGION {
            let r = r as usize;
            if r >= self.region_seq.len() {
                // Regions no record or resync has touched: never taken for clean.
                self.region_seq.resize(r + 1, u64::MAX);
            }
            let s = &mut self.region_seq[r];
            if *s == u64::MAX || *s & PENDING == 0 {
                self.pending.push(r as u64);
            }
            if seq > self.pass_start && (*s == u64::MAX || *s & !PENDING <= self.pass_start) {
                self.touched_in_pass += 1;
            }
            *s = if *s == u64::MAX {
                seq
            } else {
                (*s & !PENDING).max(seq)
            } | PENDING;
        }
    }

    /// Whether a record charged `cost` is kept.
    fn fits(&self, cost: usize, capacity: usize) -> bool {
        !self.overflowed && self.bytes + cost <= capacity
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Empties the log for a resync's pass; returns the last seq taken, after which the
    /// records from now on come.
    fn restart(&mut self) -> u64 {
        self.records.clear();
        self.bytes = 0;
        self.overflowed = false;
        self.pass_start = self.next_seq - 1;
        self.touched_in_pass = 0;
        self.pass_start
    }

    fn overflow(&mut self) {
        self.overflowed = true;
        self.records.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of `capacity` bytes over a dirty map in a temporary directory.
    fn log(capacity: usize) -> (ReplicationLog, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let map = DirtyMap::open(&dir.path().join("v.dirty")).unwrap();
        (ReplicationLog::new(capacity, map), dir)
    }

    /// A write as the queue does it: its regions marked, then recorded once complete.
    fn write(log: &ReplicationLog, offset: u64, len: usize) -> u64 {
        log.before_submit(&[(offset, len as u64)]).unwrap();
        log.write(offset, len, |_| true)
    }

    #[test]
    fn records_are_numbered_in_completion_order_and_cut_at_flushes() {
        let (log, _dir) = log(1 << 20);
        assert_eq!(
            log.write(4096, 4, |b| {
                b.copy_from_slice(b"abcd");
                true
            }),
            1
        );
        assert_eq!(log.zero(8192, 4096, true), 2);
        log.cut();
        log.cut(); // nothing since: no empty epoch
        assert_eq!(
            log.write(0, 2, |b| {
                b.copy_from_slice(b"xy");
                true
            }),
            3
        );
        let records = log.drain();
        assert!(
            matches!(records[0], Record::Write { seq: 1, offset: 4096, ref data } if data == b"abcd")
        );
        assert_eq!(
            records[1],
            Record::Zero {
                seq: 2,
                offset: 8192,
                len: 4096,
                discard: true
            }
        );
        assert!(matches!(records[2], Record::Cut { seq: 2, time_unix_ns } if time_unix_ns > 0));
        assert!(matches!(records[3], Record::Write { seq: 3, .. }));
        assert_eq!(records.len(), 4);
        assert_eq!(log.pending_bytes(), 0);
    }

    #[test]
    fn a_full_log_drops_its_records_but_the_dirty_map_keeps_every_region_written() {
        let (log, _dir) = log(2 * (4096 + RECORD_OVERHEAD));
        write(&log, 0, 4096);
        write(&log, 3 * REGION - 2048, 4096); // across regions 2 and 3
        assert!(!log.overflowed());
        // The third write does not fit: everything is dropped, nothing more is kept.
        write(&log, 10 * REGION, 4096);
        assert!(log.overflowed());
        log.before_submit(&[(20 * REGION, 2 * REGION)]).unwrap();
        log.zero(20 * REGION, 2 * REGION, false);
        log.cut();
        assert!(log.drain().is_empty());
        assert_eq!(
            log.start_resync().0,
            vec![
                (0, REGION),
                (2 * REGION, REGION),
                (3 * REGION, REGION),
                (10 * REGION, REGION),
                (20 * REGION, REGION),
                (21 * REGION, REGION),
            ]
        );
        // A fresh log: records are kept again; the regions stay dirty until committed.
        assert!(!log.overflowed());
        assert_eq!(write(&log, 0, 4096), 5, "numbering goes on across a resync");
        assert_eq!(log.drain().len(), 1);
        assert_eq!(log.start_resync().0.len(), 6);
    }

    #[test]
    fn a_commit_cleans_the_regions_written_up_to_its_cut_and_later_ones_at_their_commit() {
        let (log, _dir) = log(1 << 20);
        // Marked, recorded and done, as a queue does a write that completed.
        let write = |log: &ReplicationLog, offset, len| {
            let seq = write(log, offset, len);
            log.done(&[(offset, len as u64)]);
            seq
        };
        // Far into a large volume, and near its start.
        let far = (16u64 << 40) - REGION;
        write(&log, far, 4096);
        let first = write(&log, 0, 4096);
        // A write in flight on region 5 when the first commit comes, and one after its cut.
        log.before_submit(&[(5 * REGION, 4096)]).unwrap();
        let later = write(&log, 7 * REGION, 4096);
        assert_eq!(log.committed(first), 2, "regions 0 and far");
        assert_eq!(
            log.dirty().dirty_ranges().len(),
            2,
            "regions 5 and 7 stay dirty"
        );
        assert_eq!(log.committed(first), 0, "nothing more to clean");
        // Region 5's write completes (recorded after the cut), then everything is committed.
        let last = log.write(5 * REGION, 4096, |_| true);
        log.done(&[(5 * REGION, 4096)]);
        assert!(last > later);
        assert_eq!(log.committed(later), 1, "region 7");
        assert_eq!(log.committed(last), 1, "region 5");
        assert_eq!(log.dirty().dirty_bytes(), 0);
        // Written again: dirty again, and clean again at its commit.
        let again = write(&log, far, 4096);
        assert_eq!(log.dirty().dirty_ranges(), vec![(far, REGION)]);
        assert_eq!(log.committed(again), 1);
    }

    #[test]
    fn a_resyncs_next_pass_sends_only_the_regions_written_since_the_last_began() {
        let (log, _dir) = log(2 * (4096 + RECORD_OVERHEAD));
        for r in [0, 2, 4, 6] {
            write(&log, r * REGION, 4096);
        }
        let (ranges, since) = log.start_resync();
        assert_eq!((ranges.len(), since), (4, 4));
        // While the regions are read, writes to 2 and 9 and a zero of 13 overflow the log.
        write(&log, 2 * REGION, 4096);
        write(&log, 9 * REGION, 4096);
        log.before_submit(&[(13 * REGION, 4096)]).unwrap();
        log.zero(13 * REGION, 4096, false);
        assert!(log.overflowed());
        // Each region once, however often it is written: what the next pass sends.
        write(&log, 9 * REGION + 8192, 4096);
        assert_eq!(log.touched_in_pass(), 3 * REGION);
        assert_eq!(
            log.written_bytes(),
            8 * 4096,
            "dropped records and zeroed ranges count too"
        );
        let (ranges, since) = log.continue_resync(since);
        assert_eq!(log.touched_in_pass(), 0, "a new pass");
        assert_eq!(
            ranges,
            vec![
                (2 * REGION, REGION),
                (9 * REGION, REGION),
                (13 * REGION, REGION)
            ]
        );
        assert_eq!(since, 8);
        assert!(!log.overflowed());
        // Nothing written during that pass: the next one has nothing to send, and records
        // are kept again.
        assert_eq!(log.continue_resync(since), (vec![], 8));
        write(&log, 4 * REGION, 4096);
        assert_eq!(log.drain().len(), 1);
    }

    #[test]
    fn discards_and_flushes_alone_fill_the_log_too() {
        let (log, _dir) = log(10 * RECORD_OVERHEAD);
        for i in 0..5 {
            log.zero(i * 4096, 4096, true);
            log.cut();
        }
        assert!(!log.overflowed());
        log.zero(0, 4096, true);
        assert!(
            log.overflowed(),
            "a guest of discards cannot grow the log without bound"
        );
    }

    #[test]
    fn a_write_whose_data_cannot_be_read_is_kept_only_in_the_dirty_map() {
        let (log, _dir) = log(1 << 20);
        log.before_submit(&[(REGION, 4096)]).unwrap();
        log.write(REGION, 4096, |_| false);
        assert!(
            log.overflowed(),
            "the stream has a gap: only a resync can fill it"
        );
        assert_eq!(log.start_resync().0, vec![(REGION, REGION)]);
    }
}
