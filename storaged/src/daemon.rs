//! Wires the daemon together: data dir, volume service, admin API, metrics, signals.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::service::{self, VolumeService};
use systemd_notify::{sd_notify, StopSignals};

/// Errors that stop the daemon from starting.
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
    #[error("Data dir {0} is in use by another storaged")]
    Locked(PathBuf),
    #[error("Cannot lock data dir {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] metrics::Error),
    #[error(transparent)]
    Keys(#[from] crate::keys::Error),
    #[error(transparent)]
    MemoryGuard(#[from] crate::blk::memory_guard::Error),
    #[error(transparent)]
    Service(#[from] service::Error),
    #[error("Cannot listen on {what} {addr}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot run the control plane on its CPUs")]
    Cpus(#[from] crate::cpus::Error),
    #[error("Cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("Cannot set up replication's TLS")]
    ReplicationTls(#[from] crate::replication::tls::Error),
    #[error(transparent)]
    ReplicationListen(#[from] crate::replication::listener::Error),
}

fn create_dir(path: &Path, mode: u32) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| Error::CreateDir {
            path: path.to_owned(),
            source,
        })
}

/// Takes an exclusive lock on the data dir for the life of the returned file.
fn lock_data_dir(dir: &Path) -> Result<File, Error> {
    let path = dir.join("storaged.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Lock {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock only takes the fd and flags; the fd is valid while `file` lives.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::Locked(dir.to_owned()));
    }
    Ok(file)
}

/// A CPU set as the startup log shows it.
fn cpus_shown(cpus: &Option<crate::cpus::CpuList>) -> String {
    cpus.as_ref()
        .map_or_else(|| "all".to_owned(), ToString::to_string)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), Error> {
    let paths = config.validate()?;
    // The control plane: this thread and every thread it starts (the runtime's, and theirs)
    // but the volumes' socket threads, which move to the data plane's CPUs themselves.
    if let Some(cpus) = &paths.control_plane_cpus {
        cpus.pin_current_thread()?;
    }
    create_dir(&paths.data_dir, 0o700)?;
    create_dir(&paths.data_dir.join("volumes"), 0o700)?;
    create_dir(&paths.socket_dir, 0o755)?;
    let _lock = lock_data_dir(&paths.data_dir)?;
    disable_core_dumps();
    crate::blk::memory_guard::install()?;
    let keys = open_keys(&config, &paths.data_dir)?;
    warn_if_keys_beside_volumes(keys.as_ref(), &paths.data_dir.join("volumes"));

    let replication_tls = paths
        .replication
        .as_ref()
        .map(crate::replication::tls::Tls::load)
        .transpose()?;

    let metrics = Metrics::new()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("storaged-ctl")
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;

    let service = VolumeService::start(config, paths.clone(), metrics.clone(), keys)?;
    let service = Arc::new(service);

    let result = runtime.block_on(async {
        let signals = StopSignals::install();
        let metrics_listener = match paths.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Listen {
                        what: "metrics address",
                        addr: addr.to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        let metrics_url = match &metrics_listener {
            Some(l) => l.local_addr().ok().map(|a| format!("http://{a}/metrics")),
            None => None,
        };
        // Bound before the admin API answers, so that /v1/info can tell its address.
        let replication_listener = match paths.replication.as_ref().and_then(|r| r.listen) {
            Some(addr) => Some(crate::replication::listener::bind(addr).await?),
            None => None,
        };
        let replication_listen = replication_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string());
        let _ = fs::remove_file(&paths.admin_socket);
        let admin = UnixListener::bind(&paths.admin_socket).map_err(|source| Error::Listen {
            what: "admin socket",
            addr: paths.admin_socket.display().to_string(),
            source,
        })?;
        fs::set_permissions(&paths.admin_socket, fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::Listen {
                what: "admin socket",
                addr: paths.admin_socket.display().to_string(),
                source,
            },
        )?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let state = ApiState {
            service: service.clone(),
            metrics: metrics.clone(),
            metrics_url: metrics_url.clone(),
            replication_listen: replication_listen.clone(),
            replication_tls: replication_tls.clone(),
            stop: stop_rx.clone(),
        };
        let mut admin_rx = stop_rx.clone();
        let admin_task = tokio::spawn(async move {
            let serve = axum::serve(admin, api::router(state)).with_graceful_shutdown(async move {
                let _ = admin_rx.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!("admin API failed: {e}");
            }
        });
        let metrics_task = metrics_listener.map(|l| {
            let mut rx = stop_rx.clone();
            let m = metrics.clone();
            tokio::spawn(async move {
                let serve =
                    axum::serve(l, api::metrics_router(m)).with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|s| *s).await;
                    });
                if let Err(e) = serve.await {
                    tracing::error!("metrics server failed: {e}");
                }
            })
        });

        let replication_task =
            match (replication_listener, replication_tls.clone()) {
                (Some(listener), Some(tls)) => Some(tokio::spawn(
                    crate::replication::listener::serve(listener, tls, stop_rx.clone(), {
                        let service = service.clone();
                        move |stream, peer, stop| {
                            crate::replication::session::serve(stream, peer, service.clone(), stop)
                        }
                    }),
                )),
                _ => None,
            };

        // Every primary's sender (it resyncs its secondary and ships its writes), started by
        // the supervisor now and whenever a volume becomes a primary.
        let supervisor_task = replication_tls.clone().map(|tls| {
            tokio::spawn(crate::replication::supervisor::run(
                service.clone(),
                tls,
                replication_listen.clone(),
                stop_rx.clone(),
            ))
        });

        let volumes = service.list().len();
        tracing::info!(
            admin_socket = %paths.admin_socket.display(),
            metrics_url = metrics_url.as_deref().unwrap_or("off"),
            replication_listen = replication_listen.as_deref().unwrap_or("off"),
            data_dir = %paths.data_dir.display(),
            data_plane_cpus = %cpus_shown(&paths.data_plane_cpus),
            control_plane_cpus = %cpus_shown(&paths.control_plane_cpus),
            volumes,
            "storaged ready"
        );
        sd_notify("READY=1");

        signals.wait().await;
        tracing::info!("shutting down: closing sockets, finishing in-flight I/O");
        sd_notify("STOPPING=1");
        let _ = stop_tx.send(true);
        let _ = admin_task.await;
        // Replication sessions end before the volumes they work on are shut down.
        if let Some(t) = replication_task {
            let _ = t.await;
        }
        if let Some(t) = supervisor_task {
            let _ = t.await;
        }
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        Ok::<(), Error>(())
    });
    // Exports stop accepting, in-flight I/O finishes, backing storage is synced.
    service.shutdown();
    let _ = fs::remove_file(&paths.admin_socket);
    runtime.shutdown_background();
    tracing::info!("stopped");
    result
}

/// Keeps key material out of core dumps: none are written, and the process cannot be
/// ptraced by other processes of its user.
fn disable_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one valid rlimit; prctl takes integers only.
    let ok = unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &zero) == 0
            && libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    };
    if !ok {
        tracing::warn!(
            "cannot disable core dumps: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The key provider: the configured key dir, or `DATA_DIR/keys` (created with a first KEK).
fn open_keys(config: &Config, data_dir: &Path) -> Result<Arc<dyn crate::keys::KeyProvider>, Error> {
    use crate::keys::DirProvider;
    let provider = match &config.encryption.key_dir {
        Some(dir) => DirProvider::open(dir)?,
        None => {
            let (provider, created) = DirProvider::open_or_create(&data_dir.join("keys"))?;
            if let Some(id) = created {
                tracing::info!(
                    kek = %id,
                    dir = %provider.dir().display(),
                    "created a local key-encryption key; back it up: encrypted volumes cannot be read without it"
                );
            }
            provider
        }
    };
    Ok(Arc::new(provider))
}

/// Warns when the KEKs are on the file system of the volumes: whoever takes that disk takes
/// the keys with the data, and a deleted volume's wrapped key may survive in old copies.
fn warn_if_keys_beside_volumes(keys: &dyn crate::keys::KeyProvider, volumes: &Path) {
    let Some(dir) = keys.local_dir() else { return };
    match crate::keys::same_file_system(dir, volumes) {
        Ok(true) => tracing::warn!(
            key_dir = %dir.display(),
            volumes = %volumes.display(),
            "key directory is on the same file system as the volumes: whoever holds that disk \
             holds the keys too; set [encryption] key_dir to a directory on another device"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            key_dir = %dir.display(),
            "cannot tell whether the key directory shares the volumes' file system: {e}"
        ),
    }
}
