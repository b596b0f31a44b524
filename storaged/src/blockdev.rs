//! Block devices as the kernel describes them in sysfs (`/sys/dev/block/MAJ:MIN`): which blocks
//! two device nodes share, and an identity that outlives the device's name.
//!
//! Paths say little: `/dev/sdb`, a symbolic link to it and a second node with its numbers are
//! one device, and `/dev/sdb1` is part of it. Devices are therefore compared by device number,
//! a partition standing for its whole disk as well ([`overlap`]).
//!
//! Names are not stable either: after a reboot or a re-attach, `/dev/sdb` or `/dev/loop3` may
//! be another disk. A device-backed volume records the [`DeviceIdentity`] of its device at
//! creation and is served only by a device that shows the same one. The identity is the first
//! of these that the disk offers (for a partition, its disk's, plus its number and first
//! sector):
//!
//! - `wwid`: the world-wide id of a SCSI or NVMe disk (`wwid`, `device/wwid`);
//! - `serial`: the serial number a disk reports (virtio-blk `serial`, `device/serial`);
//! - `dm_uuid`: the UUID of a device-mapper device (LVM, dm-crypt), `dm/uuid`;
//! - `loop`: a loop device's backing file with its offset and size limit (`loop/...`);
//! - `none`: nothing stable, for which a changed device cannot be detected (logged).

use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use storaged_api::{DeviceIdentity, IdSource, PartitionId};

/// Errors examining a block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot examine block device {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a block device")]
    NotBlock(PathBuf),
    #[error("Block device {path} is not the device this volume was created on: it shows {found}, the volume was created on {recorded} (renumbered after a reboot or re-attach? Name devices by /dev/disk/by-id)")]
    Mismatch {
        path: PathBuf,
        recorded: Box<DeviceIdentity>,
        found: Box<DeviceIdentity>,
    },
}

/// A device number (`st_rdev` of a block device node).
pub type DevNum = libc::dev_t;

/// The device number of the block device at `path` (symbolic links followed).
pub fn device_number(path: &Path) -> Result<DevNum, Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Stat {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(Error::NotBlock(path.to_owned()));
    }
    Ok(meta.rdev())
}

/// The device number of an open block device.
pub fn device_number_of(file: &File, path: &Path) -> Result<DevNum, Error> {
    let meta = file.metadata().map_err(|source| Error::Stat {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(Error::NotBlock(path.to_owned()));
    }
    Ok(meta.rdev())
}

/// The device's directory in sysfs (`/sys/devices/.../block/sdb[/sdb1]`), links resolved.
fn sysfs_dir(dev: DevNum) -> Option<PathBuf> {
    let link = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    fs::canonicalize(link).ok()
}

fn read_attr(dir: &Path, name: &str) -> Option<String> {
    let text = fs::read_to_string(dir.join(name)).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn parse_dev(text: &str) -> Option<DevNum> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// The whole disk a partition belongs to, and the partition's place on it; None for a device
/// that is not a partition (or that sysfs does not describe).
fn partition_of(dev: DevNum) -> Option<(DevNum, PathBuf, PartitionId)> {
    let dir = sysfs_dir(dev)?;
    let number = read_attr(&dir, "partition")?.parse().ok()?;
    let start_sector = read_attr(&dir, "start")?.parse().ok()?;
    let disk_dir = dir.parent()?.to_owned();
    let disk = parse_dev(&read_attr(&disk_dir, "dev")?)?;
    Some((
        disk,
        disk_dir,
        PartitionId {
            number,
            start_sector,
        },
    ))
}

/// The whole disk holding `dev`: itself unless it is a partition.
pub fn whole_disk(dev: DevNum) -> DevNum {
    partition_of(dev).map_or(dev, |(disk, ..)| disk)
}

/// Whether two devices share blocks: the same device, or a disk and one of its partitions.
/// (Two partitions of one disk do not.)
pub fn overlap(a: DevNum, b: DevNum) -> bool {
    a == b || whole_disk(a) == b || whole_disk(b) == a
}

/// The identity of device `dev` (see the module documentation).
pub fn identity(dev: DevNum) -> DeviceIdentity {
    let (disk_dir, partition) = match partition_of(dev) {
        Some((_, disk_dir, p)) => (Some(disk_dir), Some(p)),
        None => (sysfs_dir(dev), None),
    };
    let (source, id) = disk_dir
        .as_deref()
        .and_then(disk_id)
        .unwrap_or((IdSource::None, String::new()));
    DeviceIdentity {
        source,
        id,
        partition,
    }
}

/// A whole disk's stable id, from its sysfs directory.
fn disk_id(dir: &Path) -> Option<(IdSource, String)> {
    let first = |source, names: &[&str]| {
        names
            .iter()
            .find_map(|n| read_attr(dir, n))
            .map(|id| (source, id))
    };
    first(IdSource::Wwid, &["wwid", "device/wwid"])
        .or_else(|| first(IdSource::Serial, &["serial", "device/serial"]))
        .or_else(|| first(IdSource::DmUuid, &["dm/uuid"]))
        .or_else(|| {
            let file = read_attr(dir, "loop/backing_file")?;
            let offset = read_attr(dir, "loop/offset").unwrap_or_else(|| "0".into());
            let limit = read_attr(dir, "loop/sizelimit").unwrap_or_else(|| "0".into());
            Some((
                IdSource::Loop,
                format!("{file} (offset {offset}, size limit {limit})"),
            ))
        })
}

/// Checks that the open device at `path` is the one `recorded` describes. A record without a
/// stable id cannot be checked and passes.
pub fn check_identity(file: &File, path: &Path, recorded: &DeviceIdentity) -> Result<(), Error> {
    if !recorded.is_stable() {
        return Ok(());
    }
    let found = identity(device_number_of(file, path)?);
    if &found != recorded {
        return Err(Error::Mismatch {
            path: path.to_owned(),
            recorded: Box::new(recorded.clone()),
            found: Box::new(found),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_the_catalog_format() {
        let id = DeviceIdentity {
            source: IdSource::Wwid,
            id: "naa.5000c500a1b2c3d4".into(),
            partition: Some(PartitionId {
                number: 2,
                start_sector: 2048,
            }),
        };
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(
            json,
            r#"{"source":"wwid","id":"naa.5000c500a1b2c3d4","partition":{"number":2,"start_sector":2048}}"#
        );
        assert_eq!(serde_json::from_str::<DeviceIdentity>(&json).unwrap(), id);
        assert_eq!(
            id.to_string(),
            "wwid naa.5000c500a1b2c3d4, partition 2 at sector 2048"
        );
    }

    #[test]
    fn a_device_overlaps_itself_and_regular_files_are_not_devices() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(matches!(device_number(&f), Err(Error::NotBlock(_))));
        // Device numbers without sysfs entries (none on most machines at 0:0) stand for
        // themselves only.
        let a = libc::makedev(0, 0);
        assert!(overlap(a, a));
        assert!(!overlap(a, libc::makedev(0, 1)));
        assert_eq!(identity(a).source, IdSource::None);
    }
}
