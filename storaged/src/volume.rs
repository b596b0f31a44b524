//! What a volume is: its validated name and the record the catalog keeps. Its tier, owner and
//! backing are the admin API's types (`storaged-api`), shown as the catalog holds them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
pub use storaged_api::{Backing, Owner, Tier, MAX_VM_ID_LEN};

/// Longest volume name accepted: it becomes part of a socket path, and `sun_path` is 108 bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Volume sizes are a multiple of this.
pub const SIZE_ALIGNMENT: u64 = 4096;

/// Errors validating what a client says about a volume.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Volume name is empty")]
    EmptyName,
    #[error("Volume name '{0}' is longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error("Volume name '{0}' may contain only ASCII letters, digits, '-', '_' and '.', and must start with a letter or digit")]
    InvalidName(String),
    #[error("Volume size must be greater than zero")]
    ZeroSize,
    #[error("Volume size {0} bytes is not a multiple of {SIZE_ALIGNMENT} bytes")]
    UnalignedSize(u64),
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
    /// The volume's replication relationship, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::replication::Relationship>,
}

impl VolumeSpec {
    /// Whether the volume is the secondary of a relationship: its frontends may only read.
    pub fn is_secondary(&self) -> bool {
        self.replication
            .as_ref()
            .is_some_and(|r| r.role == crate::replication::ReplicationRole::Secondary)
    }

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
    fn sizes_must_be_nonzero_multiples_of_4k() {
        assert_eq!(validate_size(0), Err(Error::ZeroSize));
        assert_eq!(validate_size(4097), Err(Error::UnalignedSize(4097)));
        assert_eq!(validate_size(512), Err(Error::UnalignedSize(512)));
        assert!(validate_size(1 << 40).is_ok());
    }
}
