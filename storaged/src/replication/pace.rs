//! When a resync that the volume's writes outran is tried again.
//!
//! A resync pass is lost to the writes when the log overflows during it and the regions
//! written since it began are already as many bytes as it sends: the next pass would be no
//! shorter (`sender.rs` gives up at once instead of finishing the pass). Tried again under the
//! same writes, the resync would read its regions again and lose again, taking the disk and
//! the CPU from the writer it cannot keep up with, for nothing: its passes are not committed.
//! So the next try waits until the volume's writes, over the last [`WINDOW`], fall to half of
//! what they were during the lost pass; or at the latest for a hold-off of [`HOLDOFF_MIN`],
//! doubling with each loss in a row up to [`HOLDOFF_MAX`] (the writes may have moved to fewer
//! regions, which a resync would win). Meanwhile the regions stay marked, the lag grows and
//! the relationship shows its resync with the dirty bytes left.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::log::ReplicationLog;

/// The span over which the volume's write rate is read while a resync waits.
pub const WINDOW: Duration = Duration::from_secs(1);

/// How often a waiting resync reads the volume's writes.
const TICK: Duration = Duration::from_millis(100);

/// The longest a resync waits after its first loss in a row.
pub const HOLDOFF_MIN: Duration = Duration::from_secs(10);
/// The longest it waits after any loss: a loss the link caused (slow for a while) rather
/// than the writes keeps the relationship behind for at most this once the link is back.
pub const HOLDOFF_MAX: Duration = Duration::from_secs(60);

/// The volume's write rate since a starting point: bytes of the log's writes, kept or
/// dropped, per second.
pub struct WriteMeter {
    bytes: u64,
    at: Instant,
}

impl WriteMeter {
    /// Starts measuring `log`'s writes now.
    pub fn start(log: &ReplicationLog) -> Self {
        WriteMeter {
            bytes: log.written_bytes(),
            at: Instant::now(),
        }
    }

    /// Bytes per second written to `log` since the start.
    pub fn rate(&self, log: &ReplicationLog) -> f64 {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        log.written_bytes().saturating_sub(self.bytes) as f64 / secs
    }
}

/// Losses of a relationship's resyncs in a row, and the hold-off the next one waits for.
#[derive(Debug)]
pub struct Losses {
    holdoff: Duration,
}

impl Default for Losses {
    fn default() -> Self {
        Losses {
            holdoff: HOLDOFF_MIN,
        }
    }
}

/// Why a waiting resync starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Start {
    /// The writes fell to this many bytes per second, half or less of the lost resync's.
    Slower(f64),
    /// The hold-off passed with the writes as fast.
    HeldOff(Duration),
}

impl Losses {
    /// A resync was lost to writes of `rate` bytes per second: waits until they are at most
    /// half as fast over a [`WINDOW`], or for the hold-off, which doubles for the next loss.
    pub async fn wait(&mut self, log: &ReplicationLog, rate: f64) -> Start {
        let holdoff = self.lost();
        wait_slower(log, rate / 2.0, holdoff, TICK).await
    }

    /// Counts a loss: returns the hold-off it waits for, and doubles the next one's.
    fn lost(&mut self) -> Duration {
        let holdoff = self.holdoff;
        self.holdoff = (holdoff * 2).min(HOLDOFF_MAX);
        holdoff
    }

    /// A resync was won (the secondary committed one): the next loss waits the least again.
    pub fn reset(&mut self) {
        self.holdoff = HOLDOFF_MIN;
    }

    /// What the next loss waits for at most.
    pub fn holdoff(&self) -> Duration {
        self.holdoff
    }
}

/// Waits until `log`'s writes over the last [`WINDOW`] (read every `tick`) are at most
/// `limit` bytes per second, or for `holdoff`.
async fn wait_slower(log: &ReplicationLog, limit: f64, holdoff: Duration, tick: Duration) -> Start {
    let began = Instant::now();
    // Readings of the written bytes, oldest first, spanning at most the window.
    let mut readings: VecDeque<(Instant, u64)> = VecDeque::new();
    readings.push_back((began, log.written_bytes()));
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        readings.push_back((now, log.written_bytes()));
        while readings.len() > 2 && now.duration_since(readings[1].0) >= WINDOW {
            readings.pop_front();
        }
        let ((first_at, first), (_, last)) = (readings[0], readings[readings.len() - 1]);
        let span = now.duration_since(first_at);
        if span >= WINDOW {
            let rate = last.saturating_sub(first) as f64 / span.as_secs_f64();
            if rate <= limit {
                return Start::Slower(rate);
            }
        }
        if now.duration_since(began) >= holdoff {
            return Start::HeldOff(holdoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::dirty::DirtyMap;
    use std::sync::Arc;

    fn log() -> (Arc<ReplicationLog>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let map = DirtyMap::open(&dir.path().join("v.dirty")).unwrap();
        (Arc::new(ReplicationLog::new(1 << 20, map)), dir)
    }

    /// A writer appending 64 KiB to a log every 10 ms (about 6.4 MB/s) until stopped.
    struct Writer {
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Writer {
        fn start(log: Arc<ReplicationLog>) -> Self {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = stop.clone();
            let thread = std::thread::spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    log.before_submit(&[(0, 64 << 10)]).unwrap();
                    log.write(0, 64 << 10, |_| true);
                    log.drain();
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            Writer { stop, thread }
        }

        fn stop(self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.thread.join().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_resync_waits_while_the_writes_go_on_and_starts_once_they_slow() {
        let (log, _dir) = log();
        let w = Writer::start(log.clone());
        let meter = WriteMeter::start(&log);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rate = meter.rate(&log);
        assert!(rate > 1e6, "{rate}");
        // A limit far below the writer's rate: a loaded machine slowing the writer does not
        // pass for its stop.
        let limit = rate / 20.0;
        let waiting = {
            let log = log.clone();
            tokio::spawn(async move {
                let began = Instant::now();
                let start = wait_slower(&log, limit, Duration::from_secs(60), TICK).await;
                (start, began.elapsed())
            })
        };
        // Still writing: it waits.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiting.is_finished(), "started under the same writes");
        w.stop();
        let (start, after) = waiting.await.unwrap();
        assert!(matches!(start, Start::Slower(r) if r <= limit), "{start:?}");
        // The writes stopped after 1.5 s; a window later they are slow enough.
        assert!(after < Duration::from_secs(5), "{after:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_that_stay_as_fast_start_the_resync_at_the_holdoff_which_doubles_per_loss() {
        let (log, _dir) = log();
        let w = Writer::start(log.clone());
        let start = wait_slower(&log, 1.0, Duration::from_millis(300), TICK).await;
        assert_eq!(start, Start::HeldOff(Duration::from_millis(300)));
        w.stop();

        let mut losses = Losses::default();
        assert_eq!(losses.holdoff(), HOLDOFF_MIN);
        // Nothing written: the first window shows it.
        assert!(matches!(losses.wait(&log, 1e6).await, Start::Slower(r) if r == 0.0));
        assert_eq!(losses.holdoff(), HOLDOFF_MIN * 2);
        let holdoffs: Vec<u64> = (0..6).map(|_| losses.lost().as_secs()).collect();
        assert_eq!(holdoffs, [20, 40, 60, 60, 60, 60]);
        losses.reset();
        assert_eq!(losses.holdoff(), HOLDOFF_MIN);
    }
}
