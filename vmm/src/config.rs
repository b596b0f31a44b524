//! What a VM is made of, from the command line, checked before anything starts.

use std::path::{Path, PathBuf};

use crate::boot;
use crate::console::{DEFAULT_LOG_MAX, MIN_LOG_MAX};
use crate::layout::CMDLINE_MAX;
use size::ByteSize;

/// Most vCPUs: APIC ids are 8 bits here.
pub const MAX_VCPUS: u8 = 254;
/// Least guest memory accepted.
pub const MIN_MEMORY: u64 = 16 << 20;

/// A configuration refused before the guest starts; the message says what and why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--vcpus must be between 1 and {max} (got {got})")]
    Vcpus { got: u32, max: u8 },
    #[error("--memory '{0}' is not a size (e.g. 512MiB, 2GiB)")]
    MemorySyntax(String),
    #[error("--memory {got} bytes: {reason}")]
    Memory { got: u64, reason: String },
    #[error("--kernel: {0}")]
    Kernel(#[source] boot::Error),
    #[error("--initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("--cmdline is longer than {} bytes", CMDLINE_MAX - 1)]
    Cmdline,
    #[error("--disk '{0}': expected socket=PATH[,readonly]")]
    Disk(String),
    #[error("--serial {path}: {source}")]
    Serial {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--serial-log-max '{0}' is not a size of at least {min} KiB (e.g. 16MiB)", min = MIN_LOG_MAX >> 10)]
    SerialLogMax(String),
    #[error("--serial-log-max is for a serial log file (--serial FILE), not stdout")]
    SerialLogMaxStdout,
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOut {
    Stdout,
    /// A log file rotated to `PATH.1` when it holds `max_bytes`.
    File {
        path: PathBuf,
        max_bytes: u64,
    },
}

/// A vhost-user-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub socket: PathBuf,
    pub read_only: bool,
}

impl DiskConfig {
    /// Parses `socket=PATH[,readonly]`.
    pub fn parse(s: &str) -> Result<DiskConfig, Error> {
        let mut socket = None;
        let mut read_only = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                None if part == "readonly" => read_only = true,
                _ => return Err(Error::Disk(s.to_string())),
            }
        }
        let socket = socket.ok_or_else(|| Error::Disk(s.to_string()))?;
        Ok(DiskConfig { socket, read_only })
    }
}

/// The disks of a VM: `--disk` options, or the API's typed values.
#[derive(Clone, Copy, Debug)]
pub enum DiskArgs<'a> {
    /// `socket=PATH[,readonly]` each.
    Options(&'a [String]),
    Api(&'a [vmm_api::Disk]),
}

/// Most disks (virtio-mmio windows and interrupt lines 5..).
pub const MAX_DISKS: usize = 16;

/// The VM as the command line describes it, unchecked.
#[derive(Clone, Copy, Debug)]
pub struct Args<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub memory: &'a str,
    pub serial: &'a str,
    /// Size of the serial log file before it is rotated ([`DEFAULT_LOG_MAX`] if not given).
    pub serial_log_max: Option<&'a str>,
    pub disks: DiskArgs<'a>,
    pub api_sock: Option<&'a Path>,
}

/// A checked VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory: u64,
    pub serial: SerialOut,
    pub disks: Vec<DiskConfig>,
    pub api_sock: Option<PathBuf>,
}

/// Parses a size as every daemon here reads one (see the `size` crate): "512MiB", "2G" and "2GiB"
/// are powers of two, "2GB" is 2 * 10^9 bytes, "1073741824" is bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    s.parse::<ByteSize>().ok().map(ByteSize::bytes)
}

