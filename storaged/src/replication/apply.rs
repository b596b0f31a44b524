//! A secondary volume's redo log, and the apply of each committed epoch to its image.
//!
//! The records of an epoch (`Write`, `Zero`, and the `Region`s of a resync) are checked against
//! the volume (inside it, in whole 512-byte sectors) as they arrive ([`Applier::stage`]) and
//! appended to the staging log `DIR/ID.log`, each as the [`wire`] frame it came in
//! (CRC32C-checked): gathered in memory and written in one write per [`STAGE_CHUNK`]
//! ([`Applier::write_staged`], which its caller runs where it may block). [`Applier::commit`]
//! ends the epoch in five steps:
//!
//! 1. appends a `Cut { epoch, seq, time_unix_ns }` frame, the commit record, and `fdatasync`s
//!    the log: from here on the epoch survives a crash;
//! 2. applies every record before the `Cut`, in order: from memory where the epoch's data is
//!    at most [`MEMO_CAP`], else read back from the log one frame at a time. A `Write` or
//!    `Region` is a `pwrite`; a discard punches a hole (`PUNCH_HOLE`; where
//!    that is unsupported the data stays, as on the primary, for a discard is a hint); a
//!    write-zeroes is a `ZERO_RANGE`, falling back to `PUNCH_HOLE`, then to writing zeros;
//! 3. `fdatasync`s the volume;
//! 4. writes `DIR/ID.applied`, the JSON of [`Applied`] (a temporary file, fsynced, renamed over
//!    it, the directory fsynced: either the old or the new state survives a crash);
//! 5. empties the log (truncated to 0 bytes and `fdatasync`ed).
//!
//! Applying records again is harmless: they are the same bytes at the same places, in the same
//! order. So at every instant the volume and its log together hold the image of the last
//! committed epoch, which [`Applier::open`] restores.
//!
//! # Recovery
//!
//! [`Applier::open`] reads `ID.applied` (missing: a fresh volume, `Applied::default()`, not
//! consistent; unreadable or not valid JSON of [`Applied`]: [`Error::State`], for a wrong
//! `consistent` would be a lie), then reads the log's frames from its start, one at a time:
//!
//! - an empty or missing log: nothing to do, [`Recovery::Clean`];
//! - records, then a `Cut` whose epoch is after `applied.epoch`: the epoch was committed, and
//!   maybe not (wholly) applied. Steps 2 to 5 are done again: [`Recovery::Replayed`];
//! - a `Cut` whose epoch is at most `applied.epoch`: the epoch was applied and the log not yet
//!   emptied. Step 5: [`Recovery::Clean`];
//! - records and no `Cut` (the log ends, or its tail is torn or corrupt: a frame cut short, one
//!   that does not decode, one of a type that is not a record): the epoch never committed. The
//!   log is emptied and the volume left as it is: [`Recovery::DroppedUncommitted`], with the
//!   number of whole records dropped (0 when the very first frame is torn). The primary sends
//!   the epoch again.
//!
//! Whatever follows a `Cut` is dropped with the log (there is none: the log is emptied after
//! each commit). The log's own directory entry is fsynced when it is opened, before any epoch
//! can be committed in it. A corrupt frame *before* a `Cut` that had been made durable (the
//! storage under the log lost or changed its bytes) reads as an uncommitted epoch; the CRC32C
//! of each frame is what tells.
//!
//! A failure during [`Applier::commit`] (or while emptying the log) leaves the log or the volume
//! in a state this `Applier` does not know; every later call then returns
//! [`Error::NeedsRecovery`] until the volume is opened again, whose recovery finishes the job.
//! Epochs only go forward: a commit of an epoch at most `applied.epoch` is refused, since its
//! `Cut` would read, after a crash, as already applied.
//!
//! # Initial sync
//!
//! The initial sync has no consistent image to keep: [`Applier::mark_inconsistent`] records
//! `consistent: false`, [`Applier::write_in_place`] then writes the regions straight into the
//! volume, unstaged and not synced, and [`Applier::mark_consistent`] syncs the volume and
//! records the epoch it ends in, consistent. A consistent image is never written in place.
//!
//! Memory: the epoch's records up to [`MEMO_CAP`] bytes of data, the frames not yet written
//! (under [`STAGE_CHUNK`] and one frame), and one frame (at most [`wire::MAX_PAYLOAD`] plus
//! its header) read back at a time, whatever the epoch's size.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::wire::{self, Message, MessageType, HEADER_LEN};
use crate::backing::{FALLOC_PUNCH, FALLOC_ZERO};

/// Offsets and lengths of records are in sectors of this many bytes.
pub const SECTOR: u64 = 512;

/// Largest `ID.applied` read: a few dozen bytes are expected.
const MAX_STATE_LEN: u64 = 4096;

/// Bytes of frames gathered before they are written to the log.
pub const STAGE_CHUNK: usize = 1 << 20;

/// Bytes of an epoch's data kept in memory to apply it from; past them it is read back from
/// the log.
pub const MEMO_CAP: usize = 16 << 20;

/// Zeros written where the storage can zero a range no other way.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Errors of the staging log and the apply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid volume id {0:?}: only ASCII letters, digits, '-' and '_' may name its files")]
    InvalidId(String),
    #[error("Cannot {op} staging log {path}")]
    Log {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "Staging log {path} holds a committed epoch it cannot read at offset {offset}: {reason}"
    )]
    CorruptLog {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("Cannot {op} volume {path}")]
    Volume {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot {op} volume {path} at offset {offset:#x}, {len} bytes")]
    VolumeRange {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("Cannot {op} applied state {path}")]
    State {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Range at offset {offset:#x} of {len} bytes passes the volume's end at {size:#x}")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("Range at offset {offset:#x} of {len} bytes is not in whole {SECTOR}-byte sectors")]
    Misaligned { offset: u64, len: u64 },
    #[error("A {0:?} message is not a record")]
    NotARecord(MessageType),
    #[error("Cannot frame a record")]
    Encode(#[from] wire::Error),
    #[error("Epoch {epoch} does not follow the applied epoch {applied}")]
    StaleEpoch { epoch: u64, applied: u64 },
    #[error(
        "The image is consistent: it is not written in place before it is marked inconsistent"
    )]
    Consistent,
    #[error("An earlier failure left the staging log or the volume in an unknown state; reopen the volume to recover")]
    NeedsRecovery,
    #[error(
        "Records of this epoch could not be written to the staging log: it can only be discarded"
    )]
    StagedLost,
}

