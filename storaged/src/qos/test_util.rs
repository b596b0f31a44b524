//! What the bucket's and the limiter's unit tests share: a closed loop of draws in fake time.

use std::time::Duration;

use governor::clock::FakeRelativeClock;

/// Drives a closed loop of draws of `cost` for `span` of fake time: each draw calls `take`
/// with what is left of it until `take` admits it, the clock advancing by each wait `take`
/// asks for. Returns how many draws were admitted whole.
pub(super) fn admitted_within<C: Copy>(
    clock: &FakeRelativeClock,
    cost: C,
    span: Duration,
    mut take: impl FnMut(&mut C) -> Result<(), Duration>,
) -> u64 {
    let mut elapsed = Duration::ZERO;
    let mut count = 0;
    let mut left = cost;
    loop {
        match take(&mut left) {
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
