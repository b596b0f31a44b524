//! A block device whose cached writes are lost at write-back: the storage failure behind
//! PostgreSQL's "fsyncgate", made of real kernel parts (no fault-injection hook in storaged).
//!
//! The layers: a tmpfs holding a sparse file larger than the tmpfs, a loop device over that file
//! (`lower`) with ext4 on it, a file preallocated in that ext4, and a loop device over the file
//! ([`WritebackFault::dev`]), which is what a volume is given. Writes to `dev` land in ext4's
//! page cache and succeed. Once [`WritebackFault::fill`] has taken the tmpfs's last page, the
//! blocks of that data are holes of the tmpfs file that cannot be allocated: the write-back
//! fails, and the next flush of `dev` (fdatasync) fails with EIO. As the kernel does since 4.13
//! (errseq), the error is reported once: a later flush succeeds, though the data never reached
//! the disk. mkfs writes every metadata block (journal, inode tables) while the tmpfs has room,
//! so ext4 itself keeps working.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size of the tmpfs; ext4's metadata takes about 8 MiB of it.
const TMPFS_LEN: u64 = 24 << 20;
/// Size of the sparse file under ext4 (larger than the tmpfs, so it can run out).
const LOWER_LEN: u64 = 64 << 20;

/// The layered device; everything is detached, unmounted and removed on drop.
pub struct WritebackFault {
    /// The device to serve: a loop device over a file in the ext4.
    pub dev: String,
    lower: Option<String>,
    tmpfs: PathBuf,
    ext4: PathBuf,
    mounted_tmpfs: bool,
    mounted_ext4: bool,
    dev_attached: bool,
    dir: Option<tempfile::TempDir>,
}

fn run(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    if !out.status.success() {
        eprintln!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn losetup(file: &Path) -> Option<String> {
    run(Command::new("losetup").args(["--find", "--show"]).arg(file))
}

impl WritebackFault {
    /// Builds the layers with a device of `len` bytes. None where that cannot be done (not
    /// root, no losetup or mkfs.ext4, no tmpfs or loop support); the caller skips.
    pub fn new(len: u64) -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("wbfault")
            .tempdir_in("/var/tmp")
            .ok()?;
        let mut f = WritebackFault {
            dev: String::new(),
            lower: None,
            tmpfs: dir.path().join("tmpfs"),
            ext4: dir.path().join("ext4"),
            mounted_tmpfs: false,
            mounted_ext4: false,
            dev_attached: false,
            dir: Some(dir),
        };
        std::fs::create_dir(&f.tmpfs).ok()?;
        std::fs::create_dir(&f.ext4).ok()?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={TMPFS_LEN}"))
            .arg("tmpfs")
            .arg(&f.tmpfs))?;
        f.mounted_tmpfs = true;
        let lower_file = f.tmpfs.join("lower.img");
        File::create(&lower_file).ok()?.set_len(LOWER_LEN).ok()?;
        f.lower = Some(losetup(&lower_file)?);
        // Every metadata block written with real zeros (no discard, no lazy init, no zero-out
        // offload that would punch holes), so only data blocks are left to allocate.
        run(Command::new("mkfs.ext4")
            .env("UNIX_IO_NOZEROOUT", "1")
            .args([
                "-q",
                "-O",
                "^resize_inode",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            ])
            .arg(f.lower.as_ref()?))?;
        run(Command::new("mount").arg(f.lower.as_ref()?).arg(&f.ext4))?;
        f.mounted_ext4 = true;
        let dev_file = f.ext4.join("dev.img");
        let file = File::create(&dev_file).ok()?;
        let len_i64 = i64::try_from(len).ok()?;
        // SAFETY: fallocate takes the fd of a file open for writing and integers.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_i64) } != 0 {
            return None;
        }
        file.sync_all().ok()?;
        f.dev = losetup(&dev_file)?;
        f.dev_attached = true;
        Some(f)
    }

    /// Takes every free page of the tmpfs: from now on, data written to [`Self::dev`] since
    /// its last successful flush cannot be written back.
    pub fn fill(&self) {
        let mut filler = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmpfs.join("filler"))
            .expect("create filler");
        for chunk in [1 << 20, 4096] {
            let buf = vec![0xa5u8; chunk];
            while filler.write_all(&buf).is_ok() {}
        }
        let _ = filler.sync_all();
    }

    /// Gives the tmpfs's pages back: write-back works again.
    pub fn release(&self) {
        std::fs::remove_file(self.tmpfs.join("filler")).expect("remove filler");
    }
}

impl Drop for WritebackFault {
    fn drop(&mut self) {
        if self.dev_attached {
            let _ = run(Command::new("losetup").args(["-d", &self.dev]));
        }
        // The detach of `dev` completes asynchronously: retry, then unmount lazily.
        if self.mounted_ext4 {
            let unmounted = (0..50).any(|_| {
                let ok = Command::new("umount")
                    .arg(&self.ext4)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                ok
            });
            if !unmounted {
                let _ = run(Command::new("umount").arg("-l").arg(&self.ext4));
            }
        }
        if let Some(lower) = &self.lower {
            let _ = run(Command::new("losetup").args(["-d", lower]));
        }
        if self.mounted_tmpfs {
            let _ = run(Command::new("umount").arg("-l").arg(&self.tmpfs));
        }
        drop(self.dir.take());
    }
}
