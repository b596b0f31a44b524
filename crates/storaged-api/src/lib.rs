//! storaged's admin API as types: what `storagectl`, the tests and the node agent send to the
//! admin socket and what they get back, and a blocking client of that socket ([`client`]).
//!
//! The daemon parses its requests into these types and answers with them, so a field added
//! here is added on both sides. Requests refuse unknown fields (`deny_unknown_fields`): a
//! misspelt option is an error, not a silent default. Sizes are [`ByteSize`]s: a string with
//! a unit (`"500GiB"`, `"1TB"`) or a number of bytes. `storaged/openapi.yaml` describes the
//! same API for other clients.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
pub use size::ByteSize;

pub mod client;

pub use client::AdminClient;

/// Longest VM id of an owner.
pub const MAX_VM_ID_LEN: usize = 128;

/// Errors validating a value of the API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "Unknown tier '{0}': expected one of essential, standard, premium, enterprise, ultra, mass"
    )]
    UnknownTier(String),
    #[error("Owner uid {0} is not a uid (-1 means \"no change\" to chown)")]
    InvalidOwnerUid(u32),
    #[error(
        "Owner vm_id must be 1 to {MAX_VM_ID_LEN} ASCII letters, digits, '-', '_', '.' or ':'"
    )]
    InvalidVmId,
}

/// Performance tier a volume is sold in. The IOPS it implies are applied by storaged's QoS stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String", into = "&'static str")]
pub enum Tier {
    Essential,
    #[default]
    Standard,
    Premium,
    Enterprise,
    Ultra,
    /// Archival: no IOPS commitment.
    Mass,
}

impl Tier {
    pub const ALL: [Tier; 6] = [
        Tier::Essential,
        Tier::Standard,
        Tier::Premium,
        Tier::Enterprise,
        Tier::Ultra,
        Tier::Mass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Essential => "essential",
            Tier::Standard => "standard",
            Tier::Premium => "premium",
            Tier::Enterprise => "enterprise",
            Tier::Ultra => "ultra",
            Tier::Mass => "mass",
        }
    }
}

impl From<Tier> for &'static str {
    fn from(t: Tier) -> &'static str {
        t.as_str()
    }
}

impl TryFrom<String> for Tier {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl FromStr for Tier {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::UnknownTier(s.to_string()))
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a volume's blocks live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backing {
    /// A sparse (or preallocated) file in the data dir's `volumes/` folder, named after the id.
    File { path: PathBuf, preallocated: bool },
    /// An existing block device, given by path; never created, resized or removed by us.
    Device {
        path: PathBuf,
        /// The device's identity at creation: a device at `path` that shows another is not
        /// served. None in records written before identities were recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<DeviceIdentity>,
    },
}

impl Backing {
    pub fn path(&self) -> &std::path::Path {
        match self {
            Backing::File { path, .. } | Backing::Device { path, .. } => path,
        }
    }
}

/// Who may attach a volume. storaged serves its socket only to frontends whose peer uid
/// (`SO_PEERCRED`, as it was when they connected) is `uid`, root included, and gives the
/// socket file to that uid (mode 0600).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub uid: u32,
    /// The VM the volume is assigned to, for the agent that assigned it. storaged only keeps
    /// and shows it: it can check a peer's uid, not which VM the peer runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
}

impl Owner {
    pub fn validate(&self) -> Result<(), Error> {
        if self.uid == u32::MAX {
            return Err(Error::InvalidOwnerUid(self.uid));
        }
        if let Some(id) = &self.vm_id {
            let ok = id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
            if id.is_empty() || id.len() > MAX_VM_ID_LEN || !ok {
                return Err(Error::InvalidVmId);
            }
        }
        Ok(())
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {}", self.uid)?;
        if let Some(id) = &self.vm_id {
            write!(f, " (VM {id})")?;
        }
        Ok(())
    }
}

/// Where a [`DeviceIdentity`] comes from: the first of these a disk offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdSource {
    Wwid,
    Serial,
    DmUuid,
    Loop,
    None,
}

