//! Per-volume quality of service: IOPS and bandwidth limits.
//!
//! # Which limit a volume gets
//!
//! A volume's IOPS limit comes from its performance tier and its size:
//!
//! ```text
//! iops_limit = max(floor_iops, floor(tier_rate × size_bytes / 10^12))
//! ```
//!
//! with the tier rates in IOPS per TB (TB = 10^12 bytes) of [`TierRates`]: essential 500,
//! standard 1500, premium 3000, enterprise 7500, ultra 15000. So 0.5 TB standard is 750 IOPS and
//! 10 TB ultra is 150,000 IOPS. `mass` has no rate unless the configuration gives it one: its
//! volumes are unlimited. A per-volume `iops_limit` override replaces the computed limit (floor
//! included); a per-volume `bandwidth_limit` (bytes/s) adds a second limit. [`Limits`] records
//! where each effective value comes from.
//!
//! # What a request costs
//!
//! A read or write costs one operation per started `io_size` bytes (default 256 KiB), so a
//! 1 MiB read is four operations and a 4 KiB read is one: a large request cannot pass as one.
//! FLUSH and GET_ID cost one operation. On a file-backed volume DISCARD and WRITE_ZEROES cost
//! one per segment: they move no data, the file system punches a hole or records unwritten
//! extents. On a device-backed volume they cost what a write of their length costs, against
//! both buckets: the device may write the zeros for real (a punched hole on a block device is
//! the device's zero-out). Such a volume offers at most 32 MiB in one segment per discard or
//! write-zeroes request, so one request costs no more than the largest write. Against the bandwidth limit, reads and writes cost their
//! length; the bandwidth bucket counts 512-byte units, so a limit is honoured to within 512
//! bytes/s.
//!
//! # The bucket
//!
//! Each limit is one token bucket per volume (a `governor` GCRA limiter), shared by all the
//! volume's queues. It refills continuously at the limit: one token every `10^9 / limit` ns,
//! rounded up to the next nanosecond, so the achieved rate never exceeds the limit and falls
//! short of it by less than one nanosecond per operation (0.015% at 150,000 IOPS; nothing at
//! limits that divide 10^9). Limits are not rounded to multiples of anything: 750 and 7500 are
//! honoured as exactly as 3000. The bucket holds `burst_seconds` of the limit (default one
//! second, so a 3000 IOPS volume can do 3000 operations at once after being idle).
//!
//! A request that finds too few tokens waits, in order, at the head of its queue; the requests
//! behind it stay in the virtqueue. The queue's worker arms a timerfd for the moment the tokens
//! will be there and sleeps in its epoll loop. No request is failed for being over the limit.
//! Across the queues of a volume, waiting requests are served first come, first served: only
//! the longest-waiting draws tokens, so a request costing many tokens is not starved by a queue
//! of small ones. With requests queued behind it, a waiting request sleeps up to
//! [`MAX_BATCH_WAIT`] longer, so that one wake-up admits several (same rate, fewer wake-ups
//! taken from other volumes' CPU).
//!
//! # At the edges
//!
//! - **The first second.** A volume's bucket starts full when storaged starts serving it, so in
//!   the first `t` seconds it can complete `burst + limit × t` operations, not `limit × t`. Over
//!   any interval, completed operations stay at or below `limit × interval + burst`.
//! - **A burst after idleness.** An idle volume's bucket refills at the limit up to its
//!   capacity and no further: after any idle time it can burst by at most `burst` operations,
//!   then runs at the limit.
//! - **A request larger than the bucket** (a 32 MiB write on a volume whose bucket holds fewer
//!   than 128 operations, or fewer bytes): it is not refused. It draws the bucket empty as many
//!   times as it needs, waiting for the refill in between, so it is admitted after
//!   `cost / limit` seconds, as if it had been split.
//! - **Changing a limit** (tier, size, override) takes effect at the next request of every
//!   queue, without reconnecting. The new bucket starts as full as the old one was (never
//!   fuller than its own capacity), so a change does not hand out a fresh burst. A volume that
//!   had no limit starts with a full bucket. A request already waiting is woken at once and
//!   checked against the new limits (paying its full cost under them).
//! - **A queue being stopped** (the frontend asks for the vring base, as a guest's device reset
//!   does): a request waiting at its head has not paid and is not run. The ring is wound back
//!   over it, so the base the frontend gets says it was not taken; a ring restarted from that
//!   base offers it again and it pays then. A driver that resets its device in a loop thus
//!   gets no more than the limit.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{InsufficientCapacity, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::blk::timer::Timer;
use crate::size::ByteSize;
use crate::volume::Tier;