/// Where a secondary volume's image stands: the end of `epoch`, which ends with the primary's
/// record `seq` and was cut at the primary's `time_unix_ns`. `consistent` is false before the
/// initial sync has completed once (the image is then being written in place).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Applied {
    pub epoch: u64,
    pub seq: u64,
    pub time_unix_ns: u64,
    pub consistent: bool,
}

/// What [`Applier::open`] found in the staging log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to do: the log was empty, or held an epoch already applied.
    Clean,
    /// The log held an epoch that never committed: `records` whole records, dropped.
    DroppedUncommitted { records: usize },
    /// The log held committed `epoch`, applied again: `records` records.
    Replayed { epoch: u64, records: usize },
}

/// The staging log and the image of one secondary volume.
pub struct Applier {
    dir: PathBuf,
    log: File,
    log_path: PathBuf,
    /// Bytes of whole frames in the log; the next frame goes here.
    log_len: u64,
    /// Frames staged after `log_len`, not yet written.
    unwritten: Vec<u8>,
    /// The records staged since the last commit, while their data is at most [`MEMO_CAP`]
    /// bytes (`memo_bytes`); `None` past that.
    memo: Option<Vec<Message>>,
    memo_bytes: usize,
    /// A write of staged frames failed: the epoch lacks records, and is only discarded.
    lost: bool,
    volume: File,
    volume_path: PathBuf,
    size: u64,
    state_path: PathBuf,
    applied: Applied,
    /// A failure left the log or the volume unknown: only a reopen goes on.
    needs_recovery: bool,
}

/// What the log holds at an offset.
enum Frame {
    /// A whole frame that decodes, of this many bytes.
    Whole(Message, u64),
    /// The log ends here.
    End,
    /// A torn or corrupt tail, and why.
    Bad(String),
}

/// What a first reading of the log found.
struct Scan {
    /// Whole records before the `Cut` or the end.
    records: usize,
    /// The `Cut`: its offset in the log, epoch, seq and time.
    commit: Option<(u64, Applied)>,
    /// Where the frames stop making sense before the log's end, and why.
    tail: Option<(u64, String)>,
}

