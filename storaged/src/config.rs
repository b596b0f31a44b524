//! Daemon configuration: a TOML file whose every key has a default, so `--data-dir` alone is
//! enough. Unknown keys are refused (`deny_unknown_fields`), and [`Config::validate`] refuses
//! settings that are wrong together, naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpus::CpuList;
use crate::qos::QosConfig;
use crate::volume::{self, Tier};
use size::ByteSize;

/// Longest path a Unix socket address can hold (`sun_path` less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Volume-name length a socket dir must leave room for.
pub const MIN_NAME_ROOM: usize = 16;

/// Length of the socket path of a `name_len`-character volume in `socket_dir`.
pub fn socket_path_len(socket_dir: &Path, name_len: usize) -> usize {
    socket_dir.as_os_str().len() + 1 + name_len + ".sock".len()
}

/// Most queues per volume: vhost-user-backend assigns queues to worker threads by a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;
/// Most data segments per request that can be offered: SEG_MAX × SIZE_MAX (at least a page)
/// stays within the largest request taken (32 MiB).
pub const MAX_SEG_MAX: u32 = (crate::blk::request::MAX_TRANSFER / 4096) as u32;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("No data dir: pass --data-dir or set data_dir in the config file")]
    NoDataDir,
    #[error("Invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Everything `storaged` can be told.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the catalog, backing files, sockets and admin socket live. Required (here or as
    /// `--data-dir`).
    pub data_dir: Option<PathBuf>,
    /// Admin API socket. Default: `DATA_DIR/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Folder of the volumes' vhost-user sockets. Default: `DATA_DIR/sockets`.
    pub socket_dir: Option<PathBuf>,
    /// Prometheus `/metrics` listen address. Default: `127.0.0.1:9563`. `"off"` disables it.
    pub metrics_addr: Option<String>,
    /// Total bytes volumes may take; creation beyond it fails. Default: unlimited.
    pub pool_capacity: Option<ByteSize>,
    pub volume_defaults: VolumeDefaults,
    pub io: IoConfig,
    /// Per-volume IOPS and bandwidth limits.
    pub qos: QosConfig,
    /// Encryption at rest.
    pub encryption: EncryptionConfig,
    /// Replication of volumes to a peer storaged.
    pub replication: ReplicationConfig,
    /// Which CPUs the data plane and the control plane run on.
    pub cpus: CpusConfig,
}

/// CPU affinity (see [`crate::cpus`]): Linux CPU lists such as `"2-7"`. Each unset one leaves
/// its threads on every CPU the daemon may use.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpusConfig {
    /// The volumes' threads: each one's socket thread, queue workers and io_uring workers.
    pub data_plane: Option<String>,
    /// Everything else: the admin API, metrics, replication streams.
    pub control_plane: Option<String>,
}

/// Replication to and from peer storaged daemons (see [`crate::replication`]). Every
/// replication connection is TCP with mutual TLS: this daemon presents `cert` (with `key`) and
/// accepts only peers whose certificate `ca` signed. Off unless set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Address peers connect to, `IP:PORT`. Default: none (this daemon accepts no peer; it can
    /// still replicate its volumes to others when `cert`, `key` and `ca` are set).
    pub listen: Option<String>,
    /// This daemon's certificate chain (PEM), presented to peers both ways.
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// The CA certificates (PEM) a peer's certificate must be signed by.
    pub ca: Option<PathBuf>,
    /// Mode sync: how long a write may wait for the secondary before the relationship falls
    /// back to async (logged, shown, counted) until the stream catches up. Default: 5.
    pub sync_timeout_seconds: u64,
    /// Most data one primary volume's replication log holds before it overflows (the
    /// regions are then sent by a resync): what a stall of the link or the sender can take
    /// without one, and the memory a primary volume holds for its stream at most (a write
    /// larger than it always overflows it). 1 MiB to 16 GiB. Default: 64MiB.
    pub log_capacity: ByteSize,
}

