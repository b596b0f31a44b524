//! The key hierarchy: key-encryption keys (KEKs) from a key provider wrap each volume's data
//! key (DEK) with AES-256-GCM; only wrapped DEKs are ever stored.
//!
//! A wrapped DEK is `AES-256-GCM(KEK, nonce, DEK, aad = volume id)`: 64 bytes of key and a
//! 16-byte tag, with a random 12-byte nonce, stored in the catalog beside the KEK's id. The
//! volume id as associated data binds a wrapped key to its volume: a wrapped DEK copied onto
//! another volume's record does not unwrap.
//!
//! The built-in provider ([`DirProvider`]) reads KEKs from a directory: `ID.key` files holding
//! 64 hex digits (32 bytes), and a file `current` naming the KEK new volumes and rotations
//! use. The directory and its key files must belong to storaged's user and be closed to group
//! and others; otherwise storaged refuses to start and says which file is wrong. With no key
//! directory configured, storaged keeps one in `DATA_DIR/keys` and creates a first KEK there.
//!
//! A KEK must outlive every record it wraps: [`wrap`] makes the KEK durable (its file and the
//! directory entry naming it fsynced, [`KeyProvider::sync_kek`]) before it returns a wrapped
//! key for the catalog to store, so a power cut cannot leave the catalog naming a key file
//! that an operator wrote (rotation) or storaged created (first start) and the disk lost.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::{getrandom, Dek, DEK_LEN};

/// Bytes of a KEK.
pub const KEK_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// Name of the key wrap, as the catalog records it.
pub const WRAP: &str = "aes-256-gcm";

/// Errors of the key hierarchy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Key directory {path}: {reason}")]
    Insecure { path: PathBuf, reason: String },
    #[error("Cannot read key directory {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create key {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot fsync {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Key file {path} does not hold 64 hex digits (a 256-bit key)")]
    BadKeyFile { path: PathBuf },
    #[error("Key directory {dir} has no current KEK: write the id of one of its ID.key files into {dir}/current")]
    NoCurrent { dir: PathBuf },
    #[error("Unknown KEK '{0}': no {0}.key in the key directory")]
    UnknownKek(String),
    #[error("Invalid KEK id '{0}': letters, digits, '-', '_' and '.' only")]
    BadKekId(String),
    #[error("Wrapped key of volume {volume} does not unwrap with KEK '{kek}': wrong key or corrupted record")]
    Unwrap { volume: String, kek: String },
    #[error("Wrapped key of volume {volume} is malformed: {reason}")]
    Malformed { volume: String, reason: String },
    #[error("Cannot draw random bytes")]
    Random(#[source] std::io::Error),
}

/// A key-encryption key. Zeroed when dropped; never printed.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Kek([u8; KEK_LEN]);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// Where KEKs come from.
pub trait KeyProvider: Send + Sync {
    /// Id of the KEK that wraps new keys.
    fn current_id(&self) -> Result<String, Error>;
    /// The KEK with this id.
    fn kek(&self, id: &str) -> Result<Kek, Error>;
    /// Makes the KEK with this id durable: it survives a power cut from now on.
    fn sync_kek(&self, id: &str) -> Result<(), Error>;
    /// The directory holding the KEKs when they are files on this host.
    fn local_dir(&self) -> Option<&Path>;
}

/// Whether two paths are on one file system (one device number): a key directory on the
/// volumes' file system goes wherever that disk goes.
pub fn same_file_system(a: &Path, b: &Path) -> std::io::Result<bool> {
    Ok(fs::metadata(a)?.dev() == fs::metadata(b)?.dev())
}

/// A volume's wrapped DEK, as stored in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    /// Data cipher ("aes-xts-plain64").
    pub cipher: String,
    /// Key wrap ("aes-256-gcm").
    pub wrap: String,
    pub kek_id: String,
    /// Hex.
    pub nonce: String,
    /// Hex: the encrypted DEK followed by the GCM tag.
    pub wrapped_dek: String,
}

