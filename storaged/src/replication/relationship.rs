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
}
