//! The volume catalog: the list of volumes, kept in `DATA_DIR/catalog.json`.
//!
//! Every change is written whole to a temporary file, fsynced, renamed over the old catalog and
//! the directory fsynced, so a crash leaves either the old or the new catalog, never a torn one.
//! The replaced catalog is then overwritten with zeros through a descriptor held across the
//! rename, so that its blocks, freed by the file system, do not keep a deleted volume's wrapped
//! key (or a key re-wrapped since) for whoever reads the disk. That holds on file systems that
//! overwrite in place (ext4, XFS); a copy-on-write file system (Btrfs, ZFS) or a flash
//! translation layer may write the zeros elsewhere and keep the old blocks.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::volume::{VolumeName, VolumeSpec};

const FORMAT_VERSION: u32 = 1;

/// Errors reading or writing the catalog.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read catalog {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Catalog {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "Catalog {path} has format version {found}; this storaged reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("Cannot write catalog {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    volumes: Vec<VolumeSpec>,
}

/// The persistent set of volumes, by name.
#[derive(Debug)]
pub struct VolumeCatalog {
    path: PathBuf,
    volumes: BTreeMap<VolumeName, VolumeSpec>,
}

impl VolumeCatalog {
    /// Opens the catalog in `data_dir`, or starts an empty one if there is none yet.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join("catalog.json");
        let volumes = match fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk =
                    serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if disk.version != FORMAT_VERSION {
                    return Err(Error::Version {
                        path,
                        found: disk.version,
                    });
                }
                disk.volumes
                    .into_iter()
                    .map(|v| (v.name.clone(), v))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(Error::Read { path, source }),
        };
        Ok(VolumeCatalog { path, volumes })
    }

    pub fn get(&self, name: &VolumeName) -> Option<&VolumeSpec> {
        self.volumes.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &VolumeSpec> {
        self.volumes.values()
    }

    /// Sum of all volumes' sizes.
    pub fn allocated_bytes(&self) -> u64 {
        self.volumes.values().map(|v| v.size_bytes).sum()
    }

    /// Inserts or replaces a volume and persists the catalog. On error nothing changes.
    pub fn put(&mut self, spec: VolumeSpec) -> Result<(), Error> {
        let old = self.volumes.insert(spec.name.clone(), spec.clone());
        if let Err(e) = self.save() {
            match old {
                Some(o) => self.volumes.insert(spec.name.clone(), o),
                None => self.volumes.remove(&spec.name),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes a volume and persists the catalog. On error nothing changes.
    pub fn remove(&mut self, name: &VolumeName) -> Result<Option<VolumeSpec>, Error> {
        let Some(old) = self.volumes.remove(name) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.volumes.insert(name.clone(), old);
            return Err(e);
        }
        Ok(Some(old))
    }

    fn save(&self) -> Result<(), Error> {
        let disk = OnDisk {
            version: FORMAT_VERSION,
            volumes: self.volumes.values().cloned().collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&disk).map_err(|e| Error::Write {
            path: self.path.clone(),
            source: e.into(),
        })?;
        bytes.push(b'\n');
        write_atomically(&self.path, &bytes).map_err(|source| Error::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old content or the new, then
/// overwrites the old content with zeros (see the module documentation).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    // The file about to be replaced, still reachable through this descriptor after the rename.
    let replaced = OpenOptions::new().write(true).open(path).ok();
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    if let Some(old) = replaced {
        if let Err(e) = overwrite_unlinked(&old) {
            tracing::warn!(path = %path.display(), "cannot overwrite the replaced file: {e}");
        }
    }
    Ok(())
}

/// Overwrites a file that no name refers to any more with zeros, and syncs it. A file that
/// still has a name (a hard link someone made, a backup) is left alone.
fn overwrite_unlinked(file: &File) -> std::io::Result<()> {
    let meta = file.metadata()?;
    if meta.nlink() != 0 {
        return Ok(());
    }
    let zeros = [0u8; 64 * 1024];
    let mut offset = 0;
    while offset < meta.len() {
        let n = (meta.len() - offset).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], offset)?;
        offset += n;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Backing, Owner, Tier};

    fn spec(name: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.parse().unwrap(),
            id: format!("id-{name}"),
            size_bytes: 1 << 30,
            tier: Tier::Premium,
            read_only: false,
            num_queues: 2,
            backing: Backing::File {
                path: format!("/d/volumes/{name}.img").into(),
                preallocated: false,
            },
            created_at: 1,
            iops_limit: None,
            bandwidth_limit: None,
            encryption: None,
            owner: None,
            replication: None,
        }
    }

    #[test]
    fn changes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = VolumeCatalog::open(dir.path()).unwrap();
        c.put(spec("a")).unwrap();
        c.put(spec("b")).unwrap();
        c.remove(&"a".parse().unwrap()).unwrap();
        let c2 = VolumeCatalog::open(dir.path()).unwrap();
        let names: Vec<_> = c2.iter().map(|v| v.name.to_string()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(c2.get(&"b".parse().unwrap()), Some(&spec("b")));
        assert_eq!(c2.allocated_bytes(), 1 << 30);
        assert!(!dir.path().join("catalog.json.tmp").exists());
    }

    #[test]
    fn a_replaced_catalog_is_zeroed_but_a_linked_copy_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomically(&path, b"first").unwrap();
        let old = File::open(&path).unwrap();
        write_atomically(&path, b"second").unwrap();
        let mut seen = Vec::new();
        std::io::Read::read_to_end(&mut &old, &mut seen).unwrap();
        assert_eq!(seen, [0u8; 5], "the replaced file kept its content");
        // A backup made as a hard link is somebody's copy: it survives the next write.
        let backup = dir.path().join("backup.json");
        fs::hard_link(&path, &backup).unwrap();
        write_atomically(&path, b"third").unwrap();
        assert_eq!(fs::read(&backup).unwrap(), b"second");
        assert_eq!(fs::read(&path).unwrap(), b"third");
    }

    #[test]
    fn corrupt_catalog_is_an_error_not_an_empty_catalog() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("catalog.json"), b"{\"version\":1,\"volu").unwrap();
        assert!(matches!(
            VolumeCatalog::open(dir.path()),
            Err(Error::Corrupt { .. })
        ));
        fs::write(
            dir.path().join("catalog.json"),
            b"{\"version\":9,\"volumes\":[]}",
        )
        .unwrap();
        assert!(matches!(
            VolumeCatalog::open(dir.path()),
            Err(Error::Version { found: 9, .. })
        ));
    }

    #[test]
    fn owners_are_kept_and_catalogs_without_them_still_load() {
        let dir = tempfile::tempdir().unwrap();
        // A catalog as written before volumes had owners.
        fs::write(
            dir.path().join("catalog.json"),
            br#"{"version":1,"volumes":[{"name":"old","id":"id-old","size_bytes":4096,
                "tier":"standard","read_only":false,"num_queues":1,
                "backing":{"kind":"file","path":"/d/volumes/old.img","preallocated":false},
                "created_at":1}]}"#,
        )
        .unwrap();
        let mut c = VolumeCatalog::open(dir.path()).unwrap();
        assert_eq!(c.get(&"old".parse().unwrap()).unwrap().owner, None);
        let mut owned = spec("a");
        owned.owner = Some(Owner {
            uid: 1234,
            vm_id: Some("vm-1".into()),
        });
        c.put(owned.clone()).unwrap();
        let c2 = VolumeCatalog::open(dir.path()).unwrap();
        assert_eq!(c2.get(&"a".parse().unwrap()), Some(&owned));
    }

    #[test]
    fn failed_save_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = VolumeCatalog::open(&dir.path().join("missing-dir")).unwrap();
        assert!(c.put(spec("a")).is_err());
        assert_eq!(c.iter().count(), 0);
    }
}