/// Bytes in the TB of the per-TB tier rates.
pub const TB: u64 = 1_000_000_000_000;

/// Unit the bandwidth bucket counts in: virtio-blk sectors.
pub const BANDWIDTH_UNIT: u64 = 512;

/// Smallest bandwidth limit accepted, in bytes/s.
pub const MIN_BANDWIDTH: u64 = 4096;

/// Most a waiting request's wake-up is put off to let requests behind it go in the same batch
/// (see [`Limiter::batch_wait`]).
pub const MAX_BATCH_WAIT: Duration = Duration::from_millis(1);

/// Longest burst accepted, in seconds.
pub const MAX_BURST_SECONDS: f64 = 60.0;

/// Errors in QoS settings, from the configuration or the API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{key} must be at least 1 (got 0)")]
    Zero { key: &'static str },
    #[error("{key} {value} is out of range: {reason}")]
    OutOfRange {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl Error {
    /// The setting the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            Error::Zero { key } | Error::OutOfRange { key, .. } => key,
        }
    }
}

/// IOPS per TB of volume size, per tier. `mass` has none unless configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierRates {
    pub essential: u64,
    pub standard: u64,
    pub premium: u64,
    pub enterprise: u64,
    pub ultra: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mass: Option<u64>,
}

impl Default for TierRates {
    fn default() -> Self {
        TierRates {
            essential: 500,
            standard: 1500,
            premium: 3000,
            enterprise: 7500,
            ultra: 15000,
            mass: None,
        }
    }
}

impl TierRates {
    /// IOPS per TB of a tier; `None`: no IOPS commitment, no limit.
    pub fn rate(&self, tier: Tier) -> Option<u64> {
        match tier {
            Tier::Essential => Some(self.essential),
            Tier::Standard => Some(self.standard),
            Tier::Premium => Some(self.premium),
            Tier::Enterprise => Some(self.enterprise),
            Tier::Ultra => Some(self.ultra),
            Tier::Mass => self.mass,
        }
    }
}

/// The `[qos]` section of the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QosConfig {
    /// A read or write costs one operation per started unit of this many bytes. A multiple of
    /// 512, at least 4 KiB. Default: 256 KiB.
    pub io_size: ByteSize,
    /// Bucket capacity, in seconds of the limit. Default: 1.
    pub burst_seconds: f64,
    /// Lowest IOPS limit a tier gives (so small volumes stay usable); 0: none. Overrides may
    /// go below it. Default: 100.
    pub floor_iops: u64,
    pub tier_iops_per_tb: TierRates,
}

impl Default for QosConfig {
    fn default() -> Self {
        QosConfig {
            io_size: ByteSize(256 << 10),
            burst_seconds: 1.0,
            floor_iops: 100,
            tier_iops_per_tb: TierRates::default(),
        }
    }
}

