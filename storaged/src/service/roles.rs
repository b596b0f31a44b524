//! A replicated volume's role changes: promote (failover), demote (failback), the switchover's
//! two halves, resolve (split brain), unreplicate; and what the link's tasks ask of the
//! volume's role (its side in a meeting, the receiver's hold). The rules a meeting applies
//! are in `replication/roles.rs`; the design in docs/ARCHITECTURE.md, "Roles, generations and
//! split brain".
//!
//! Every change is written to the catalog before the data path sees it: a promote records
//! the primary (and its dirty map exists, clean) before the volume takes writes; a demote
//! records the secondary before the volume is served read-only again.

use std::path::PathBuf;
use std::sync::Arc;

use super::{Error, VolumeService};
use crate::replication::apply::{Applied, Applier};
use crate::replication::dirty::DirtyMap;
use crate::replication::roles::Side;
use crate::replication::{LinkStatus, ReplicationRole};
use crate::volume::{VolumeName, VolumeSpec};
use storaged_api::{Keep, ReplicationInfo};

/// A switchover under way on a primary, between its API call and its sender.
pub(super) struct Switchover {
    /// Answered by the sender: `Ok` once the peer is the primary and this side its
    /// secondary.
    done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    /// The peer was asked to promote: the outcome is no longer this side's to undo.
    promote_sent: bool,
}

/// A receiver's hold on a secondary: while it lives, the volume's role does not change under
/// the stream (a promote is refused), except through the stream itself (a switchover).
pub struct Receiving<'a> {
    service: &'a VolumeService,
    name: VolumeName,
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.service.state().receiving.remove(&self.name);
    }
}

/// The secondary a receiver holds: what the stream needs of it.
pub struct SecondaryVolume {
    pub name: String,
    pub id: String,
    pub backing: PathBuf,
    pub size: u64,
    pub generation: u64,
}

fn conflict(msg: String) -> Error {
    Error::Replication(msg)
}

impl VolumeService {
    fn replication_dir(&self) -> PathBuf {
        self.paths.data_dir.join("replication")
    }

    fn dirty_path(&self, id: &str) -> PathBuf {
        self.replication_dir().join(format!("{id}.dirty"))
    }

    /// A secondary at start: its staging log's committed epoch is applied (and the rest
    /// dropped) before the volume is served, so that its image is the last committed epoch's
    /// from the first read, whatever instant the daemon was killed at. Nothing to do for any
    /// other volume.
    pub(super) fn recover_secondary(&self, spec: &VolumeSpec) -> Result<(), Error> {
        let dir = self.replication_dir();
        if !spec.is_secondary() || !dir.join(format!("{}.log", spec.id)).exists() {
            return Ok(());
        }
        let recovery = Applier::open(&dir, &spec.id, spec.backing.path(), spec.size_bytes)
            .and_then(|(mut app, recovery)| app.discard_staged().map(|()| recovery))
            .map_err(|e| Error::Replication(crate::error_chain(&e)))?;
        tracing::info!(volume = %spec.name, ?recovery, "secondary recovered its staging log");
        Ok(())
    }

    /// Takes the receiver's hold on the secondary of relationship `id`; `None` when this
    /// daemon has no such secondary, or it is held or busy.
    pub fn start_receiving(&self, id: &str) -> Option<(Receiving<'_>, SecondaryVolume)> {
        let mut st = self.state();
        let spec = st
            .volumes
            .values()
            .find(|v| v.is_secondary() && v.replication.as_ref().is_some_and(|r| r.id == id))?
            .clone();
        if st.busy.contains_key(&spec.name) || !st.receiving.insert(spec.name.clone()) {
            return None;
        }
        let generation = spec.replication.as_ref().map_or(0, |r| r.generation);
        Some((
            Receiving {
                service: self,
                name: spec.name.clone(),
            },
            SecondaryVolume {
                name: spec.name.to_string(),
                id: spec.id.clone(),
                backing: spec.backing.path().to_owned(),
                size: spec.size_bytes,
                generation,
            },
        ))
    }

