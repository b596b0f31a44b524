//! The volume service: the catalog, the backing storage and the exports, kept in step.
//!
//! Every operation validates first and changes nothing when it fails. Creation writes the
//! backing file, then the catalog, then starts the socket; deletion removes the catalog entry
//! before the file, so a crash in between leaves an orphan file, never a catalog entry without
//! its data.
//!
//! No lock is held across I/O on a volume's storage, so one hung device (a forced delete
//! waiting for in-flight I/O, a grow, a slow fsync) holds up only the operation on that volume:
//! - `state` is what the API shows (the catalog as last written, the exports) and which
//!   volumes an operation is working on; it is held for no I/O at all.
//! - `catalog` is the catalog file; a change takes it while the file is written and fsynced,
//!   then publishes the change in `state`. It is taken before `state`, never while holding it.
//!
//! An operation claims its volume in `state` first (a create claims the name, its size and its
//! device): a second operation on a claimed volume is answered 409 at once, while operations on
//! other volumes and every read go on. Pool capacity counts what claims have reserved.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backing::{self, BackingStore};
use crate::blk::export::{self, Export};
use crate::blk::{failure, VolumeIo};
use crate::blockdev;
use crate::catalog::{self, VolumeCatalog};
use crate::config::{socket_path_len, Config, Resolved, MAX_QUEUES, MAX_SOCKET_PATH};
use crate::crypto::{self, Dek, Xts};
use crate::keys::{self, KeyProvider};
use crate::metrics::Metrics;
use crate::qos::{self, Limits, Overrides};
use crate::replication::dirty::DirtyMap;
use crate::replication::log::ReplicationLog;
use crate::replication::{self, LinkStatus, Relationship, ReplicationRole};
use crate::volume::{self, Backing, Owner, VolumeName, VolumeSpec};
use size::ByteSize;
mod roles;
pub use roles::{Receiving, SecondaryVolume};

use storaged_api::{
    CreateVolume, Deleted, KeyStatus, ReplicationInfo, Rotated, UpdateVolume, VolumeInfo,
    KEY_REMOVED,
};