/// A partition's place on its disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionId {
    pub number: u32,
    /// First sector (512 bytes) on the disk.
    pub start_sector: u64,
}

/// What a device-backed volume records about its device at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceIdentity {
    pub source: IdSource,
    /// The disk's id as `source` gives it; empty for `none`.
    pub id: String,
    /// Set when the device is a partition of the disk `id` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionId>,
}

impl DeviceIdentity {
    /// Whether the identity can tell one device from another.
    pub fn is_stable(&self) -> bool {
        self.source != IdSource::None
    }

    /// Whether two identities name devices that share blocks: the same disk, or a disk and
    /// one of its partitions (two partitions of one disk do not). Devices without a stable
    /// identity are never said to.
    pub fn overlaps(&self, other: &DeviceIdentity) -> bool {
        self.is_stable()
            && other.is_stable()
            && self.source == other.source
            && self.id == other.id
            && match (&self.partition, &other.partition) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            IdSource::Wwid => write!(f, "wwid {}", self.id)?,
            IdSource::Serial => write!(f, "serial {}", self.id)?,
            IdSource::DmUuid => write!(f, "dm uuid {}", self.id)?,
            IdSource::Loop => write!(f, "loop over {}", self.id)?,
            IdSource::None => f.write_str("a device without a stable id")?,
        }
        if let Some(p) = &self.partition {
            write!(f, ", partition {} at sector {}", p.number, p.start_sector)?;
        }
        Ok(())
    }
}

/// Where an effective limit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitSource {
    /// The tier's rate times the volume's size.
    Tier,
    /// The configured floor (the tier's computation gave less).
    Floor,
    /// The volume's own override.
    Override,
    /// No limit.
    Unlimited,
}

/// A volume's effective limits, as the data path applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Operations per second; `None`: unlimited.
    pub iops: Option<u64>,
    pub iops_source: LimitSource,
    /// Operations the bucket holds (the burst).
    pub iops_burst: Option<u64>,
    /// Bytes per second; `None`: unlimited.
    pub bandwidth_bytes_per_second: Option<u64>,
    pub bandwidth_source: LimitSource,
    /// Bytes the bandwidth bucket holds.
    pub bandwidth_burst_bytes: Option<u64>,
    /// Bytes one operation covers.
    pub io_size: u64,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: ByteSize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocate: Option<bool>,
    /// Serve an existing block device instead of a file in the data dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    /// IOPS limit replacing the tier's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_limit: Option<u64>,
    /// Bandwidth limit, bytes/s (a number or a size such as "100MiB").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<ByteSize>,
    /// "aes-xts-plain64" (the default) or "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    /// The only uid served, and the VM the volume is assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// Tells a field left out (`None`) from a field set to null (`Some(None)`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /v1/volumes/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateVolume {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// A new IOPS override; null removes it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_limit: Option<Option<u64>>,
    /// A new bandwidth override (bytes/s); null removes it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub bandwidth_limit: Option<Option<ByteSize>>,
    /// A new owner; null removes it. A change drops the connected frontend.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub owner: Option<Option<Owner>>,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub id: String,
    pub size_bytes: u64,
    pub size: String,
    pub tier: Tier,
    pub read_only: bool,
    pub num_queues: u16,
    /// Absolute path of the vhost-user-blk socket.
    pub socket: PathBuf,
    pub attached: bool,
    pub backing: Backing,
    pub direct_io: bool,
    /// Logical block size offered to the guest.
    pub block_size: u32,
    pub created_at: u64,
    /// The volume's own IOPS limit, replacing its tier's (null: none).
    pub iops_limit: Option<u64>,
    /// The volume's own bandwidth limit in bytes/s (null: none).
    pub bandwidth_limit: Option<u64>,
    /// The limits in force and where each comes from.
    pub limits: Limits,
    /// Cipher of the data at rest: "aes-xts-plain64" or "none".
    pub encryption: String,
    /// Id of the KEK wrapping the volume's key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kek_id: Option<String>,
    /// The only uid served and the VM the volume is assigned to (null: any peer that can
    /// open the socket).
    pub owner: Option<Owner>,
    /// "serving", or "failed": the backing storage could not be opened at start, or a FLUSH
    /// failed (cleared by `POST /v1/volumes/{name}/clear-failure`).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When a FLUSH failed the volume (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<u64>,
    /// The volume's side of a replication (absent: not replicated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_role: Option<ReplicationRole>,
}

