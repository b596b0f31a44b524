//! The limit stage of the data path: what a request costs ([`Cost`]), the buckets of one
//! volume and the order in which its queues' waiting requests draw from them ([`Limiter`]),
//! and the volume's current limiter, swapped when its limits change ([`QosSlot`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};

use super::bucket::Bucket;
use super::policy::{Limits, BANDWIDTH_UNIT};

/// Most a waiting request's wake-up is put off to let requests behind it go in the same batch
/// (see [`Limiter::batch_wait`]).
pub const MAX_BATCH_WAIT: Duration = Duration::from_millis(1);

/// What one request draws from the buckets; what is left to draw while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Operations.
    pub ops: u64,
    /// Bandwidth units ([`BANDWIDTH_UNIT`] bytes).
    pub units: u64,
}

impl Cost {
    /// A read or write of `len` bytes.
    pub fn transfer(len: u64, io_size: u64) -> Cost {
        Cost {
            ops: len.div_ceil(io_size.max(1)).max(1),
            units: len.div_ceil(BANDWIDTH_UNIT),
        }
    }

    /// A request moving no data, costing `ops` operations (at least one).
    pub fn ops(ops: u64) -> Cost {
        Cost {
            ops: ops.max(1),
            units: 0,
        }
    }
}

/// Wakes the worker of a queue serving a volume, so that a request waiting for tokens is
/// checked again at once. [`QosSlot::set`] wakes every registered queue when the limits
/// change; a queue with nothing waiting wakes once for nothing. The data path implements it
/// for the timerfd its queue worker sleeps on.
pub trait QueueWaker: Send + Sync {
    /// Makes the queue's worker look at its waiting request now.
    fn wake(&self);
}

/// The buckets of one volume.
pub struct Limiter<C: Clock = MonotonicClock> {
    ops: Option<Bucket<C>>,
    bandwidth: Option<Bucket<C>>,
    limits: Limits,
    /// Queues with a request waiting, first come first served: only the first draws tokens,
    /// and a queue with a new request joins the end while anyone waits. Without this, a
    /// request costing many tokens could wait forever beside a queue that takes each token as
    /// it arrives.
    waiting: Mutex<VecDeque<u64>>,
    /// Length of `waiting`, read without the lock on the fast path.
    waiting_len: AtomicUsize,
}

