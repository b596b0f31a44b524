//! The agent's configuration: a TOML file whose every key has a default, so `--data-dir`
//! alone is enough. Unknown keys are refused (`deny_unknown_fields`); [`Config::resolve`]
//! applies the defaults and refuses what cannot work, naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// storaged's admin socket when neither the config nor `STORAGED_ADMIN_SOCKET` names one:
/// the one storaged's packaging uses.
pub const DEFAULT_STORAGED_SOCKET: &str = "/var/lib/storaged/admin.sock";

/// The first uid given to a jailed vmm when the config names none: above the ranges
/// container runtimes map by default (LXD's 1000000-1000999999, `/etc/subuid`'s 100000 on),
/// below 2^31, which some tools take for a negative id.
pub const DEFAULT_JAIL_UID_BASE: u32 = 2_000_000_000;

/// The API's TCP address when the config names none: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9571";

/// Errors loading or checking the configuration.
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

/// Everything `agent` can be told.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the state database, the admin token and the API socket live. Required (here or
    /// as `--data-dir`).
    pub data_dir: Option<PathBuf>,
    /// The API's TCP address, `IP:PORT`, or `"off"`. Default: [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// The API's Unix socket. Default: `DATA_DIR/agent.sock`.
    pub socket: Option<PathBuf>,
    /// The file holding the admin token (created with a random one, mode 0600, if missing).
    /// Default: `DATA_DIR/admin.token`.
    pub admin_token_file: Option<PathBuf>,
    /// storaged's admin socket, through which volumes are made. Default: `STORAGED_ADMIN_SOCKET`
    /// if set, else [`DEFAULT_STORAGED_SOCKET`].
    pub storaged_socket: Option<PathBuf>,
    /// The image catalog: the files a VM's `kernel` and `initrd` may name, by their path
    /// relative to it. Default: `DATA_DIR/images`.
    pub images_dir: Option<PathBuf>,
    /// The vmm binary. Default: `vmm` beside the agent's own.
    pub vmm: Option<PathBuf>,
    /// A certificate chain (PEM, leaf first) and its key: the TCP address then serves HTTPS
    /// only. Both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Whether each VM runs jailed (default true; see the `jail` module): a uid of its own,
    /// a mount namespace holding only its files, cgroups with its CPU and memory limits. Where
    /// the host has no cgroups or namespaces to use, the agent refuses to start unless this
    /// is false.
    pub jail: Option<bool>,
    /// The first of the jailed vmms' uids: each VM gets the next one no other VM has.
    /// Default: [`DEFAULT_JAIL_UID_BASE`].
    pub jail_uid_base: Option<u32>,
    /// Seccomp filters for every vmm in place of its built-in ones (vmm's `--seccomp-filter`:
    /// a seccompiler JSON file with a filter per thread kind). Default: the built-in ones.
    pub seccomp_filter: Option<PathBuf>,
}