/// Which side of a replication a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationRole {
    /// Written by its frontend; its writes are shipped to the peer.
    Primary,
    /// The peer's copy: read-only to frontends until promoted.
    Secondary,
}

/// How a primary's write waits for the peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Answered after the local write; the peer follows.
    #[default]
    Async,
    /// Answered once the peer has it too.
    Sync,
}

/// `POST /v1/volumes/{name}/replication`: start replicating the volume to `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartReplication {
    /// The peer storaged's replication address, `HOST:PORT`; its certificate must name HOST.
    pub peer: String,
    #[serde(default)]
    pub mode: ReplicationMode,
    /// How far behind the secondary may fall before `rpo_exceeded` [default: 5].
    #[serde(default = "default_rpo_seconds")]
    pub rpo_seconds: u32,
}

fn default_rpo_seconds() -> u32 {
    5
}

/// `POST /v1/volumes/{name}/resolve`: which side's data a split brain keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    pub keep: Keep,
}

/// The side whose data wins a split brain; the other's writes since the two were last level
/// are overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// This side: it stays the primary, the peer becomes its secondary.
    Local,
    /// The peer: this side becomes its secondary.
    Peer,
}

/// `POST /v1/volumes/{name}/unreplicate`: what became of the relationship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreplicated {
    pub name: String,
    /// The relationship that ended.
    pub relationship: String,
    /// Whether the peer was told and its volume left the relationship too (false: it could
    /// not be reached; unreplicate it there).
    pub peer_ended: bool,
}

/// `GET /v1/volumes/{name}/replication`: the relationship as this side sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationInfo {
    /// The relationship's id, the same on both sides.
    pub relationship: String,
    pub role: ReplicationRole,
    /// The other side (the primary's replication address, or the peer that created this
    /// secondary).
    pub peer: String,
    pub mode: ReplicationMode,
    pub rpo_seconds: u32,
    /// Raised by every promote: of two primaries, the higher is the current one.
    #[serde(default)]
    pub generation: u64,
    /// `initial_sync`, `replicating`, `disconnected`, `resync` or `split_brain`.
    pub state: String,
    /// While `disconnected`: since when (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_since: Option<u64>,
    /// Initial sync or resync: how much is done, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_done: Option<f64>,
    /// Initial sync or resync: bytes still to send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_left: Option<u64>,
    /// Initial sync or resync: estimated seconds to its end, at the pace so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Whether the secondary's image is a consistent point.
    pub consistent: bool,
    /// The primary's time (Unix seconds) the secondary's image corresponds to.
    pub consistent_at: Option<f64>,
    /// How far the secondary is behind, in seconds (null: not known yet).
    pub lag_seconds: Option<f64>,
    pub rpo_exceeded: bool,
    /// Mode sync: the relationship fell back to async (the secondary did not commit within
    /// the sync timeout) until the stream catches up.
    #[serde(default)]
    pub sync_suspended: bool,
}

/// `DELETE` answer: what was done, and what that does not protect against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub name: String,
    pub id: String,
    pub deleted: bool,
    /// What became of the volume's key: [`KEY_REMOVED`], or "none (not encrypted)".
    pub key: String,
    /// What became of the data: "backing file removed" or "left on the device".
    pub data: String,
    /// The backing file was removed (false for a device).
    pub data_removed: bool,
    /// What this delete does not protect against.
    pub not_protected_against: Vec<String>,
}

/// What a delete does with an encrypted volume's key: the catalog held its only wrapped copy
/// (the KEK is kept: it may wrap other volumes).
pub const KEY_REMOVED: &str = "wrapped key removed from the catalog";