impl<C: Clock + Clone> Limiter<C> {
    /// Buckets for `limits`; `None` if there is nothing to limit. With `previous`, each new
    /// bucket starts as full as the previous one of its kind was.
    pub fn new(limits: &Limits, clock: C, previous: Option<&Limiter<C>>) -> Option<Limiter<C>> {
        if limits.is_unlimited() {
            return None;
        }
        let ops = limits
            .iops
            .map(|r| Bucket::new(r, limits.iops_burst.unwrap_or(r), 1, clock.clone()));
        let bandwidth = limits.bandwidth_bytes_per_second.map(|r| {
            let burst = limits.bandwidth_burst_bytes.unwrap_or(r);
            Bucket::new(r, burst, BANDWIDTH_UNIT, clock.clone())
        });
        if let Some(prev) = previous {
            if let (Some(new), Some(old)) = (&ops, &prev.ops) {
                new.set_level(old.level());
            }
            if let (Some(new), Some(old)) = (&bandwidth, &prev.bandwidth) {
                new.set_level(old.level());
            }
        }
        Some(Limiter {
            ops,
            bandwidth,
            limits: *limits,
            waiting: Mutex::new(VecDeque::new()),
            waiting_len: AtomicUsize::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Draws `cost` for a request of queue `waiter` (an id unique among the volume's queues),
    /// counting down what was drawn. `Err(wait)`: the request must wait about that long, then
    /// call again with what is left. Requests of different queues are served in the order
    /// they started waiting.
    pub fn admit(&self, waiter: u64, cost: &mut Cost) -> Result<(), Duration> {
        if self.waiting_len.load(Ordering::Acquire) == 0 && self.draw(cost).is_ok() {
            return Ok(());
        }
        let mut waiting = crate::lock(&self.waiting);
        if !waiting.contains(&waiter) {
            waiting.push_back(waiter);
        }
        let result = if waiting.front() == Some(&waiter) {
            self.draw(cost)
        } else {
            // Someone waits ahead: come back when a token or a batch could be there.
            Err(MAX_BATCH_WAIT.max(self.token_time()))
        };
        if result.is_ok() {
            waiting.pop_front();
        }
        self.waiting_len.store(waiting.len(), Ordering::Release);
        result
    }

    /// Withdraws queue `waiter`'s waiting request (it went without waiting, or was dropped),
    /// so it holds up nobody.
    pub fn forget(&self, waiter: u64) {
        let mut waiting = crate::lock(&self.waiting);
        waiting.retain(|w| *w != waiter);
        self.waiting_len.store(waiting.len(), Ordering::Release);
    }

    fn draw(&self, cost: &mut Cost) -> Result<(), Duration> {
        if let Some(b) = &self.ops {
            b.take(&mut cost.ops)?;
        }
        if let Some(b) = &self.bandwidth {
            b.take(&mut cost.units)?;
        }
        Ok(())
    }

    /// Time one operation's token (or a 4 KiB request's bandwidth) takes to arrive.
    fn token_time(&self) -> Duration {
        match (&self.ops, &self.bandwidth) {
            (Some(b), _) => b.period(),
            (None, Some(b)) => b.period() * 8,
            (None, None) => Duration::ZERO,
        }
    }

    /// How much longer than necessary a waiting request may sleep when `behind` more requests
    /// wait behind it: long enough for tokens for them to arrive too, up to
    /// [`MAX_BATCH_WAIT`]. Waking once per batch instead of once per token saves the CPU that
    /// neighbours would lose; the rate is unchanged (the tokens wait in the bucket), and a
    /// request alone in its queue (`behind` = 0) is not delayed.
    pub fn batch_wait(&self, behind: u64) -> Duration {
        self.token_time()
            .saturating_mul(u32::try_from(behind).unwrap_or(u32::MAX))
            .min(MAX_BATCH_WAIT)
    }

    /// Cost of a read or write of `len` bytes.
    pub fn transfer_cost(&self, len: u64) -> Cost {
        Cost::transfer(len, self.limits.io_size)
    }
}

/// A volume's current limiter. Replaced as a whole when the limits change; each queue keeps a
/// reference and compares generations (one atomic load per request) to pick up a new one.
#[derive(Default)]
pub struct QosSlot {
    current: Mutex<Option<Arc<Limiter>>>,
    generation: AtomicU64,
    /// The queues serving the volume, woken on a change so that a request waiting under the
    /// old limits is checked against the new ones at once.
    wakers: Mutex<Vec<Weak<dyn QueueWaker>>>,
}

impl QosSlot {
    /// Applies new limits, carrying the bucket levels over.
    pub fn set(&self, limits: &Limits) {
        let mut current = crate::lock(&self.current);
        let next = Limiter::new(limits, MonotonicClock, current.as_deref()).map(Arc::new);
        *current = next;
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(current);
        let mut wakers = crate::lock(&self.wakers);
        wakers.retain(|w| match w.upgrade() {
            Some(waker) => {
                waker.wake();
                true
            }
            None => false,
        });
    }

    /// Registers a queue's waker, to be woken when the limits change. The slot holds it weakly:
    /// a queue that is gone is forgotten.
    pub fn add_waker<W: QueueWaker + 'static>(&self, waker: &Arc<W>) {
        let waker: Weak<W> = Arc::downgrade(waker);
        let mut wakers = crate::lock(&self.wakers);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(waker);
    }

    /// Changes whenever [`QosSlot::set`] runs.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The limiter now (`None`: unlimited) and its generation.
    pub fn current(&self) -> (u64, Option<Arc<Limiter>>) {
        let current = crate::lock(&self.current);
        (self.generation.load(Ordering::Acquire), current.clone())
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::qos::{test_util, Overrides, QosConfig, TB};
    use crate::volume::Tier;

    const KIB: u64 = 1024;

    fn limits(iops: Option<u64>, bandwidth: Option<u64>) -> Limits {
        Limits::compute(
            &QosConfig::default(),
            Tier::Mass,
            TB,
            Overrides {
                iops_limit: iops,
                bandwidth_limit: bandwidth,
            },
        )
    }

    fn limiter(l: &Limits, clock: &FakeRelativeClock) -> Limiter<FakeRelativeClock> {
        Limiter::new(l, clock.clone(), None).expect("limited")
    }

    /// How many `cost`-sized requests of queue 0 the limiter admits in `span` of fake time.
    fn admitted_within(
        l: &Limiter<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        cost: Cost,
        span: Duration,
    ) -> u64 {
        test_util::admitted_within(clock, cost, span, |left| l.admit(0, left))
    }

    #[test]
    fn requests_cost_one_operation_per_started_io_size() {
        let io = 256 * KIB;
        assert_eq!(Cost::transfer(4 * KIB, io).ops, 1);
        assert_eq!(Cost::transfer(256 * KIB, io).ops, 1);
        assert_eq!(Cost::transfer(256 * KIB + 512, io).ops, 2);
        assert_eq!(Cost::transfer(1024 * KIB, io).ops, 4);
        assert_eq!(Cost::transfer(32 << 20, io).ops, 128);
        assert_eq!(Cost::transfer(4 * KIB, io).units, 8);
        assert_eq!(Cost::ops(0), Cost::ops(1));
        // Through a limiter: 100 IOPS is 25 one-MiB reads a second.
        let clock = FakeRelativeClock::default();
        let l = limiter(&limits(Some(100), None), &clock);
        let mib = l.transfer_cost(1 << 20);
        assert_eq!(mib.ops, 4);
        assert!(l.admit(0, &mut Cost::ops(100)).is_ok());
        let n = admitted_within(&l, &clock, mib, Duration::from_secs(4));
        assert_eq!(n, 100);
    }

    #[test]
    fn a_large_request_progresses_while_another_queue_takes_every_token_as_it_comes() {
        let clock = FakeRelativeClock::default();
        let l = limiter(&limits(Some(100), None), &clock);
        assert!(l.admit(0, &mut Cost::ops(100)).is_ok());
        // Queue A: a 4 MiB write (16 operations). Queue B: 4 KiB reads back to back. Each
        // sleeps as told; when both wake at once, B goes first.
        let mut big = l.transfer_cost(4 << 20);
        let (mut a_at, mut b_at) = (Duration::ZERO, Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut small = 0;
        loop {
            let next = a_at.min(b_at);
            clock.advance(next - now);
            now = next;
            if b_at <= a_at {
                match l.admit(2, &mut Cost::ops(1)) {
                    Ok(()) => small += 1,
                    Err(wait) => b_at = now + wait,
                }
            } else {
                match l.admit(1, &mut big) {
                    Ok(()) => break,
                    Err(wait) => a_at = now + wait,
                }
            }
            assert!(now < Duration::from_secs(5), "the large request starves");
        }
        // First come, first served: B's first read, then A's 16 operations at 100 a second,
        // while B's next read waits behind A.
        assert_eq!(small, 1);
        assert!(now <= Duration::from_millis(180), "{now:?}");
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl QueueWaker for CountingWaker {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_limit_change_wakes_each_registered_queue_and_forgets_queues_that_are_gone() {
        let slot = QosSlot::default();
        let a = Arc::new(CountingWaker::default());
        let b = Arc::new(CountingWaker::default());
        slot.add_waker(&a);
        slot.add_waker(&b);
        drop(b);
        slot.set(&limits(Some(100), None));
        assert_eq!(a.0.load(Ordering::Relaxed), 1);
        assert_eq!(crate::lock(&slot.wakers).len(), 1);
        assert!(slot.current().1.is_some());
    }

    #[test]
    fn batch_wait_grows_with_the_requests_behind_up_to_a_millisecond() {
        let clock = FakeRelativeClock::default();
        let l = limiter(&limits(Some(50_000), None), &clock);
        assert_eq!(l.batch_wait(0), Duration::ZERO);
        assert_eq!(l.batch_wait(10), Duration::from_micros(200));
        assert_eq!(l.batch_wait(1000), MAX_BATCH_WAIT);
    }

    #[test]
    fn bandwidth_is_limited_in_bytes_alongside_iops() {
        let clock = FakeRelativeClock::default();
        // 1 MB/s (not MiB): a 512-byte unit every 512 µs.
        let l = limiter(&limits(None, Some(1_000_000)), &clock);
        let burst = l.limits().bandwidth_burst_bytes.unwrap();
        assert_eq!(burst, 1_000_448); // one second, rounded up to 512-byte units
        assert!(l.admit(0, &mut Cost::transfer(burst, 256 * KIB)).is_ok());
        let n = admitted_within(&l, &clock, l.transfer_cost(4096), Duration::from_secs(8));
        // 8 s × 10^6 B/s / 4096 B = 1953.1 requests.
        assert_eq!(n, 1953);
        // Non-data requests do not draw bandwidth.
        assert!(l.admit(0, &mut Cost::ops(1)).is_ok());
    }

    #[test]
    fn changing_the_limit_mid_stream_keeps_the_bucket_level_and_applies_the_new_rate() {
        let clock = FakeRelativeClock::default();
        let old = limiter(&limits(Some(1000), None), &clock);
        assert!(old.admit(0, &mut Cost::ops(1000)).is_ok());
        // Raised while empty: no fresh burst, the new rate at once.
        let new = Limiter::new(&limits(Some(3000), None), clock.clone(), Some(&old)).unwrap();
        assert!(new.admit(0, &mut Cost::ops(1)).is_err());
        let n = admitted_within(&new, &clock, Cost::ops(1), Duration::from_secs(1));
        // 333,334 ns a token: the 3000th arrives 2 µs after the second is over.
        assert_eq!(n, 2999);
        // Lowered while full: the smaller bucket is full, no more.
        clock.advance(Duration::from_secs(5));
        let low = Limiter::new(&limits(Some(500), None), clock.clone(), Some(&new)).unwrap();
        assert!(low.admit(0, &mut Cost::ops(500)).is_ok());
        assert!(low.admit(0, &mut Cost::ops(1)).is_err());
        let n = admitted_within(&low, &clock, Cost::ops(1), Duration::from_secs(2));
        assert_eq!(n, 1000);
        // Removed: unlimited, no limiter at all.
        assert!(Limiter::new(&limits(None, None), clock.clone(), Some(&low)).is_none());
    }
}
