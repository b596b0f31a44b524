//! `storaged`: a block-storage target that serves dedicated volumes to VMs over
//! vhost-user-blk, with io_uring on the data path.
//!
//! See `docs/ARCHITECTURE.md` at the top of the repository for how the pieces fit.

pub mod api;
pub mod backing;
pub mod blk;
pub mod blockdev;
pub mod catalog;
pub mod config;
pub mod cpus;
pub mod crypto;
pub mod daemon;
pub mod keys;
pub mod log_writer;
pub mod metrics;
pub mod qos;
pub mod replication;
pub mod service;
pub mod volume;

/// Locks a mutex, going on with the data if a thread panicked while holding it: every mutex
/// here guards state that stays consistent between statements, and one failed worker must not
/// take the daemon's other volumes down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The wall clock, as time since the Unix epoch (zero for a clock set before it).
pub(crate) fn unix_time() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Formats an error with its whole chain of sources: "a: b: c".
pub use errors::chain as error_chain;