/// `POST /v1/keys/rotate` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    pub current_kek: String,
    /// Volumes whose key was re-wrapped with the current KEK.
    pub rewrapped: Vec<String>,
    /// Encrypted volumes already wrapped by it.
    pub already_current: usize,
}

/// `GET /v1/keys` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    pub current_kek: String,
    /// Encrypted volumes per KEK id: a KEK with none can be removed.
    pub volumes_by_kek: BTreeMap<String, usize>,
}

/// `GET /v1/info` answer: daemon facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub socket_dir: PathBuf,
    /// Where `/metrics` is served on TCP (null: off).
    pub metrics_url: Option<String>,
    /// The address replication peers connect to, `IP:PORT` (null: none are accepted).
    #[serde(default)]
    pub replication_listen: Option<String>,
    /// The pool's capacity (null: unbounded).
    pub pool_capacity_bytes: Option<u64>,
    /// Sum of the volumes' sizes and of what operations under way have reserved.
    pub allocated_bytes: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_round_trip_and_unknown_is_refused() {
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>(), Ok(t));
            let j = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<Tier>(&j).unwrap(), t);
        }
        assert_eq!(
            "gold".parse::<Tier>(),
            Err(Error::UnknownTier("gold".into()))
        );
    }

    #[test]
    fn owners_need_a_real_uid_and_a_plain_vm_id() {
        let owner = |uid, vm_id: Option<&str>| Owner {
            uid,
            vm_id: vm_id.map(str::to_string),
        };
        assert!(owner(0, None).validate().is_ok());
        assert!(owner(1234, Some("vm-7f3a:0.1_x")).validate().is_ok());
        assert!(owner(7, Some(&"v".repeat(MAX_VM_ID_LEN)))
            .validate()
            .is_ok());
        assert_eq!(
            owner(u32::MAX, None).validate(),
            Err(Error::InvalidOwnerUid(u32::MAX))
        );
        for id in ["", "a b", "vm\n", "é", &"v".repeat(MAX_VM_ID_LEN + 1)] {
            assert_eq!(
                owner(7, Some(id)).validate(),
                Err(Error::InvalidVmId),
                "{id:?}"
            );
        }
    }

    #[test]
    fn an_update_tells_a_field_left_out_from_one_set_to_null_both_ways() {
        let u: UpdateVolume = serde_json::from_str(r#"{"iops_limit": null}"#).unwrap();
        assert_eq!(u.iops_limit, Some(None));
        assert_eq!(u.bandwidth_limit, None);
        assert_eq!(serde_json::to_string(&u).unwrap(), r#"{"iops_limit":null}"#);
        let u: UpdateVolume = serde_json::from_str(r#"{"bandwidth_limit": "8MiB"}"#).unwrap();
        assert_eq!(u.bandwidth_limit, Some(Some(ByteSize(8 << 20))));
        assert_eq!(
            serde_json::to_string(&UpdateVolume::default()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let e = serde_json::from_str::<CreateVolume>(r#"{"name":"a","size":4096,"sise":1}"#);
        assert!(e.unwrap_err().to_string().contains("unknown field `sise`"));
        assert!(serde_json::from_str::<UpdateVolume>(r#"{"tear":"ultra"}"#).is_err());
    }

    #[test]
    fn a_create_sends_only_what_is_set() {
        let req = CreateVolume {
            name: "db1".into(),
            size: ByteSize(2 << 40),
            tier: None,
            read_only: false,
            num_queues: None,
            preallocate: None,
            device: None,
            iops_limit: Some(5000),
            bandwidth_limit: None,
            encryption: None,
            owner: None,
        };
        let j = serde_json::to_string(&req).unwrap();
        assert_eq!(
            j,
            r#"{"name":"db1","size":"2TiB","read_only":false,"iops_limit":5000}"#
        );
        assert_eq!(serde_json::from_str::<CreateVolume>(&j).unwrap(), req);
    }
}