/// Wraps `dek` for volume `volume_id` with the provider's current KEK, made durable first: the
/// caller may store the answer at once.
pub fn wrap(provider: &dyn KeyProvider, volume_id: &str, dek: &Dek) -> Result<WrappedKey, Error> {
    let kek_id = provider.current_id()?;
    let kek = provider.kek(&kek_id)?;
    provider.sync_kek(&kek_id)?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom(&mut nonce).map_err(Error::Random)?;
    let cipher = Aes256Gcm::new((&kek.0).into());
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: dek.as_bytes(),
                aad: volume_id.as_bytes(),
            },
        )
        .map_err(|_| Error::Malformed {
            volume: volume_id.to_string(),
            reason: "encryption failed".into(),
        })?;
    Ok(WrappedKey {
        cipher: crate::crypto::CIPHER.into(),
        wrap: WRAP.into(),
        kek_id,
        nonce: to_hex(&nonce),
        wrapped_dek: to_hex(&sealed),
    })
}

/// Unwraps a volume's DEK; fails unless the record authenticates under its KEK.
pub fn unwrap(provider: &dyn KeyProvider, volume_id: &str, w: &WrappedKey) -> Result<Dek, Error> {
    let malformed = |reason: &str| Error::Malformed {
        volume: volume_id.to_string(),
        reason: reason.to_string(),
    };
    if w.cipher != crate::crypto::CIPHER || w.wrap != WRAP {
        return Err(malformed("unknown cipher or wrap"));
    }
    let nonce = from_hex(&w.nonce).ok_or_else(|| malformed("nonce is not hex"))?;
    let sealed = from_hex(&w.wrapped_dek).ok_or_else(|| malformed("key is not hex"))?;
    if nonce.len() != NONCE_LEN || sealed.len() != DEK_LEN + 16 {
        return Err(malformed("wrong length"));
    }
    let kek = provider.kek(&w.kek_id)?;
    let cipher = Aes256Gcm::new((&kek.0).into());
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &sealed,
                    aad: volume_id.as_bytes(),
                },
            )
            .map_err(|_| Error::Unwrap {
                volume: volume_id.to_string(),
                kek: w.kek_id.clone(),
            })?,
    );
    Dek::from_bytes(&plain).ok_or_else(|| malformed("wrong key length"))
}

/// KEKs in a directory (see the module documentation). Holds only the path; keys are read
/// when needed.
#[derive(Debug)]
pub struct DirProvider {
    dir: PathBuf,
}

impl DirProvider {
    /// Opens a key directory after checking its ownership and permissions.
    pub fn open(dir: &Path) -> Result<DirProvider, Error> {
        check_private(dir, true)?;
        let p = DirProvider {
            dir: dir.to_owned(),
        };
        // Fail at start, not at the first volume, if the current KEK is missing or bad.
        let current = p.current_id()?;
        p.kek(&current)?;
        Ok(p)
    }

    /// Opens `dir`, creating it (mode 0700) with a first KEK if it does not exist or is empty.
    /// Returns the provider and the id of a KEK it created, if it did.
    pub fn open_or_create(dir: &Path) -> Result<(DirProvider, Option<String>), Error> {
        if !dir.exists() {
            create_dir_durably(dir)?;
        }
        if dir.join("current").exists() {
            return Ok((Self::open(dir)?, None));
        }
        check_private(dir, true)?;
        let id = format!("local-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut key = Zeroizing::new([0u8; KEK_LEN]);
        getrandom(&mut key[..]).map_err(Error::Random)?;
        // The key file and its directory entry are durable before `current` names it, and
        // `current` appears whole (renamed into place) or not at all: a crash in between
        // leaves a directory without `current`, where the next start creates a new KEK.
        write_private(&dir.join(format!("{id}.key")), to_hex(&key[..]).as_bytes())?;
        sync_path(dir)?;
        let tmp = dir.join("current.tmp");
        let _ = fs::remove_file(&tmp);
        write_private(&tmp, id.as_bytes())?;
        let current = dir.join("current");
        fs::rename(&tmp, &current).map_err(|source| Error::Create {
            path: current,
            source,
        })?;
        sync_path(dir)?;
        Ok((Self::open(dir)?, Some(id)))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl KeyProvider for DirProvider {
    fn current_id(&self) -> Result<String, Error> {
        let path = self.dir.join("current");
        let text = fs::read_to_string(&path).map_err(|_| Error::NoCurrent {
            dir: self.dir.clone(),
        })?;
        let id = text.trim().to_string();
        validate_id(&id)?;
        Ok(id)
    }

    fn kek(&self, id: &str) -> Result<Kek, Error> {
        validate_id(id)?;
        let path = self.dir.join(format!("{id}.key"));
        if !path.exists() {
            return Err(Error::UnknownKek(id.to_string()));
        }
        check_private(&path, false)?;
        let text = Zeroizing::new(fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?);
        let bytes = Zeroizing::new(from_hex(text.trim()).unwrap_or_default());
        let key: [u8; KEK_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| Error::BadKeyFile { path })?;
        Ok(Kek(key))
    }

    /// Fsyncs `ID.key` and the directory: the file's data and the entry that names it.
    fn sync_kek(&self, id: &str) -> Result<(), Error> {
        validate_id(id)?;
        sync_path(&self.dir.join(format!("{id}.key")))?;
        sync_path(&self.dir)
    }

    fn local_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

/// Fsyncs a file or directory by path (a read-only descriptor is enough on Linux).
fn sync_path(path: &Path) -> Result<(), Error> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| Error::Sync {
            path: path.to_owned(),
            source,
        })
}

/// Creates `dir` (mode 0700) and the missing folders above it, fsyncing the parent of each
/// one created so that the new entries survive a power cut.
fn create_dir_durably(dir: &Path) -> Result<(), Error> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(Error::Create {
                    path: d.to_owned(),
                    source,
                })
            }
        }
        sync_path(
            d.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
    }
    Ok(())
}