/// Bytes of memory the host can give now (MemAvailable).
pub fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// Checks everything that can be checked before the guest starts.
    pub fn new(args: &Args<'_>, max_vcpus: usize) -> Result<VmConfig, Error> {
        let Args {
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory,
            serial,
            serial_log_max,
            disks,
            api_sock,
        } = *args;
        let disks = match disks {
            DiskArgs::Options(options) => options
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<Vec<_>, _>>()?,
            DiskArgs::Api(disks) => disks
                .iter()
                .map(|d| DiskConfig {
                    socket: d.socket.clone(),
                    read_only: d.read_only,
                })
                .collect(),
        };
        if disks.len() > MAX_DISKS {
            return Err(Error::Disk(format!(
                "{} disks (at most {MAX_DISKS})",
                disks.len()
            )));
        }
        let max = MAX_VCPUS.min(u8::try_from(max_vcpus).unwrap_or(u8::MAX));
        if vcpus == 0 || vcpus > u32::from(max) {
            return Err(Error::Vcpus { got: vcpus, max });
        }
        let memory_bytes =
            parse_size(memory).ok_or_else(|| Error::MemorySyntax(memory.to_string()))?;
        if memory_bytes < MIN_MEMORY {
            return Err(Error::Memory {
                got: memory_bytes,
                reason: format!("less than the {} MiB a guest needs", MIN_MEMORY >> 20),
            });
        }
        if memory_bytes % (2 << 20) != 0 {
            return Err(Error::Memory {
                got: memory_bytes,
                reason: "not a multiple of 2 MiB".into(),
            });
        }
        if let Some(avail) = host_available_memory() {
            if memory_bytes > avail {
                return Err(Error::Memory {
                    got: memory_bytes,
                    reason: format!("more than the {} MiB this host has available", avail >> 20),
                });
            }
        }
        boot::kernel_kind(kernel).map_err(Error::Kernel)?;
        if let Some(i) = initrd {
            if let Err(e) = std::fs::File::open(i) {
                return Err(Error::Initrd {
                    path: i.to_owned(),
                    reason: e.to_string(),
                });
            }
        }
        if cmdline.len() + 1 > CMDLINE_MAX {
            return Err(Error::Cmdline);
        }
        let serial = match serial {
            "stdout" if serial_log_max.is_some() => return Err(Error::SerialLogMaxStdout),
            "stdout" => SerialOut::Stdout,
            path => {
                let max_bytes = match serial_log_max {
                    None => DEFAULT_LOG_MAX,
                    Some(s) => parse_size(s)
                        .filter(|n| *n >= MIN_LOG_MAX)
                        .ok_or_else(|| Error::SerialLogMax(s.to_string()))?,
                };
                let path = PathBuf::from(path);
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| Error::Serial {
                        path: path.clone(),
                        source,
                    })?;
                SerialOut::File { path, max_bytes }
            }
        };
        Ok(VmConfig {
            kernel: kernel.to_owned(),
            initrd: initrd.map(Path::to_owned),
            cmdline: cmdline.to_string(),
            vcpus: vcpus as u8,
            memory: memory_bytes,
            serial,
            disks,
            api_sock: api_sock.map(Path::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("1.3B"), None);
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn a_serial_log_gets_a_size_cap_of_at_least_4_kib_and_stdout_none() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("console.log");
        let kernel = tmp.path().join("vmlinux");
        // An ELF header is all the kernel check reads.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        std::fs::write(&kernel, &elf).unwrap();
        let args = |serial, max| Args {
            kernel: &kernel,
            initrd: None,
            cmdline: "",
            vcpus: 1,
            memory: "64MiB",
            serial,
            serial_log_max: max,
            disks: DiskArgs::Options(&[]),
            api_sock: None,
        };
        let file = log.to_str().unwrap();
        let serial = |max| VmConfig::new(&args(file, max), 1).map(|c| c.serial);
        assert_eq!(
            serial(None).unwrap(),
            SerialOut::File {
                path: log.clone(),
                max_bytes: DEFAULT_LOG_MAX
            }
        );
        assert_eq!(
            serial(Some("64KiB")).unwrap(),
            SerialOut::File {
                path: log.clone(),
                max_bytes: 64 << 10
            }
        );
        assert!(matches!(serial(Some("1KiB")), Err(Error::SerialLogMax(_))));
        assert!(matches!(serial(Some("lots")), Err(Error::SerialLogMax(_))));
        assert!(matches!(
            VmConfig::new(&args("stdout", Some("1MiB")), 1),
            Err(Error::SerialLogMaxStdout)
        ));
    }

    #[test]
    fn disks_parse_with_their_options() {
        let d = DiskConfig::parse("socket=/run/db1.sock,readonly").unwrap();
        assert_eq!(d.socket, PathBuf::from("/run/db1.sock"));
        assert!(d.read_only);
        assert!(!DiskConfig::parse("socket=/a").unwrap().read_only);
        assert!(DiskConfig::parse("path=/a").is_err());
        assert!(DiskConfig::parse("socket=").is_err());
        assert!(DiskConfig::parse("socket=/a,fast").is_err());
    }
}
