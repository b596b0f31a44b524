//! Sync mode's gate between a primary's data path and its link: while it is active, a
//! write's answer waits until the secondary has committed it.
//!
//! - The replicate stage asks [`SyncGate::holds`] with the seq of a completed write: the
//!   queue then keeps the answer (the request, its status) until the secondary's commits pass
//!   that seq, and registers its completion eventfd ([`SyncGate::register`]), which each
//!   [`SyncGate::ack`] rings so the queue answers what is now covered.
//! - Each record appended while the gate is active rings the sender ([`SyncGate::appended`]),
//!   which cuts and ships an epoch at once instead of at its next tick.
//! - A write held longer than the relationship's sync timeout ([`SyncGate::expire`], checked
//!   by the supervisor every second) opens the gate: the relationship runs async, its held
//!   answers go out, and the sender closes it again once the stream has caught up.
//!
//! Inactive (async mode, or sync suspended) the gate holds nothing and costs an atomic load
//! per write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// The sync gate of one primary volume.
#[derive(Default)]
pub struct SyncGate {
    active: AtomicBool,
    /// Every seq up to this one is committed on the secondary.
    acked: AtomicU64,
    /// The highest seq a queue holds an answer for.
    held: AtomicU64,
    /// Since when the oldest held answer has waited (`None`: nothing held).
    waiting_since: Mutex<Option<Instant>>,
    /// The queues' completion eventfds, rung when answers may go.
    wakers: Mutex<std::collections::HashMap<u64, EventFd>>,
    /// Rung when a record is appended while the gate is active.
    records: tokio::sync::Notify,
}

impl SyncGate {
    /// Whether the answer of the write of `seq` must wait for the secondary; the caller then
    /// holds it until a wake-up says it may go (`holds` false).
    pub fn holds(&self, seq: u64) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        // Under the lock `ack` clears `waiting_since` with: an ack either comes first (and is
        // seen here) or sees this hold.
        let mut since = crate::lock(&self.waiting_since);
        if self.acked.load(Ordering::Acquire) >= seq {
            return false;
        }
        self.held.fetch_max(seq, Ordering::AcqRel);
        since.get_or_insert_with(Instant::now);
        true
    }

    /// Whether answers wait for the secondary now.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Adds a queue's eventfd to ring at each ack (`fd`, a clone of its completion eventfd),
    /// under `key`, until [`unregister`](Self::unregister).
    pub fn register(&self, key: u64, fd: EventFd) {
        crate::lock(&self.wakers).insert(key, fd);
    }

    /// The queue of `key` is gone.
    pub fn unregister(&self, key: u64) {
        crate::lock(&self.wakers).remove(&key);
    }

    /// The secondary committed everything up to `seq`.
    pub fn ack(&self, seq: u64) {
        {
            let mut since = crate::lock(&self.waiting_since);
            let before = self.acked.fetch_max(seq, Ordering::AcqRel);
            if seq <= before {
                return;
            }
            if seq >= self.held.load(Ordering::Acquire) {
                *since = None;
            } else if since.is_some() {
                // Answers are still held, younger than the ones just let go.
                *since = Some(Instant::now());
            }
        }
        self.wake();
    }

    /// Makes answers wait for the secondary (`true`) or not; opening the gate lets every
    /// held answer go.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Release);
        if !active {
            *crate::lock(&self.waiting_since) = None;
            self.wake();
        }
    }

    /// Opens the gate if an answer has been held longer than `timeout`; says whether it did.
    pub fn expire(&self, timeout: Duration) -> bool {
        let late = crate::lock(&self.waiting_since).is_some_and(|t| t.elapsed() > timeout);
        if late && self.active() {
            self.set_active(false);
            return true;
        }
        false
    }

    /// A record was appended: the sender ships it at once while the gate is active.
    pub fn appended(&self) {
        if self.active() {
            self.records.notify_one();
        }
    }

    /// Returns once a record was appended while the gate was active.
    pub async fn records_appended(&self) {
        self.records.notified().await;
    }

    fn wake(&self) {
        for fd in crate::lock(&self.wakers).values() {
            let _ = fd.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn an_active_gate_holds_answers_until_their_seq_is_acked_and_rings_the_queues() {
        let gate = SyncGate::default();
        assert!(!gate.holds(1), "inactive: nothing waits");
        gate.set_active(true);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        gate.register(1, fd.try_clone().unwrap());
        assert!(gate.holds(1));
        assert!(gate.holds(2));
        gate.ack(1);
        assert_eq!(fd.read().unwrap(), 1, "the queue is rung");
        assert!(!gate.holds(1));
        assert!(gate.holds(2));
        gate.ack(5);
        assert!(!gate.holds(2));
        assert!(!gate.expire(Duration::ZERO), "nothing held any more");
    }

    #[test]
    fn an_answer_held_past_the_timeout_opens_the_gate_and_lets_everything_go() {
        let gate = SyncGate::default();
        gate.set_active(true);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        gate.register(1, fd.try_clone().unwrap());
        gate.register(2, EventFd::new(EFD_NONBLOCK).unwrap());
        gate.unregister(2);
        assert!(gate.holds(3));
        assert!(!gate.expire(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(gate.expire(Duration::from_millis(1)));
        assert!(!gate.active());
        assert!(fd.read().is_ok());
        assert!(!gate.holds(3), "async now");
    }
}