    /// The volume of relationship `id` here, by name, whatever its role.
    pub fn volume_of_relationship(&self, id: &str) -> Option<String> {
        self.state()
            .volumes
            .values()
            .find(|v| v.replication.as_ref().is_some_and(|r| r.id == id))
            .map(|v| v.name.to_string())
    }

    /// This side of volume `name`'s relationship, as a `Hello` describes it.
    pub fn local_side(&self, name: &str) -> Option<Side> {
        let n: VolumeName = name.parse().ok()?;
        let st = self.state();
        let rel = st.volumes.get(&n)?.replication.clone()?;
        let diverged = st
            .exports
            .get(&n)
            .and_then(|e| e.volume().replication.load_full())
            .is_some_and(|log| log.dirty().diverged());
        Some(Side {
            role: rel.role,
            generation: rel.generation,
            diverged,
            won: rel.won,
        })
    }

    /// Whether `log` is still the replication log of the primary volume `name` (it is not
    /// once the volume was demoted or unreplicated).
    pub fn still_primary(
        &self,
        name: &str,
        log: &Arc<crate::replication::log::ReplicationLog>,
    ) -> bool {
        let Ok(n) = name.parse::<VolumeName>() else {
            return false;
        };
        self.state()
            .exports
            .get(&n)
            .and_then(|e| e.volume().replication.load_full())
            .is_some_and(|current| Arc::ptr_eq(&current, log))
    }

    /// Raises the generation volume `name`'s relationship records to `generation` (a peer
    /// showed a higher one).
    pub fn raise_generation(&self, name: &str, generation: u64) -> Result<(), Error> {
        self.change_relationship(name, |r| {
            if r.generation < generation {
                r.generation = generation;
                true
            } else {
                false
            }
        })
    }

    /// The relationship is level again: a `won` resolve has done its work.
    pub fn level_again(&self, name: &str) -> Result<(), Error> {
        self.change_relationship(name, |r| std::mem::take(&mut r.won))
    }

    /// Changes volume `name`'s relationship in the catalog, if `change` says it changed it.
    pub(super) fn change_relationship(
        &self,
        name: &str,
        change: impl FnOnce(&mut crate::replication::Relationship) -> bool,
    ) -> Result<(), Error> {
        let n: VolumeName = name.parse()?;
        let mut catalog = crate::lock(&self.catalog);
        let Some(mut spec) = self.state().volumes.get(&n).cloned() else {
            return Err(Error::NotFound(name.to_string()));
        };
        let Some(rel) = spec.replication.as_mut() else {
            return Err(Error::NotReplicated(name.to_string()));
        };
        if change(rel) {
            catalog.put(spec.clone())?;
            self.state().volumes.insert(n, spec);
        }
        Ok(())
    }

    /// Volume `name`'s link after a role change: down, from now, nothing known of the peer.
    fn link_down_since_now(&self, name: &VolumeName) {
        crate::lock(&self.link_status).insert(
            name.to_string(),
            LinkStatus {
                state: "disconnected",
                disconnected_since: Some(crate::unix_time().as_secs()),
                ..LinkStatus::default()
            },
        );
    }

    /// `POST /v1/volumes/{name}/promote`: the secondary `name` becomes the primary of the
    /// next generation, from its last consistent image (the staging log's committed epoch
    /// applied, the rest dropped), and takes writes at once. Refused while its primary's
    /// stream is connected (a switchover is the planned way), and when it has no consistent
    /// image unless `force`.
    pub fn promote(&self, name: &str, force: bool) -> Result<ReplicationInfo, Error> {
        let (_held, spec, _export) = self.claim(name, "promote")?;
        let rel = self.secondary_rel(&spec)?;
        if self.state().receiving.contains(&spec.name) {
            return Err(conflict(format!(
                "volume '{name}' is receiving its primary's stream from {}: a failover is for \
                 a primary that is gone; to swap the roles of both, call switchover on the \
                 primary",
                rel.peer
            )));
        }
        let dir = self.replication_dir();
        let applied = Applier::open(&dir, &spec.id, spec.backing.path(), spec.size_bytes)
            .and_then(|(mut app, recovery)| {
                app.discard_staged()?;
                tracing::info!(volume = %name, ?recovery, "promote: the staging log recovered");
                Ok(app.applied().clone())
            })
            .map_err(|e| Error::Replication(crate::error_chain(&e)))?;
        if !applied.consistent && !force {
            return Err(conflict(format!(
                "volume '{name}' has no consistent image: its initial sync never completed; \
                 promote with force=true to serve it as it is"
            )));
        }
        if !applied.consistent {
            tracing::warn!(volume = %name, "promoting by force a secondary with no consistent image: its data is a partial initial sync");
        }
        self.become_primary(&spec, rel.generation + 1, &applied)?;
        self.info_after_role_change(name)
    }