/// Errors of volume operations; [`Error::kind`] says which kind each is, and the API answers
/// each kind with its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] volume::Error),
    #[error(transparent)]
    InvalidValue(#[from] storaged_api::Error),
    #[error("{0}")]
    BadRequest(String),
    #[error("Volume '{0}' does not exist")]
    NotFound(String),
    #[error("Volume '{0}' already exists")]
    AlreadyExists(String),
    #[error("Pool capacity exceeded: {requested} more bytes asked for, {available} of {capacity} bytes free")]
    PoolFull {
        requested: u64,
        available: u64,
        capacity: u64,
    },
    #[error("Volume '{0}' cannot shrink from {1} to {2} bytes; only growing is supported")]
    Shrink(String, u64, u64),
    #[error("Volume '{0}' is attached to a frontend; detach it first or pass force=true")]
    Attached(String),
    #[error("Volume '{0}' is busy: a {1} is under way")]
    Busy(String, &'static str),
    #[error("A key rotation is already under way")]
    RotationUnderWay,
    #[error("Volume '{0}' is not being served: {1}")]
    NotServing(String, String),
    #[error("Volume '{0}' has no recorded I/O failure to clear")]
    NotFailed(String),
    /// The request contradicts the volume's replication (it is a secondary, it is already
    /// replicated).
    #[error("{0}")]
    Replication(String),
    #[error("Volume '{0}' is not replicated")]
    NotReplicated(String),
    #[error(transparent)]
    Failure(#[from] failure::Error),
    #[error(transparent)]
    Qos(#[from] qos::Error),
    #[error(transparent)]
    Keys(#[from] keys::Error),
    #[error(transparent)]
    Backing(#[from] backing::Error),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Export(#[from] export::Error),
    #[error("Cannot remove backing file {path}")]
    RemoveFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What kind of failure an [`Error`] is, for the client to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong: a bad name, size, tier, limit, owner or device; a shrink.
    BadRequest,
    /// No such volume.
    NotFound,
    /// The request contradicts the volume's state: it exists, it is attached, it has no
    /// failure to clear, its device is in use.
    Conflict,
    /// Another operation is under way on the volume (or a key rotation): retry after it.
    Busy,
    /// The pool has not the room.
    PoolFull,
    /// The volume is not being served (its storage could not be opened).
    NotServing,
    /// The daemon could not do it: I/O on the catalog, the keys or the storage.
    Internal,
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        use backing::Error as B;
        match self {
            Error::Invalid(_)
            | Error::InvalidValue(_)
            | Error::BadRequest(_)
            | Error::Shrink(..)
            | Error::Qos(_)
            | Error::Backing(B::DeviceTooSmall { .. } | B::NotBlockOrFile { .. }) => {
                ErrorKind::BadRequest
            }
            // A device or file the request names that is not there.
            Error::Backing(B::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ErrorKind::BadRequest
            }
            Error::NotFound(_) | Error::NotReplicated(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_)
            | Error::Attached(_)
            | Error::NotFailed(_)
            | Error::Replication(_)
            | Error::Backing(B::DeviceBusy { .. }) => ErrorKind::Conflict,
            Error::Busy(..) | Error::RotationUnderWay => ErrorKind::Busy,
            Error::PoolFull { .. } => ErrorKind::PoolFull,
            Error::NotServing(..) => ErrorKind::NotServing,
            Error::Failure(_)
            | Error::Keys(_)
            | Error::Backing(_)
            | Error::Catalog(_)
            | Error::Export(_)
            | Error::RemoveFile { .. } => ErrorKind::Internal,
        }
    }
}

/// What a peer's primary gives the secondary it asks this daemon to create, beyond an
/// ordinary create's fields.
pub struct SecondaryOrigin {
    /// The primary volume's id, kept (the guest's serial).
    pub id: String,
    /// The primary's data key, for an encrypted volume: wrapped here under this daemon's KEK.
    pub dek: Option<Dek>,
    /// The relationship, this side's role secondary.
    pub relationship: Relationship,
}

/// What a primary volume's sender works from.
pub struct PrimaryLink {
    pub relationship: Relationship,
    pub log: Arc<ReplicationLog>,
    /// The backing file the resyncs read.
    pub backing: PathBuf,
    pub size: u64,
    pub block_size: u32,
    pub spec: VolumeSpec,
}

/// Volumes of this daemon (see the module doc for its two locks).
pub struct VolumeService {
    config: Config,
    paths: Resolved,
    metrics: Metrics,
    keys: Arc<dyn KeyProvider>,
    catalog: Mutex<VolumeCatalog>,
    state: Mutex<State>,
    /// The replication links' view of each replicated volume, by name.
    link_status: Mutex<BTreeMap<String, LinkStatus>>,
    /// Switchovers under way, by primary volume.
    switchovers: Mutex<BTreeMap<String, roles::Switchover>>,
    /// Rung when a volume became a primary: the replication supervisor starts its sender.
    sender_wake: tokio::sync::Notify,
}

/// What the API shows and what operations hold; changed only in memory.
#[derive(Default)]
struct State {
    /// The catalog as last written.
    volumes: BTreeMap<VolumeName, VolumeSpec>,
    /// The devices that back volumes: path and device number.
    devices: BTreeMap<VolumeName, (PathBuf, blockdev::DevNum)>,
    exports: BTreeMap<VolumeName, Arc<Export>>,
    failed: BTreeMap<VolumeName, String>,
    /// Volumes an operation is working on (a create's before they exist).
    busy: BTreeMap<VolumeName, Claim>,
    /// Secondaries whose primary's stream a receiver is taking ([`Receiving`]).
    receiving: BTreeSet<VolumeName>,
    rotating: bool,
}

/// An operation's hold on one volume.
struct Claim {
    /// What it does: "create", "change", "delete".
    op: &'static str,
    /// Pool bytes it will add (a create's size, a grow's increase).
    reserved: u64,
    /// The device a create will serve: path and device number.
    device: Option<(PathBuf, blockdev::DevNum)>,
}

impl State {
    fn allocated_bytes(&self) -> u64 {
        let volumes: u64 = self.volumes.values().map(|v| v.size_bytes).sum();
        let reserved: u64 = self.busy.values().map(|c| c.reserved).sum();
        volumes + reserved
    }
}

/// What an operation holds in [`State`].
enum Hold {
    Volume(VolumeName),
    Rotation,
}

/// Releases a [`Hold`] on drop, whatever the operation's outcome. Never dropped while the
/// state lock is held.
struct Held<'a> {
    state: &'a Mutex<State>,
    hold: Hold,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut st = crate::lock(self.state);
        match &self.hold {
            Hold::Volume(name) => {
                st.busy.remove(name);
            }
            Hold::Rotation => st.rotating = false,
        }
    }
}

fn now() -> u64 {
    crate::unix_time().as_secs()
}

fn pool_check(st: &State, capacity: Option<ByteSize>, more: u64) -> Result<(), Error> {
    if let Some(cap) = capacity {
        let available = cap.0.saturating_sub(st.allocated_bytes());
        if more > available {
            return Err(Error::PoolFull {
                requested: more,
                available,
                capacity: cap.0,
            });
        }
    }
    Ok(())
}

impl VolumeService {
    /// Opens the catalog and starts serving every volume in it. A volume whose storage cannot
    /// be opened is logged and listed as failed; the others are served.
    pub fn start(
        config: Config,
        paths: Resolved,
        metrics: Metrics,
        keys: Arc<dyn KeyProvider>,
    ) -> Result<Self, Error> {
        let catalog = VolumeCatalog::open(&paths.data_dir)?;
        let specs: Vec<VolumeSpec> = catalog.iter().cloned().collect();
        let svc = VolumeService {
            config,
            paths,
            metrics,
            keys,
            catalog: Mutex::new(catalog),
            state: Mutex::new(State::default()),
            link_status: Mutex::new(BTreeMap::new()),
            switchovers: Mutex::new(BTreeMap::new()),
            sender_wake: tokio::sync::Notify::new(),
        };
        let mut st = State::default();
        for spec in specs {
            if let Backing::Device { path, .. } = &spec.backing {
                if let Ok(num) = blockdev::device_number(path) {
                    st.devices.insert(spec.name.clone(), (path.clone(), num));
                }
            }
            // Never served torn: a secondary whose log cannot be recovered is not served.
            if let Err(e) = svc.recover_secondary(&spec) {
                tracing::error!(volume = %spec.name, "cannot serve volume: {}", crate::error_chain(&e));
                st.failed.insert(spec.name.clone(), crate::error_chain(&e));
                st.volumes.insert(spec.name.clone(), spec);
                continue;
            }
            match svc.open_and_export(&spec) {
                Ok(export) => {
                    tracing::info!(
                        volume = %spec.name,
                        socket = %export.socket_path().display(),
                        size = spec.size_bytes,
                        "volume served"
                    );
                    if let Some(f) = export.volume().failure.get() {
                        tracing::warn!(volume = %spec.name, reason = %f.reason, failed_at = f.at, "volume is failed: FLUSH, writes and discards are answered IOERR until an operator clears the failure");
                    }
                    st.exports.insert(spec.name.clone(), Arc::new(export));
                }
                Err(e) => {
                    tracing::error!(volume = %spec.name, "cannot serve volume: {}", crate::error_chain(&e));
                    st.failed.insert(spec.name.clone(), crate::error_chain(&e));
                }
            }
            st.volumes.insert(spec.name.clone(), spec);
        }
        *svc.state() = st;
        Ok(svc)
    }

    pub fn paths(&self) -> &Resolved {
        &self.paths
    }

    fn state(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    fn socket_path(&self, name: &VolumeName) -> PathBuf {
        self.paths.socket_dir.join(format!("{name}.sock"))
    }

    fn open_and_export(&self, spec: &VolumeSpec) -> Result<Export, Error> {
        // The catalog is a file: check what the data path relies on.
        volume::validate_size(spec.size_bytes)?;
        if spec.num_queues == 0 || spec.num_queues > MAX_QUEUES {
            return Err(Error::BadRequest(format!(
                "num_queues {} is not between 1 and {MAX_QUEUES}",
                spec.num_queues
            )));
        }
        // A key that does not unwrap (missing KEK, corrupted record) leaves the volume
        // unserved: never served with a wrong key.
        let crypt = match &spec.encryption {
            Some(w) => Some(Xts::new(&keys::unwrap(self.keys.as_ref(), &spec.id, w)?)),
            None => None,
        };
        let store = BackingStore::open(
            spec.backing.path(),
            spec.size_bytes,
            spec.read_only,
            self.config.io.direct,
        )?;
        // After a reboot or a re-attach the path may name another disk: never serve it.
        if let Backing::Device { identity, .. } = &spec.backing {
            match identity {
                Some(recorded) => store.check_identity(recorded)?,
                None => {
                    tracing::warn!(volume = %spec.name, "no device identity recorded (a volume created by an older storaged): a different disk at this path would not be detected")
                }
            }
        }
        let io = Arc::new(VolumeIo::new(
            spec,
            store,
            &self.config.io,
            &self.limits(spec),
            crypt,
            self.metrics.volume(spec.name.as_str()),
            failure::record_path(&self.paths.data_dir, &spec.id),
        ));
        self.attach_log(&io, spec)?;
        Ok(Export::start(
            io,
            &self.socket_path(&spec.name),
            spec.owner.as_ref(),
            self.paths.data_plane_cpus.clone(),
        )?)
    }

    fn limits(&self, spec: &VolumeSpec) -> Limits {
        Limits::compute(
            &self.config.qos,
            spec.tier,
            spec.size_bytes,
            spec.overrides(),
        )
    }

    fn info(&self, st: &State, spec: &VolumeSpec) -> VolumeInfo {
        let export = st.exports.get(&spec.name);
        let io_failure = export.and_then(|e| e.volume().failure.get());
        VolumeInfo {
            name: spec.name.to_string(),
            id: spec.id.clone(),
            size_bytes: spec.size_bytes,
            size: ByteSize(spec.size_bytes).to_string(),
            tier: spec.tier,
            read_only: spec.read_only || spec.is_secondary(),
            num_queues: spec.num_queues,
            socket: self.socket_path(&spec.name),
            attached: export.is_some_and(|e| e.is_attached()),
            backing: spec.backing.clone(),
            direct_io: export.is_some_and(|e| e.volume().store.direct),
            block_size: export.map_or(512, |e| e.volume().block_size()),
            created_at: spec.created_at,
            iops_limit: spec.iops_limit,
            bandwidth_limit: spec.bandwidth_limit,
            limits: self.limits(spec).into(),
            encryption: match &spec.encryption {
                Some(w) => w.cipher.clone(),
                None => "none".into(),
            },
            kek_id: spec.encryption.as_ref().map(|w| w.kek_id.clone()),
            owner: spec.owner.clone(),
            state: if export.is_some() && io_failure.is_none() {
                "serving"
            } else {
                "failed"
            }
            .into(),
            error: st.failed.get(&spec.name).cloned().or_else(|| {
                io_failure.as_ref().map(|f| {
                    format!(
                        "{}: data written since the last successful flush may be lost; FLUSH, \
                         writes and discards are answered IOERR until the failure is cleared",
                        f.reason
                    )
                })
            }),
            failed_at: io_failure.map(|f| f.at),
            replication_role: spec.replication.as_ref().map(|r| r.role),
        }
    }

    /// The volume as the API shows it now.
    fn info_of(&self, spec: &VolumeSpec) -> VolumeInfo {
        self.info(&self.state(), spec)
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        let st = self.state();
        st.volumes.values().map(|s| self.info(&st, s)).collect()
    }

    pub fn get(&self, name: &str) -> Result<VolumeInfo, Error> {
        let n: VolumeName = name.parse()?;
        let st = self.state();
        match st.volumes.get(&n) {
            Some(spec) => Ok(self.info(&st, spec)),
            None => Err(Error::NotFound(name.to_string())),
        }
    }

    /// Claims a volume of the catalog for `op`: its record and export as they are now.
    fn claim(
        &self,
        name: &str,
        op: &'static str,
    ) -> Result<(Held<'_>, VolumeSpec, Option<Arc<Export>>), Error> {
        let n: VolumeName = name.parse()?;
        let (spec, export) = {
            let mut st = self.state();
            let spec = st
                .volumes
                .get(&n)
                .cloned()
                .ok_or_else(|| Error::NotFound(name.to_string()))?;
            if let Some(c) = st.busy.get(&n) {
                return Err(Error::Busy(n.to_string(), c.op));
            }
            st.busy.insert(
                n.clone(),
                Claim {
                    op,
                    reserved: 0,
                    device: None,
                },
            );
            (spec, st.exports.get(&n).cloned())
        };
        let held = Held {
            state: &self.state,
            hold: Hold::Volume(n),
        };
        Ok((held, spec, export))
    }

    /// The device number of a device asked for at creation: a block device, given by
    /// absolute path. (Whether it shares blocks with another volume's device, whatever path
    /// that one was given by, is checked by device number under the state lock.)
    fn new_device_number(dev: &Path) -> Result<blockdev::DevNum, Error> {
        if !dev.is_absolute() {
            return Err(Error::BadRequest(format!(
                "device path {} is not absolute",
                dev.display()
            )));
        }
        blockdev::device_number(dev).map_err(|e| Error::BadRequest(crate::error_chain(&e)))
    }

    /// Reserves `more` pool bytes for the claimed volume `name`.
    fn reserve(&self, name: &VolumeName, more: u64) -> Result<(), Error> {
        let mut st = self.state();
        pool_check(&st, self.config.pool_capacity, more)?;
        if let Some(c) = st.busy.get_mut(name) {
            c.reserved = more;
        }
        Ok(())
    }

    fn failed_reason(&self, name: &VolumeName) -> String {
        self.state().failed.get(name).cloned().unwrap_or_default()
    }

    /// Writes a changed record of a claimed volume to the catalog and publishes it. The
    /// wrapped key is taken from the catalog as it is now: a key rotation may have re-wrapped
    /// it since the claim.
    fn commit_change(&self, mut new: VolumeSpec) -> Result<VolumeSpec, Error> {
        let mut catalog = crate::lock(&self.catalog);
        if let Some(current) = catalog.get(&new.name) {
            new.encryption = current.encryption.clone();
        }
        catalog.put(new.clone())?;
        let mut st = self.state();
        // The new size is counted from here on: the claim's reservation is spent.
        if let Some(c) = st.busy.get_mut(&new.name) {
            c.reserved = 0;
        }
        st.volumes.insert(new.name.clone(), new.clone());
        Ok(new)
    }

    pub fn create(&self, req: CreateVolume) -> Result<VolumeInfo, Error> {
        self.create_volume(req, None)
    }

    /// Creates the secondary of a relationship a peer's primary asked for: `req` as the
    /// primary's volume is (name, size, tier, queues, encryption), with its id and key, served
    /// read-only to frontends.
    pub fn create_secondary(
        &self,
        req: CreateVolume,
        origin: SecondaryOrigin,
        block_size: u32,
    ) -> Result<VolumeInfo, Error> {
        if uuid::Uuid::parse_str(&origin.id)
            .map(|u| u.hyphenated().to_string())
            .ok()
            .as_deref()
            != Some(origin.id.as_str())
        {
            return Err(Error::BadRequest(format!(
                "volume id '{}' is not a UUID in its lowercase hyphenated form",
                origin.id
            )));
        }
        if req.device.is_some() {
            return Err(Error::BadRequest(
                "a secondary is created on a file of this daemon's pool".into(),
            ));
        }
        let name = req.name.clone();
        let info = self.create_volume(req, Some(origin))?;
        // The guest's file system is laid out in the primary's blocks: a secondary whose
        // storage takes only larger ones could not serve it after a failover.
        if info.block_size != block_size {
            let _ = self.delete_volume(&name, true, true);
            return Err(Error::Replication(format!(
                "the volume's blocks are {block_size} bytes, but this daemon's storage offers \
                 {} for it",
                info.block_size
            )));
        }
        Ok(info)
    }

    fn create_volume(
        &self,
        req: CreateVolume,
        origin: Option<SecondaryOrigin>,
    ) -> Result<VolumeInfo, Error> {
        let name: VolumeName = req.name.parse()?;
        let size = req.size.0;
        volume::validate_size(size)?;
        let tier = match &req.tier {
            Some(t) => t.parse()?,
            None => self.config.volume_defaults.tier,
        };
        let num_queues = req
            .num_queues
            .unwrap_or(self.config.volume_defaults.num_queues);
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(Error::BadRequest(format!(
                "num_queues {num_queues} is not between 1 and {MAX_QUEUES}"
            )));
        }
        if socket_path_len(&self.paths.socket_dir, name.as_str().len()) > MAX_SOCKET_PATH {
            return Err(Error::BadRequest(format!(
                "volume name '{name}' is too long for socket dir {}: the socket path would exceed {MAX_SOCKET_PATH} bytes",
                self.paths.socket_dir.display()
            )));
        }
        let overrides = Overrides {
            iops_limit: req.iops_limit,
            bandwidth_limit: req.bandwidth_limit.map(|b| b.0),
        };
        overrides.validate()?;
        if let Some(owner) = &req.owner {
            owner.validate()?;
        }
        let encrypted =
            match req.encryption.as_deref() {
                None | Some(crypto::CIPHER) => true,
                Some("none") if self.config.encryption.allow_plaintext => false,
                Some("none") => return Err(Error::BadRequest(
                    "encryption \"none\" is not allowed here (encryption.allow_plaintext = false)"
                        .into(),
                )),
                Some(other) => {
                    return Err(Error::BadRequest(format!(
                        "unknown encryption '{other}': expected \"{}\" or \"none\"",
                        crypto::CIPHER
                    )))
                }
            };
        if req.device.is_some() && req.preallocate == Some(true) {
            return Err(Error::BadRequest(
                "preallocate applies to file-backed volumes, not to devices".into(),
            ));
        }
        let device = match &req.device {
            Some(dev) => Some((dev.clone(), Self::new_device_number(dev)?)),
            None => None,
        };
        let device_identity = device.as_ref().map(|(dev, num)| {
            let identity = blockdev::identity(*num);
            if !identity.is_stable() {
                tracing::warn!(device = %dev.display(), "device has no stable identity (no wwid, serial, dm uuid or loop backing file): a different disk at this path later would not be detected");
            }
            identity
        });
        if let Some(o) = &origin {
            if encrypted != o.dek.is_some() {
                return Err(Error::BadRequest(
                    "the volume's encryption and the key sent with it disagree".into(),
                ));
            }
        }
        let _held = {
            let mut st = self.state();
            if st.volumes.contains_key(&name) {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            if let Some(o) = &origin {
                if let Some(v) = st.volumes.values().find(|v| v.id == o.id) {
                    return Err(Error::Replication(format!(
                        "volume id {} is already volume '{}' here",
                        o.id, v.name
                    )));
                }
            }
            if let Some(c) = st.busy.get(&name) {
                return Err(Error::Busy(name.to_string(), c.op));
            }
            if let Some((dev, num)) = &device {
                // Compared by device number: links, other nodes, a disk and its partitions.
                let backing = st.devices.iter();
                let creating = st
                    .busy
                    .iter()
                    .filter_map(|(n, c)| c.device.as_ref().map(|d| (n, d)));
                if let Some((other, (path, _))) = backing
                    .chain(creating)
                    .find(|(_, (_, theirs))| blockdev::overlap(*num, *theirs))
                {
                    return Err(Error::BadRequest(format!(
                        "device {} shares blocks with {}, which backs volume '{other}'",
                        dev.display(),
                        path.display(),
                    )));
                }
                // A volume whose device is missing or renumbered has no device number here:
                // its recorded identity still names its disk.
                let mine = device_identity.as_ref();
                if let Some(other) = st.volumes.values().find(|v| match (&v.backing, mine) {
                    (
                        Backing::Device {
                            identity: Some(theirs),
                            ..
                        },
                        Some(mine),
                    ) => mine.overlaps(theirs),
                    _ => false,
                }) {
                    return Err(Error::BadRequest(format!(
                        "device {} is the disk ({}) that backs volume '{}'",
                        dev.display(),
                        mine.map(ToString::to_string).unwrap_or_default(),
                        other.name
                    )));
                }
            }
            pool_check(&st, self.config.pool_capacity, size)?;
            st.busy.insert(
                name.clone(),
                Claim {
                    op: "create",
                    reserved: size,
                    device: device.clone(),
                },
            );
            Held {
                state: &self.state,
                hold: Hold::Volume(name.clone()),
            }
        };

        let (id, given_dek, replication) = match origin {
            Some(o) => (o.id, o.dek, Some(o.relationship)),
            None => (uuid::Uuid::new_v4().to_string(), None, None),
        };
        let encryption = if encrypted {
            // A secondary's key is its primary's, wrapped here under this daemon's KEK.
            let dek = match given_dek {
                Some(d) => d,
                None => Dek::generate()
                    .map_err(|e| Error::BadRequest(format!("cannot draw a key: {e}")))?,
            };
            Some(keys::wrap(self.keys.as_ref(), &id, &dek)?)
        } else {
            None
        };
        let backing = match req.device {
            Some(path) => Backing::Device {
                path,
                identity: device_identity,
            },
            None => {
                let preallocated = req
                    .preallocate
                    .unwrap_or(self.config.volume_defaults.preallocate);
                let path = self
                    .paths
                    .data_dir
                    .join("volumes")
                    .join(format!("{id}.img"));
                backing::create_file(&path, size, preallocated)?;
                Backing::File { path, preallocated }
            }
        };
        let spec = VolumeSpec {
            name: name.clone(),
            id,
            size_bytes: size,
            tier,
            read_only: req.read_only,
            num_queues,
            backing,
            created_at: now(),
            iops_limit: overrides.iops_limit,
            bandwidth_limit: overrides.bandwidth_limit,
            encryption,
            owner: req.owner,
            replication,
        };
        let undo_file = |spec: &VolumeSpec| {
            if let Backing::File { path, .. } = &spec.backing {
                let _ = std::fs::remove_file(path);
            }
        };
        let export = match self.open_and_export(&spec) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                undo_file(&spec);
                self.metrics.remove_volume(name.as_str());
                return Err(e);
            }
        };
        if let Some((dev, num)) = &device {
            // The path was checked, then opened: it must still be the device checked.
            let opened = blockdev::device_number_of(&export.volume().store.file, dev);
            if opened.as_ref().ok() != Some(num) {
                drop(export);
                self.metrics.remove_volume(name.as_str());
                return Err(Error::BadRequest(format!(
                    "device {} changed while it was being opened",
                    dev.display()
                )));
            }
        }
        let written = {
            let mut catalog = crate::lock(&self.catalog);
            catalog.put(spec.clone()).map(|()| {
                let mut st = self.state();
                if let Some(c) = st.busy.get_mut(&name) {
                    c.reserved = 0;
                }
                st.volumes.insert(name.clone(), spec.clone());
                st.exports.insert(name.clone(), export.clone());
                if let Some(device) = device {
                    st.devices.insert(name.clone(), device);
                }
            })
        };
        if let Err(e) = written {
            export.stop();
            undo_file(&spec);
            self.metrics.remove_volume(name.as_str());
            return Err(e.into());
        }
        let limits = self.limits(&spec);
        tracing::info!(
            volume = %name,
            id = %spec.id,
            size = size,
            tier = %tier,
            iops_limit = limits.iops,
            bandwidth_limit = limits.bandwidth_bytes_per_second,
            encryption = spec.encryption.as_ref().map_or("none", |w| w.cipher.as_str()),
            kek = spec.encryption.as_ref().map_or("", |w| w.kek_id.as_str()),
            owner = %spec.owner.as_ref().map_or("none".to_string(), Owner::to_string),
            socket = %export.socket_path().display(),
            role = spec.replication.as_ref().map_or("none", |r| match r.role {
                ReplicationRole::Primary => "primary",
                ReplicationRole::Secondary => "secondary",
            }),
            "volume created"
        );
        Ok(self.info_of(&spec))
    }

    /// What a primary tells its peer of the volume `name` it starts replicating: its spec, its
    /// key and the block size it offers. Refused for a volume that is already part of a
    /// relationship.
    pub fn replication_source(&self, name: &str) -> Result<(VolumeSpec, Option<Dek>, u32), Error> {
        let n: VolumeName = name.parse()?;
        let (spec, block_size) = {
            let st = self.state();
            let spec = st
                .volumes
                .get(&n)
                .cloned()
                .ok_or_else(|| Error::NotFound(name.to_string()))?;
            if let Some(c) = st.busy.get(&n) {
                return Err(Error::Busy(name.to_string(), c.op));
            }
            let block_size = self.info(&st, &spec).block_size;
            (spec, block_size)
        };
        Self::not_replicated(&spec)?;
        let dek = match &spec.encryption {
            Some(w) => Some(keys::unwrap(self.keys.as_ref(), &spec.id, w)?),
            None => None,
        };
        Ok((spec, dek, block_size))
    }

    /// Gives a primary volume's data path its replication log: from now on what completes is
    /// recorded. (What completed before is in the initial sync, which reads the volume.)
    fn attach_log(&self, io: &VolumeIo, spec: &VolumeSpec) -> Result<(), Error> {
        let primary = spec
            .replication
            .as_ref()
            .is_some_and(|r| r.role == ReplicationRole::Primary);
        if primary {
            let dir = self.paths.data_dir.join("replication");
            {
                use std::os::unix::fs::DirBuilderExt;
                if !dir.exists() {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .recursive(true)
                        .create(&dir)
                        .and_then(|()| std::fs::File::open(&self.paths.data_dir)?.sync_all())
                        .map_err(|e| {
                            Error::Replication(format!("cannot create {}: {e}", dir.display()))
                        })?;
                }
            }
            let (map, created) = DirtyMap::open_or_create(&dir.join(format!("{}.dirty", spec.id)))
                .map_err(|e| Error::Replication(crate::error_chain(&e)))?;
            if created {
                // A new relationship (or a primary whose map is gone): nothing says what the
                // secondary has, so every region is to be sent. Writes in flight while the
                // relationship starts are covered too.
                map.mark(0, spec.size_bytes)
                    .map_err(|e| Error::Replication(crate::error_chain(&e)))?;
            }
            let capacity = usize::try_from(self.config.replication.log_capacity.0)
                .unwrap_or(replication::log::DEFAULT_CAPACITY);
            let log = ReplicationLog::new(capacity, map);
            io.replication.store(Some(Arc::new(log)));
        }
        Ok(())
    }

    fn not_replicated(spec: &VolumeSpec) -> Result<(), Error> {
        match &spec.replication {
            None => Ok(()),
            Some(r) if r.role == ReplicationRole::Secondary => Err(Error::Replication(format!(
                "volume '{}' is the secondary of a relationship with {}: it cannot be replicated \
                 itself",
                spec.name, r.peer
            ))),
            Some(r) => Err(Error::Replication(format!(
                "volume '{}' is already replicated to {}",
                spec.name, r.peer
            ))),
        }
    }

    /// Records the relationship of the primary volume `name` (whose peer accepted it).
    pub fn set_relationship(
        &self,
        name: &str,
        rel: Relationship,
    ) -> Result<ReplicationInfo, Error> {
        let (_held, spec, export) = self.claim(name, "replication")?;
        Self::not_replicated(&spec)?;
        let mut new = spec.clone();
        new.replication = Some(rel);
        // Tracking first: from the moment the catalog says primary, every write is tracked.
        if let Some(export) = &export {
            self.attach_log(export.volume(), &new)?;
        }
        {
            let mut catalog = crate::lock(&self.catalog);
            catalog.put(new.clone())?;
            self.state().volumes.insert(new.name.clone(), new.clone());
        }
        tracing::info!(volume = %new.name, peer = %new.replication.as_ref().map_or("", |r| r.peer.as_str()), "replication started: this volume is the primary");
        self.replication_info(name)
    }

    /// `GET /v1/volumes/{name}/replication`.
    pub fn replication_info(&self, name: &str) -> Result<ReplicationInfo, Error> {
        let spec = self.spec(name)?;
        let r = spec
            .replication
            .ok_or_else(|| Error::NotReplicated(name.to_string()))?;
        // A status of an ended relationship (its sender had not seen the end yet) says
        // nothing of this one.
        let st = crate::lock(&self.link_status)
            .get(name)
            .filter(|s| s.relationship.as_ref().is_none_or(|id| *id == r.id))
            .cloned()
            .unwrap_or_else(|| LinkStatus {
                state: "disconnected",
                ..LinkStatus::default()
            });
        let consistent_at = st.consistent_at_ns.map(|ns| ns as f64 / 1e9);
        let lag_seconds = match (st.behind, consistent_at) {
            (false, Some(_)) => Some(0.0),
            (true, Some(at)) => Some((crate::unix_time().as_secs_f64() - at).max(0.0)),
            _ => None,
        };
        // Mode sync on a primary whose writes do not wait for the secondary (before the first
        // sync, or fallen back to async).
        let sync_suspended = r.mode == replication::ReplicationMode::Sync
            && r.role == ReplicationRole::Primary
            && self
                .state()
                .exports
                .get(&spec.name)
                .and_then(|e| e.volume().replication.load_full())
                .is_some_and(|log| !log.sync().active());
        let rpo_exceeded = r.role == ReplicationRole::Primary
            && lag_seconds.is_none_or(|l| l > f64::from(r.rpo_seconds));
        Ok(ReplicationInfo {
            relationship: r.id,
            role: r.role,
            peer: r.peer,
            mode: r.mode,
            rpo_seconds: r.rpo_seconds,
            generation: r.generation,
            state: st.state.into(),
            disconnected_since: st.disconnected_since,
            percent_done: st.percent_done,
            bytes_left: st.bytes_left,
            eta_seconds: st.eta_seconds(),
            consistent: st.consistent,
            consistent_at,
            lag_seconds,
            rpo_exceeded,
            sync_suspended,
        })
    }

    /// Records `peer` as the other side of volume `name`'s relationship (a secondary learns its
    /// primary's address from the primary's `Hello`).
    pub fn set_peer(&self, name: &str, peer: &str) -> Result<(), Error> {
        self.change_relationship(name, |r| {
            let changed = r.peer != peer;
            r.peer = peer.to_string();
            changed
        })
    }

    /// Records what the link knows of the relationship of volume `name`, and shows it in the
    /// volume's replication metrics.
    pub fn set_link_status(&self, name: &str, mut status: LinkStatus) {
        if let Some(id) = &status.relationship {
            let current = self
                .spec(name)
                .ok()
                .and_then(|s| s.replication)
                .map(|r| r.id);
            if current.as_ref() != Some(id) {
                return;
            }
        }
        {
            let mut all = crate::lock(&self.link_status);
            // A split brain stays one until a stream runs again or an operator resolves it
            // (a failed attempt to connect does not end it).
            if status.state == "disconnected"
                && all.get(name).is_some_and(|s| s.state == "split_brain")
            {
                status.state = "split_brain";
            }
            all.insert(name.to_string(), status);
        }
        let Ok(info) = self.replication_info(name) else {
            return;
        };
        let log = name.parse::<VolumeName>().ok().and_then(|n| {
            self.state()
                .exports
                .get(&n)
                .and_then(|e| e.volume().replication.load_full())
        });
        let (pending_bytes, resync_bytes) = log.map_or((0, 0), |l| {
            (l.pending_bytes() as u64, l.dirty().dirty_bytes())
        });
        self.metrics.set_replication(
            name,
            &crate::metrics::ReplicationGauges {
                role: match info.role {
                    ReplicationRole::Primary => "primary",
                    ReplicationRole::Secondary => "secondary",
                },
                state: &info.state,
                consistent: info.consistent,
                lag_seconds: info.lag_seconds,
                rpo_exceeded: info.rpo_exceeded,
                sync_suspended: info.sync_suspended,
                pending_bytes,
                resync_bytes,
            },
        );
    }

    /// Counts bytes sent and received on volume `name`'s replication link.
    pub fn count_replication_bytes(&self, name: &str, sent: u64, received: u64) {
        self.metrics.count_replication_bytes(name, sent, received);
    }

    /// Counts a fallback of volume `name`'s sync relationship to async, and shows it.
    pub fn count_sync_suspension(&self, name: &str) {
        self.metrics.count_sync_suspension(name);
        let status = crate::lock(&self.link_status).get(name).cloned();
        if let Some(status) = status {
            self.set_link_status(name, status);
        }
    }

    /// Counts a reconnection of volume `name`'s replication link.
    pub fn count_replication_reconnect(&self, name: &str) {
        self.metrics.count_replication_reconnect(name);
    }

    /// What a primary's sender needs of volume `name`; `None` when it is not (or no longer)
    /// a served primary.
    pub fn primary_link(&self, name: &str) -> Option<PrimaryLink> {
        let n: VolumeName = name.parse().ok()?;
        let st = self.state();
        let spec = st.volumes.get(&n)?;
        let relationship = spec.replication.clone()?;
        if relationship.role != ReplicationRole::Primary {
            return None;
        }
        let io = st.exports.get(&n)?.volume();
        Some(PrimaryLink {
            relationship,
            log: io.replication.load_full()?,
            backing: spec.backing.path().to_owned(),
            size: io.capacity(),
            block_size: io.block_size(),
            spec: spec.clone(),
        })
    }

    /// How long a sync relationship's write may wait for the secondary before it falls back
    /// to async.
    pub fn sync_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.replication.sync_timeout_seconds)
    }

    /// The primaries this daemon serves, by name.
    pub fn primaries(&self) -> Vec<String> {
        self.state()
            .volumes
            .values()
            .filter(|v| {
                v.replication
                    .as_ref()
                    .is_some_and(|r| r.role == ReplicationRole::Primary)
            })
            .map(|v| v.name.to_string())
            .collect()
    }

    /// The secondary of relationship `id` here: its name, id, backing file and size.
    pub fn secondary_of(&self, id: &str) -> Option<(String, String, PathBuf, u64)> {
        let st = self.state();
        st.volumes
            .values()
            .find(|v| v.is_secondary() && v.replication.as_ref().is_some_and(|r| r.id == id))
            .map(|v| {
                (
                    v.name.to_string(),
                    v.id.clone(),
                    v.backing.path().to_owned(),
                    v.size_bytes,
                )
            })
    }

    fn spec(&self, name: &str) -> Result<VolumeSpec, Error> {
        let n: VolumeName = name.parse()?;
        self.state()
            .volumes
            .get(&n)
            .cloned()
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    pub fn update(&self, name: &str, req: UpdateVolume) -> Result<VolumeInfo, Error> {
        self.update_volume(name, req, false)
    }

    /// Grows the secondary `name` to its primary's `size` (the primary grew).
    pub fn grow_secondary(&self, name: &str, size: u64) -> Result<VolumeInfo, Error> {
        let req = UpdateVolume {
            size: Some(ByteSize(size)),
            ..UpdateVolume::default()
        };
        self.update_volume(name, req, true)
    }

    /// A PATCH; `secondary_ok`: a secondary may be grown (by its relationship).
    fn update_volume(
        &self,
        name: &str,
        req: UpdateVolume,
        secondary_ok: bool,
    ) -> Result<VolumeInfo, Error> {
        let (_held, spec, export) = self.claim(name, "change")?;
        if spec.is_secondary() && !secondary_ok && req.size.is_some_and(|s| s.0 != spec.size_bytes)
        {
            return Err(Error::Replication(format!(
                "volume '{name}' is a replication secondary: it grows with its primary"
            )));
        }
        let name = spec.name.clone();
        let mut new = spec.clone();
        let old_limits = self.limits(&spec);
        if let Some(t) = &req.tier {
            new.tier = t.parse()?;
        }
        if let Some(iops) = req.iops_limit {
            new.iops_limit = iops;
        }
        if let Some(bandwidth) = req.bandwidth_limit {
            new.bandwidth_limit = bandwidth.map(|b| b.0);
        }
        new.overrides().validate()?;
        if let Some(owner) = req.owner {
            if let Some(o) = &owner {
                o.validate()?;
            }
            new.owner = owner;
        }
        let grow_to = match req.size {
            Some(s) => {
                volume::validate_size(s.0)?;
                if s.0 < spec.size_bytes {
                    return Err(Error::Shrink(name.to_string(), spec.size_bytes, s.0));
                }
                (s.0 > spec.size_bytes).then_some(s.0)
            }
            None => None,
        };
        if let Some(size) = grow_to {
            if spec.read_only && !secondary_ok {
                return Err(Error::BadRequest(format!(
                    "volume '{name}' is read-only and cannot be resized"
                )));
            }
            self.reserve(&name, size - spec.size_bytes)?;
            let Some(export) = &export else {
                let why = self.failed_reason(&name);
                return Err(Error::NotServing(name.to_string(), why));
            };
            let preallocated = matches!(
                spec.backing,
                Backing::File {
                    preallocated: true,
                    ..
                }
            );
            export.volume().store.grow(size, preallocated)?;
            new.size_bytes = size;
        }
        // The socket changes hands before the catalog says so, and back if the catalog write
        // fails.
        let owner_changed = new.owner != spec.owner;
        if owner_changed {
            if let Some(export) = &export {
                export.set_owner(new.owner.as_ref())?;
            }
        }
        if new != spec {
            new = match self.commit_change(new) {
                Ok(new) => new,
                Err(e) => {
                    if let (true, Some(export)) = (owner_changed, &export) {
                        if let Err(back) = export.set_owner(spec.owner.as_ref()) {
                            tracing::error!(volume = %name, "cannot give the socket back to its owner: {}", crate::error_chain(&back));
                        }
                    }
                    return Err(e);
                }
            };
        }
        if owner_changed {
            let owner = new
                .owner
                .as_ref()
                .map_or("none".to_string(), Owner::to_string);
            tracing::info!(volume = %name, %owner, "volume owner changed");
        }
        if let Some(size) = grow_to {
            if let Some(export) = &export {
                export.volume().set_capacity(size);
                let notified = export.notify_config_change();
                tracing::info!(
                    volume = %name,
                    size,
                    attached = export.is_attached(),
                    config_change_notification = notified,
                    "volume grown"
                );
            }
        }
        if req.tier.is_some() {
            tracing::info!(volume = %name, tier = %new.tier, "volume tier changed");
        }
        let limits = self.limits(&new);
        if limits != old_limits {
            if let Some(export) = &export {
                export.volume().set_limits(&limits);
            }
            tracing::info!(
                volume = %name,
                iops_limit = limits.iops,
                iops_source = ?limits.iops_source,
                bandwidth_limit = limits.bandwidth_bytes_per_second,
                "volume limits changed"
            );
        }
        Ok(self.info_of(&new))
    }

    pub fn delete(&self, name: &str, force: bool) -> Result<Deleted, Error> {
        self.delete_volume(name, force, false)
    }

    fn delete_volume(&self, name: &str, force: bool, secondary_ok: bool) -> Result<Deleted, Error> {
        let (_held, spec, export) = self.claim(name, "delete")?;
        if spec.is_secondary() && !secondary_ok && !force {
            return Err(Error::Replication(format!(
                "volume '{name}' is a replication secondary: end the relationship (unreplicate) \
                 or promote it first, or delete it with force=true (its primary is then \
                 replicated nowhere)"
            )));
        }
        if spec.is_secondary() && force && !secondary_ok {
            tracing::warn!(volume = %name, "deleting a replication secondary by force: its primary loses its copy");
        }
        let name = spec.name.clone();
        if let Some(export) = &export {
            if export.is_attached() && !force {
                return Err(Error::Attached(name.to_string()));
            }
            if export.is_attached() {
                tracing::info!(volume = %name, "deleting an attached volume: disconnecting its frontend, waiting for its in-flight I/O");
            }
            // As long as the device takes to finish that I/O, with no lock held.
            export.stop();
        }
        let removed = {
            let mut catalog = crate::lock(&self.catalog);
            catalog.remove(&name).map(|_| {
                let mut st = self.state();
                st.volumes.remove(&name);
                st.devices.remove(&name);
                st.exports.remove(&name);
                st.failed.remove(&name);
            })
        };
        if let Err(e) = removed {
            // Put the volume back in service: nothing changed on disk. The stopped export
            // goes first: it holds the backing store, and a device is opened exclusively.
            let stopped = self.state().exports.remove(&name);
            drop(stopped);
            drop(export);
            let reopened = self.open_and_export(&spec);
            let mut st = self.state();
            match reopened {
                Ok(export) => {
                    st.exports.insert(name.clone(), Arc::new(export));
                }
                Err(again) => {
                    st.exports.remove(&name);
                    st.failed.insert(name.clone(), crate::error_chain(&again));
                }
            }
            return Err(e.into());
        }
        self.metrics.remove_volume(name.as_str());
        let record = failure::record_path(&self.paths.data_dir, &spec.id);
        if let Err(e) = std::fs::remove_file(&record) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(volume = %name, path = %record.display(), "cannot remove the failure record: {e}");
            }
        }
        if spec.replication.is_some() {
            let map = self
                .paths
                .data_dir
                .join("replication")
                .join(format!("{}.dirty", spec.id));
            if let Err(e) = std::fs::remove_file(&map) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(volume = %name, path = %map.display(), "cannot remove the dirty map: {e}");
                }
            }
        }
        // The catalog (rewritten whole, fsynced, renamed, the replaced file zeroed) no longer
        // holds the wrapped key, before a byte of the data is removed.
        if let Some(w) = &spec.encryption {
            tracing::info!(volume = %name, id = %spec.id, kek = %w.kek_id, "{KEY_REMOVED}");
        }
        let mut data_removed = false;
        if let Backing::File { path, .. } = &spec.backing {
            match std::fs::remove_file(path) {
                Ok(()) => data_removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => data_removed = true,
                Err(source) => {
                    return Err(Error::RemoveFile {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        tracing::info!(volume = %name, id = %spec.id, force, "volume deleted");
        Ok(Deleted {
            name: name.to_string(),
            key: if spec.encryption.is_some() {
                KEY_REMOVED
            } else {
                "none (not encrypted)"
            }
            .to_string(),
            data: if data_removed {
                "backing file removed"
            } else {
                "left on the device"
            }
            .to_string(),
            not_protected_against: self.delete_caveats(&spec),
            id: spec.id,
            deleted: true,
            data_removed,
        })
    }

    /// What deleting `spec` leaves to whoever holds a copy or the disk.
    fn delete_caveats(&self, spec: &VolumeSpec) -> Vec<String> {
        if spec.encryption.is_none() {
            return vec![
                "copies taken before the delete: backups or copies of the data dir or the \
                 backing storage still hold the data"
                    .into(),
                match spec.backing {
                    Backing::File { .. } => "the data was not encrypted: the removed file's \
                                             blocks hold it until the file system reuses them"
                        .into(),
                    Backing::Device { .. } => {
                        "the data was not encrypted and is left on the device".into()
                    }
                },
            ];
        }
        let mut caveats = vec![
            "copies taken before the delete: backups or copies of the data dir, the key \
             directory or the backing storage still hold the data and its wrapped key, which \
             the KEK still unwraps"
                .to_string(),
            "flash remanence and copy-on-write storage: the replaced catalog is overwritten with \
             zeros, but an SSD or a copy-on-write file system may keep its old blocks, and the \
             wrapped key in them"
                .into(),
        ];
        let volumes = self.paths.data_dir.join("volumes");
        if let Some(dir) = self.keys.local_dir() {
            if keys::same_file_system(dir, &volumes).unwrap_or(true) {
                caveats.push(format!(
                    "a key directory on the same file system as the volumes: {} goes with the \
                     disk, so whoever holds the disk and an old copy of the wrapped key can \
                     decrypt the data",
                    dir.display()
                ));
            }
        }
        caveats
    }

    /// Clears a volume's failure (see [`crate::blk::failure`]): the operator has dealt with the
    /// storage; FLUSH and writes are served again.
    pub fn clear_failure(&self, name: &str) -> Result<VolumeInfo, Error> {
        let n: VolumeName = name.parse()?;
        let export = {
            let st = self.state();
            if !st.volumes.contains_key(&n) {
                return Err(Error::NotFound(name.to_string()));
            }
            st.exports.get(&n).cloned().ok_or_else(|| {
                Error::NotServing(
                    n.to_string(),
                    st.failed.get(&n).cloned().unwrap_or_default(),
                )
            })?
        };
        // Removing the record (and syncing its directory) is I/O: no lock is held.
        let Some(cleared) = export.volume().failure.clear()? else {
            return Err(Error::NotFailed(n.to_string()));
        };
        tracing::info!(volume = %n, reason = %cleared.reason, failed_at = cleared.at, "volume failure cleared by the operator");
        self.get(name)
    }

    /// Re-wraps every volume key not wrapped by the current KEK with it, one volume at a time
    /// (each catalog write is atomic). Volume data is not touched; operations on volumes go on
    /// meanwhile, and a volume deleted meanwhile is skipped.
    pub fn rotate_keys(&self) -> Result<Rotated, Error> {
        let _held = {
            let mut st = self.state();
            if st.rotating {
                return Err(Error::RotationUnderWay);
            }
            st.rotating = true;
            Held {
                state: &self.state,
                hold: Hold::Rotation,
            }
        };
        let current = self.keys.current_id()?;
        // Check the current KEK before touching anything.
        self.keys.kek(&current)?;
        let mut rewrapped = Vec::new();
        let mut already_current = 0;
        let specs: Vec<VolumeSpec> = self.state().volumes.values().cloned().collect();
        for spec in specs {
            let Some(w) = &spec.encryption else { continue };
            if w.kek_id == current {
                already_current += 1;
                continue;
            }
            let dek = keys::unwrap(self.keys.as_ref(), &spec.id, w)?;
            let new_wrap = keys::wrap(self.keys.as_ref(), &spec.id, &dek)?;
            let written = {
                let mut catalog = crate::lock(&self.catalog);
                match catalog.get(&spec.name) {
                    Some(now) if now.id == spec.id && now.encryption.as_ref() == Some(w) => {
                        let mut new = now.clone();
                        new.encryption = Some(new_wrap);
                        catalog.put(new.clone())?;
                        self.state().volumes.insert(new.name.clone(), new);
                        true
                    }
                    _ => false,
                }
            };
            if written {
                tracing::info!(volume = %spec.name, from = %w.kek_id, to = %current, "volume key re-wrapped");
                rewrapped.push(spec.name.to_string());
            }
        }
        Ok(Rotated {
            current_kek: current,
            rewrapped,
            already_current,
        })
    }

    /// The current KEK and how many volumes each KEK wraps.
    pub fn key_status(&self) -> Result<KeyStatus, Error> {
        let mut volumes_by_kek = BTreeMap::new();
        for spec in self.state().volumes.values() {
            if let Some(w) = &spec.encryption {
                *volumes_by_kek.entry(w.kek_id.clone()).or_insert(0) += 1;
            }
        }
        Ok(KeyStatus {
            current_kek: self.keys.current_id()?,
            volumes_by_kek,
        })
    }

    /// Stops every export (waiting for in-flight I/O) and syncs the backing storage.
    pub fn shutdown(&self) {
        let exports = std::mem::take(&mut self.state().exports);
        for (name, export) in exports {
            export.stop();
            if let Err(e) = export.volume().store.file.sync_data() {
                tracing::error!(volume = %name, "final sync failed: {e}");
                let volume = export.volume();
                volume
                    .failure
                    .fail(&volume.name, format!("fdatasync at shutdown failed: {e}"));
            }
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.paths.data_dir
    }

    pub fn pool_capacity(&self) -> Option<u64> {
        self.config.pool_capacity.map(|c| c.0)
    }

    /// Sum of the volumes' sizes and of what operations under way have reserved.
    pub fn allocated_bytes(&self) -> u64 {
        self.state().allocated_bytes()
    }
}

impl Drop for VolumeService {
    fn drop(&mut self) {
        self.shutdown();
    }
}
