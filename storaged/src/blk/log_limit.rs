//! A per-volume budget for the log lines the data path writes about what a guest did.
//!
//! A guest decides how often its requests are malformed or fail, so lines about them are
//! bounded: at most [`LINES_PER_WINDOW`] per [`WINDOW`] for each volume. Lines over the budget
//! are counted, and the next line written says how many were left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one volume's data path may log per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window of the budget.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The log budget of one volume, shared by its queues.
pub struct LogLimit {
    window: Mutex<(Instant, u32)>,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit {
            window: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl LogLimit {
    /// Whether a line may be logged now; if so, how many were left out since the last one.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut window = crate::lock(&self.window);
        if now.duration_since(window.0) >= WINDOW {
            *window = (now, 0);
        }
        if window.1 >= LINES_PER_WINDOW {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        window.1 += 1;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Logs a data-path line for a volume within its budget ([`LogLimit`]), with a `suppressed`
/// field counting the lines left out before it.
#[macro_export]
macro_rules! volume_log {
    ($level:ident, $volume:expr, $($rest:tt)+) => {{
        let volume: &$crate::blk::VolumeIo = $volume;
        if let Some(suppressed) = volume.log_limit.allow() {
            tracing::$level!(volume = %volume.name, suppressed, $($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_over_the_budget_are_counted_and_reported_with_the_next_window() {
        let limit = LogLimit::default();
        let start = Instant::now();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.allow_at(start), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limit.allow_at(start + Duration::from_secs(1)), None);
        }
        assert_eq!(limit.allow_at(start + WINDOW), Some(5));
        assert_eq!(limit.allow_at(start + WINDOW), Some(0));
    }
}
