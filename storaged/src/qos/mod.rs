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
//! write-zeroes request, so one request costs no more than the largest write. Against the
//! bandwidth limit, reads and writes cost their length; the bandwidth bucket counts 512-byte
//! units, so a limit is honoured to within 512 bytes/s.
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
//!   checked against the new limits (paying its full cost under them): its queue registered
//!   a [`QueueWaker`] with the volume's [`QosSlot`], which wakes it on the change.
//! - **A queue being stopped** (the frontend asks for the vring base, as a guest's device reset
//!   does): a request waiting at its head has not paid and is not run. The ring is wound back
//!   over it, so the base the frontend gets says it was not taken; a ring restarted from that
//!   base offers it again and it pays then. A driver that resets its device in a loop thus
//!   gets no more than the limit.
//!
//! # Where it is
//!
//! - `policy.rs`: the `[qos]` configuration ([`QosConfig`], [`TierRates`]), a volume's
//!   [`Overrides`], and the [`Limits`] computed from them, with where each comes from.
//! - `bucket.rs`: one token bucket over `governor`'s GCRA: refill, capacity, partial draws.
//! - `limiter.rs`: what a request costs ([`Cost`]), a volume's buckets and the first come,
//!   first served order of its waiting queues ([`Limiter`]), and the volume's current limiter
//!   ([`QosSlot`]), which wakes the queues through [`QueueWaker`] when the limits change.

mod bucket;
mod limiter;
mod policy;
#[cfg(test)]
mod test_util;

pub use limiter::{Cost, Limiter, QosSlot, QueueWaker, MAX_BATCH_WAIT};
pub use policy::{
    Error, Limits, Overrides, QosConfig, Source, TierRates, BANDWIDTH_UNIT, MAX_BURST_SECONDS,
    MIN_BANDWIDTH, TB,
};
