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
}

impl LinkStatus {
    /// Sets a (re)sync's progress to `done` of `total` bytes; true when the whole percent it
    /// shows changed, the moments worth publishing (at most a hundred per sync, whatever the
    /// number of regions).
    pub fn set_progress(&mut self, done: u64, total: u64) -> bool {
        let before = self.percent_done.map(|p| p as u64);
        let now = 100.0 * done as f64 / total.max(1) as f64;
        self.percent_done = Some(now);
        before != Some(now as u64)
    }
}