/// Bounds of `replication.log_capacity`.
pub const MIN_LOG_CAPACITY: u64 = 1 << 20;
pub const MAX_LOG_CAPACITY: u64 = 16 << 30;

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            listen: None,
            cert: None,
            key: None,
            ca: None,
            sync_timeout_seconds: 5,
            log_capacity: ByteSize(crate::replication::log::DEFAULT_CAPACITY as u64),
        }
    }
}

/// Replication's resolved settings: the TLS files, and the address to listen on if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationResolved {
    pub listen: Option<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Encryption at rest (see [`crate::crypto`] and [`crate::keys`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Allow volumes created with `"encryption": "none"`. Default: true.
    pub allow_plaintext: bool,
    /// Directory of key-encryption keys (`ID.key` files and a `current` file), owned by
    /// storaged's user, mode 0700. Default: `DATA_DIR/keys`, created with a first KEK.
    pub key_dir: Option<PathBuf>,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig {
            allow_plaintext: true,
            key_dir: None,
        }
    }
}

/// Defaults applied to volumes created without saying otherwise.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeDefaults {
    /// Performance tier. Default: standard.
    pub tier: Tier,
    /// Virtqueues offered to the frontend (VIRTIO_BLK_F_MQ). Default: 1.
    pub num_queues: u16,
    /// Allocate the whole backing file at creation (fallocate) instead of a sparse file.
    pub preallocate: bool,
}

impl Default for VolumeDefaults {
    fn default() -> Self {
        VolumeDefaults {
            tier: Tier::Standard,
            num_queues: 1,
            preallocate: false,
        }
    }
}

/// Data-path settings shared by every volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IoConfig {
    /// Largest virtqueue a frontend may set up. A power of two, 256 to 32768. Default: 1024.
    pub max_queue_size: u16,
    /// Open backing storage with O_DIRECT, falling back to buffered I/O (with a warning) where
    /// the file system refuses it. Default: true.
    pub direct: bool,
    /// Most data segments in one request (VIRTIO_BLK_F_SEG_MAX). Default: 128.
    pub seg_max: u32,
    /// Polling: after a batch on a busy queue (two or more requests handled or in flight), its
    /// worker keeps checking the virtqueue and completion ring before it sleeps, saving a
    /// wake-up per request while work keeps coming. The window adapts to the queue's pace, up
    /// to this many microseconds. 0 disables polling. At most 1000. Default: 50.
    pub poll_us: u32,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            max_queue_size: 1024,
            direct: true,
            seg_max: 128,
            poll_us: 50,
        }
    }
}

/// Fully resolved paths and addresses, after defaults.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub socket_dir: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    /// None when replication is not configured.
    pub replication: Option<ReplicationResolved>,
    /// The CPUs of the data plane and of the control plane, where set (the data plane's too
    /// where only the control plane's is: every CPU the daemon may use).
    pub data_plane_cpus: Option<CpuList>,
    pub control_plane_cpus: Option<CpuList>,
}

impl Config {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Applies defaults and checks settings that depend on each other.
    pub fn validate(&self) -> Result<Resolved, Error> {
        let data_dir = self.data_dir.clone().ok_or(Error::NoDataDir)?;
        let admin_socket = self
            .admin_socket
            .clone()
            .unwrap_or_else(|| data_dir.join("admin.sock"));
        let socket_dir = self
            .socket_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("sockets"));
        let invalid = |key, reason: String| Error::Invalid { key, reason };