impl Applier {
    /// Opens the volume of `id`, `size` bytes at `volume`, with its staging log and applied state
    /// in `dir` (the log is created if missing), and recovers as the module doc says.
    pub fn open(
        dir: &Path,
        id: &str,
        volume: &Path,
        size: u64,
    ) -> Result<(Applier, Recovery), Error> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::InvalidId(id.to_owned()));
        }
        let state_path = dir.join(format!("{id}.applied"));
        let log_path = dir.join(format!("{id}.log"));
        let applied = read_state(&state_path)?.unwrap_or_default();
        let volume_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(volume)
            .map_err(|source| Error::Volume {
                op: "open",
                path: volume.to_owned(),
                source,
            })?;
        let log_err = |op| {
            let path = log_path.clone();
            move |source| Error::Log { op, path, source }
        };
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&log_path)
            .map_err(log_err("open"))?;
        // The log's name is durable before an epoch can be committed in it.
        sync_dir(dir).map_err(log_err("sync the directory of"))?;
        let log_len = log.metadata().map_err(log_err("stat"))?.len();
        let mut applier = Applier {
            dir: dir.to_owned(),
            log,
            log_path,
            log_len,
            unwritten: Vec::new(),
            memo: Some(Vec::new()),
            memo_bytes: 0,
            lost: false,
            volume: volume_file,
            volume_path: volume.to_owned(),
            size,
            state_path,
            applied,
            needs_recovery: true,
        };
        let recovery = applier.recover()?;
        applier.needs_recovery = false;
        Ok((applier, recovery))
    }

    /// Makes the volume of `id` a secondary whose image is level with its new primary's at
    /// `seq` (a primary demoted): whatever staging log and state it had are dropped, and the
    /// image is recorded consistent, at epoch 0. The volume is synced first.
    pub fn start_level(
        dir: &Path,
        id: &str,
        volume: &Path,
        size: u64,
        seq: u64,
        time_unix_ns: u64,
    ) -> Result<Applied, Error> {
        for path in [
            dir.join(format!("{id}.log")),
            dir.join(format!("{id}.applied")),
        ] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::State {
                        op: "remove",
                        path,
                        source: e,
                    })
                }
                _ => {}
            }
        }
        let (mut applier, _) = Applier::open(dir, id, volume, size)?;
        applier.mark_consistent(0, seq, time_unix_ns)
    }

    /// Stages `record` (a `Write`, `Zero` or `Region`), once it is checked to lie inside the
    /// volume in whole sectors: its frame joins those to be written to the log, and no I/O is
    /// done here. On an error nothing is staged.
    pub fn stage(&mut self, record: Message) -> Result<(), Error> {
        self.stage_as(record, None)
    }

    /// [`stage`](Self::stage) of a record that came in as `frame` (checked by
    /// [`wire::decode`], which gave `record`): that frame is what joins the log, not encoded
    /// again.
    pub fn stage_frame(&mut self, record: Message, frame: &[u8]) -> Result<(), Error> {
        self.stage_as(record, Some(frame))
    }

    fn stage_as(&mut self, record: Message, frame: Option<&[u8]>) -> Result<(), Error> {
        self.usable()?;
        let (offset, len) = record_range(&record)?;
        self.check_range(offset, len)?;
        match frame {
            Some(frame) => {
                debug_assert!(
                    matches!(wire::decode(frame), Ok(Some((ref m, n))) if *m == record && n == frame.len()),
                    "a staged frame is the record's"
                );
                self.unwritten.extend_from_slice(frame);
            }
            None => wire::encode(&record, &mut self.unwritten)?,
        }
        if let Some(memo) = &mut self.memo {
            let data = match &record {
                Message::Write { data, .. } | Message::Region { data, .. } => data.len(),
                _ => 0,
            };
            if self.memo_bytes + data <= MEMO_CAP {
                self.memo_bytes += data;
                memo.push(record);
            } else {
                self.memo = None;
            }
        }
        Ok(())
    }

    /// Whether enough frames are staged that [`write_staged`](Self::write_staged) is due.
    pub fn write_due(&self) -> bool {
        self.unwritten.len() >= STAGE_CHUNK
    }

    /// Writes the frames staged so far to the log (not synced).
    pub fn write_staged(&mut self) -> Result<(), Error> {
        self.usable()?;
        if self.lost {
            return Err(Error::StagedLost);
        }
        self.write_unwritten()
    }

    fn write_unwritten(&mut self) -> Result<(), Error> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        if let Err(source) = self.log.write_all_at(&self.unwritten, self.log_len) {
            // Take back the part that reached the file: left there, a frame written over it
            // could leave bytes of the guest's data where a frame is read.
            if self.log.set_len(self.log_len).is_err() {
                self.needs_recovery = true;
            }
            self.lost = true;
            self.unwritten.clear();
            return Err(self.log_err("append to", source));
        }
        self.log_len += self.unwritten.len() as u64;
        self.unwritten.clear();
        Ok(())
    }

    /// Ends the epoch staged since the last commit (steps 1 to 5 of the module doc) and returns
    /// the volume's new state. `epoch` must be after the applied one.
    pub fn commit(&mut self, epoch: u64, seq: u64, time_unix_ns: u64) -> Result<Applied, Error> {
        self.usable()?;
        if epoch <= self.applied.epoch {
            return Err(Error::StaleEpoch {
                epoch,
                applied: self.applied.epoch,
            });
        }
        let next = Applied {
            epoch,
            seq,
            time_unix_ns,
            consistent: true,
        };
        if self.lost {
            return Err(Error::StagedLost);
        }
        // Cleared at the end: any failure from here on leaves the log unknown.
        self.needs_recovery = true;
        if self.staged_bytes() > 0 {
            let cut_at = self.staged_bytes();
            wire::encode(
                &Message::Cut {
                    epoch,
                    seq,
                    time_unix_ns,
                },
                &mut self.unwritten,
            )?;
            self.write_unwritten()?;
            self.log
                .sync_data()
                .map_err(|e| self.log_err("fdatasync", e))?;
            match self.memo.take() {
                Some(records) => records.iter().try_for_each(|r| self.apply(r))?,
                None => {
                    self.replay(cut_at)?;
                }
            }
        }
        self.finish_apply(next)?;
        self.needs_recovery = false;
        Ok(self.applied.clone())
    }

    /// Writes `data` at `offset` straight into the volume, unstaged and not synced: the initial
    /// sync, on an image marked inconsistent. Checked as [`Applier::stage`] checks a record.
    pub fn write_in_place(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.usable()?;
        if self.applied.consistent {
            return Err(Error::Consistent);
        }
        self.check_range(offset, data.len() as u64)?;
        self.write_volume(offset, data)
    }

    /// The initial sync is complete: syncs the volume and records it consistent at the end of
    /// `epoch`.
    pub fn mark_consistent(
        &mut self,
        epoch: u64,
        seq: u64,
        time_unix_ns: u64,
    ) -> Result<Applied, Error> {
        self.usable()?;
        // A failed fdatasync may have lost in-place writes that a later one would not report.
        self.needs_recovery = true;
        self.sync_volume()?;
        let next = Applied {
            epoch,
            seq,
            time_unix_ns,
            consistent: true,
        };
        write_state(&self.dir, &self.state_path, &next)?;
        self.applied = next;
        self.needs_recovery = false;
        Ok(self.applied.clone())
    }

    /// Records the image inconsistent: the initial sync is about to write it in place.
    pub fn mark_inconsistent(&mut self) -> Result<(), Error> {
        self.usable()?;
        let next = Applied {
            consistent: false,
            ..self.applied.clone()
        };
        write_state(&self.dir, &self.state_path, &next)?;
        self.applied = next;
        Ok(())
    }

    /// Where the image stands.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// Bytes staged and not yet committed (frames, headers included), written or not.
    pub fn staged_bytes(&self) -> u64 {
        self.log_len + self.unwritten.len() as u64
    }

    /// Drops the records staged since the last commit (the link broke mid-epoch; the primary
    /// sends them again).
    pub fn discard_staged(&mut self) -> Result<(), Error> {
        self.usable()?;
        self.unwritten.clear();
        self.reset_memo();
        self.lost = false;
        self.needs_recovery = true;
        self.empty_log()?;
        self.needs_recovery = false;
        Ok(())
    }

    fn usable(&self) -> Result<(), Error> {
        match self.needs_recovery {
            true => Err(Error::NeedsRecovery),
            false => Ok(()),
        }
    }

    fn recover(&mut self) -> Result<Recovery, Error> {
        if self.log_len == 0 {
            return Ok(Recovery::Clean);
        }
        let scan = self.scan()?;
        if let Some((offset, reason)) = &scan.tail {
            tracing::warn!(
                log = %self.log_path.display(),
                offset,
                "dropping the staging log's tail: {reason}"
            );
        }
        let recovery = match scan.commit {
            Some((cut_at, next)) if next.epoch > self.applied.epoch => {
                let records = self.replay(cut_at)?;
                let epoch = next.epoch;
                self.finish_apply(next)?;
                tracing::info!(
                    log = %self.log_path.display(),
                    epoch,
                    records,
                    "applied again a committed epoch"
                );
                return Ok(Recovery::Replayed { epoch, records });
            }
            Some(_) => Recovery::Clean,
            None => Recovery::DroppedUncommitted {
                records: scan.records,
            },
        };
        self.empty_log()?;
        Ok(recovery)
    }

    /// Reads the log up to its first `Cut` or its end, applying nothing.
    fn scan(&self) -> Result<Scan, Error> {
        let mut buf = Vec::new();
        let mut scan = Scan {
            records: 0,
            commit: None,
            tail: None,
        };
        let mut at = 0;
        loop {
            match self.read_frame(at, &mut buf)? {
                Frame::End => break,
                Frame::Bad(reason) => {
                    scan.tail = Some((at, reason));
                    break;
                }
                Frame::Whole(
                    Message::Cut {
                        epoch,
                        seq,
                        time_unix_ns,
                    },
                    len,
                ) => {
                    let applied = Applied {
                        epoch,
                        seq,
                        time_unix_ns,
                        consistent: true,
                    };
                    scan.commit = Some((at, applied));
                    if at + len < self.log_len {
                        let reason = "frames after the commit frame".to_owned();
                        scan.tail = Some((at + len, reason));
                    }
                    break;
                }
                Frame::Whole(msg, len) => {
                    if record_range(&msg).is_err() {
                        let reason = format!("a {:?} frame, not a record", msg.message_type());
                        scan.tail = Some((at, reason));
                        break;
                    }
                    scan.records += 1;
                    at += len;
                }
            }
        }
        Ok(scan)
    }

    /// Applies, in order, the records the log holds before `end` (a `Cut`'s offset); returns
    /// how many.
    fn replay(&self, end: u64) -> Result<usize, Error> {
        let mut buf = Vec::new();
        let mut at = 0;
        let mut records = 0;
        while at < end {
            let corrupt = |reason| Error::CorruptLog {
                path: self.log_path.clone(),
                offset: at,
                reason,
            };
            match self.read_frame(at, &mut buf)? {
                Frame::Whole(msg, len) if at + len <= end => {
                    self.apply(&msg)?;
                    records += 1;
                    at += len;
                }
                Frame::Whole(..) => return Err(corrupt("a frame across the commit".to_owned())),
                Frame::End => return Err(corrupt("the log ends".to_owned())),
                Frame::Bad(reason) => return Err(corrupt(reason)),
            }
        }
        Ok(records)
    }

    /// Steps 3 to 5: syncs the volume, records `next`, empties the log.
    fn finish_apply(&mut self, next: Applied) -> Result<(), Error> {
        self.sync_volume()?;
        write_state(&self.dir, &self.state_path, &next)?;
        self.applied = next;
        if self.log_len > 0 {
            self.empty_log()?;
        }
        self.reset_memo();
        Ok(())
    }

    fn reset_memo(&mut self) {
        self.memo = Some(Vec::new());
        self.memo_bytes = 0;
    }

    /// Reads the frame at `at` into `buf` (one frame's bytes at most).
    fn read_frame(&self, at: u64, buf: &mut Vec<u8>) -> Result<Frame, Error> {
        let left = self.log_len - at.min(self.log_len);
        if left == 0 {
            return Ok(Frame::End);
        }
        let mut header = [0u8; HEADER_LEN];
        if left < HEADER_LEN as u64 {
            return Ok(Frame::Bad(format!(
                "{left} bytes, less than a frame header"
            )));
        }
        self.log
            .read_exact_at(&mut header, at)
            .map_err(|e| self.log_err("read", e))?;
        // A bad header is an error from its 16 bytes alone; a good one announces at most
        // MAX_PAYLOAD bytes.
        let payload_len = match wire::decode(&header) {
            Err(e) => return Ok(Frame::Bad(e.to_string())),
            Ok(Some((msg, len))) => return Ok(Frame::Whole(msg, len as u64)),
            Ok(None) => {
                let [_, _, _, _, _, _, _, _, l0, l1, l2, l3, _, _, _, _] = header;
                u32::from_le_bytes([l0, l1, l2, l3])
            }
        };
        let frame_len = HEADER_LEN as u64 + u64::from(payload_len);
        if left < frame_len {
            return Ok(Frame::Bad(format!(
                "a frame of {frame_len} bytes cut short at {left}"
            )));
        }
        buf.clear();
        buf.extend_from_slice(&header);
        buf.resize(HEADER_LEN + payload_len as usize, 0);
        self.log
            .read_exact_at(&mut buf[HEADER_LEN..], at + HEADER_LEN as u64)
            .map_err(|e| self.log_err("read", e))?;
        Ok(match wire::decode(buf) {
            Ok(Some((msg, len))) => Frame::Whole(msg, len as u64),
            Ok(None) => Frame::Bad("an incomplete frame".to_owned()),
            Err(e) => Frame::Bad(e.to_string()),
        })
    }

    /// Applies one record to the volume.
    fn apply(&self, record: &Message) -> Result<(), Error> {
        let (offset, len) = record_range(record)?;
        self.check_range(offset, len)?;
        match record {
            Message::Write { data, .. } | Message::Region { data, .. } => {
                self.write_volume(offset, data)
            }
            Message::Zero { discard, .. } => {
                zero(&self.volume, offset, len, *discard).map_err(|source| Error::VolumeRange {
                    op: if *discard { "discard" } else { "zero" },
                    path: self.volume_path.clone(),
                    offset,
                    len,
                    source,
                })
            }
            other => Err(Error::NotARecord(other.message_type())),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(Error::OutOfBounds {
                    offset,
                    len,
                    size: self.size,
                })
            }
        }
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::Misaligned { offset, len });
        }
        Ok(())
    }

    fn write_volume(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.volume
            .write_all_at(data, offset)
            .map_err(|source| Error::VolumeRange {
                op: "write",
                path: self.volume_path.clone(),
                offset,
                len: data.len() as u64,
                source,
            })
    }

    fn sync_volume(&self) -> Result<(), Error> {
        self.volume.sync_data().map_err(|source| Error::Volume {
            op: "fdatasync",
            path: self.volume_path.clone(),
            source,
        })
    }

    fn empty_log(&mut self) -> Result<(), Error> {
        self.log
            .set_len(0)
            .map_err(|e| self.log_err("truncate", e))?;
        self.log_len = 0;
        self.log
            .sync_data()
            .map_err(|e| self.log_err("fdatasync", e))
    }

    fn log_err(&self, op: &'static str, source: io::Error) -> Error {
        Error::Log {
            op,
            path: self.log_path.clone(),
            source,
        }
    }
}

