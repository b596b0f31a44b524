//! The primary's side of the stream: one task per relationship of a primary volume ([`run`])
//! that keeps a connection to the secondary's storaged and ships the volume's replication log
//! over it; it ends with its relationship (a new one gets a new task), and what it says of the
//! link is shown only while its relationship is the volume's.
//!
//! Each connection (see docs/ARCHITECTURE.md, "The stream's conversation"):
//!
//! 1. `Hello` both ways: the secondary says the epoch its image is at and whether it is
//!    consistent.
//! 2. A (re)sync, every time the connection is made and whenever the log overflowed: the
//!    dirty regions, read from the backing file as stored (a region that is a hole there is
//!    sent as a discard of it), then the records appended since the resync began, then
//!    `ResyncEnd`, the epoch's cut. Should the log overflow while the regions are read (writes
//!    faster than the link), a further pass in the same epoch sends the regions written
//!    meanwhile, while the passes shrink; else the resync is lost to the writes, given up as
//!    soon as a pass is known to be no shorter than the last, and tried again on a new
//!    connection once the writes slow (`pace.rs`). The secondary commits the epoch whole (in
//!    place the first time, when it has no consistent image to keep) and answers
//!    `Committed`.
//! 3. The stream: every [`EPOCH_INTERVAL`] the log is cut and its records sent, each cut as a
//!    `Cut` with the next epoch; each `Committed` moves the secondary's consistent point
//!    (`consistent_at`, the primary's time of that cut).
//!
//! Each `Committed` also cleans the dirty map: a region whose last record is in a committed
//! epoch, and that no request has in flight, is cleared (on disk once it stayed clean for
//! [`super::dirty::DISK_CLEAN_AGE`]), so a resync sends only the regions changed since the
//! secondary last had them. A broken connection is made
//! again after a backoff of 1 s doubling to 10 s; after a resync lost to the writes, once
//! they slow (`pace.rs`).
//!
//! When the peer answers as a primary too, `roles.rs` decides: this side demotes itself (and
//! the sender ends), waits for the peer to, or reports a split brain. A secondary's `Hello`
//! may name regions it changed as a primary: they are marked here before the resync, which
//! then sends them. A switchover asked of the volume ([`VolumeService::begin_switchover`])
//! is carried out on the stream once it is drained: `Promote`, then, on `Accepted`, this side
//! becomes the secondary.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::link::{self, Link};
use super::log::{Record, ReplicationLog};
use super::pace;
use super::roles::{self, Meeting, Side};
use super::session::{self, wire_spec};
use super::tls::Tls;
use super::wire::{self, Message, Role};
use super::{LinkStatus, ReplicationMode};
use crate::service::{PrimaryLink, VolumeService};

/// How often the stream cuts an epoch while records come.
pub const EPOCH_INTERVAL: Duration = Duration::from_millis(100);

/// How often the stream pings the secondary, and how long the secondary may stay silent
/// before the link is taken for broken (a cut cable sends nothing, not even a reset).
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one frame (at most 4 MiB + 4 KiB) may take to go out: a cut link whose send
/// buffer is full takes no byte, and the stream must notice that too, not only the
/// secondary's silence between sends. (A link must carry about 1 MiB/s for the largest
/// frame.)
pub const SEND_TIMEOUT: Duration = PEER_TIMEOUT;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Errors of one connection.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Session(#[from] session::Error),
    #[error(transparent)]
    Link(#[from] link::Error),
    #[error("the secondary closed the connection")]
    Closed,
    #[error("the secondary refused: {0}")]
    Refused(String),
    #[error("the secondary sent an unexpected {0:?}")]
    Unexpected(super::wire::MessageType),
    #[error("cannot read the volume's backing file")]
    Read(#[source] std::io::Error),
    #[error("the volume is no longer a served primary")]
    Gone,
    #[error("the secondary sent nothing for {} s", PEER_TIMEOUT.as_secs())]
    Silent,
    #[error("a frame could not be sent in {} s", SEND_TIMEOUT.as_secs())]
    Stuck,
    #[error("the peer is a primary of an older generation: it becomes this side's secondary")]
    PeerDemotes,
    #[error(
        "split brain: the peer is a primary of generation {0} and both sides were written \
         since they were level; resolve with keep = local or peer"
    )]
    SplitBrain(u64),
    #[error(
        "the volume's writes ({:.1} MB/s) outran the resync: the log overflowed during a pass \
         and the regions written since it began were as many bytes as it sends",
        writes_per_second / 1e6
    )]
    ResyncOverflow { writes_per_second: f64 },
    #[error("the volume grew: the secondary grows at the next connection")]
    Resized,
    #[error("cannot change the volume's role: {0}")]
    Role(String),
    #[error("cannot mark the regions the secondary changed: {0}")]
    Mark(#[source] super::dirty::Error),
}

