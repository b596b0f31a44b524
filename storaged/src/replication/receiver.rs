//! The secondary's side of the stream: a connection whose first message is a `Hello` from
//! the primary of one of this daemon's secondaries. The volume's [`Applier`] is opened (its
//! recovery run), this side answers with its own `Hello` (the epoch its image is at, and
//! whether it is consistent), then takes what the primary sends:
//!
//! - `ResyncBegin`: a (re)sync starts; an image that was never consistent is written in place
//!   from here on (`mark_inconsistent`), any other is staged;
//! - `Region`: in place during an initial sync, staged otherwise; `Write`, `Zero`: staged;
//! - `Cut`, `ResyncEnd`: the epoch is committed (the image moves to it, atomically) and
//!   `Committed` answered;
//! - `Ping`: `Pong`;
//! - `Promote` (a switchover): once level with the primary, this side becomes the primary.
//!
//! Nothing for [`super::sender::PEER_TIMEOUT`] (the primary pings every second) ends the
//! stream: the link is gone, and the volume may be promoted.
//!
//! Anything else, a malformed frame, or a record outside the volume ends the connection with
//! a log line; what was staged and not committed is dropped (the primary sends it again). The
//! applier's file I/O runs on the runtime's blocking side (`block_in_place`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::apply::{self, Applier};
use super::dirty::DirtyMap;
use super::link::{self, Link};
use super::wire::{self, Message, MessageType, Role, VolumeSpec};
use super::LinkStatus;
use crate::service::{SecondaryVolume, VolumeService};

/// Errors of a secondary's connection.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Link(#[from] link::Error),
    #[error(transparent)]
    Apply(#[from] apply::Error),
    #[error("unexpected {0:?} from the primary")]
    Unexpected(MessageType),
    #[error("the primary sent nothing for {} s", super::sender::PEER_TIMEOUT.as_secs())]
    Silent,
}