fn validate_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadKekId(id.to_string()))
    }
}

/// Refuses a key directory or file that is not ours alone.
fn check_private(path: &Path, dir: bool) -> Result<(), Error> {
    let meta = fs::symlink_metadata(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let insecure = |reason: String| Error::Insecure {
        path: path.to_owned(),
        reason,
    };
    if dir && !meta.is_dir() {
        return Err(insecure("not a directory".into()));
    }
    if !dir && !meta.is_file() {
        return Err(insecure("not a regular file".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(insecure(format!(
            "owned by uid {}, not by storaged's user (uid {euid})",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(insecure(format!(
            "mode {mode:04o} gives group or others access; chmod {} it",
            if dir { "0700" } else { "0600" }
        )));
    }
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), Error> {
    let create = |source| Error::Create {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create)?;
    f.write_all(data).map_err(create)?;
    f.sync_all().map_err(create)?;
    Ok(())
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_directory_wraps_and_unwraps_and_binds_keys_to_volumes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let (p, created) = DirProvider::open_or_create(&dir).unwrap();
        let id = created.unwrap();
        assert_eq!(p.current_id().unwrap(), id);
        let mode = fs::metadata(dir.join(format!("{id}.key")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dek = Dek::generate().unwrap();
        let w = wrap(&p, "vol-a", &dek).unwrap();
        assert!(!w.wrapped_dek.contains(&to_hex(dek.as_bytes())[..16]));
        assert_eq!(unwrap(&p, "vol-a", &w).unwrap().as_bytes(), dek.as_bytes());
        assert!(matches!(unwrap(&p, "vol-b", &w), Err(Error::Unwrap { .. })));
        // A second open finds the KEK and creates none.
        let (_, again) = DirProvider::open_or_create(&dir).unwrap();
        assert!(again.is_none());
    }

    #[test]
    fn corrupted_wrapped_keys_and_unknown_keks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, _) = DirProvider::open_or_create(&tmp.path().join("k")).unwrap();
        let dek = Dek::generate().unwrap();
        let w = wrap(&p, "v", &dek).unwrap();
        let mut bad = w.clone();
        let flipped = if bad.wrapped_dek.starts_with('0') {
            "1"
        } else {
            "0"
        };
        bad.wrapped_dek.replace_range(0..1, flipped);
        assert!(matches!(unwrap(&p, "v", &bad), Err(Error::Unwrap { .. })));
        let mut other = w.clone();
        other.kek_id = "gone".into();
        assert!(matches!(unwrap(&p, "v", &other), Err(Error::UnknownKek(_))));
        let mut short = w;
        short.wrapped_dek.truncate(10);
        assert!(matches!(
            unwrap(&p, "v", &short),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn open_directories_and_key_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("k");
        let (_, id) = DirProvider::open_or_create(&dir).unwrap();
        let id = id.unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        let err = DirProvider::open(&dir).unwrap_err().to_string();
        assert!(err.contains("0750"), "{err}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let key = dir.join(format!("{id}.key"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = DirProvider::open(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{id}.key")) && err.contains("0644"),
            "{err}"
        );
    }
}