impl QosConfig {
    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        let io = self.io_size.0;
        if io < 4096 || !io.is_multiple_of(BANDWIDTH_UNIT) {
            return Err(Error::OutOfRange {
                key: "qos.io_size",
                value: io.to_string(),
                reason: "must be a multiple of 512 bytes and at least 4096",
            });
        }
        if !(self.burst_seconds > 0.0 && self.burst_seconds <= MAX_BURST_SECONDS) {
            return Err(Error::OutOfRange {
                key: "qos.burst_seconds",
                value: self.burst_seconds.to_string(),
                reason: "must be more than 0 and at most 60",
            });
        }
        let r = &self.tier_iops_per_tb;
        for (key, v) in [
            ("qos.tier_iops_per_tb.essential", Some(r.essential)),
            ("qos.tier_iops_per_tb.standard", Some(r.standard)),
            ("qos.tier_iops_per_tb.premium", Some(r.premium)),
            ("qos.tier_iops_per_tb.enterprise", Some(r.enterprise)),
            ("qos.tier_iops_per_tb.ultra", Some(r.ultra)),
            ("qos.tier_iops_per_tb.mass", r.mass),
        ] {
            if v == Some(0) {
                return Err(Error::Zero { key });
            }
        }
        Ok(())
    }
}

/// Per-volume overrides, as stored in the catalog and set through the API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    /// IOPS limit replacing the tier's.
    pub iops_limit: Option<u64>,
    /// Bandwidth limit in bytes/s.
    pub bandwidth_limit: Option<u64>,
}

impl Overrides {
    /// Checks override values: positive, bandwidth at least [`MIN_BANDWIDTH`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.iops_limit == Some(0) {
            return Err(Error::Zero { key: "iops_limit" });
        }
        if let Some(b) = self.bandwidth_limit {
            if b == 0 {
                return Err(Error::Zero {
                    key: "bandwidth_limit",
                });
            }
            if b < MIN_BANDWIDTH {
                return Err(Error::OutOfRange {
                    key: "bandwidth_limit",
                    value: b.to_string(),
                    reason: "must be at least 4096 bytes/s",
                });
            }
        }
        Ok(())
    }
}

/// Where an effective limit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The tier's rate times the volume's size.
    Tier,
    /// The configured floor (the tier's computation gave less).
    Floor,
    /// The volume's own override.
    Override,
    /// No limit.
    Unlimited,
}

/// A volume's effective limits, as the data path applies them and the API shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Operations per second; `None`: unlimited.
    pub iops: Option<u64>,
    pub iops_source: Source,
    /// Operations the bucket holds (the burst).
    pub iops_burst: Option<u64>,
    /// Bytes per second; `None`: unlimited.
    pub bandwidth_bytes_per_second: Option<u64>,
    pub bandwidth_source: Source,
    /// Bytes the bandwidth bucket holds.
    pub bandwidth_burst_bytes: Option<u64>,
    /// Bytes one operation covers.
    pub io_size: u64,
}

