//! The limit stage: a request draws its cost from its volume's IOPS and bandwidth buckets
//! ([`crate::qos`]) before it is submitted, or waits at the head of its queue until the
//! tokens are there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::blk::request::Operation;
use crate::qos::{Cost, Limiter, QosSlot};

/// Source of queue ids in the limiter's line of waiting queues.
static NEXT_WAITER_ID: AtomicU64 = AtomicU64::new(1);

/// What the stage says of a request.
pub enum Admit {
    /// Its tokens were drawn (or the volume has no limits): it goes.
    Go,
    /// It waits about this long for what it still owes.
    Wait(Duration, Owed),
}

/// What a waiting request still has to draw, and from which limiter generation.
pub struct Owed {
    cost: Cost,
    generation: u64,
}

/// The limit stage of one queue.
pub struct LimitStage {
    /// The volume's limiter as of `generation` (None: unlimited).
    limiter: Option<Arc<Limiter>>,
    generation: u64,
    /// This queue's id in the limiter's line of waiting queues.
    waiter_id: u64,
}

impl LimitStage {
    pub fn new(qos: &QosSlot) -> Self {
        let (generation, limiter) = qos.current();
        LimitStage {
            limiter,
            generation,
            waiter_id: NEXT_WAITER_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Draws a new request's cost, `zeroes_are_writes` as the volume's backing says.
    pub fn admit(&mut self, qos: &QosSlot, op: &Operation, zeroes_are_writes: bool) -> Admit {
        self.refresh(qos);
        let Some(limiter) = &self.limiter else {
            return Admit::Go;
        };
        let mut cost = request_cost(limiter, op, zeroes_are_writes);
        match limiter.admit(self.waiter_id, &mut cost) {
            Ok(()) => Admit::Go,
            Err(wait) => Admit::Wait(
                wait,
                Owed {
                    cost,
                    generation: self.generation,
                },
            ),
        }
    }

    /// Draws what a waiting request still owes. If the limits changed while it waited, it
    /// pays the new price, in full.
    pub fn readmit(
        &mut self,
        qos: &QosSlot,
        op: &Operation,
        zeroes_are_writes: bool,
        owed: &mut Owed,
    ) -> Result<(), Duration> {
        self.refresh(qos);
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if owed.generation != self.generation {
            owed.cost = request_cost(limiter, op, zeroes_are_writes);
            owed.generation = self.generation;
        }
        limiter.admit(self.waiter_id, &mut owed.cost)
    }

    /// How much longer a waiting request may sleep with `behind` more requests queued behind
    /// it, so that they go in the same batch ([`Limiter::batch_wait`]).
    pub fn batch_wait(&self, behind: u64) -> Duration {
        self.limiter
            .as_ref()
            .map_or(Duration::ZERO, |l| l.batch_wait(behind))
    }

    /// Takes this queue out of the limiter's line: its waiting request went, or was dropped.
    pub fn forget(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.forget(self.waiter_id);
        }
    }

    /// Picks up the volume's limiter if it changed since the last request.
    fn refresh(&mut self, qos: &QosSlot) {
        if qos.generation() != self.generation {
            self.forget();
            (self.generation, self.limiter) = qos.current();
        }
    }
}

/// What a request draws from its volume's buckets (see [`crate::qos`]): what it makes the
/// backing storage do. A discard or write-zeroes where the zeros are metadata (a file's
/// unwritten extents or holes) costs one operation per range; one the device may carry out by
/// writing (`zeroes_are_writes`) costs the write of its length.
fn request_cost(limiter: &Limiter, op: &Operation, zeroes_are_writes: bool) -> Cost {
    match op {
        Operation::Read { len, .. } | Operation::Write { len, .. } => limiter.transfer_cost(*len),
        Operation::Discard(ranges) | Operation::WriteZeroes(ranges) if zeroes_are_writes => {
            limiter.transfer_cost(ranges.iter().map(|r| r.len).sum())
        }
        Operation::Discard(ranges) | Operation::WriteZeroes(ranges) => {
            Cost::ops(ranges.len() as u64)
        }
        Operation::Flush | Operation::GetId { .. } => Cost::ops(1),
    }
}
