//! A volume's replication relationship, as the catalog keeps it on each side.

use serde::{Deserialize, Serialize};
pub use storaged_api::{ReplicationMode, ReplicationRole};

/// One side of a relationship between a primary volume and its secondary on a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relationship {
    /// The relationship's id (a UUID), the same on both sides.
    pub id: String,
    pub role: ReplicationRole,
    /// The other side: the secondary's storaged (`HOST:PORT`) on the primary; the address the
    /// primary connected from on the secondary.
    pub peer: String,
    pub mode: ReplicationMode,
    pub rpo_seconds: u32,
    /// Raised by every promote; the side with the higher one is the current primary.
    pub generation: u64,
    /// An operator resolved a split brain in this side's favour, and the two have not been
    /// level since (see `roles.rs`).
    #[serde(default)]
    pub won: bool,
}

/// What the link knows of a relationship now, kept by the daemon for the API: the stream's
/// side updates it as it goes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkStatus {
    /// `initial_sync`, `replicating`, `disconnected`, `resync` or `split_brain`.
    pub state: &'static str,
    /// Initial sync or resync: how much is done, 0 to 100.
    pub percent_done: Option<f64>,
    /// Initial sync or resync: bytes still to send, and when it began.
    pub bytes_left: Option<u64>,
    pub sync_started: Option<std::time::Instant>,
    /// Whether the secondary's image is a consistent point.
    pub consistent: bool,
    /// The primary's time (Unix ns) the secondary's image corresponds to.
    pub consistent_at_ns: Option<u64>,
    /// Whether the primary has records the secondary has not committed.
    pub behind: bool,
    /// Since when (Unix seconds) the link has been down, while it is.
    pub disconnected_since: Option<u64>,
    /// The peer's generation, when it was last met as a primary (a superseded or split side
    /// knows its new primary's).
    pub peer_generation: Option<u64>,
    /// The relationship (its id) this is the status of, where the one who says it serves only
    /// that one (a primary's sender): shown only while it is the volume's.
    pub relationship: Option<String>,
}

impl LinkStatus {
    /// Sets a (re)sync's progress to `done` of `total` bytes; true when the whole percent it
    /// shows changed, the moments worth publishing (at most a hundred per sync, whatever the
    /// number of regions).
    pub fn set_progress(&mut self, done: u64, total: u64) -> bool {
        if done == 0 || self.sync_started.is_none() {
            self.sync_started = Some(std::time::Instant::now());
        }
        self.bytes_left = Some(total.saturating_sub(done));
        let before = self.percent_done.map(|p| p as u64);
        let now = 100.0 * done as f64 / total.max(1) as f64;
        self.percent_done = Some(now);
        before != Some(now as u64)
    }

    /// A (re)sync's estimated seconds to its end, at the pace so far.
    pub fn eta_seconds(&self) -> Option<f64> {
        let (left, started, percent) = (self.bytes_left?, self.sync_started?, self.percent_done?);
        if left == 0 {
            return Some(0.0);
        }
        let elapsed = started.elapsed().as_secs_f64();
        (percent > 0.0).then(|| elapsed * (100.0 - percent) / percent)
    }

    /// The (re)sync is over.
    pub fn end_progress(&mut self) {
        self.percent_done = None;
        self.bytes_left = None;
        self.sync_started = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syncs_progress_gives_percent_bytes_left_and_an_eta_at_its_pace_so_far() {
        let mut s = LinkStatus::default();
        assert!(s.set_progress(0, 1000));
        assert_eq!((s.percent_done, s.bytes_left), (Some(0.0), Some(1000)));
        assert_eq!(s.eta_seconds(), None, "no pace yet");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(s.set_progress(250, 1000));
        assert!(!s.set_progress(251, 1000), "the same whole percent");
        assert_eq!(s.bytes_left, Some(749));
        let eta = s.eta_seconds().unwrap();
        // A quarter took at least 50 ms: the rest takes about three times as long.
        assert!((0.14..10.0).contains(&eta), "{eta}");
        s.set_progress(1000, 1000);
        assert_eq!(s.eta_seconds(), Some(0.0));
        s.end_progress();
        assert_eq!(
            (s.percent_done, s.bytes_left, s.eta_seconds()),
            (None, None, None)
        );
    }
}
