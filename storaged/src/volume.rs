//! What a volume is: its validated name, its performance tier, its owner and the record the
//! catalog keeps.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest volume name accepted: it becomes part of a socket path, and `sun_path` is 108 bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Volume sizes are a multiple of this.
pub const SIZE_ALIGNMENT: u64 = 4096;

/// Longest VM id of an owner.
pub const MAX_VM_ID_LEN: usize = 128;

/// Errors validating what a client says about a volume.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Volume name is empty")]
    EmptyName,
    #[error("Volume name '{0}' is longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error("Volume name '{0}' may contain only ASCII letters, digits, '-', '_' and '.', and must start with a letter or digit")]
    InvalidName(String),
    #[error(
        "Unknown tier '{0}': expected one of essential, standard, premium, enterprise, ultra, mass"
    )]
    UnknownTier(String),
    #[error("Volume size must be greater than zero")]
    ZeroSize,
    #[error("Volume size {0} bytes is not a multiple of {SIZE_ALIGNMENT} bytes")]
    UnalignedSize(u64),
    #[error("Owner uid {0} is not a uid (-1 means \"no change\" to chown)")]
    InvalidOwnerUid(u32),
    #[error(
        "Owner vm_id must be 1 to {MAX_VM_ID_LEN} ASCII letters, digits, '-', '_', '.' or ':'"
    )]
    InvalidVmId,
}

/// A validated volume name: safe as a file name and a socket name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

impl VolumeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VolumeName {
    type Error = Error;

    fn try_from(name: String) -> Result<Self, Error> {
        if name.is_empty() {
            return Err(Error::EmptyName);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(Error::NameTooLong(name));
        }
        let first_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric());
        let rest_ok = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        // A leading alphanumeric already excludes "." and ".."; "a..b" is harmless but confusing.
        if !first_ok || !rest_ok || name.contains("..") {
            return Err(Error::InvalidName(name));
        }
        Ok(VolumeName(name))
    }
}

impl FromStr for VolumeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::try_from(s.to_string())
    }
}

impl From<VolumeName> for String {
    fn from(n: VolumeName) -> String {
        n.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Performance tier a volume is sold in. The IOPS it implies are applied by the QoS stage.
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

/// Checks a volume size: non-zero and a multiple of [`SIZE_ALIGNMENT`].
pub fn validate_size(size: u64) -> Result<(), Error> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    if !size.is_multiple_of(SIZE_ALIGNMENT) {
        return Err(Error::UnalignedSize(size));
    }
    Ok(())
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
        identity: Option<crate::blockdev::DeviceIdentity>,
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

/// The catalog's record of one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub name: VolumeName,
    pub id: String,
    pub size_bytes: u64,
    pub tier: Tier,
    pub read_only: bool,
    pub num_queues: u16,
    pub backing: Backing,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// IOPS limit replacing the tier's (see [`crate::qos`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_limit: Option<u64>,
    /// Bandwidth limit, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
    /// The volume's data key, wrapped by a KEK; `None`: not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::keys::WrappedKey>,
    /// The only uid served; `None`: any process that can open the socket (catalogs written
    /// before owners existed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

impl VolumeSpec {
    pub fn overrides(&self) -> crate::qos::Overrides {
        crate::qos::Overrides {
            iops_limit: self.iops_limit,
            bandwidth_limit: self.bandwidth_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["db1", "a", "vol-01_x.data", &"x".repeat(MAX_NAME_LEN)] {
            assert!(n.parse::<VolumeName>().is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_path_tricks_and_overlong_names() {
        assert_eq!("".parse::<VolumeName>(), Err(Error::EmptyName));
        for n in [
            "a/b", "..", ".", "../etc", "a..b", "-x", ".hidden", "a b", "é", "a\0",
        ] {
            assert!(
                matches!(n.parse::<VolumeName>(), Err(Error::InvalidName(_))),
                "{n:?} accepted"
            );
        }
        assert!(matches!(
            "x".repeat(MAX_NAME_LEN + 1).parse::<VolumeName>(),
            Err(Error::NameTooLong(_))
        ));
    }

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
    fn sizes_must_be_nonzero_multiples_of_4k() {
        assert_eq!(validate_size(0), Err(Error::ZeroSize));
        assert_eq!(validate_size(4097), Err(Error::UnalignedSize(4097)));
        assert_eq!(validate_size(512), Err(Error::UnalignedSize(512)));
        assert!(validate_size(1 << 40).is_ok());
    }
}