impl Limits {
    /// The effective limits of a volume of `tier` and `size_bytes` with `overrides`.
    pub fn compute(cfg: &QosConfig, tier: Tier, size_bytes: u64, overrides: Overrides) -> Limits {
        let (iops, iops_source) = match (overrides.iops_limit, cfg.tier_iops_per_tb.rate(tier)) {
            (Some(o), _) => (Some(o), Source::Override),
            (None, None) => (None, Source::Unlimited),
            (None, Some(rate)) => {
                let by_size = u128::from(rate) * u128::from(size_bytes) / u128::from(TB);
                let by_size = u64::try_from(by_size).unwrap_or(u64::MAX);
                if by_size < cfg.floor_iops {
                    (Some(cfg.floor_iops), Source::Floor)
                } else {
                    // A tiny volume with no floor still gets one operation a second.
                    (Some(by_size.max(1)), Source::Tier)
                }
            }
        };
        let (bandwidth, bandwidth_source) = match overrides.bandwidth_limit {
            Some(b) => (Some(b), Source::Override),
            None => (None, Source::Unlimited),
        };
        let burst = |per_second: u64, unit: u64| {
            let b = (per_second as f64 * cfg.burst_seconds / unit as f64).ceil() as u64;
            b.clamp(1, u64::from(u32::MAX)) * unit
        };
        Limits {
            iops,
            iops_source,
            iops_burst: iops.map(|i| burst(i, 1)),
            bandwidth_bytes_per_second: bandwidth,
            bandwidth_source,
            bandwidth_burst_bytes: bandwidth.map(|b| burst(b, BANDWIDTH_UNIT)),
            io_size: cfg.io_size.0,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bandwidth_bytes_per_second.is_none()
    }
}

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

type Gcra<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// One token bucket: a token every `period_ns`, holding at most `capacity`.
struct Bucket<C: Clock> {
    gcra: Gcra<C>,
    clock: C,
    capacity: u32,
    period: Duration,
}

impl<C: Clock + Clone> Bucket<C> {
    /// A bucket refilling at `unit` bytes (or one operation, `unit` = 1) per `unit / rate`
    /// seconds, holding `burst` of the same: the period is rounded up to the next nanosecond,
    /// so the bucket never refills faster than the limit.
    fn new(rate: u64, burst: u64, unit: u64, clock: C) -> Bucket<C> {
        let period = (u128::from(unit) * 1_000_000_000).div_ceil(u128::from(rate.max(1)));
        let period = u64::try_from(period).unwrap_or(u64::MAX).max(1);
        let capacity = u32::try_from(burst.div_ceil(unit).max(1)).unwrap_or(u32::MAX);
        let period = Duration::from_nanos(period);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(capacity).unwrap_or(NonZeroU32::MIN));
        let gcra = RateLimiter::direct_with_clock(quota, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        Bucket {
            gcra,
            clock,
            capacity,
            period,
        }
    }

    /// Takes `remaining` tokens, counting down what it took. On shortage it takes what is
    /// there and says how long to wait: until the rest (up to the capacity) will be there, but
    /// no longer than [`MAX_BATCH_WAIT`] or one token's time. Taking partial amounts, and
    /// coming back for more at least that often, matters with several queues: a request
    /// needing more tokens than a busy neighbour queue ever leaves in the bucket still gets
    /// its share of them.
    fn take(&self, remaining: &mut u64) -> Result<(), Duration> {
        let mut chunk = (*remaining).min(u64::from(self.capacity)) as u32;
        while *remaining > 0 {
            let Some(n) = NonZeroU32::new(chunk) else {
                break;
            };
            match self.gcra.check_n(n) {
                Ok(Ok(_)) => {
                    *remaining -= u64::from(chunk);
                    chunk = chunk.min((*remaining).min(u64::from(self.capacity)) as u32);
                }
                // Not that many: try half as many (what is there goes in O(log n) tries).
                Ok(Err(_)) | Err(InsufficientCapacity(_)) => chunk /= 2,
            }
        }
        if *remaining == 0 {
            return Ok(());
        }
        let n = (*remaining).min(u64::from(self.capacity)) as u32;
        match self
            .gcra
            .check_n(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
        {
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let wait = wait.min(MAX_BATCH_WAIT.max(self.period));
                Err(wait.max(Duration::from_nanos(1)))
            }
            // Tokens arrived meanwhile: take them.
            Ok(Ok(_)) => {
                *remaining -= u64::from(n);
                if *remaining == 0 {
                    Ok(())
                } else {
                    Err(Duration::from_nanos(1))
                }
            }
            // Cannot happen: n never exceeds the capacity. Retry a little later.
            Err(InsufficientCapacity(_)) => Err(Duration::from_millis(1)),
        }
    }

    /// Time one token takes to arrive.
    fn period(&self) -> Duration {
        self.period
    }

    /// Tokens in the bucket now (taking one to measure: the bucket is about to be replaced).
    fn level(&self) -> u64 {
        match self.gcra.check() {
            Ok(state) => u64::from(state.remaining_burst_capacity()) + 1,
            Err(_) => 0,
        }
    }

