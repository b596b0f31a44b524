//! The replication supervisor: the one place senders are started. It runs one sender per
//! relationship of a primary volume: those of the catalog at start, and each volume that
//! becomes a primary later (a relationship started, a promote, a switchover) as soon as the
//! service rings ([`VolumeService::wake_senders`]); it looks again every second, so a sender
//! that ended while its volume is still a primary is started again. Each round also opens the
//! sync gate (`sync.rs`) of a sync relationship whose secondary has not committed a write
//! within the sync timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::sender;
use super::tls::Tls;
use super::ReplicationMode;
use crate::service::VolumeService;

/// Runs until `stop` turns true, then waits for the senders (which stop with it).
pub async fn run(
    service: Arc<VolumeService>,
    tls: Tls,
    listen: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    let listen = listen.unwrap_or_default();
    // By volume and relationship: the sender of a relationship just ended may still run (it
    // ends at its next look) when the volume's next one starts.
    let mut running: HashMap<(String, String), tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        running.retain(|_, task| !task.is_finished());
        for name in service.primaries() {
            let Some(link) = service.primary_link(&name) else {
                continue;
            };
            let key = (name.clone(), link.relationship.id);
            running.entry(key).or_insert_with(|| {
                tokio::spawn(sender::run(
                    service.clone(),
                    tls.clone(),
                    name,
                    listen.clone(),
                    stop.clone(),
                ))
            });
        }
        // Sync relationships whose secondary takes too long fall back to async.
        for (name, id) in running.keys() {
            let Some(link) = service
                .primary_link(name)
                .filter(|l| l.relationship.id == *id)
            else {
                continue;
            };
            if link.relationship.mode == ReplicationMode::Sync
                && link.log.sync().expire(service.sync_timeout())
            {
                tracing::warn!(volume = %name, peer = %link.relationship.peer, timeout_seconds = service.sync_timeout().as_secs(), "sync mode suspended: the secondary did not commit a write in time; running async until the stream catches up");
                // Writes are answered without the secondary from now on: this side diverges.
                if let Err(e) = link.log.dirty().mark_diverged() {
                    tracing::error!(volume = %name, "replication: {}", crate::error_chain(&e));
                }
                service.count_sync_suspension(name);
            }
        }
        tokio::select! {
            () = service.senders_woken() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for (_, task) in running {
        let _ = task.await;
    }
}