    /// The switchover's second half, on the secondary whose receiver holds it: level with the
    /// primary, it becomes the primary of `generation`.
    pub fn promote_in_switchover(
        &self,
        name: &str,
        generation: u64,
        applied: &Applied,
    ) -> Result<(), Error> {
        let (_held, spec, _export) = self.claim(name, "promote")?;
        self.secondary_rel(&spec)?;
        self.become_primary(&spec, generation, applied)
    }

    fn secondary_rel(&self, spec: &VolumeSpec) -> Result<crate::replication::Relationship, Error> {
        match &spec.replication {
            None => Err(Error::NotReplicated(spec.name.to_string())),
            Some(r) if r.role == ReplicationRole::Primary => Err(conflict(format!(
                "volume '{}' is already the primary of its relationship (generation {})",
                spec.name, r.generation
            ))),
            Some(r) => Ok(r.clone()),
        }
    }

    fn become_primary(
        &self,
        spec: &VolumeSpec,
        generation: u64,
        applied: &Applied,
    ) -> Result<(), Error> {
        let mut new = spec.clone();
        if let Some(r) = new.replication.as_mut() {
            r.role = ReplicationRole::Primary;
            r.generation = generation;
            r.won = false;
        }
        // The dirty map exists before the catalog says primary: a primary with no map has
        // every region marked, and this one has exactly its secondary's image (a map left by
        // an earlier demote keeps the regions it named: they still differ from the peer).
        std::fs::create_dir_all(self.replication_dir())
            .map_err(|e| Error::Replication(format!("cannot create the replication dir: {e}")))?;
        DirtyMap::open(&self.dirty_path(&spec.id))
            .map_err(|e| Error::Replication(crate::error_chain(&e)))?;
        {
            let mut catalog = crate::lock(&self.catalog);
            catalog.put(new.clone())?;
            self.state().volumes.insert(new.name.clone(), new.clone());
        }
        let export = self.state().exports.get(&new.name).cloned();
        if let Some(export) = export {
            if let Err(e) = self.attach_log(export.volume(), &new) {
                // Still the secondary: the catalog says so again.
                let mut catalog = crate::lock(&self.catalog);
                if catalog.put(spec.clone()).is_ok() {
                    self.state().volumes.insert(spec.name.clone(), spec.clone());
                }
                return Err(e);
            }
            export.volume().set_read_only(new.read_only);
        }
        self.link_down_since_now(&new.name);
        tracing::info!(
            volume = %new.name,
            generation,
            consistent = applied.consistent,
            image_at_unix_ns = applied.time_unix_ns,
            socket = %self.socket_path(&new.name).display(),
            "volume promoted: it is the primary and takes writes"
        );
        self.wake_senders();
        Ok(())
    }

    /// `POST /v1/volumes/{name}/demote`: the primary `name`, superseded by its peer (seen
    /// as a primary of a higher generation, or in a split brain), becomes its secondary. Its
    /// writes since the two were last level are overwritten by the peer's resync, which
    /// sends their regions (this side reports them from its dirty map).
    pub fn demote(&self, name: &str) -> Result<ReplicationInfo, Error> {
        let peer_generation = crate::lock(&self.link_status)
            .get(name)
            .and_then(|s| s.peer_generation);
        let Some(generation) = peer_generation else {
            let spec = self.spec(name)?;
            return Err(match &spec.replication {
                None => Error::NotReplicated(name.to_string()),
                Some(r) if r.role == ReplicationRole::Secondary => conflict(format!(
                    "volume '{name}' is already the secondary of its relationship"
                )),
                Some(r) => conflict(format!(
                    "volume '{name}' has not met {} as a primary: demote is for a primary \
                     whose secondary was promoted; to swap the roles of both, call switchover",
                    r.peer
                )),
            });
        };
        self.demote_to(name, generation, 0, false)?;
        self.info_after_role_change(name)
    }

