//! A block device whose writes hang on demand (it needs root, losetup, mkfs.ext4, mount and
//! fsfreeze; a test that cannot have one skips, saying so).

use std::process::Command;

/// A block device whose writes hang while it is frozen: a loop device over a file on an ext4
/// file system (itself on a loop device) that `fsfreeze` freezes. A write sent to the device
/// meanwhile stays in flight in the kernel, uninterruptibly, until [`FreezableDevice::thaw`]:
/// a hung disk, for real. Thawed and taken apart on drop.
pub struct FreezableDevice {
    /// The device to serve, e.g. `/dev/loop7`.
    pub dev: String,
    fs_dev: String,
    mnt: tempfile::TempDir,
    mounted: bool,
    frozen: bool,
    image: tempfile::NamedTempFile,
}

fn command_ok(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl FreezableDevice {
    /// A device of `size` bytes; `None` where it cannot be set up (it needs root, losetup,
    /// mkfs.ext4, mount and fsfreeze).
    pub fn new(size: u64) -> Option<Self> {
        let image = tempfile::NamedTempFile::new_in("/var/tmp").ok()?;
        image.as_file().set_len(size + (32 << 20)).ok()?;
        let mut d = FreezableDevice {
            dev: String::new(),
            fs_dev: String::new(),
            mnt: tempfile::tempdir().ok()?,
            mounted: false,
            frozen: false,
            image,
        };
        let image_path = d.image.path().to_str()?.to_string();
        let mnt = d.mnt.path().to_str()?.to_string();
        command_ok("mkfs.ext4", &["-q", "-F", &image_path])?;
        d.fs_dev = command_ok("losetup", &["--find", "--show", &image_path])?;
        command_ok("mount", &[&d.fs_dev, &mnt])?;
        d.mounted = true;
        let disk = d.mnt.path().join("disk.img");
        std::fs::File::create(&disk).ok()?.set_len(size).ok()?;
        d.dev = command_ok("losetup", &["--find", "--show", disk.to_str()?])?;
        Some(d)
    }

    /// From now on, writes to the device wait until [`FreezableDevice::thaw`].
    pub fn freeze(&mut self) {
        let mnt = self.mnt.path().to_str().unwrap().to_string();
        assert!(
            command_ok("fsfreeze", &["--freeze", &mnt]).is_some(),
            "fsfreeze --freeze {mnt} failed"
        );
        self.frozen = true;
    }

    /// Lets the writes waiting on the device go on.
    pub fn thaw(&mut self) {
        if self.frozen {
            let mnt = self.mnt.path().to_str().unwrap().to_string();
            let _ = command_ok("fsfreeze", &["--unfreeze", &mnt]);
            self.frozen = false;
        }
    }

    /// Requests (reads and writes) the kernel has in flight on the device.
    pub fn inflight(&self) -> u64 {
        let name = self.dev.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/inflight"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for FreezableDevice {
    fn drop(&mut self) {
        // Thaw first: whatever waits on the device (a daemon's drain, a test's write) goes on.
        self.thaw();
        // A device still open (by a daemon the test has not stopped yet) is detached when it
        // is closed; the lazy unmount lets the file system go once the loop device is gone.
        if !self.dev.is_empty() {
            let _ = command_ok("losetup", &["-d", &self.dev]);
        }
        if self.mounted {
            let mnt = self.mnt.path().to_str().unwrap_or_default().to_string();
            let _ = command_ok("umount", &["--lazy", &mnt]);
        }
        if !self.fs_dev.is_empty() {
            let _ = command_ok("losetup", &["-d", &self.fs_dev]);
        }
    }
}