    /// Empties a fresh (full) bucket down to `level` tokens.
    fn set_level(&self, level: u64) {
        let mut excess = u64::from(self.capacity).saturating_sub(level);
        let _ = self.take(&mut excess);
    }
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
    /// Timers of the queues serving the volume, fired on a change so that a request waiting
    /// under the old limits is checked against the new ones at once.
    wakers: Mutex<Vec<Weak<Timer>>>,
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
            Some(timer) => {
                // A queue with nothing waiting wakes once for nothing.
                let _ = timer.arm(Duration::from_nanos(1));
                true
            }
            None => false,
        });
    }

    /// Registers a queue's timer, to be fired when the limits change.
    pub fn add_waker(&self, timer: &Arc<Timer>) {
        let mut wakers = crate::lock(&self.wakers);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(timer));
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

    /// Drives a closed loop of `cost`-sized requests for `span` of fake time, each waiting as
    /// the limiter says; returns how many were admitted.
    fn admitted_within(
        l: &Limiter<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        cost: Cost,
        span: Duration,
    ) -> u64 {
        let mut elapsed = Duration::ZERO;
        let mut count = 0;
        let mut left = cost;
        loop {
            match l.admit(0, &mut left) {
                Ok(()) => {
                    count += 1;
                    left = cost;
                }
                Err(wait) => {
                    if elapsed + wait > span {
                        return count;
                    }
                    clock.advance(wait);
                    elapsed += wait;
                }
            }
        }
    }

    #[test]
    fn tier_limits_are_rate_times_size_in_decimal_terabytes() {
        let cfg = QosConfig::default();
        let l = Limits::compute(&cfg, Tier::Standard, TB / 2, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (Some(750), Source::Tier));
        let l = Limits::compute(&cfg, Tier::Ultra, 10 * TB, Overrides::default());
        assert_eq!(l.iops, Some(150_000));
        for (tier, rate) in [
            (Tier::Essential, 500),
            (Tier::Premium, 3000),
            (Tier::Enterprise, 7500),
        ] {
            assert_eq!(
                Limits::compute(&cfg, tier, TB, Overrides::default()).iops,
                Some(rate)
            );
        }
        // 1 TiB is 1.0995 TB: the limit is rounded down, not up to a round number.
        let l = Limits::compute(&cfg, Tier::Premium, 1 << 40, Overrides::default());
        assert_eq!(l.iops, Some(3298));
        assert_eq!(l.iops_burst, Some(3298));
    }

    #[test]
    fn floor_override_and_mass_say_where_the_limit_comes_from() {
        let cfg = QosConfig::default();
        let l = Limits::compute(&cfg, Tier::Essential, 1 << 30, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (Some(100), Source::Floor));
        let l = Limits::compute(&cfg, Tier::Mass, 10 * TB, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (None, Source::Unlimited));
        assert!(l.is_unlimited());
        let o = Overrides {
            iops_limit: Some(40),
            bandwidth_limit: Some(10_000_000),
        };
        let l = Limits::compute(&cfg, Tier::Essential, 1 << 30, o);
        assert_eq!((l.iops, l.iops_source), (Some(40), Source::Override));
        assert_eq!(
            (l.bandwidth_bytes_per_second, l.bandwidth_source),
            (Some(10_000_000), Source::Override)
        );
        let mut cfg = QosConfig::default();
        cfg.tier_iops_per_tb.mass = Some(100);
        let l = Limits::compute(&cfg, Tier::Mass, 10 * TB, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (Some(1000), Source::Tier));
    }

    #[test]
    fn bad_settings_and_overrides_are_refused_by_name() {
        let o = Overrides {
            iops_limit: Some(0),
            ..Default::default()
        };
        assert_eq!(o.validate(), Err(Error::Zero { key: "iops_limit" }));
        let o = Overrides {
            bandwidth_limit: Some(100),
            ..Default::default()
        };
        assert!(matches!(
            o.validate(),
            Err(Error::OutOfRange {
                key: "bandwidth_limit",
                ..
            })
        ));
        let mut c = QosConfig::default();
        c.tier_iops_per_tb.premium = 0;
        assert_eq!(
            c.validate(),
            Err(Error::Zero {
                key: "qos.tier_iops_per_tb.premium"
            })
        );
        let c = QosConfig {
            io_size: ByteSize(1000),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = QosConfig {
            burst_seconds: 0.0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        assert!(QosConfig::default().validate().is_ok());
    }

    #[test]
    fn a_full_bucket_admits_exactly_the_burst_then_waits_for_one_token() {
        let clock = FakeRelativeClock::default();
        let l = limiter(&limits(Some(750), None), &clock);
        for i in 0..750 {
            assert!(
                l.admit(0, &mut Cost::ops(1)).is_ok(),
                "request {i} of the burst"
            );
        }
        let wait = l.admit(0, &mut Cost::ops(1)).unwrap_err();
        // 10^9 / 750 = 1,333,333.3 ns, rounded up.
        assert_eq!(wait, Duration::from_nanos(1_333_334));
        clock.advance(wait);
        assert!(l.admit(0, &mut Cost::ops(1)).is_ok());
    }

    #[test]
    fn sustained_rate_is_the_limit_for_limits_that_are_not_round_numbers() {
        for limit in [750u64, 3000, 7500, 50_000] {
            let clock = FakeRelativeClock::default();
            let l = limiter(&limits(Some(limit), None), &clock);
            // Empty the burst first, then count ten seconds.
            let mut burst = Cost::ops(limit);
            assert!(l.admit(0, &mut burst).is_ok());
            let n = admitted_within(&l, &clock, Cost::ops(1), Duration::from_secs(10));
            // Never more than the limit; short of it by under a token per 10^9 ns of rounding.
            assert!(n <= limit * 10, "{limit}: {n}");
            assert!(
                n >= limit * 10 - limit * 10 * limit / 1_000_000_000 - 1,
                "{limit}: {n}"
            );
        }
    }

    #[test]
    fn idleness_refills_up_to_the_burst_and_no_further() {
        let clock = FakeRelativeClock::default();
        let l = limiter(&limits(Some(1000), None), &clock);
        assert!(l.admit(0, &mut Cost::ops(1000)).is_ok());
        assert!(l.admit(0, &mut Cost::ops(1)).is_err());
        // Half a second refills half the bucket.
        clock.advance(Duration::from_millis(500));
        assert!(l.admit(0, &mut Cost::ops(500)).is_ok());
        assert!(l.admit(0, &mut Cost::ops(1)).is_err());
        // A minute idle refills one burst, not sixty.
        clock.advance(Duration::from_secs(60));
        assert!(l.admit(0, &mut Cost::ops(1000)).is_ok());
        assert!(l.admit(0, &mut Cost::ops(1)).is_err());
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
    fn a_request_larger_than_the_bucket_is_admitted_after_cost_over_rate() {
        let clock = FakeRelativeClock::default();
        let l = limiter(&limits(Some(10), None), &clock);
        // 32 MiB at 256 KiB per op: 128 operations, the bucket holds 10.
        let mut big = l.transfer_cost(32 << 20);
        let mut waited = Duration::ZERO;
        while let Err(wait) = l.admit(0, &mut big) {
            clock.advance(wait);
            waited += wait;
        }
        // The first 10 come from the full bucket, the other 118 at 10 a second.
        assert_eq!(waited, Duration::from_millis(11_800));
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

    #[test]
    fn a_limit_change_wakes_the_queues_at_once() {
        let slot = QosSlot::default();
        let timer = Arc::new(Timer::new().unwrap());
        slot.add_waker(&timer);
        timer.arm(Duration::from_secs(3600)).unwrap();
        slot.set(&limits(Some(100), None));
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&*timer),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1);
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