/// The sender of primary volume `name` (started by `supervisor.rs`); it ends when the volume
/// stops being a served primary or `stop` turns true. `listen` is this daemon's replication
/// address, told to the secondary.
pub async fn run(
    service: Arc<VolumeService>,
    tls: Tls,
    name: String,
    listen: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    // The relationship this sender serves: a new one of the same volume gets a sender of its
    // own, starting from nothing known.
    let Some(served) = service.primary_link(&name).map(|l| l.relationship.id) else {
        return;
    };
    let mut known = LinkStatus {
        state: "disconnected",
        relationship: Some(served.clone()),
        ..LinkStatus::default()
    };
    let mut first = true;
    let mut losses = pace::Losses::default();
    loop {
        let Some(PrimaryLink {
            relationship: rel,
            log,
            ..
        }) = service
            .primary_link(&name)
            .filter(|l| l.relationship.id == served)
        else {
            return;
        };
        if !std::mem::take(&mut first) {
            service.count_replication_reconnect(&name);
        }
        let committed = known.consistent_at_ns;
        let outcome = tokio::select! {
            r = connection(&service, &tls, &name, &listen, &mut known) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if known.consistent_at_ns != committed {
            losses.reset();
        }
        if service.switchover_pending(&name) {
            let why = match &outcome {
                Err(e) => crate::error_chain(e),
                Ok(()) => "the link closed".into(),
            };
            service.end_switchover(&name, Err(why), false);
        }
        let mut split = false;
        match outcome {
            Err(Error::Gone) => return,
            Err(ref e @ Error::ResyncOverflow { writes_per_second }) => {
                tracing::warn!(
                    volume = %name,
                    "replication: {e}; the resync starts again once they slow to half, or in {} s",
                    losses.holdoff().as_secs()
                );
                wait_out_the_writes(
                    &service,
                    &name,
                    &log,
                    &mut known,
                    &mut losses,
                    writes_per_second,
                    &mut stop,
                )
                .await;
                if *stop.borrow() {
                    return;
                }
                backoff = BACKOFF_MIN;
                continue;
            }
            Err(e @ Error::Resized) => {
                tracing::info!(volume = %name, "replication: {e}");
                backoff = BACKOFF_MIN / 2;
            }
            Err(Error::PeerDemotes) => {
                tracing::info!(volume = %name, peer = %rel.peer, "replication: the peer was superseded by this side and becomes its secondary");
                backoff = BACKOFF_MIN / 2;
            }
            Err(e @ Error::SplitBrain(_)) => {
                split = true;
                if known.state != "split_brain" {
                    tracing::error!(volume = %name, peer = %rel.peer, "replication stopped: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(volume = %name, peer = %rel.peer, "replication link down: {}", crate::error_chain(&e));
            }
            Ok(()) => {}
        }
        known.state = if split { "split_brain" } else { "disconnected" };
        known.end_progress();
        // Behind while anything written is not on the secondary: records, dropped ones
        // (an overflowed log), or regions marked since its last commit.
        known.behind |= log.has_records() || log.overflowed() || log.dirty().dirty_bytes() > 0;
        known.disconnected_since.get_or_insert_with(now_unix);
        service.set_link_status(&name, known.clone());
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// After a resync lost to writes of `writes_per_second`: shows the resync waiting with the
/// dirty bytes left, and waits as `pace.rs` says, or until `stop`.
async fn wait_out_the_writes(
    service: &VolumeService,
    name: &str,
    log: &ReplicationLog,
    known: &mut LinkStatus,
    losses: &mut pace::Losses,
    writes_per_second: f64,
    stop: &mut watch::Receiver<bool>,
) {
    known.state = if known.consistent {
        "resync"
    } else {
        "initial_sync"
    };
    known.behind = true;
    known.disconnected_since = None;
    let wait = losses.wait(log, writes_per_second);
    tokio::pin!(wait);
    // What the next resync will send, as the writes go on marking regions.
    let mut shown = tokio::time::interval(Duration::from_secs(1));
    let start = loop {
        tokio::select! {
            s = &mut wait => break s,
            _ = shown.tick() => {
                known.set_progress(0, log.dirty().dirty_bytes());
                service.set_link_status(name, known.clone());
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    };
    match start {
        pace::Start::Slower(rate) => {
            tracing::info!(volume = %name, "replication: the volume's writes slowed to {:.1} MB/s; the resync starts again", rate / 1e6);
        }
        pace::Start::HeldOff(after) => {
            tracing::info!(volume = %name, "replication: the resync starts again after {} s, the writes as fast", after.as_secs());
        }
    }
}

fn now_unix() -> u64 {
    crate::unix_time().as_secs()
}

fn now_ns() -> u64 {
    crate::unix_time().as_nanos() as u64
}

/// One connection: Hello, a resync, then the stream until the link breaks.
async fn connection(
    service: &Arc<VolumeService>,
    tls: &Tls,
    name: &str,
    listen: &str,
    known: &mut LinkStatus,
) -> Result<(), Error> {
    let PrimaryLink {
        relationship: rel,
        log,
        backing: path,
        size,
        block_size,
        spec,
    } = service
        .primary_link(name)
        .filter(|l| known.relationship.as_ref() == Some(&l.relationship.id))
        .ok_or(Error::Gone)?;
    let relationship = *uuid::Uuid::parse_str(&rel.id)
        .map_err(|_| Error::Gone)?
        .as_bytes();
    let stream = session::connect(tls, &rel.peer).await?;
    let (rd, wr) = tokio::io::split(stream);
    let (mut rx, mut tx) = (Link::new(rd), Link::new(wr));
    send(
        &mut tx,
        &Message::Hello {
            relationship,
            role: Role::Primary,
            generation: rel.generation,
            shared_seq: 0,
            diverged: log.dirty().diverged(),
            won: rel.won,
            epoch: 0,
            consistent: true,
            listen: listen.to_string(),
            volume: wire_spec(&spec, block_size),
            all_regions: false,
            regions: Vec::new(),
        },
    )
    .await?;
    let (mut epoch, consistent) = match rx.recv().await?.ok_or(Error::Closed)? {
        Message::Hello {
            role,
            generation,
            diverged,
            won,
            epoch,
            consistent,
            all_regions,
            regions,
            ..
        } => {
            let local = service.local_side(name).ok_or(Error::Gone)?;
            let peer = Side {
                role: role.into(),
                generation,
                diverged,
                won,
            };
            known.peer_generation = (role == Role::Primary).then_some(generation);
            match roles::meet(local, peer) {
                Meeting::Stream => {}
                Meeting::Demote { generation } => {
                    tracing::warn!(volume = %name, peer = %rel.peer, generation, "replication: the peer is the primary of a newer generation; this side becomes its secondary");
                    let demoted = tokio::task::block_in_place(|| {
                        service.demote_to(name, generation, 0, !peer.won)
                    });
                    return Err(match demoted {
                        Ok(()) => Error::Gone,
                        // Written while cut off, seen once fenced.
                        Err(_)
                            if !peer.won
                                && service.local_side(name).is_some_and(|s| s.diverged) =>
                        {
                            Error::SplitBrain(generation)
                        }
                        Err(e) => Error::Role(crate::error_chain(&e)),
                    });
                }
                Meeting::PeerDemotes => return Err(Error::PeerDemotes),
                Meeting::SplitBrain => return Err(Error::SplitBrain(generation)),
                Meeting::Receive | Meeting::NoPrimary => {
                    return Err(Error::Unexpected(wire::MessageType::Hello))
                }
            }
            if generation > rel.generation {
                tokio::task::block_in_place(|| service.raise_generation(name, generation))
                    .map_err(|e| Error::Role(crate::error_chain(&e)))?;
            }
            // What the secondary changed as a primary is sent by the resync below.
            tokio::task::block_in_place(|| {
                if all_regions {
                    log.dirty().mark(0, size)
                } else {
                    log.dirty().mark_bitmap(&regions, size)
                }
            })
            .map_err(Error::Mark)?;
            (epoch, consistent)
        }
        Message::Refused { reason, .. } => return Err(Error::Refused(reason)),
        other => return Err(Error::Unexpected(other.message_type())),
    };
    tracing::info!(volume = %name, peer = %rel.peer, epoch, consistent, "replication link up");
    known.consistent = consistent;
    let file = File::open(&path).map_err(Error::Read)?;
    loop {
        epoch += 1;
        let (cut, cut_time) =
            resync(service, name, &log, &file, size, epoch, &mut tx, known).await?;
        // The resync's commit: the two are level at `cut`. Answers to what the stream sent
        // before this resync (epochs, pings) may come first.
        loop {
            match rx.recv().await?.ok_or(Error::Closed)? {
                Message::Committed { epoch: e } if e == epoch => break,
                Message::Committed { epoch: e } if e < epoch => {}
                Message::Pong { .. } => {}
                other => return Err(Error::Unexpected(other.message_type())),
            }
        }
        log.committed(cut);
        // The regions only the resync marked are clean on disk at once.
        flush_clears(&log);
        let _connected = Connected::new(log.dirty());
        log.sync().ack(cut);
        if rel.mode == ReplicationMode::Sync && !log.sync().active() {
            log.sync().set_active(true);
            tracing::info!(volume = %name, "sync mode: writes are answered once the secondary has committed them");
        }
        tokio::task::block_in_place(|| {
            if let Err(e) = log.dirty().clear_diverged() {
                tracing::warn!(volume = %name, "replication: {}", crate::error_chain(&e));
            }
            if rel.won {
                if let Err(e) = service.level_again(name) {
                    tracing::warn!(volume = %name, "replication: {}", crate::error_chain(&e));
                }
            }
        });
        known.consistent = true;
        known.consistent_at_ns = Some(cut_time);
        known.disconnected_since = None;
        known.state = "replicating";
        known.end_progress();
        known.behind = log.has_records();
        count(service, name, &mut rx, &mut tx);
        service.set_link_status(name, known.clone());
        let level = Level {
            relationship,
            generation: rel.generation,
            seq: cut,
            size,
        };
        ship(
            service, name, &log, &mut rx, &mut tx, &mut epoch, known, level,
        )
        .await?;
    }
}

/// Epochs sent and not yet committed: (epoch, seq and time of its cut).
type Sent = std::collections::VecDeque<(u64, u64, u64)>;

/// Passes a resync makes at most, each over the regions written during the last (see
/// [`resync`]).
const RESYNC_PASSES: u32 = 16;

/// Regions (of [`super::log::REGION`] bytes) a resync reads ahead of what the link has taken.
const READ_AHEAD: usize = 4;

/// Bytes of frames written to the link at once.
const BATCH: usize = 256 << 10;

/// How often the dirty map's clears are written out (those due: see [`super::dirty`]).
const FLUSH_CLEARS_INTERVAL: Duration = Duration::from_secs(1);

/// A sync relationship is caught up when at most an epoch is in flight and the log holds
/// less than this.
const CAUGHT_UP: usize = 1 << 20;

/// Cuts the log and sends its records, each cut as the next epoch (recorded in `sent`).
/// False when the log overflowed instead: a resync follows.
async fn send_epoch<W: AsyncWrite + Unpin>(
    log: &ReplicationLog,
    tx: &mut Link<W>,
    epoch: &mut u64,
    sent: &mut Sent,
) -> Result<bool, Error> {
    log.cut();
    let records = log.drain();
    if log.overflowed() {
        return Ok(false);
    }
    for record in records {
        let cut = match &record {
            Record::Cut { seq, time_unix_ns } => Some((*seq, *time_unix_ns)),
            _ => None,
        };
        if let Some(msg) = record_message(record, Some(epoch)) {
            send_batched(tx, &msg).await?;
        }
        if let Some((seq, time)) = cut {
            sent.push_back((*epoch, seq, time));
        }
    }
    flush(tx).await?;
    Ok(true)
}

/// While it lives, the stream runs and the secondary is level: changes are not divergence.
struct Connected<'a>(&'a super::dirty::DirtyMap);

impl<'a> Connected<'a> {
    fn new(map: &'a super::dirty::DirtyMap) -> Self {
        map.set_connected(true);
        Connected(map)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.set_connected(false);
    }
}

/// Where the stream stands with the secondary: the relationship, this side's generation, and
/// the last seq the secondary committed.
struct Level {
    relationship: [u8; 16],
    generation: u64,
    seq: u64,
    /// The volume's size the secondary was told.
    size: u64,
}

/// Sends `msg` (after what is queued), or fails once [`SEND_TIMEOUT`] passed without it
/// going out.
async fn send<W: AsyncWrite + Unpin>(tx: &mut Link<W>, msg: &Message) -> Result<(), Error> {
    tx.queue(msg)?;
    flush(tx).await
}

/// Queues `msg`, and writes what is queued once that is a batch.
async fn send_batched<W: AsyncWrite + Unpin>(tx: &mut Link<W>, msg: &Message) -> Result<(), Error> {
    tx.queue(msg)?;
    if tx.queued() >= BATCH {
        flush(tx).await?;
    }
    Ok(())
}

/// Writes what is queued, or fails once [`SEND_TIMEOUT`] passed without it going out.
async fn flush<W: AsyncWrite + Unpin>(tx: &mut Link<W>) -> Result<(), Error> {
    match tokio::time::timeout(SEND_TIMEOUT, tx.flush()).await {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(Error::Stuck),
    }
}

/// Adds what the link's two halves carried to the volume's byte counters.
fn count<R, W>(service: &VolumeService, name: &str, rx: &mut Link<R>, tx: &mut Link<W>) {
    let (_, received) = rx.take_counts();
    let (sent, _) = tx.take_counts();
    service.count_replication_bytes(name, sent, received);
}

/// Adds what the sending half carried to the volume's sent-bytes counter (during a resync,
/// whose passes may be given up with the connection).
fn count_sent<W>(service: &VolumeService, name: &str, tx: &mut Link<W>) {
    let (sent, _) = tx.take_counts();
    service.count_replication_bytes(name, sent, 0);
}

/// Writes out the dirty map's clears that are due.
fn flush_clears(log: &ReplicationLog) {
    let flushed =
        tokio::task::block_in_place(|| log.dirty().flush_clears(super::dirty::DISK_CLEAN_AGE));
    if let Err(e) = flushed {
        tracing::warn!(
            "replication: cannot write the dirty map's clears: {}",
            crate::error_chain(&e)
        );
    }
}

/// Sends a resync as epoch `epoch`: the dirty regions; while the log overflows during a pass,
/// another pass with the regions written during it (at most [`RESYNC_PASSES`], each smaller
/// than the last, else [`Error::ResyncOverflow`]); then the records since the last pass
/// began, then its end, whose seq and time it returns.
#[allow(clippy::too_many_arguments)]
async fn resync<W: AsyncWrite + Unpin>(
    service: &VolumeService,
    name: &str,
    log: &ReplicationLog,
    file: &File,
    size: u64,
    epoch: u64,
    tx: &mut Link<W>,
    known: &mut LinkStatus,
) -> Result<(u64, u64), Error> {
    // The writes during the pass being sent: what a lost resync waits to see slow.
    let mut meter = pace::WriteMeter::start(log);
    let lost = |meter: &pace::WriteMeter| Error::ResyncOverflow {
        writes_per_second: meter.rate(log),
    };
    let (mut ranges, mut since) = log.start_resync();
    let mut pass = 1;
    let (time_unix_ns, records, seq) = loop {
        let Some(bytes) =
            send_regions(service, name, log, file, size, epoch, &ranges, tx, known).await?
        else {
            return Err(lost(&meter));
        };
        // Grown meanwhile: the regions past the size the secondary was told are not in
        // this resync, and its commit would clear them. A new connection grows it first.
        if service.primary_link(name).is_some_and(|l| l.size != size) {
            return Err(Error::Resized);
        }
        // What completed while the regions were read; cuts inside a resync are not epochs.
        // The resync's cut is the last record taken with them: what comes after goes to the
        // stream. Its time is read before: every write answered by then is among them.
        let time_unix_ns = now_ns();
        let (records, seq) = log.drain_to();
        if !log.overflowed() {
            break (time_unix_ns, records, seq);
        }
        // Records were dropped during the pass: its cut would claim them. Their regions are
        // dirty, touched since the pass began: another pass sends them, in the same epoch,
        // while the passes shrink (the link outruns the writes).
        let next = log.continue_resync(since);
        let left: u64 = next.0.iter().map(|(_, l)| l).sum();
        pass += 1;
        if pass > RESYNC_PASSES || left >= bytes {
            return Err(lost(&meter));
        }
        meter = pace::WriteMeter::start(log);
        tracing::info!(volume = %name, epoch, pass, bytes = left, "replication: the log overflowed during the resync; another pass");
        (ranges, since) = next;
    };
    for record in records {
        if let Some(msg) = record_message(record, None) {
            send_batched(tx, &msg).await?;
        }
    }
    send(
        tx,
        &Message::ResyncEnd {
            epoch,
            seq,
            time_unix_ns,
        },
    )
    .await?;
    Ok((seq, time_unix_ns))
}

/// Sends one pass of a resync: `ResyncBegin`, then the regions `ranges` (cut to the
/// volume's `size`); returns their bytes. `None`: the pass was given up, lost to the writes
/// (`log` overflowed and they touched as many bytes of regions as the pass sends, so the next
/// pass would be no shorter).
#[allow(clippy::too_many_arguments)]
async fn send_regions<W: AsyncWrite + Unpin>(
    service: &VolumeService,
    name: &str,
    log: &ReplicationLog,
    file: &File,
    size: u64,
    epoch: u64,
    ranges: &[(u64, u64)],
    tx: &mut Link<W>,
    known: &mut LinkStatus,
) -> Result<Option<u64>, Error> {
    let ranges: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(off, _)| *off < size)
        .map(|&(off, len)| (off, len.min(size - off)))
        .collect();
    let bytes: u64 = ranges.iter().map(|(_, l)| l).sum();
    tracing::info!(volume = %name, epoch, regions = ranges.len(), bytes, "replication: resync");
    known.state = if known.consistent {
        "resync"
    } else {
        "initial_sync"
    };
    known.set_progress(0, bytes);
    known.behind |= bytes > 0;
    service.set_link_status(name, known.clone());
    send(
        tx,
        &Message::ResyncBegin {
            epoch,
            regions: ranges.len() as u64,
            bytes,
        },
    )
    .await?;
    // The regions are read on the runtime's blocking side, up to READ_AHEAD of them ahead
    // of the link: the disk's reads overlap the sends. Dropping `regions` (the pass given
    // up, the link broken) stops the reads.
    let (ahead, mut regions) = tokio::sync::mpsc::channel(READ_AHEAD);
    let file = file.try_clone().map_err(Error::Read)?;
    let reader = tokio::task::spawn_blocking(move || {
        for (offset, len) in ranges {
            let region = read_region(&file, offset, len).map(|msg| (len, msg));
            let failed = region.is_err();
            if ahead.blocking_send(region).is_err() || failed {
                return;
            }
        }
    });
    let mut done = 0u64;
    while let Some(region) = regions.recv().await {
        let (len, msg) = region.map_err(Error::Read)?;
        send(tx, &msg).await?;
        done += len;
        if known.set_progress(done, bytes) {
            count_sent(service, name, tx);
            service.set_link_status(name, known.clone());
        }
        if log.overflowed() && log.touched_in_pass() >= bytes {
            count_sent(service, name, tx);
            return Ok(None);
        }
    }
    if done != bytes {
        // The reader ended without an error of its own to say: the pass is not whole, and
        // must not be committed.
        let why = match reader.await {
            Err(e) if e.is_panic() => "the resync's reader panicked",
            _ => "the resync's reads ended before its last region",
        };
        return Err(Error::Read(std::io::Error::other(why)));
    }
    Ok(Some(bytes))
}

/// A region as the backing file holds it: its bytes, or a discard where the file has a hole.
fn read_region(file: &File, offset: u64, len: u64) -> std::io::Result<Message> {
    if is_hole(file, offset, len) {
        return Ok(Message::Zero {
            seq: 0,
            offset,
            len,
            discard: true,
        });
    }
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset)?;
    Ok(Message::Region { offset, data })
}

/// Whether `len` bytes at `offset` of `file` are a hole (SEEK_DATA finds no data in them).
fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on a descriptor `file` owns; it moves only this descriptor's offset,
    // which nothing here uses (reads are positioned).
    let next = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after offset. Anything else: read it to be sure.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset + len
}

/// The wire message of a log record; a cut becomes the next epoch's `Cut` when `epoch` is
/// given, and nothing inside a resync.
fn record_message(record: Record, epoch: Option<&mut u64>) -> Option<Message> {
    Some(match record {
        Record::Write { seq, offset, data } => Message::Write { seq, offset, data },
        Record::Zero {
            seq,
            offset,
            len,
            discard,
        } => Message::Zero {
            seq,
            offset,
            len,
            discard,
        },
        Record::Cut { seq, time_unix_ns } => {
            let epoch = epoch?;
            *epoch += 1;
            Message::Cut {
                epoch: *epoch,
                seq,
                time_unix_ns,
            }
        }
    })
}

/// The stream, until the log overflows (a resync follows) or the link breaks; or a
/// switchover makes this side the secondary.
#[allow(clippy::too_many_arguments)]
async fn ship<R, W>(
    service: &VolumeService,
    name: &str,
    log: &Arc<ReplicationLog>,
    rx: &mut Link<R>,
    tx: &mut Link<W>,
    epoch: &mut u64,
    known: &mut LinkStatus,
    mut level: Level,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut tick = tokio::time::interval(EPOCH_INTERVAL);
    // Epochs sent and not yet committed: (epoch, seq and time of its cut).
    let mut sent = Sent::default();
    let mut flushed_clears = std::time::Instant::now();
    let mut heard = std::time::Instant::now();
    let mut pinged = std::time::Instant::now();
    // A switchover's `Promote` sent: the generation the peer is asked to take.
    let mut promoting: Option<u64> = None;
    let sync = service
        .primary_link(name)
        .is_some_and(|l| l.relationship.mode == ReplicationMode::Sync);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if heard.elapsed() > PEER_TIMEOUT {
                    return Err(Error::Silent);
                }
                if !service.still_primary(name, log) {
                    return Err(Error::Gone);
                }
                // Grown: a new connection's Hello grows the secondary first.
                if service.primary_link(name).is_some_and(|l| l.size != level.size) {
                    return Err(Error::Resized);
                }
                if promoting.is_some() {
                    continue;
                }
                // A switchover, once everything written is committed there.
                // (Pending first: the fence comes before it, so a change it did not refuse is
                // in the map by then.)
                if service.switchover_pending(name)
                    && sent.is_empty()
                    && !log.has_records()
                    && log.dirty().dirty_bytes() == 0
                    && service.switchover_promote_due(name)
                {
                    let generation = level.generation + 1;
                    tracing::info!(volume = %name, generation, seq = level.seq, "switchover: drained, asking the secondary to promote");
                    send(tx, &Message::Promote {
                        relationship: level.relationship,
                        generation,
                        seq: level.seq,
                    })
                    .await?;
                    promoting = Some(generation);
                    continue;
                }
                if flushed_clears.elapsed() >= FLUSH_CLEARS_INTERVAL {
                    flush_clears(log);
                    flushed_clears = std::time::Instant::now();
                }
                if pinged.elapsed() >= PING_INTERVAL {
                    send(tx, &Message::Ping { time_unix_ns: now_ns() }).await?;
                    pinged = std::time::Instant::now();
                }
                // A sync relationship that fell back to async returns to sync once the
                // stream has caught up.
                if sync && !log.sync().active() && sent.len() <= 1 && log.pending_bytes() < CAUGHT_UP {
                    log.sync().set_active(true);
                            tracing::info!(volume = %name, "sync mode resumed: the stream caught up; writes wait for the secondary again");
                }
                if !send_epoch(log, tx, epoch, &mut sent).await? {
                    return Ok(());
                }
            }
            // Sync mode: what completed goes at once, each batch an epoch of its own.
            () = log.sync().records_appended(), if sync && promoting.is_none() => {
                if !send_epoch(log, tx, epoch, &mut sent).await? {
                    return Ok(());
                }
            }
            m = rx.recv() => {
                let m = m?.ok_or(Error::Closed)?;
                heard = std::time::Instant::now();
                match m {
                Message::Committed { epoch: e } => {
                    let mut upto = None;
                    while let Some(&(first, seq, time)) = sent.front() {
                        if first > e {
                            break;
                        }
                        sent.pop_front();
                        known.consistent_at_ns = Some(time);
                        upto = Some(seq);
                    }
                    if let Some(seq) = upto {
                        level.seq = seq;
                        log.sync().ack(seq);
                        // Clean in memory at once; on disk once they stay clean.
                        log.committed(seq);
                    }
                }
                Message::Accepted { relationship } if promoting.is_some() && relationship == level.relationship => {
                    let generation = promoting.unwrap_or_default();
                    let demoted = tokio::task::block_in_place(|| service.demote_to(name, generation, level.seq, false));
                    match demoted {
                        Ok(()) => {
                            tracing::info!(volume = %name, generation, "switchover done: the peer is the primary, this side its secondary");
                            service.end_switchover(name, Ok(()), false);
                            return Err(Error::Gone);
                        }
                        Err(e) => {
                            let why = crate::error_chain(&e);
                            service.end_switchover(name, Err(format!("the peer was promoted, but this side cannot become its secondary: {why}")), false);
                            return Err(Error::Role(why));
                        }
                    }
                }
                Message::Refused { reason, .. } if promoting.is_some() => {
                    service.end_switchover(name, Err(format!("the secondary refused to promote: {reason}")), true);
                    promoting = None;
                }
                Message::Pong { .. } => {}
                other => return Err(Error::Unexpected(other.message_type())),
                }
            }
        }
        known.behind = !sent.is_empty() || log.has_records() || log.overflowed();
        count(service, name, rx, tx);
        service.set_link_status(name, known.clone());
    }
}