/// Serves the primary of relationship `relationship` on `link`, its `Hello` read (`listen`:
/// the address the primary gave for itself; `generation`: its generation).
#[allow(clippy::too_many_arguments)]
pub async fn serve<S>(
    mut link: Link<S>,
    peer: SocketAddr,
    relationship: [u8; 16],
    listen: String,
    generation: u64,
    spec: VolumeSpec,
    service: Arc<VolumeService>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = uuid::Uuid::from_bytes(relationship).to_string();
    let Some((_receiving, vol)) = service.start_receiving(&id) else {
        tracing::warn!(%peer, relationship = %id, "replication: refused a stream for a relationship this daemon has no free secondary of");
        let _ = link
            .send(&Message::Refused {
                status: 404,
                reason: format!(
                    "no secondary of relationship {id} here (or it is busy: another stream, a \
                     role change)"
                ),
            })
            .await;
        return;
    };
    let SecondaryVolume {
        name,
        id: volume_id,
        backing: path,
        mut size,
        generation: local_generation,
    } = vol;
    // The primary grew: so does the secondary, before anything beyond its end arrives.
    if spec.size > size {
        match tokio::task::block_in_place(|| service.grow_secondary(&name, spec.size)) {
            Ok(_) => {
                tracing::info!(volume = %name, from = size, to = spec.size, "replication: the secondary grew with its primary");
                size = spec.size;
            }
            Err(e) => {
                tracing::error!(volume = %name, "replication: cannot grow the secondary with its primary: {}", crate::error_chain(&e));
                let status = match e.kind() {
                    crate::service::ErrorKind::PoolFull => 507,
                    _ => 500,
                };
                let _ = link
                    .send(&Message::Refused {
                        status,
                        reason: format!("cannot grow the secondary to {} bytes: {e}", spec.size),
                    })
                    .await;
                return;
            }
        }
    }
    if spec.size != size {
        let _ = link
            .send(&Message::Refused {
                status: 409,
                reason: format!("the secondary is {size} bytes, the primary {}", spec.size),
            })
            .await;
        return;
    }
    let dir = service.data_dir().join("replication");
    let leftover = dir.join(format!("{volume_id}.dirty"));
    let opened = tokio::task::block_in_place(|| {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let app =
            Applier::open(&dir, &volume_id, &path, size).map_err(|e| crate::error_chain(&e))?;
        // The regions this side changed as a primary, if it was one: the primary sends them.
        let regions = match leftover.exists() {
            true => Some(
                DirtyMap::open(&leftover)
                    .map_err(|e| crate::error_chain(&e))?
                    .bitmap(),
            ),
            false => None,
        };
        Ok::<_, String>((app, regions))
    });
    let ((mut app, recovery), regions) = match opened {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(volume = %name, "replication: cannot open the secondary's staging log: {e}");
            let _ = link
                .send(&Message::Refused {
                    status: 500,
                    reason: format!("cannot open the secondary's staging log: {e}"),
                })
                .await;
            return;
        }
    };
    tracing::info!(volume = %name, %peer, ?recovery, "replication stream from the primary");
    // Where the primary says it can be reached: the relationship's peer from now on.
    if !listen.is_empty() {
        if let Err(e) = tokio::task::block_in_place(|| service.set_peer(&name, &listen)) {
            tracing::warn!(volume = %name, "replication: cannot record the primary's address: {}", crate::error_chain(&e));
        }
    }
    if generation > local_generation {
        if let Err(e) = tokio::task::block_in_place(|| service.raise_generation(&name, generation))
        {
            tracing::warn!(volume = %name, "replication: cannot record the primary's generation: {}", crate::error_chain(&e));
        }
    }
    let applied = app.applied().clone();
    let mut status = LinkStatus {
        state: "replicating",
        consistent: applied.consistent,
        consistent_at_ns: Some(applied.time_unix_ns).filter(|t| applied.consistent && *t > 0),
        ..LinkStatus::default()
    };
    service.set_link_status(&name, status.clone());
    let (all_regions, regions) = match regions {
        Some(r) if r.len() > wire::MAX_BITMAP => (true, Vec::new()),
        Some(r) => (false, r),
        None => (false, Vec::new()),
    };
    let hello = Message::Hello {
        relationship,
        role: Role::Secondary,
        generation: generation.max(local_generation),
        shared_seq: applied.seq,
        diverged: false,
        won: false,
        epoch: applied.epoch,
        consistent: applied.consistent,
        listen: String::new(),
        volume: VolumeSpec { size, ..spec },
        all_regions,
        regions,
    };
    let mut session = Session {
        relationship,
        name: &name,
        leftover: leftover.exists().then_some(leftover),
    };
    let outcome = async {
        link.send(&hello).await?;
        receive(
            &mut link,
            &mut app,
            &service,
            &mut session,
            &mut status,
            &mut stop,
        )
        .await
    }
    .await;
    if let Err(e) = outcome {
        tracing::warn!(volume = %name, %peer, "replication stream ended: {}", crate::error_chain(&e));
    }
    let _ = tokio::task::block_in_place(|| app.discard_staged());
    if service.secondary_of(&id).is_some() {
        status.state = "disconnected";
        status.end_progress();
        status.disconnected_since = Some(crate::unix_time().as_secs());
        service.set_link_status(&name, status);
    }
}

/// What one stream knows beyond the applier.
struct Session<'a> {
    relationship: [u8; 16],
    name: &'a str,
    /// The dirty map this side kept from its time as a primary: removed once a resync has
    /// brought it level (its regions were in it).
    leftover: Option<std::path::PathBuf>,
}

