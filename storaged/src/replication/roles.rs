//! What two sides of a relationship do when they meet: each says, in its `Hello`, its role,
//! its generation (raised by every promote), whether it changed the volume as a primary with
//! no link to its secondary since they were last level (`diverged`, see `dirty.rs`), and
//! whether an operator resolved a split brain in its favour (`won`). [`meet`] is the rule both
//! sides apply to the same facts, so they reach the same verdict without a third party.
//!
//! - A primary and a secondary: the primary streams (a secondary that was a primary sends the
//!   regions it changed, which the resync adds to the primary's own).
//! - Two primaries: the higher generation is the current primary. The other was superseded
//!   (a failover promoted its secondary). If it diverged (it took writes while cut off, which
//!   the new primary never saw) and the operator did not resolve in the new primary's favour,
//!   both were written as primaries: split brain, and neither overwrites the other. Otherwise
//!   the superseded side becomes the new primary's secondary by itself: what it wrote since
//!   the last shipped point is in its dirty map, and it receives exactly those regions and
//!   the new primary's. Equal generations cannot be ordered: split brain.
//! - Two secondaries: no one has the volume writable; nothing is sent.

use super::ReplicationRole;

/// One side, as its `Hello` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Side {
    pub role: ReplicationRole,
    pub generation: u64,
    pub diverged: bool,
    pub won: bool,
}

/// The verdict of a meeting, for the local side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meeting {
    /// This side is the primary of a secondary: stream to it.
    Stream,
    /// This side is the secondary of a primary: receive.
    Receive,
    /// This side was superseded: it becomes the peer's secondary (generation `generation`).
    Demote { generation: u64 },
    /// The peer was superseded: it becomes this side's secondary; nothing to do but wait for
    /// it.
    PeerDemotes,
    /// Both sides were written as primaries: an operator decides (`resolve`).
    SplitBrain,
    /// Neither side is a primary.
    NoPrimary,
}

/// The verdict for `local` meeting `peer`.
pub fn meet(local: Side, peer: Side) -> Meeting {
    use ReplicationRole::{Primary, Secondary};
    match (local.role, peer.role) {
        (Primary, Secondary) => Meeting::Stream,
        (Secondary, Primary) => Meeting::Receive,
        (Secondary, Secondary) => Meeting::NoPrimary,
        (Primary, Primary) => {
            if local.generation == peer.generation {
                return Meeting::SplitBrain;
            }
            let (older, newer) = if local.generation < peer.generation {
                (local, peer)
            } else {
                (peer, local)
            };
            if older.diverged && !newer.won {
                Meeting::SplitBrain
            } else if older == local {
                Meeting::Demote {
                    generation: peer.generation,
                }
            } else {
                Meeting::PeerDemotes
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationRole::{Primary, Secondary};

    fn side(role: ReplicationRole, generation: u64, diverged: bool, won: bool) -> Side {
        Side {
            role,
            generation,
            diverged,
            won,
        }
    }

    /// Both sides reach matching verdicts from the same two hellos.
    fn both(a: Side, b: Side) -> (Meeting, Meeting) {
        (meet(a, b), meet(b, a))
    }

    #[test]
    fn a_primary_streams_to_its_secondary_whatever_their_generations() {
        for (gp, gs) in [(0, 0), (3, 1), (1, 3)] {
            assert_eq!(
                both(
                    side(Primary, gp, true, false),
                    side(Secondary, gs, false, false)
                ),
                (Meeting::Stream, Meeting::Receive)
            );
        }
    }

    #[test]
    fn an_old_primary_that_took_no_writes_while_cut_off_becomes_the_new_ones_secondary() {
        // The failover's primary was killed while connected, restarted, and met its promoted
        // secondary (generation 1) before a frontend wrote to it.
        let old = side(Primary, 0, false, false);
        let new = side(Primary, 1, true, false);
        assert_eq!(
            both(old, new),
            (Meeting::Demote { generation: 1 }, Meeting::PeerDemotes)
        );
    }

    #[test]
    fn two_primaries_both_written_while_apart_are_a_split_brain_on_both_sides() {
        let old = side(Primary, 0, true, false);
        let new = side(Primary, 1, true, false);
        assert_eq!(both(old, new), (Meeting::SplitBrain, Meeting::SplitBrain));
        // Equal generations cannot be ordered, written or not.
        let a = side(Primary, 2, false, false);
        assert_eq!(both(a, a), (Meeting::SplitBrain, Meeting::SplitBrain));
    }

    #[test]
    fn a_resolve_in_one_sides_favour_makes_the_other_its_secondary() {
        // resolve keep=local on the old primary: it takes a generation above both and wins.
        let winner = side(Primary, 2, true, true);
        let loser = side(Primary, 1, true, false);
        assert_eq!(
            both(winner, loser),
            (Meeting::PeerDemotes, Meeting::Demote { generation: 2 })
        );
    }

    #[test]
    fn two_secondaries_send_nothing() {
        let s = side(Secondary, 1, false, false);
        assert_eq!(both(s, s), (Meeting::NoPrimary, Meeting::NoPrimary));
    }
}
