//! Replication of a volume to a peer storaged over TCP and mutual TLS.

pub mod wire;
