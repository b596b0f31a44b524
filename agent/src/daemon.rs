//! Wires the agent together: data dir, state database, admin token, the API on its TCP
//! address and its Unix socket, signals.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use systemd_notify::{sd_notify, StopSignals};
use tokio::net::{TcpListener, UnixListener};

use crate::api::{self, ApiState};
use crate::auth::Authority;
use crate::config::Config;
use crate::store::{self, Store};
use crate::tenants::{self, TenantRegistry};
use crate::tokens;
use crate::vms::{JailSettings, VmSupervisor};
use crate::volumes::VolumeRegistry;

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error("Cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    AdminToken(#[from] tokens::Error),
    #[error("Cannot listen on {what} {addr}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists and is not a socket: not replacing it")]
    NotASocket(PathBuf),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::Error),
    #[error(transparent)]
    Cgroups(#[from] crate::cgroups::Error),
    #[error("Cannot jail the VMs: {0} (set jail = false to run VMs unjailed)")]
    NoJail(String),
    #[error(transparent)]
    Jail(#[from] crate::jail::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("Cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// What jailing the VMs takes from this host: root (to mount, give uids and make device
/// nodes), the namespaces, cgroups; and the libraries of the vmm binary.
fn jail_settings(paths: &crate::config::Resolved) -> Result<JailSettings, Error> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NoJail(
            "the agent is not root: jails are made with mounts, uids and a device node".into(),
        ));
    }
    for ns in ["mnt", "net", "ipc", "uts"] {
        if !Path::new("/proc/self/ns").join(ns).exists() {
            return Err(Error::NoJail(format!(
                "this kernel has no {ns} namespaces (/proc/self/ns/{ns})"
            )));
        }
    }
    let cgroups = crate::cgroups::Cgroups::detect()?;
    let libraries = crate::jail::libraries(&paths.vmm)?;
    Ok(JailSettings {
        cgroups,
        uid_base: paths.jail_uid_base,
        libraries,
    })
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), Error> {
    let paths = config.resolve()?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.data_dir)
        .map_err(|source| Error::CreateDir {
            path: paths.data_dir.clone(),
            source,
        })?;
    let acceptor = paths
        .tls
        .as_ref()
        .map(|(cert, key)| crate::tls::acceptor(cert, key))
        .transpose()?;
    // Opened first: it locks the data dir against a second agent.
    let store = Arc::new(Store::open(&paths.database)?);
    let (admin_token, created) = tokens::admin_token(&paths.admin_token_file)?;
    if created {
        tracing::info!(path = %paths.admin_token_file.display(), "admin token created");
    }
    let authority = Arc::new(Authority::new(
        tokens::hash(&admin_token),
        tenants::known_hashes(&store)?,
    ));
    drop(admin_token);
    let volumes = VolumeRegistry::new(
        store.clone(),
        storaged_api::client::AdminClient::new(&paths.storaged_socket),
    );
    match volumes.settle() {
        Ok(_) => {}
        Err(e) => tracing::warn!(
            "cannot settle the volumes left half-created: {}",
            crate::error_chain(&e)
        ),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent-api")
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    let jail = if paths.jail {
        Some(jail_settings(&paths)?)
    } else {
        tracing::warn!("jail = false: the VMs run as the agent's uid, in its namespaces, without cgroups of their own");
        None
    };
    let vms = VmSupervisor::new(
        store.clone(),
        storaged_api::client::AdminClient::new(&paths.storaged_socket),
        crate::vms::VmPaths {
            images_dir: paths.images_dir.clone(),
            vmm: paths.vmm.clone(),
            vms_dir: paths.vms_dir.clone(),
            seccomp_filter: paths.seccomp_filter.clone(),
        },
        runtime.handle().clone(),
        metrics.clone(),
        jail,
    );
    {
        // The watches it starts need the runtime's reactor.
        let _guard = runtime.enter();
        if let Err(e) = vms.adopt() {
            tracing::error!("cannot find the VMs again: {}", crate::error_chain(&e));
        }
    }
    let state = Arc::new(ApiState {
        authority: authority.clone(),
        tenants: TenantRegistry::new(store, authority),
        volumes,
        vms,
        metrics,
    });
    runtime.block_on(async {
        let signals = StopSignals::install();
        let tcp = match paths.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Listen {
                        what: "API address",
                        addr: addr.to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        let unix = bind_socket(&paths.socket)?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let url = tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("{scheme}://{a}/v1"));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        match (tcp, acceptor) {
            (Some(l), Some(acceptor)) => tasks.push(tokio::spawn(crate::tls::serve(
                l,
                acceptor,
                api::router(state.clone()),
                stop_rx.clone(),
            ))),
            (Some(l), None) => {
                let serve = axum::serve(l, api::router(state.clone()))
                    .with_graceful_shutdown(stopped(stop_rx.clone()));
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = serve.await {
                        tracing::error!("API on TCP failed: {e}");
                    }
                }));
            }
            (None, _) => {}
        }
        let serve =
            axum::serve(unix, api::router(state.clone())).with_graceful_shutdown(stopped(stop_rx));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("API on the Unix socket failed: {e}");
            }
        }));
        sd_notify("READY=1");
        tracing::info!(
            api_url = %url.as_deref().unwrap_or("off"),
            socket = %paths.socket.display(),
            storaged_socket = %paths.storaged_socket.display(),
            data_dir = %paths.data_dir.display(),
            "agent ready"
        );
        signals.wait().await;
        tracing::info!("shutting down; the VMs keep running");
        sd_notify("STOPPING=1");
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        let _ = fs::remove_file(&paths.socket);
        Ok(())
    })
}

/// Binds the API's Unix socket at `path`, mode 0600, replacing a socket left by an agent
/// that did not remove its own (the database's lock says none runs), never another file.
fn bind_socket(path: &Path) -> Result<UnixListener, Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = fs::remove_file(path);
        }
        Ok(_) => return Err(Error::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listen = |source| Error::Listen {
        what: "API socket",
        addr: path.display().to_string(),
        source,
    };
    let l = UnixListener::bind(path).map_err(listen)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(listen)?;
    Ok(l)
}