    /// Makes the primary `name` the secondary of a peer of `generation` whose image it is level
    /// with up to `seq` (a switchover's; 0 otherwise). Does nothing to a volume that is
    /// already a secondary. `unless_diverged` (a meeting's verdict, taken before the fence):
    /// a volume found diverged once fenced is not demoted (split brain; it is unfenced).
    pub fn demote_to(
        &self,
        name: &str,
        generation: u64,
        seq: u64,
        unless_diverged: bool,
    ) -> Result<(), Error> {
        // Two demotes can race (both sides dial at a meeting, a switchover's end): the
        // second waits for the first, then finds a secondary.
        let mut tries = 0;
        let (_held, spec, export) = loop {
            match self.claim(name, "demote") {
                Err(Error::Busy(..)) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => break r?,
            }
        };
        let Some(rel) = spec.replication.clone() else {
            return Err(Error::NotReplicated(name.to_string()));
        };
        if rel.role == ReplicationRole::Secondary {
            return Ok(());
        }
        let mut new = spec.clone();
        if let Some(r) = new.replication.as_mut() {
            r.role = ReplicationRole::Secondary;
            r.generation = generation.max(rel.generation);
            r.won = false;
        }
        // Fenced at once: from here every change is refused or already marked (and, with no
        // link, recorded diverged). The re-export below waits for what is in flight.
        if let Some(export) = &export {
            let io = export.volume();
            io.set_read_only(true);
            if let Some(log) = io.replication.load_full() {
                log.dirty().fence(true);
                if unless_diverged && log.dirty().diverged() {
                    log.dirty().fence(false);
                    io.set_read_only(spec.read_only);
                    return Err(conflict(format!(
                        "volume '{name}' took writes while cut off from its secondary: split \
                         brain, resolve it"
                    )));
                }
            }
        }
        let dir = self.replication_dir();
        // A switchover's image is the new primary's as of now; any other demoted image is a
        // consistent point of this side's own history, not one of the new primary's: it has
        // no `consistent_at` until the first resync commits.
        let at_ns = match seq {
            0 => 0,
            _ => crate::unix_time().as_nanos() as u64,
        };
        Applier::start_level(
            &dir,
            &spec.id,
            spec.backing.path(),
            spec.size_bytes,
            seq,
            at_ns,
        )
        .map_err(|e| Error::Replication(crate::error_chain(&e)))?;
        {
            let mut catalog = crate::lock(&self.catalog);
            catalog.put(new.clone())?;
            self.state().volumes.insert(new.name.clone(), new.clone());
        }
        // Served again as a secondary: read-only, with no replication log. Its dirty map stays,
        // the regions it changed that the new primary lacks, reported at the next connection.
        self.reexport(&new, export);
        let diverged = self.dirty_path(&spec.id).with_extension("diverged");
        let _ = std::fs::remove_file(diverged);
        self.link_down_since_now(&new.name);
        tracing::info!(volume = %new.name, generation = generation, peer = %rel.peer, "volume demoted: it is the secondary of its peer and served read-only");
        Ok(())
    }

    /// Serves `spec` anew in place of `old` (stopped first: it holds the backing store).
    fn reexport(&self, spec: &VolumeSpec, old: Option<Arc<crate::blk::export::Export>>) {
        if let Some(old) = old {
            old.stop();
        }
        let stopped = self.state().exports.remove(&spec.name);
        drop(stopped);
        match self.open_and_export(spec) {
            Ok(export) => {
                self.state()
                    .exports
                    .insert(spec.name.clone(), Arc::new(export));
            }
            Err(e) => {
                tracing::error!(volume = %spec.name, "cannot serve the volume after its role change: {}", crate::error_chain(&e));
                self.state()
                    .failed
                    .insert(spec.name.clone(), crate::error_chain(&e));
            }
        }
    }

