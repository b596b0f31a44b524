//! Replication of a volume to a peer storaged in another zone.
//!
//! - `tls.rs`: the link's mutual TLS (one identity and one CA set per daemon).
//! - `listener.rs`: accepting peers on `[replication] listen`.

pub mod listener;
pub mod tls;