/// The byte range a record changes, or [`Error::NotARecord`].
fn record_range(msg: &Message) -> Result<(u64, u64), Error> {
    match msg {
        Message::Write { offset, data, .. } | Message::Region { offset, data } => {
            Ok((*offset, data.len() as u64))
        }
        Message::Zero { offset, len, .. } => Ok((*offset, *len)),
        other => Err(Error::NotARecord(other.message_type())),
    }
}

/// Zeroes `len` bytes at `offset`: a discard punches a hole where the storage can (and keeps
/// the data where it cannot, as the primary does); a write-zeroes zeroes the range, punching
/// or writing zeros where the storage has no ZERO_RANGE.
fn zero(file: &File, offset: u64, len: u64, discard: bool) -> io::Result<()> {
    // fallocate refuses an empty range.
    if len == 0 {
        return Ok(());
    }
    let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
    if discard {
        return match fallocate(file, FALLOC_PUNCH, offset, len) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        };
    }
    match fallocate(file, FALLOC_ZERO, offset, len) {
        Err(e) if unsupported(&e) => match fallocate(file, FALLOC_PUNCH, offset, len) {
            Err(e) if unsupported(&e) => write_zeros(file, offset, len),
            r => r,
        },
        r => r,
    }
}

fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The state in `path`, or `None` if there is no such file.
fn read_state(path: &Path) -> Result<Option<Applied>, Error> {
    let err = |op| {
        move |source| Error::State {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err("open")(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(err("read"))?;
    if bytes.len() as u64 > MAX_STATE_LEN {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_STATE_LEN} bytes"),
        );
        return Err(err("parse")(e));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| err("parse")(e.into()))
}

/// Replaces the state in `path` (in `dir`) with `applied`: either the old or the new one
/// survives a crash.
fn write_state(dir: &Path, path: &Path, applied: &Applied) -> Result<(), Error> {
    let err = |op| {
        move |source| Error::State {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut bytes = serde_json::to_vec(applied).map_err(|e| err("encode")(e.into()))?;
    bytes.push(b'\n');
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err("create the temporary file of"))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(err("write the temporary file of"))?;
    fs::rename(&tmp, path).map_err(err("rename over"))?;
    sync_dir(dir).map_err(err("sync the directory of"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "vol";
    const SIZE: u64 = 16 << 10;

    fn volume_path(dir: &Path) -> PathBuf {
        dir.join("vol.img")
    }

    fn state_path(dir: &Path) -> PathBuf {
        dir.join("vol.applied")
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join("vol.log")
    }

    /// A directory with a volume of `SIZE` bytes holding `image`.
    fn volume_dir(image: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(volume_path(dir.path()), image).unwrap();
        dir
    }

    fn open(dir: &Path) -> (Applier, Recovery) {
        Applier::open(dir, ID, &volume_path(dir), SIZE).unwrap()
    }

    fn image(dir: &Path) -> Vec<u8> {
        fs::read(volume_path(dir)).unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn write(seq: u64, offset: u64, data: Vec<u8>) -> Message {
        Message::Write { seq, offset, data }
    }

    fn zero(seq: u64, offset: u64, len: u64, discard: bool) -> Message {
        Message::Zero {
            seq,
            offset,
            len,
            discard,
        }
    }

    /// What a record does to an image, as the test expects it.
    fn apply_model(image: &mut [u8], record: &Message) {
        match record {
            Message::Write { offset, data, .. } | Message::Region { offset, data } => {
                let at = *offset as usize;
                image[at..at + data.len()].copy_from_slice(data);
            }
            Message::Zero { offset, len, .. } => {
                image[*offset as usize..(*offset + *len) as usize].fill(0);
            }
            other => panic!("not a record: {other:?}"),
        }
    }

    /// The first half of what `record` changes: a write torn by a crash.
    fn first_half(record: &Message) -> Message {
        match record {
            Message::Write { seq, offset, data } => {
                write(*seq, *offset, data[..data.len() / 2].to_vec())
            }
            Message::Region { offset, data } => Message::Region {
                offset: *offset,
                data: data[..data.len() / 2].to_vec(),
            },
            Message::Zero {
                seq,
                offset,
                len,
                discard,
            } => zero(*seq, *offset, len / 2, *discard),
            other => panic!("not a record: {other:?}"),
        }
    }

    fn frame(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        wire::encode(msg, &mut out).unwrap();
        out
    }

    #[test]
    fn commit_applies_the_records_in_order_and_the_state_survives_a_reopen() {
        let dir = volume_dir(&vec![0xff; SIZE as usize]);
        let (mut a, recovery) = open(dir.path());
        assert_eq!(recovery, Recovery::Clean);
        assert_eq!(a.applied(), &Applied::default());
        let records = [
            write(1, 0, vec![1; 2048]),
            // Overlaps the first write's second half: the later one wins.
            write(2, 1024, vec![2; 2048]),
            zero(3, 4096, 1024, true),
            zero(4, 6144, 512, false),
            Message::Region {
                offset: 8192,
                data: vec![3; 512],
            },
        ];
        for r in &records {
            a.stage(r.clone()).unwrap();
        }
        let staged: usize = records.iter().map(wire::encoded_len).sum();
        assert_eq!(a.staged_bytes(), staged as u64);
        // Nothing reaches the volume before the commit.
        assert_eq!(image(dir.path()), vec![0xff; SIZE as usize]);
        let applied = a.commit(7, 4, 1234).unwrap();
        let want = Applied {
            epoch: 7,
            seq: 4,
            time_unix_ns: 1234,
            consistent: true,
        };
        assert_eq!(applied, want);
        assert_eq!(a.staged_bytes(), 0);
        assert_eq!(fs::metadata(log_path(dir.path())).unwrap().len(), 0);

        let img = image(dir.path());
        assert_eq!(img[..1024], [1; 1024]);
        assert_eq!(img[1024..3072], [2; 2048]);
        assert_eq!(img[4096..5120], [0; 1024]);
        assert_eq!(img[5120..6144], [0xff; 1024]);
        assert_eq!(img[6144..6656], [0; 512]);
        assert_eq!(img[8192..8704], [3; 512]);
        let mut model = vec![0xff; SIZE as usize];
        records.iter().for_each(|r| apply_model(&mut model, r));
        assert_eq!(img, model);

        drop(a);
        let (a, recovery) = open(dir.path());
        assert_eq!(recovery, Recovery::Clean);
        assert_eq!(a.applied(), &want);
    }

    #[test]
    fn an_empty_epoch_commits_without_a_log() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let (mut a, _) = open(dir.path());
        assert_eq!(a.commit(1, 0, 5).unwrap().epoch, 1);
        drop(a);
        let (a, recovery) = open(dir.path());
        assert_eq!(recovery, Recovery::Clean);
        assert_eq!(a.applied().time_unix_ns, 5);
    }

    #[test]
    fn commit_refuses_an_epoch_not_after_the_applied_one() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let (mut a, _) = open(dir.path());
        a.commit(3, 1, 1).unwrap();
        a.stage(write(2, 0, vec![9; 512])).unwrap();
        for epoch in [2, 3] {
            let err = a.commit(epoch, 2, 2).unwrap_err();
            assert!(
                matches!(err, Error::StaleEpoch { epoch: e, applied: 3 } if e == epoch),
                "{err}"
            );
        }
        // The records stay staged, for the next epoch.
        assert_eq!(a.commit(4, 2, 2).unwrap().epoch, 4);
        assert_eq!(image(dir.path())[..512], [9; 512]);
    }

    #[test]
    fn stage_refuses_ranges_outside_the_volume_misaligned_ranges_and_non_records() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let (mut a, _) = open(dir.path());
        let past_end = write(1, SIZE - 512, vec![1; 1024]);
        let err = a.stage(past_end.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OutOfBounds {
                    offset: 15872,
                    len: 1024,
                    size: SIZE
                }
            ),
            "{err}"
        );
        let err = a.stage(zero(1, SIZE, 512, false)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OutOfBounds {
                    offset: SIZE,
                    len: 512,
                    size: SIZE
                }
            ),
            "{err}"
        );
        let overflowing = Message::Region {
            offset: u64::MAX - 511,
            data: vec![1; 512],
        };
        assert!(matches!(
            a.stage(overflowing.clone()),
            Err(Error::OutOfBounds { .. })
        ));
        let err = a.stage(write(1, 100, vec![1; 512])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Misaligned {
                    offset: 100,
                    len: 512
                }
            ),
            "{err}"
        );
        let err = a.stage(zero(1, 512, 100, true)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Misaligned {
                    offset: 512,
                    len: 100
                }
            ),
            "{err}"
        );
        let cut = Message::Cut {
            epoch: 1,
            seq: 1,
            time_unix_ns: 1,
        };
        let err = a.stage(cut.clone()).unwrap_err();
        assert!(matches!(err, Error::NotARecord(MessageType::Cut)), "{err}");
        let err = a.stage(Message::Ping { time_unix_ns: 1 }).unwrap_err();
        assert!(matches!(err, Error::NotARecord(MessageType::Ping)), "{err}");

        assert_eq!(a.staged_bytes(), 0);
        assert_eq!(fs::metadata(log_path(dir.path())).unwrap().len(), 0);
        a.commit(1, 1, 1).unwrap();
        assert_eq!(image(dir.path()), vec![0; SIZE as usize]);
    }

    #[test]
    fn a_corrupt_applied_state_is_an_error_and_is_left_alone() {
        let cases: [&[u8]; 5] = [
            b"",
            b"not json",
            br#"{"epoch":1,"seq":2"#,
            br#"{"epoch":1,"seq":2,"time_unix_ns":3,"consistent":"yes"}"#,
            br#"{"epoch":1,"seq":2,"time_unix_ns":3,"consistent":true,"extra":0}"#,
        ];
        for bytes in cases {
            let dir = volume_dir(&[0; SIZE as usize]);
            fs::write(state_path(dir.path()), bytes).unwrap();
            match Applier::open(dir.path(), ID, &volume_path(dir.path()), SIZE) {
                Err(Error::State { op: "parse", .. }) => {}
                Err(e) => panic!("{bytes:?}: {e}"),
                Ok(_) => panic!("{bytes:?} opened"),
            }
            assert_eq!(fs::read(state_path(dir.path())).unwrap(), bytes);
        }
        let dir = volume_dir(&[0; SIZE as usize]);
        fs::write(
            state_path(dir.path()),
            vec![b' '; MAX_STATE_LEN as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            Applier::open(dir.path(), ID, &volume_path(dir.path()), SIZE),
            Err(Error::State { op: "parse", .. })
        ));
    }

    #[test]
    fn an_id_that_is_not_a_plain_name_is_refused() {
        let dir = volume_dir(&[0; SIZE as usize]);
        for id in ["", "../vol", "a/b", "vol.x"] {
            assert!(matches!(
                Applier::open(dir.path(), id, &volume_path(dir.path()), SIZE),
                Err(Error::InvalidId(_))
            ));
        }
    }

    #[test]
    fn the_initial_sync_writes_in_place_and_ends_consistent() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let (mut a, _) = open(dir.path());
        a.commit(1, 1, 1).unwrap();
        // A consistent image is not written in place.
        assert!(matches!(
            a.write_in_place(0, &[1; 512]),
            Err(Error::Consistent)
        ));
        a.mark_inconsistent().unwrap();
        drop(a);
        let (mut a, _) = open(dir.path());
        let inconsistent = Applied {
            epoch: 1,
            seq: 1,
            time_unix_ns: 1,
            consistent: false,
        };
        assert_eq!(a.applied(), &inconsistent);
        a.write_in_place(0, &[1; 512]).unwrap();
        a.write_in_place(SIZE - 1024, &[2; 1024]).unwrap();
        assert!(matches!(
            a.write_in_place(SIZE - 512, &[2; 1024]),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            a.write_in_place(1, &[2; 512]),
            Err(Error::Misaligned { .. })
        ));
        // Nothing is staged by the initial sync.
        assert_eq!(a.staged_bytes(), 0);
        let consistent = a.mark_consistent(5, 40, 99).unwrap();
        drop(a);
        let (a, _) = open(dir.path());
        assert_eq!(a.applied(), &consistent);
        assert!(consistent.consistent);
        let img = image(dir.path());
        assert_eq!(img[..512], [1; 512]);
        assert_eq!(img[SIZE as usize - 1024..], [2; 1024]);
    }

    #[test]
    fn an_epoch_past_the_memory_cap_is_written_in_chunks_and_applied_from_the_log() {
        const BIG: usize = MEMO_CAP + (4 << 20);
        let dir = volume_dir(&vec![0; BIG]);
        let (mut a, _) =
            Applier::open(dir.path(), ID, &volume_path(dir.path()), BIG as u64).unwrap();
        let mut writes = 0;
        for i in 0..BIG >> 20 {
            a.stage(Message::Region {
                offset: (i << 20) as u64,
                data: vec![i as u8 + 1; 1 << 20],
            })
            .unwrap();
            if a.write_due() {
                a.write_staged().unwrap();
                writes += 1;
            }
        }
        // Each region's frame is a chunk: written as it came, never more than one held.
        assert_eq!(writes, BIG >> 20);
        assert!(a.memo.is_none());
        a.commit(1, 1, 1).unwrap();
        let img = image(dir.path());
        for (i, chunk) in img.chunks(1 << 20).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8 + 1), "region {i}");
        }
        assert_eq!(a.staged_bytes(), 0);
        assert!(a.memo.as_ref().is_some_and(Vec::is_empty));
    }

    #[test]
    fn discarded_records_never_reach_the_volume() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let (mut a, _) = open(dir.path());
        a.stage(write(1, 0, vec![1; 1024])).unwrap();
        a.stage(zero(2, 2048, 512, false)).unwrap();
        a.discard_staged().unwrap();
        assert_eq!(a.staged_bytes(), 0);
        assert_eq!(fs::metadata(log_path(dir.path())).unwrap().len(), 0);
        a.stage(write(1, 4096, vec![2; 512])).unwrap();
        a.commit(1, 1, 1).unwrap();
        let mut want = vec![0; SIZE as usize];
        want[4096..4608].fill(2);
        assert_eq!(image(dir.path()), want);
    }

    #[test]
    fn a_corrupt_frame_before_the_commit_drops_the_epoch() {
        let dir = volume_dir(&[7; SIZE as usize]);
        let first = frame(&write(1, 0, vec![1; 512]));
        let mut log = first.clone();
        log.extend(frame(&write(2, 512, vec![2; 512])));
        log.extend(frame(&Message::Cut {
            epoch: 1,
            seq: 2,
            time_unix_ns: 1,
        }));
        log[first.len() + 100] ^= 0x10;
        fs::write(log_path(dir.path()), &log).unwrap();
        let (a, recovery) = open(dir.path());
        assert_eq!(recovery, Recovery::DroppedUncommitted { records: 1 });
        assert_eq!(a.applied(), &Applied::default());
        assert_eq!(image(dir.path()), vec![7; SIZE as usize]);
        assert_eq!(fs::metadata(log_path(dir.path())).unwrap().len(), 0);
    }

    #[test]
    fn frames_after_the_commit_frame_are_dropped() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let mut log = frame(&write(1, 0, vec![1; 512]));
        log.extend(frame(&Message::Cut {
            epoch: 1,
            seq: 1,
            time_unix_ns: 1,
        }));
        log.extend(frame(&write(2, 512, vec![2; 512])));
        log.extend(frame(&Message::Cut {
            epoch: 2,
            seq: 2,
            time_unix_ns: 2,
        }));
        fs::write(log_path(dir.path()), &log).unwrap();
        let (a, recovery) = open(dir.path());
        assert_eq!(
            recovery,
            Recovery::Replayed {
                epoch: 1,
                records: 1
            }
        );
        assert_eq!(a.applied().epoch, 1);
        let mut want = vec![0; SIZE as usize];
        want[..512].fill(1);
        assert_eq!(image(dir.path()), want);
    }

    #[test]
    fn a_frame_that_is_not_a_record_ends_the_epoch_uncommitted() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let mut log = frame(&write(1, 0, vec![1; 512]));
        log.extend(frame(&Message::Ping { time_unix_ns: 1 }));
        log.extend(frame(&Message::Cut {
            epoch: 1,
            seq: 1,
            time_unix_ns: 1,
        }));
        fs::write(log_path(dir.path()), &log).unwrap();
        let (_, recovery) = open(dir.path());
        assert_eq!(recovery, Recovery::DroppedUncommitted { records: 1 });
        assert_eq!(image(dir.path()), vec![0; SIZE as usize]);
    }

    #[test]
    fn a_committed_record_outside_the_volume_is_an_error_not_a_write() {
        let dir = volume_dir(&[0; SIZE as usize]);
        let mut log = frame(&write(1, SIZE, vec![1; 512]));
        log.extend(frame(&Message::Cut {
            epoch: 1,
            seq: 1,
            time_unix_ns: 1,
        }));
        fs::write(log_path(dir.path()), &log).unwrap();
        assert!(matches!(
            Applier::open(dir.path(), ID, &volume_path(dir.path()), SIZE),
            Err(Error::OutOfBounds { .. })
        ));
        // The committed epoch is kept for a volume that can take it.
        assert_eq!(fs::read(log_path(dir.path())).unwrap(), log);
        assert_eq!(fs::metadata(volume_path(dir.path())).unwrap().len(), SIZE);
    }

    /// The files a crash left: the log, the volume, the applied state, maybe the state's
    /// temporary file.
    struct Crash<'a> {
        log: &'a [u8],
        volume: &'a [u8],
        state: &'a [u8],
        tmp_state: bool,
    }

    /// Lays out `crash` in `dir`, opens it, and returns the image, the recovery and the state.
    fn recover(dir: &Path, crash: &Crash<'_>) -> (Vec<u8>, Recovery, Applied) {
        fs::write(log_path(dir), crash.log).unwrap();
        fs::write(volume_path(dir), crash.volume).unwrap();
        fs::write(state_path(dir), crash.state).unwrap();
        let tmp = dir.join("vol.applied.tmp");
        if crash.tmp_state {
            fs::write(&tmp, b"{\"epo").unwrap();
        } else {
            let _ = fs::remove_file(&tmp);
        }
        let (a, recovery) = open(dir);
        assert_eq!(a.staged_bytes(), 0);
        assert_eq!(fs::metadata(log_path(dir)).unwrap().len(), 0);
        let applied = a.applied().clone();
        drop(a);
        (image(dir), recovery, applied)
    }

    #[test]
    fn a_crash_at_any_point_of_an_epoch_leaves_the_previous_or_the_new_image() {
        // Epoch 1: the whole volume, a pattern, so that zeroed ranges show.
        let base = volume_dir(&[0; SIZE as usize]);
        let (mut a, _) = open(base.path());
        a.stage(write(1, 0, pattern(SIZE as usize, 0x5a))).unwrap();
        let applied1 = a.commit(1, 1, 100).unwrap();
        let v1 = image(base.path());
        let state1 = fs::read(state_path(base.path())).unwrap();

        // Epoch 2: small records of each kind, two of them overlapping.
        let records = [
            write(2, 0, pattern(1024, 1)),
            write(3, 512, pattern(512, 2)),
            zero(4, 4096, 1024, true),
            zero(5, 8192, 512, false),
            Message::Region {
                offset: 12288,
                data: pattern(512, 3),
            },
        ];
        for r in &records {
            a.stage(r.clone()).unwrap();
        }
        a.write_staged().unwrap();
        let staged = fs::read(log_path(base.path())).unwrap();
        let cut = frame(&Message::Cut {
            epoch: 2,
            seq: 5,
            time_unix_ns: 200,
        });
        let applied2 = a.commit(2, 5, 200).unwrap();
        let v2 = image(base.path());
        let state2 = fs::read(state_path(base.path())).unwrap();
        let mut model = v1.clone();
        records.iter().for_each(|r| apply_model(&mut model, r));
        assert_eq!(v2, model);
        assert_ne!(v1, v2);

        // Offsets in the log where each record's frame ends.
        let ends: Vec<usize> = records
            .iter()
            .scan(0, |end, r| {
                *end += wire::encoded_len(r);
                Some(*end)
            })
            .collect();
        assert_eq!(ends.last(), Some(&staged.len()));
        let mut committed = staged.clone();
        committed.extend_from_slice(&cut);

        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let mut cases = 0;
        let mut check = |crash: Crash<'_>, want_image: &[u8], want: Recovery, applied: &Applied| {
            let (img, recovery, got) = recover(dir, &crash);
            let at = (crash.log.len(), crash.tmp_state);
            assert!(img == v1 || img == v2, "a mixed image at {at:?}");
            assert!(img == want_image, "the wrong image at {at:?}");
            assert_eq!(recovery, want, "at {at:?}");
            assert_eq!(&got, applied, "at {at:?}");
            cases += 1;
        };

        // Killed while staging, or while appending the commit frame: the epoch is dropped.
        for len in 0..committed.len() {
            let records = ends.iter().filter(|&&end| end <= len).count();
            let want = match len {
                0 => Recovery::Clean,
                _ => Recovery::DroppedUncommitted { records },
            };
            let crash = Crash {
                log: &committed[..len],
                volume: &v1,
                state: &state1,
                tmp_state: false,
            };
            check(crash, &v1, want, &applied1);
        }

        // Killed after the commit was durable, before, while or after applying each record,
        // or while writing the state: the epoch is applied again.
        let mut volumes = Vec::new();
        let mut partial = v1.clone();
        for r in &records {
            volumes.push(partial.clone());
            let mut torn = partial.clone();
            apply_model(&mut torn, &first_half(r));
            volumes.push(torn);
            apply_model(&mut partial, r);
        }
        volumes.push(partial);
        for volume in &volumes {
            for tmp_state in [false, true] {
                let crash = Crash {
                    log: &committed,
                    volume,
                    state: &state1,
                    tmp_state,
                };
                let replayed = Recovery::Replayed {
                    epoch: 2,
                    records: records.len(),
                };
                check(crash, &v2, replayed, &applied2);
            }
        }

        // Killed after the state was written, before or after the log was emptied.
        for log in [&committed[..], &[]] {
            let crash = Crash {
                log,
                volume: &v2,
                state: &state2,
                tmp_state: false,
            };
            check(crash, &v2, Recovery::Clean, &applied2);
        }
        assert_eq!(cases, committed.len() + 2 * volumes.len() + 2);
    }
}