    /// `POST /v1/volumes/{name}/resolve`: ends the split brain of primary `name`. `Local`:
    /// this side takes a generation above both and wins: at the next meeting the peer becomes
    /// its secondary and receives both sides' changed regions. `Peer`: this side becomes the
    /// peer's secondary, as [`demote`](Self::demote).
    pub fn resolve(&self, name: &str, keep: Keep) -> Result<ReplicationInfo, Error> {
        let status = crate::lock(&self.link_status).get(name).cloned();
        let spec = self.spec(name)?;
        let rel = spec
            .replication
            .clone()
            .ok_or_else(|| Error::NotReplicated(name.to_string()))?;
        let split = status.as_ref().is_some_and(|s| s.state == "split_brain");
        if !split || rel.role != ReplicationRole::Primary {
            return Err(conflict(format!(
                "volume '{name}' is not in a split brain: resolve is for two primaries that \
                 were both written"
            )));
        }
        match keep {
            Keep::Peer => self.demote(name),
            Keep::Local => {
                let peer = status.and_then(|s| s.peer_generation).unwrap_or(0);
                let generation = rel.generation.max(peer) + 1;
                self.change_relationship(name, |r| {
                    r.generation = generation;
                    r.won = true;
                    true
                })?;
                if let Some(s) = crate::lock(&self.link_status).get_mut(name) {
                    s.state = "disconnected";
                }
                tracing::warn!(volume = %name, generation, "split brain resolved: this side's data is kept; the peer's writes since the two were level will be overwritten");
                self.wake_senders();
                self.info_after_role_change(name)
            }
        }
    }

    /// `POST /v1/volumes/{name}/unreplicate` (or the peer's `End`): volume `name` leaves its
    /// relationship and keeps its data; a secondary becomes an ordinary volume, writable.
    /// Refused on a secondary whose primary's stream is connected (end it on the primary).
    /// Returns the relationship's id.
    pub fn unreplicate(&self, name: &str) -> Result<(String, String), Error> {
        let (_held, spec, export) = self.claim(name, "unreplicate")?;
        let Some(rel) = spec.replication.clone() else {
            return Err(Error::NotReplicated(name.to_string()));
        };
        if self.state().receiving.contains(&spec.name) {
            return Err(conflict(format!(
                "volume '{name}' is receiving its primary's stream from {}: end the \
                 relationship on the primary",
                rel.peer
            )));
        }
        let dir = self.replication_dir();
        if rel.role == ReplicationRole::Secondary {
            // The last committed epoch is the image the volume keeps.
            Applier::open(&dir, &spec.id, spec.backing.path(), spec.size_bytes)
                .and_then(|(mut app, _)| app.discard_staged())
                .map_err(|e| Error::Replication(crate::error_chain(&e)))?;
        }
        let mut new = spec.clone();
        new.replication = None;
        {
            let mut catalog = crate::lock(&self.catalog);
            catalog.put(new.clone())?;
            self.state().volumes.insert(new.name.clone(), new.clone());
        }
        if let Some(export) = &export {
            export.volume().replication.store(None);
            export.volume().set_read_only(new.read_only);
        }
        for ext in ["dirty", "diverged", "log", "applied"] {
            let _ = std::fs::remove_file(dir.join(format!("{}.{ext}", spec.id)));
        }
        crate::lock(&self.link_status).remove(name);
        self.metrics.remove_replication(name);
        tracing::info!(volume = %name, relationship = %rel.id, peer = %rel.peer, "replication ended: the volume keeps its data and is no longer replicated");
        Ok((rel.id, rel.peer))
    }