async fn receive<S>(
    link: &mut Link<S>,
    app: &mut Applier,
    service: &VolumeService,
    session: &mut Session<'_>,
    status: &mut LinkStatus,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = session.name;
    let mut in_place = false;
    let mut resync_bytes = 0u64;
    let mut resync_done = 0u64;
    // A primary pings every second: silence means the link is gone (a cut cable sends
    // nothing), and the secondary is free to be promoted.
    let mut heard = std::time::Instant::now();
    let mut watch = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            m = link.recv() => m?,
            _ = watch.tick() => {
                if heard.elapsed() > super::sender::PEER_TIMEOUT {
                    return Err(Error::Silent);
                }
                continue;
            }
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let Some(msg) = msg else {
            return Ok(());
        };
        heard = std::time::Instant::now();
        match msg {
            Message::ResyncBegin { bytes, .. } => {
                in_place = !app.applied().consistent;
                if in_place {
                    tokio::task::block_in_place(|| app.mark_inconsistent())?;
                }
                resync_bytes = bytes;
                resync_done = 0;
                status.state = if in_place { "initial_sync" } else { "resync" };
                status.set_progress(0, bytes);
                service.set_link_status(name, status.clone());
            }
            Message::Region { offset, ref data } => {
                let len = data.len() as u64;
                if in_place {
                    tokio::task::block_in_place(|| app.write_in_place(offset, data))?;
                } else {
                    stage(app, msg, link.last_frame())?;
                }
                resync_done += len;
                if status.set_progress(resync_done, resync_bytes) {
                    count(service, name, link);
                    service.set_link_status(name, status.clone());
                }
            }
            // A region that is a hole (seq 0; a record's is at least 1).
            Message::Zero { len, seq: 0, .. } if status.percent_done.is_some() => {
                stage(app, msg, link.last_frame())?;
                resync_done += len;
            }
            Message::Write { .. } | Message::Zero { .. } => {
                stage(app, msg, link.last_frame())?;
            }
            Message::Cut {
                epoch,
                seq,
                time_unix_ns,
            }
            | Message::ResyncEnd {
                epoch,
                seq,
                time_unix_ns,
            } => {
                let resync = msg.message_type() == MessageType::ResyncEnd;
                let applied = tokio::task::block_in_place(|| app.commit(epoch, seq, time_unix_ns))?;
                if resync {
                    if let Some(path) = session.leftover.take() {
                        let _ = std::fs::remove_file(&path);
                        tracing::info!(volume = %name, "replication: level with the new primary; the regions changed as a primary are overwritten");
                    }
                }
                link.send(&Message::Committed { epoch }).await?;
                count(service, name, link);
                in_place = false;
                status.state = "replicating";
                status.end_progress();
                status.consistent = applied.consistent;
                status.consistent_at_ns = Some(applied.time_unix_ns);
                service.set_link_status(name, status.clone());
            }
            Message::Ping { time_unix_ns } => {
                link.send(&Message::Pong { time_unix_ns }).await?;
                count(service, name, link);
            }
            Message::Promote {
                relationship,
                generation,
                seq,
            } if relationship == session.relationship => {
                let applied = app.applied().clone();
                let level = applied.consistent && applied.seq == seq && app.staged_bytes() == 0;
                let promoted = if level {
                    tokio::task::block_in_place(|| {
                        service.promote_in_switchover(name, generation, &applied)
                    })
                    .map_err(|e| crate::error_chain(&e))
                } else {
                    Err(format!(
                        "not level with the primary: committed up to seq {} (consistent: {}), \
                         asked at seq {seq}",
                        applied.seq, applied.consistent
                    ))
                };
                match promoted {
                    Ok(()) => {
                        link.send(&Message::Accepted { relationship }).await?;
                        tracing::info!(volume = %name, generation, "switchover: this side is the primary");
                        return Ok(());
                    }
                    Err(reason) => {
                        tracing::warn!(volume = %name, "switchover refused: {reason}");
                        link.send(&Message::Refused {
                            status: 409,
                            reason,
                        })
                        .await?;
                    }
                }
            }
            other => return Err(Error::Unexpected(other.message_type())),
        }
    }
}

/// Stages a record, `frame` the one it came in; writes the staged frames to the log once they
/// are a chunk.
fn stage(app: &mut Applier, record: Message, frame: &[u8]) -> Result<(), Error> {
    app.stage_frame(record, frame)?;
    if app.write_due() {
        tokio::task::block_in_place(|| app.write_staged())?;
    }
    Ok(())
}

/// Adds what the link carried since the last call to the volume's byte counters.
fn count<S>(service: &VolumeService, name: &str, link: &mut Link<S>) {
    let (sent, received) = link.take_counts();
    service.count_replication_bytes(name, sent, received);
}