        if admin_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "admin_socket",
                format!(
                    "{} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path can have",
                    admin_socket.display()
                ),
            ));
        }
        // Socket paths are SOCKET_DIR/NAME.sock; leave room for names of at least 16 characters
        // (creation refuses a name whose socket path would not fit).
        if socket_path_len(&socket_dir, MIN_NAME_ROOM) > MAX_SOCKET_PATH {
            return Err(invalid(
                "socket_dir",
                format!(
                    "{} is too long: sockets of {MIN_NAME_ROOM}-character volume names would exceed the {MAX_SOCKET_PATH} bytes of a Unix socket path",
                    socket_dir.display(),
                ),
            ));
        }
        let metrics_addr = match self.metrics_addr.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9563))),
            Some("off") => None,
            Some(a) => Some(a.parse().map_err(|e| {
                invalid(
                    "metrics_addr",
                    format!("'{a}' is not an IP:port address ({e})"),
                )
            })?),
        };
        let d = &self.volume_defaults;
        if d.num_queues == 0 || d.num_queues > MAX_QUEUES {
            return Err(invalid(
                "volume_defaults.num_queues",
                format!("{} is not between 1 and {MAX_QUEUES}", d.num_queues),
            ));
        }
        let q = self.io.max_queue_size;
        if !q.is_power_of_two() || !(256..=32768).contains(&q) {
            return Err(invalid(
                "io.max_queue_size",
                format!("{q} is not a power of two between 256 and 32768"),
            ));
        }
        // SIZE_MAX is offered as the largest request over seg_max, at least a page: past
        // MAX_SEG_MAX the two would allow requests larger than the device takes.
        let most = u32::from(q).min(MAX_SEG_MAX);
        if self.io.seg_max == 0 || self.io.seg_max > most {
            return Err(invalid(
                "io.seg_max",
                format!(
                    "{} is not between 1 and {most} (io.max_queue_size, at most {MAX_SEG_MAX})",
                    self.io.seg_max
                ),
            ));
        }
        if self.io.poll_us > 1000 {
            return Err(invalid(
                "io.poll_us",
                format!("{} is more than 1000 microseconds", self.io.poll_us),
            ));
        }
        self.qos
            .validate()
            .map_err(|e| invalid(e.key(), e.to_string()))?;
        if let Some(cap) = self.pool_capacity {
            volume::validate_size(cap.0).map_err(|e| invalid("pool_capacity", e.to_string()))?;
        }
        let replication = self.replication.resolve()?;
        let cap = self.replication.log_capacity.0;
        if !(MIN_LOG_CAPACITY..=MAX_LOG_CAPACITY).contains(&cap) {
            return Err(invalid(
                "replication.log_capacity",
                format!("{cap} bytes is not between 1 MiB and 16 GiB"),
            ));
        }
        let cpus = |key, list: &Option<String>| {
            list.as_deref()
                .map(|l| CpuList::parse(l).and_then(CpuList::check_allowed))
                .transpose()
                .map_err(|e| invalid(key, e.to_string()))
        };
        let control_plane_cpus = cpus("cpus.control_plane", &self.cpus.control_plane)?;
        // A thread starts on the CPUs of the one that started it: with the control plane
        // pinned, the data plane moves back to every CPU the daemon may use.
        let data_plane_cpus = match cpus("cpus.data_plane", &self.cpus.data_plane)? {
            None if control_plane_cpus.is_some() => {
                Some(CpuList::allowed().map_err(|e| invalid("cpus.data_plane", e.to_string()))?)
            }
            set => set,
        };
        Ok(Resolved {
            data_dir,
            admin_socket,
            socket_dir,
            metrics_addr,
            replication,
            data_plane_cpus,
            control_plane_cpus,
        })
    }
}

