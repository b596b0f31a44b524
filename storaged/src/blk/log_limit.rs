//! A per-volume budget for the log lines the data path writes about what a guest (or its
//! frontend) did.
//!
//! A guest decides how often its requests are malformed or fail, and a local process how often
//! it connects, so lines about them are bounded: at most [`LINES_PER_WINDOW`] per [`WINDOW`]
//! for each volume and level (debug, info, warn, error each have their own budget, so a flood
//! of debug-level refusals cannot hide a warning about the storage). A line whose level is not
//! enabled costs nothing. Lines over the budget are counted, and the next line written at
//! that level says how many were left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one volume may log per level and window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window of the budget.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The budget of one level.
struct Budget {
    window: Mutex<(Instant, u32)>,
    suppressed: AtomicU64,
}

impl Budget {
    fn new() -> Self {
        Budget {
            window: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
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

/// The log budgets of one volume, shared by its queues and its socket.
pub struct LogLimit {
    /// Budgets of debug, info, warn and error lines.
    levels: [Budget; 4],
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit {
            levels: [Budget::new(), Budget::new(), Budget::new(), Budget::new()],
        }
    }
}

impl LogLimit {
    /// Whether a line of `level` may be logged now; if so, how many lines of that level were
    /// left out since the last one.
    pub fn allow(&self, level: tracing::Level) -> Option<u64> {
        self.allow_at(level, Instant::now())
    }

    fn allow_at(&self, level: tracing::Level, now: Instant) -> Option<u64> {
        let i = match level {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 2,
            tracing::Level::INFO => 1,
            _ => 0,
        };
        self.levels[i].allow_at(now)
    }
}

/// Logs a line about a volume within its budget ([`LogLimit`]), with a `suppressed` field
/// counting the lines of that level left out before it: `volume_log!(warn, &volume, ...)`.
#[macro_export]
macro_rules! volume_log {
    (debug, $($rest:tt)+) => { $crate::volume_log!(@ DEBUG, debug, $($rest)+) };
    (info, $($rest:tt)+) => { $crate::volume_log!(@ INFO, info, $($rest)+) };
    (warn, $($rest:tt)+) => { $crate::volume_log!(@ WARN, warn, $($rest)+) };
    (error, $($rest:tt)+) => { $crate::volume_log!(@ ERROR, error, $($rest)+) };
    (@ $level:ident, $mac:ident, $volume:expr, $($rest:tt)+) => {{
        let volume: &$crate::blk::VolumeIo = $volume;
        if tracing::enabled!(tracing::Level::$level) {
            if let Some(suppressed) = volume.log_limit.allow(tracing::Level::$level) {
                tracing::$mac!(volume = %volume.name, suppressed, $($rest)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn lines_over_the_budget_are_counted_and_reported_with_the_next_window() {
        let limit = LogLimit::default();
        let start = Instant::now();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.allow_at(Level::DEBUG, start), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(
                limit.allow_at(Level::DEBUG, start + Duration::from_secs(1)),
                None
            );
        }
        // Another level has a budget of its own.
        assert_eq!(
            limit.allow_at(Level::WARN, start + Duration::from_secs(1)),
            Some(0)
        );
        assert_eq!(limit.allow_at(Level::DEBUG, start + WINDOW), Some(5));
        assert_eq!(limit.allow_at(Level::DEBUG, start + WINDOW), Some(0));
    }
}
