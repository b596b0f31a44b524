//! Replication of a volume to a peer storaged in another zone.
//!
//! - `tls.rs`: the link's mutual TLS (one identity and one CA set per daemon).
//! - `listener.rs`: accepting peers on `[replication] listen`.
//! - `wire.rs`: the link's frames (versioned, length-delimited, CRC32C-checked) and messages.
//! - `log.rs`: a primary volume's records of completed writes, over
//! - `dirty.rs`: its dirty map on disk, marked before each write is submitted.
//! - `sync.rs`: sync mode's gate: a write's answer waits for the secondary's commit.
//! - `apply.rs`: a secondary volume's staging log (redo log) and the apply of each committed
//!   epoch, with the recovery that makes the image always the last committed epoch's.
//! - `link.rs`: messages on a stream, whole frames each way.
//! - `session.rs`: what an authenticated connection does (a primary asking its peer to create
//!   the secondary).
//! - `sender.rs`: the primary's side of the stream (resync, then records and cuts);
//! - `pace.rs`: when a resync the volume's writes outran starts again;
//! - `supervisor.rs`: starts the sender of every primary volume.
//! - `receiver.rs`: the secondary's side (staging and committing through `apply.rs`).
//! - `relationship.rs`: a volume's relationship as the catalog keeps it.
//! - `roles.rs`: what two sides do when they meet (stream, demote, split brain).

pub mod apply;
pub mod dirty;
pub mod link;
pub mod listener;
pub mod log;
pub mod pace;
pub mod receiver;
pub mod relationship;
pub mod roles;
pub mod sender;
pub mod session;
pub mod supervisor;
pub mod sync;
pub mod tls;
pub mod wire;

pub use relationship::{LinkStatus, Relationship, ReplicationMode, ReplicationRole};