impl ReplicationConfig {
    /// The resolved settings: None when nothing is set; the TLS files all three or none; a
    /// listen address only with them.
    fn resolve(&self) -> Result<Option<ReplicationResolved>, Error> {
        let invalid = |key, reason: String| Error::Invalid { key, reason };
        let listen = match self.listen.as_deref() {
            None | Some("off") => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "replication.listen",
                    format!("'{a}' is not an IP:port address ({e})"),
                )
            })?),
        };
        match (&self.cert, &self.key, &self.ca) {
            (None, None, None) if listen.is_none() => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(ReplicationResolved {
                listen,
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            _ => {
                let missing: Vec<&str> = [
                    ("replication.cert", self.cert.is_none()),
                    ("replication.key", self.key.is_none()),
                    ("replication.ca", self.ca.is_none()),
                ]
                .into_iter()
                .filter_map(|(k, m)| m.then_some(k))
                .collect();
                Err(invalid(
                    missing[0],
                    format!(
                        "replication is mutual TLS: set {} too (cert, key and ca go together{})",
                        missing.join(", "),
                        if listen.is_some() {
                            ", and listen needs them"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_alone_is_a_valid_config() {
        let c = Config {
            data_dir: Some("/var/lib/storaged".into()),
            ..Default::default()
        };
        let r = c.validate().unwrap();
        assert_eq!(r.admin_socket, Path::new("/var/lib/storaged/admin.sock"));
        assert_eq!(r.socket_dir, Path::new("/var/lib/storaged/sockets"));
        assert_eq!(r.metrics_addr, Some("127.0.0.1:9563".parse().unwrap()));
    }

    #[test]
    fn full_file_parses() {
        let c = Config::from_toml(
            r#"
            data_dir = "/srv/st"
            metrics_addr = "off"
            pool_capacity = "10TiB"
            [volume_defaults]
            tier = "premium"
            num_queues = 4
            preallocate = true
            [io]
            max_queue_size = 256
            direct = false
            seg_max = 64
            [cpus]
            data_plane = "0"
            "#,
        )
        .unwrap();
        assert_eq!(c.pool_capacity, Some(ByteSize(10 << 40)));
        assert_eq!(c.volume_defaults.tier, Tier::Premium);
        let r = c.validate().unwrap();
        assert!(r.metrics_addr.is_none());
        assert_eq!(r.data_plane_cpus, Some(CpuList::parse("0").unwrap()));
        assert_eq!(r.control_plane_cpus, None);
    }

    #[test]
    fn example_file_is_valid_and_states_the_defaults() {
        let mut c = Config::from_toml(include_str!("../storaged.example.toml")).unwrap();
        c.data_dir = Some("/var/lib/storaged".into());
        c.validate().unwrap();
        let d = Config::default();
        assert_eq!(c.io.max_queue_size, d.io.max_queue_size);
        assert_eq!(c.io.seg_max, d.io.seg_max);
        assert_eq!(c.io.poll_us, d.io.poll_us);
        assert_eq!(c.io.direct, d.io.direct);
        assert_eq!(c.volume_defaults.num_queues, d.volume_defaults.num_queues);
        assert_eq!(c.volume_defaults.tier, d.volume_defaults.tier);
        assert_eq!(c.qos, d.qos);
        assert_eq!(c.validate().unwrap().replication, None);
        assert_eq!(c.replication.log_capacity, d.replication.log_capacity);
        assert_eq!(c.cpus.data_plane, None);
    }

    #[test]
    fn replication_needs_its_three_tls_files_and_an_ip_port_to_listen_on() {
        let with = |toml: &str| {
            let mut c = Config::from_toml(toml).unwrap();
            c.data_dir = Some("/d".into());
            c.validate()
        };
        assert_eq!(with("").unwrap().replication, None);
        assert_eq!(
            with("[replication]\nlisten = \"off\"").unwrap().replication,
            None
        );
        let tls = "cert = \"/c.pem\"\nkey = \"/k.pem\"\nca = \"/ca.pem\"\n";
        let r = with(&format!("[replication]\nlisten = \"10.0.0.1:7420\"\n{tls}"))
            .unwrap()
            .replication
            .unwrap();
        assert_eq!(r.listen, Some("10.0.0.1:7420".parse().unwrap()));
        assert_eq!(r.ca, PathBuf::from("/ca.pem"));
        // TLS alone: replicates to peers, accepts none.
        let r = with(&format!("[replication]\n{tls}"))
            .unwrap()
            .replication
            .unwrap();
        assert_eq!(r.listen, None);

        let e = with("[replication]\nlisten = \"10.0.0.1:7420\"").unwrap_err();
        assert!(matches!(
            e,
            Error::Invalid {
                key: "replication.cert",
                ..
            }
        ));
        assert!(e.to_string().contains("listen needs them"), "{e}");
        let e = with("[replication]\ncert = \"/c.pem\"\nkey = \"/k.pem\"").unwrap_err();
        assert!(matches!(
            e,
            Error::Invalid {
                key: "replication.ca",
                ..
            }
        ));
        let e = with(&format!("[replication]\nlisten = \"somewhere\"\n{tls}")).unwrap_err();
        assert!(matches!(
            e,
            Error::Invalid {
                key: "replication.listen",
                ..
            }
        ));
        assert!(Config::from_toml("[replication]\nport = 1").is_err());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("data_dir = \"/x\"\nqueues = 3\n").unwrap_err();
        assert!(err.to_string().contains("queues"), "{err}");
        let err = Config::from_toml("[io]\nturbo = true\n").unwrap_err();
        assert!(err.to_string().contains("turbo"), "{err}");
    }

    #[test]
    fn inconsistent_settings_name_the_key() {
        let base = || Config {
            data_dir: Some("/d".into()),
            ..Default::default()
        };
        let mut c = base();
        c.io.max_queue_size = 128;
        assert!(matches!(
            c.validate(),
            Err(Error::Invalid {
                key: "io.max_queue_size",
                ..
            })
        ));
        let mut c = base();
        c.io.seg_max = 2048;
        assert!(matches!(
            c.validate(),
            Err(Error::Invalid {
                key: "io.seg_max",
                ..
            })
        ));
        // Within a large queue, but more segments than SIZE_MAX can keep under 32 MiB.
        let mut c = base();
        c.io.max_queue_size = 32768;
        c.io.seg_max = 16384;
        assert!(matches!(
            c.validate(),
            Err(Error::Invalid {
                key: "io.seg_max",
                ..
            })
        ));
        let mut c = base();
        c.volume_defaults.num_queues = 0;
        assert!(matches!(
            c.validate(),
            Err(Error::Invalid {
                key: "volume_defaults.num_queues",
                ..
            })
        ));
        let mut c = base();
        c.qos.tier_iops_per_tb.ultra = 0;
        assert!(matches!(
            c.validate(),
            Err(Error::Invalid {
                key: "qos.tier_iops_per_tb.ultra",
                ..
            })
        ));
        for (data_plane, control_plane, key) in [
            (Some("0-"), None, "cpus.data_plane"),
            (
                None,
                Some(crate::cpus::MAX_CPU.to_string()),
                "cpus.control_plane",
            ),
        ] {
            let mut c = base();
            c.cpus.data_plane = data_plane.map(String::from);
            c.cpus.control_plane = control_plane;
            match c.validate() {
                Err(Error::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        for cap in [(1 << 20) - 1, (16 << 30) + 1] {
            let mut c = base();
            c.replication.log_capacity = ByteSize(cap);
            assert!(matches!(
                c.validate(),
                Err(Error::Invalid {
                    key: "replication.log_capacity",
                    ..
                })
            ));
        }
        let mut c = base();
        c.metrics_addr = Some("localhost".into());
        assert!(matches!(
            c.validate(),
            Err(Error::Invalid {
                key: "metrics_addr",
                ..
            })
        ));
        let mut c = base();
        c.socket_dir = Some(PathBuf::from("/".repeat(90)));
        assert!(matches!(
            c.validate(),
            Err(Error::Invalid {
                key: "socket_dir",
                ..
            })
        ));
        assert!(matches!(
            Config::default().validate(),
            Err(Error::NoDataDir)
        ));
    }
}