/// The configuration with its defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub data_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub socket: PathBuf,
    pub admin_token_file: PathBuf,
    /// The state database: `DATA_DIR/agent.redb`.
    pub database: PathBuf,
    pub storaged_socket: PathBuf,
    pub images_dir: PathBuf,
    pub vmm: PathBuf,
    /// Each VM's files (its vmm's log, API socket, console): `DATA_DIR/vms`.
    pub vms_dir: PathBuf,
    /// The TLS certificate and key of the TCP address.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub jail: bool,
    pub jail_uid_base: u32,
    pub seccomp_filter: Option<PathBuf>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Applies the defaults and checks the settings.
    pub fn resolve(&self) -> Result<Resolved, Error> {
        let data_dir = self.data_dir.clone().ok_or(Error::NoDataDir)?;
        let listen = match self.listen.as_deref().unwrap_or(DEFAULT_LISTEN) {
            "off" => None,
            addr => Some(addr.parse().map_err(|e| Error::Invalid {
                key: "listen",
                reason: format!("{addr:?} is not IP:PORT or \"off\" ({e})"),
            })?),
        };
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| data_dir.join("agent.sock"));
        // sun_path holds 107 bytes and a NUL.
        if socket.as_os_str().len() > 107 {
            return Err(Error::Invalid {
                key: "socket",
                reason: format!(
                    "{} is longer than a Unix socket path can be (107 bytes)",
                    socket.display()
                ),
            });
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(Error::Invalid {
                    key: "tls_cert",
                    reason: "tls_cert and tls_key go together".into(),
                })
            }
        };
        let jail_uid_base = self.jail_uid_base.unwrap_or(DEFAULT_JAIL_UID_BASE);
        if jail_uid_base == 0 || jail_uid_base > (1 << 31) - (1 << 20) {
            return Err(Error::Invalid {
                key: "jail_uid_base",
                reason: format!(
                    "{jail_uid_base}: not root's, and leaving room for 2^20 VMs below 2^31"
                ),
            });
        }
        Ok(Resolved {
            jail: self.jail.unwrap_or(true),
            jail_uid_base,
            seccomp_filter: self.seccomp_filter.clone(),
            tls,
            listen,
            socket,
            admin_token_file: self
                .admin_token_file
                .clone()
                .unwrap_or_else(|| data_dir.join("admin.token")),
            database: data_dir.join("agent.redb"),
            storaged_socket: self
                .storaged_socket
                .clone()
                .or_else(|| std::env::var_os("STORAGED_ADMIN_SOCKET").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORAGED_SOCKET)),
            images_dir: self
                .images_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("images")),
            vmm: self.vmm.clone().unwrap_or_else(beside_the_agent),
            vms_dir: data_dir.join("vms"),
            data_dir,
        })
    }
}

/// `vmm` in the directory of the running agent's binary.
fn beside_the_agent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vmm")))
        .unwrap_or_else(|| PathBuf::from("vmm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_alone_is_a_valid_config() {
        let c = Config {
            data_dir: Some("/var/lib/agent".into()),
            ..Config::default()
        };
        let r = c.resolve().unwrap();
        assert_eq!(r.listen, Some(DEFAULT_LISTEN.parse().unwrap()));
        assert_eq!(r.socket, Path::new("/var/lib/agent/agent.sock"));
        assert_eq!(r.admin_token_file, Path::new("/var/lib/agent/admin.token"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<Config>("data_dir = \"/d\"\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
    }

    #[test]
    fn a_listen_that_is_not_an_address_is_refused_by_name() {
        let c = Config {
            data_dir: Some("/d".into()),
            listen: Some("localhost".into()),
            ..Config::default()
        };
        let e = c.resolve().unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }

    #[test]
    fn listen_off_serves_the_socket_only() {
        let c = Config {
            data_dir: Some("/d".into()),
            listen: Some("off".into()),
            ..Config::default()
        };
        assert_eq!(c.resolve().unwrap().listen, None);
    }

    #[test]
    fn the_example_file_is_valid_and_states_the_defaults() {
        let mut c: Config = toml::from_str(include_str!("../agent.example.toml")).unwrap();
        c.data_dir = Some("/var/lib/agent".into());
        let example = c.resolve().unwrap();
        let defaults = Config {
            data_dir: Some("/var/lib/agent".into()),
            ..Config::default()
        };
        assert_eq!(example, defaults.resolve().unwrap());
    }

    #[test]
    fn a_tls_cert_without_its_key_is_refused() {
        let c = Config {
            data_dir: Some("/d".into()),
            tls_cert: Some("/c.pem".into()),
            ..Config::default()
        };
        assert!(c.resolve().unwrap_err().to_string().contains("tls_key"));
    }

    #[test]
    fn no_data_dir_is_an_error() {
        assert!(matches!(Config::default().resolve(), Err(Error::NoDataDir)));
    }
}
