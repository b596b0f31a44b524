//! One token bucket over a `governor` GCRA limiter: refilled continuously at a rate, holding at
//! most a burst, drawn from in partial amounts so that a large request makes progress.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{InsufficientCapacity, Quota, RateLimiter};

use super::MAX_BATCH_WAIT;

type Gcra<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// One token bucket: a token every `period`, holding at most `capacity`.
pub(super) struct Bucket<C: Clock> {
    gcra: Gcra<C>,
    clock: C,
    capacity: u32,
    period: Duration,
}

impl<C: Clock + Clone> Bucket<C> {
    /// A bucket refilling at `unit` bytes (or one operation, `unit` = 1) per `unit / rate`
    /// seconds, holding `burst` of the same: the period is rounded up to the next nanosecond,
    /// so the bucket never refills faster than the limit.
    pub(super) fn new(rate: u64, burst: u64, unit: u64, clock: C) -> Bucket<C> {
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
    pub(super) fn take(&self, remaining: &mut u64) -> Result<(), Duration> {
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
    pub(super) fn period(&self) -> Duration {
        self.period
    }

    /// Tokens in the bucket now (taking one to measure: the bucket is about to be replaced).
    pub(super) fn level(&self) -> u64 {
        match self.gcra.check() {
            Ok(state) => u64::from(state.remaining_burst_capacity()) + 1,
            Err(_) => 0,
        }
    }

    /// Empties a fresh (full) bucket down to `level` tokens.
    pub(super) fn set_level(&self, level: u64) {
        let mut excess = u64::from(self.capacity).saturating_sub(level);
        let _ = self.take(&mut excess);
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::qos::test_util::admitted_within;

    /// An operations bucket (unit 1) of `rate` a second holding `rate`, as a limit with the
    /// default one-second burst has.
    fn bucket(rate: u64, clock: &FakeRelativeClock) -> Bucket<FakeRelativeClock> {
        Bucket::new(rate, rate, 1, clock.clone())
    }

    /// How many `cost`-token draws the bucket admits in `span` of fake time.
    fn taken_within(
        b: &Bucket<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        cost: u64,
        span: Duration,
    ) -> u64 {
        admitted_within(clock, cost, span, |left| b.take(left))
    }

    #[test]
    fn a_full_bucket_admits_exactly_the_burst_then_waits_for_one_token() {
        let clock = FakeRelativeClock::default();
        let b = bucket(750, &clock);
        for i in 0..750 {
            assert!(b.take(&mut 1).is_ok(), "request {i} of the burst");
        }
        let wait = b.take(&mut 1).unwrap_err();
        // 10^9 / 750 = 1,333,333.3 ns, rounded up.
        assert_eq!(wait, Duration::from_nanos(1_333_334));
        clock.advance(wait);
        assert!(b.take(&mut 1).is_ok());
    }

    #[test]
    fn sustained_rate_is_the_limit_for_limits_that_are_not_round_numbers() {
        for limit in [750u64, 3000, 7500, 50_000] {
            let clock = FakeRelativeClock::default();
            let b = bucket(limit, &clock);
            // Empty the burst first, then count ten seconds.
            let mut burst = limit;
            assert!(b.take(&mut burst).is_ok());
            let n = taken_within(&b, &clock, 1, Duration::from_secs(10));
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
        let b = bucket(1000, &clock);
        assert!(b.take(&mut 1000).is_ok());
        assert!(b.take(&mut 1).is_err());
        // Half a second refills half the bucket.
        clock.advance(Duration::from_millis(500));
        assert!(b.take(&mut 500).is_ok());
        assert!(b.take(&mut 1).is_err());
        // A minute idle refills one burst, not sixty.
        clock.advance(Duration::from_secs(60));
        assert!(b.take(&mut 1000).is_ok());
        assert!(b.take(&mut 1).is_err());
    }

    #[test]
    fn a_request_larger_than_the_bucket_is_admitted_after_cost_over_rate() {
        let clock = FakeRelativeClock::default();
        let b = bucket(10, &clock);
        // A 32 MiB write at 256 KiB per op: 128 operations, the bucket holds 10.
        let mut big = 128;
        let mut waited = Duration::ZERO;
        while let Err(wait) = b.take(&mut big) {
            clock.advance(wait);
            waited += wait;
        }
        // The first 10 come from the full bucket, the other 118 at 10 a second.
        assert_eq!(waited, Duration::from_millis(11_800));
    }
}
