//! Replication of a volume to a peer storaged in another zone.
//!
//! - `tls.rs`: the link's mutual TLS (one identity and one CA set per daemon).
//! - `listener.rs`: accepting peers on `[replication] listen`.
//! - `wire.rs`: the link's frames (versioned, length-delimited, CRC32C-checked) and messages.

pub mod listener;
pub mod tls;
pub mod wire;