    /// Begins a switchover of primary `name`: fences it (frontends' writes are refused from
    /// now on) and hands its sender the request; the answer comes once the peer is the
    /// primary and this side its secondary.
    pub fn begin_switchover(
        &self,
        name: &str,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, Error> {
        let spec = self.spec(name)?;
        match &spec.replication {
            None => return Err(Error::NotReplicated(name.to_string())),
            Some(r) if r.role != ReplicationRole::Primary => {
                return Err(conflict(format!(
                    "volume '{name}' is the secondary: call switchover on the primary, {}",
                    r.peer
                )))
            }
            Some(_) => {}
        }
        let state = crate::lock(&self.link_status)
            .get(name)
            .map_or("disconnected", |s| s.state);
        if state != "replicating" {
            return Err(conflict(format!(
                "volume '{name}' is {state}: a switchover needs the link up and the initial \
                 sync done"
            )));
        }
        let mut switchovers = crate::lock(&self.switchovers);
        if switchovers.contains_key(name) {
            return Err(Error::Busy(name.to_string(), "switchover"));
        }
        let export = self
            .state()
            .exports
            .get(&spec.name)
            .cloned()
            .ok_or_else(|| Error::NotServing(name.to_string(), self.failed_reason(&spec.name)))?;
        export.volume().set_read_only(true);
        if let Some(log) = export.volume().replication.load_full() {
            log.dirty().fence(true);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        switchovers.insert(
            name.to_string(),
            Switchover {
                done: Some(tx),
                promote_sent: false,
            },
        );
        tracing::info!(volume = %name, "switchover: writes fenced, draining to the secondary");
        Ok(rx)
    }

    /// The sender of `name`, drained: whether a switchover waits for its `Promote` (then
    /// marked sent).
    pub fn switchover_promote_due(&self, name: &str) -> bool {
        let mut switchovers = crate::lock(&self.switchovers);
        match switchovers.get_mut(name) {
            Some(s) if !s.promote_sent => {
                s.promote_sent = true;
                true
            }
            _ => false,
        }
    }

    /// Ends the switchover of `name` with `outcome`. One that failed before the peer was
    /// asked to promote, or that the peer refused, lets the frontends write again; otherwise
    /// this side stays fenced (the peer may be the primary now: the next meeting says).
    pub fn end_switchover(&self, name: &str, outcome: Result<(), String>, peer_refused: bool) {
        let Some(mut s) = crate::lock(&self.switchovers).remove(name) else {
            return;
        };
        if outcome.is_err() && (!s.promote_sent || peer_refused) {
            if let Ok(n) = name.parse::<VolumeName>() {
                let st = self.state();
                if let (Some(e), Some(spec)) = (st.exports.get(&n), st.volumes.get(&n)) {
                    if spec.replication.as_ref().map(|r| r.role) == Some(ReplicationRole::Primary) {
                        if let Some(log) = e.volume().replication.load_full() {
                            log.dirty().fence(false);
                        }
                        e.volume().set_read_only(spec.read_only);
                    }
                }
            }
        }
        if let Err(why) = &outcome {
            tracing::warn!(volume = %name, promote_sent = s.promote_sent, "switchover failed: {why}");
        }
        if let Some(done) = s.done.take() {
            let _ = done.send(outcome);
        }
    }

    /// Whether a switchover of `name` is under way.
    pub fn switchover_pending(&self, name: &str) -> bool {
        crate::lock(&self.switchovers).contains_key(name)
    }

    /// Records that volume `name` met its peer, a primary of `peer_generation`, in a split
    /// brain.
    pub fn note_split_brain(&self, name: &str, peer_generation: u64) {
        let mut status = crate::lock(&self.link_status)
            .get(name)
            .cloned()
            .unwrap_or_default();
        status.state = "split_brain";
        status.end_progress();
        status.peer_generation = Some(peer_generation);
        self.set_link_status(name, status);
    }

    /// Asks the replication supervisor to start the senders of primaries that have none.
    pub fn wake_senders(&self) {
        self.sender_wake.notify_one();
    }

    /// Returns when [`wake_senders`](Self::wake_senders) was called (or had been).
    pub async fn senders_woken(&self) {
        self.sender_wake.notified().await;
    }

    fn info_after_role_change(&self, name: &str) -> Result<ReplicationInfo, Error> {
        self.replication_info(name)
    }
}
