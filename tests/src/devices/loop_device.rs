//! Loop devices for tests of device-backed volumes (they need root and losetup; a test that
//! cannot have one skips, saying so).

/// A loop device over a temporary file, detached on drop.
pub struct LoopDevice {
    pub dev: String,
    file: tempfile::NamedTempFile,
}

impl LoopDevice {
    pub fn new(size: u64) -> Option<Self> {
        let file = tempfile::NamedTempFile::new_in("/var/tmp").ok()?;
        file.as_file().set_len(size).ok()?;
        Self::attach(file, &[])
    }

    /// A device of `size` bytes with an MBR holding one partition of `part` bytes at 1 MiB,
    /// attached with partition scanning: the partition is `DEV` + "p1".
    pub fn partitioned(size: u64, part: u64) -> Option<Self> {
        let file = tempfile::NamedTempFile::new_in("/var/tmp").ok()?;
        file.as_file().set_len(size).ok()?;
        let mut mbr = [0u8; 512];
        let entry = &mut mbr[446..462];
        entry[4] = 0x83; // Linux
        entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
        entry[12..16].copy_from_slice(&((part / 512) as u32).to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        std::os::unix::fs::FileExt::write_all_at(file.as_file(), &mbr, 0).ok()?;
        let lo = Self::attach(file, &["--partscan"])?;
        // A kernel without the MBR parser finds no partition: partx reads the table itself
        // and adds the partition (BLKPG).
        if !std::path::Path::new(&lo.partition()).exists() {
            let _ = std::process::Command::new("partx")
                .args(["-a", &lo.dev])
                .status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::path::Path::new(&lo.partition()).exists() {
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(lo)
    }

    fn attach(file: tempfile::NamedTempFile, args: &[&str]) -> Option<Self> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .args(args)
            .arg(file.path())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(LoopDevice { dev, file })
    }

    /// The file behind the device.
    pub fn backing_file(&self) -> &std::path::Path {
        self.file.path()
    }

    pub fn partition(&self) -> String {
        format!("{}p1", self.dev)
    }

    /// Detaches the device and attaches `file` at the same /dev/loopN: what a reboot that
    /// numbers devices differently looks like to storaged. Returns the file it had, or None
    /// if the number was taken in between (other tests attach loop devices too).
    pub fn swap_backing_file(
        &mut self,
        file: tempfile::NamedTempFile,
    ) -> Option<tempfile::NamedTempFile> {
        let run = |args: &[&str]| {
            std::process::Command::new("losetup")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(run(&["-d", &self.dev]));
        for _ in 0..50 {
            if run(&[&self.dev, file.path().to_str().unwrap()]) {
                return Some(std::mem::replace(&mut self.file, file));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}
