//! The replicate stage: a primary volume's requests that change its data are appended, as
//! they complete and before the guest is answered, to its replication log
//! ([`crate::replication::log`]), which the link ships to the secondary. A write is recorded
//! with its data as stored: the ciphertext of an encrypted volume (its bounce buffer), the
//! guest's data otherwise (its bounce copy, or read again from guest memory, which the guest
//! may not change before it has the answer). A discard or write-zeroes is recorded as its
//! ranges, a successful FLUSH as the end of an epoch. Before any of them is submitted, the
//! regions it changes are marked in the volume's dirty map on disk
//! ([`Replicate::before_submit`]). A volume that is not a primary has no log, and the stage
//! does nothing.

use crate::blk::inflight::InFlight;
use crate::blk::request::{self, Operation};
use crate::blk::VolumeIo;
use crate::replication::log::ReplicationLog;

/// The replicate stage of one volume: its log, if it is a primary.
pub struct Replicate {
    log: arc_swap::Guard<Option<std::sync::Arc<ReplicationLog>>>,
}

impl Replicate {
    pub fn of(volume: &VolumeIo) -> Self {
        Replicate {
            log: volume.replication.load(),
        }
    }

    fn log(&self) -> Option<&ReplicationLog> {
        self.log.as_deref()
    }

    /// Marks the regions `inflight` is about to change in the dirty map, durably (a write
    /// waits here only the first time its region is written since the secondary had it); they
    /// count as in flight until the request completes.
    pub fn before_submit(
        &self,
        inflight: &InFlight,
    ) -> Result<(), crate::replication::dirty::Error> {
        match (self.log(), changed_ranges(&inflight.op)) {
            (Some(log), Some(ranges)) => log.before_submit(&ranges),
            _ => Ok(()),
        }
    }

    /// A request that was submitted and failed: if it changes data it may have changed part
    /// of it, unrecorded; the log says so (a gap, filled by a resync of its marked regions).
    pub fn failed(&self, inflight: &InFlight) {
        if let (Some(log), Some(ranges)) = (self.log(), changed_ranges(&inflight.op)) {
            log.gap();
            log.done(&ranges);
        }
    }

    /// Records a request that completed successfully; returns the seq of its last record if
    /// it changed data (for [`holds`](Self::holds)).
    pub fn completed(&self, inflight: &InFlight) -> Option<u64> {
        let log = self.log()?;
        let mut last = None;
        match &inflight.op {
            Operation::Write { offset, len } => {
                let len = *len as usize;
                last = Some(log.write(*offset, len, |dst| match &inflight.bounce {
                    Some(b) => match b.as_slice().get(..len) {
                        Some(stored) => {
                            dst.copy_from_slice(stored);
                            true
                        }
                        None => false,
                    },
                    None => request::gather(inflight.mem.as_ref(), &inflight.data, dst).is_ok(),
                }));
            }
            Operation::Discard(ranges) | Operation::WriteZeroes(ranges) => {
                let discard = matches!(inflight.op, Operation::Discard(_));
                for r in ranges {
                    last = Some(log.zero(r.offset, r.len, discard));
                }
            }
            Operation::Flush => log.cut(),
            Operation::Read { .. } | Operation::GetId { .. } => {}
        }
        if let Some(ranges) = changed_ranges(&inflight.op) {
            log.done(&ranges);
        }
        last
    }

    /// Whether the answer of a request whose last record is `seq` waits for the secondary
    /// (sync mode): the queue holds it until a wake-up of its completion eventfd, registered
    /// under `key` with the log's gate the first time (`registered` keeps the log it is
    /// registered with, alive, so that the queue can unregister when it goes).
    pub fn holds(
        &self,
        seq: u64,
        completion_fd: &vmm_sys_util::eventfd::EventFd,
        key: u64,
        registered: &mut Option<std::sync::Arc<ReplicationLog>>,
    ) -> bool {
        let Some(log) = self.log.as_ref() else {
            return false;
        };
        if !log.sync().active() {
            return false;
        }
        if !registered
            .as_ref()
            .is_some_and(|r| std::sync::Arc::ptr_eq(r, log))
        {
            match completion_fd.try_clone() {
                Ok(fd) => log.sync().register(key, fd),
                // Never a wake-up: do not wait for one.
                Err(_) => return false,
            }
            if let Some(old) = registered.replace(log.clone()) {
                old.sync().unregister(key);
            }
        }
        log.sync().holds(seq)
    }
}

/// The byte ranges a request changes (a write's on the stack, a discard's or write-zeroes'
/// collected).
enum Changed {
    One([(u64, u64); 1]),
    Many(Vec<(u64, u64)>),
}

impl std::ops::Deref for Changed {
    type Target = [(u64, u64)];

    fn deref(&self) -> &[(u64, u64)] {
        match self {
            Changed::One(r) => r,
            Changed::Many(r) => r,
        }
    }
}

/// The byte ranges a request changes: `None` for one that changes nothing.
fn changed_ranges(op: &Operation) -> Option<Changed> {
    match op {
        Operation::Write { offset, len } => Some(Changed::One([(*offset, *len)])),
        Operation::Discard(ranges) | Operation::WriteZeroes(ranges) => Some(Changed::Many(
            ranges.iter().map(|r| (r.offset, r.len)).collect(),
        )),
        Operation::Read { .. } | Operation::Flush | Operation::GetId { .. } => None,
    }
}
