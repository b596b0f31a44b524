//! The vhost-user socket of one volume.
//!
//! A volume is dedicated: one frontend at a time. A thread per volume owns the listening
//! socket. When a frontend connects it gets a fresh device ([`BlkBackend`]) with its own worker
//! threads and rings; while it stays connected, further connections are accepted and closed at
//! once (and logged). When it disconnects, its in-flight I/O is drained and the socket accepts
//! the next frontend.
//!
//! A volume with an [`Owner`] is served only to the owner's uid. The socket file belongs to
//! that uid with mode 0600, so other uids cannot connect; a peer that can anyway (root, or one
//! that connected before the owner changed and waited in the backlog) is checked at accept:
//! its `SO_PEERCRED` uid, fixed when it connected, must be the owner's, root's included, or the
//! connection is logged and closed before a message of it is read. An owner change re-chowns
//! the socket and drops the connection being served: it belongs to the previous assignment.
//! The check and the registration of an accepted connection happen under the owner's lock, so
//! a connection is either checked against the new owner or dropped by the change. Without an
//! owner the socket is storaged's with mode 0660 and every peer that can connect is served.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use super::VolumeIo;
use crate::cpus::CpuList;
use crate::lock;
use crate::volume::Owner;

/// Errors setting up a volume's socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("Cannot set permissions of {path}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot give {path} to uid {uid}")]
    Chown {
        path: PathBuf,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot start the socket thread for volume {volume}")]
    Thread {
        volume: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Default)]
struct ExportState {
    attached: AtomicBool,
    stopping: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
    /// The device of the connected frontend.
    device: Mutex<Option<Arc<BlkBackend>>>,
    /// The only uid served, if any; held while a connection is checked and registered.
    owner: Mutex<Option<Owner>>,
}

/// A volume being served on its vhost-user socket.
pub struct Export {
    volume: Arc<VolumeIo>,
    socket_path: PathBuf,
    state: Arc<ExportState>,
    stop: EventFd,
    /// The socket thread; taken by the first [`Export::stop`].
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Export {
    /// Binds the socket (listening when this returns), gives it to `owner` if there is one,
    /// and starts serving it on a thread of the data plane's `cpus` (all if none), where the
    /// queue workers it starts run too.
    pub fn start(
        volume: Arc<VolumeIo>,
        socket_path: &Path,
        owner: Option<&Owner>,
        cpus: Option<CpuList>,
    ) -> Result<Self, Error> {
        let listener = Listener::new(socket_path, true).map_err(|source| Error::Listen {
            path: socket_path.to_owned(),
            source,
        })?;
        set_socket_owner(socket_path, owner)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let state = Arc::new(ExportState {
            owner: Mutex::new(owner.cloned()),
            ..ExportState::default()
        });
        let server = Server {
            volume: volume.clone(),
            listener,
            stop: stop.try_clone().map_err(Error::EventFd)?,
            state: state.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("export-{}", volume.name))
            .spawn(move || {
                if let Some(Err(e)) = cpus.map(|c| c.pin_current_thread()) {
                    let name = &server.volume.name;
                    tracing::warn!(volume = %name, "the volume's queues run on the control plane's CPUs: {}", crate::error_chain(&e));
                }
                server.run()
            })
            .map_err(|source| Error::Thread {
                volume: volume.name.clone(),
                source,
            })?;
        Ok(Export {
            volume,
            socket_path: socket_path.to_owned(),
            state,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn volume(&self) -> &Arc<VolumeIo> {
        &self.volume
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// True while a frontend is connected.
    pub fn is_attached(&self) -> bool {
        self.state.attached.load(Ordering::Acquire)
    }

    /// Tells the connected frontend, if any, that the configuration space changed. Returns
    /// whether a notification went out.
    pub fn notify_config_change(&self) -> bool {
        lock(&self.state.device)
            .as_ref()
            .is_some_and(|d| d.notify_config_change())
    }

    /// Makes `owner` the only uid served (`None`: any peer that can connect) and gives it the
    /// socket. A change drops the connection being served, which belongs to the previous
    /// assignment; setting the owner there is already changes nothing.
    pub fn set_owner(&self, owner: Option<&Owner>) -> Result<(), Error> {
        let mut current = lock(&self.state.owner);
        if current.as_ref() == owner {
            return Ok(());
        }
        set_socket_owner(&self.socket_path, owner)?;
        *current = owner.cloned();
        if self.is_attached() {
            tracing::info!(volume = %self.volume.name, "owner changed: disconnecting the frontend");
            self.disconnect();
        }
        Ok(())
    }

    /// Closes the current frontend connection, if any (the socket keeps listening).
    pub fn disconnect(&self) {
        if let Some(conn) = lock(&self.state.connection).as_ref() {
            conn.shutdown();
        }
    }

    /// Stops accepting, closes the connection, waits for in-flight I/O and removes the socket.
    /// Returns when all of that is done, however long the backing storage takes to finish what
    /// it was given; a second call returns at once.
    pub fn stop(&self) {
        let Some(thread) = lock(&self.thread).take() else {
            return;
        };
        self.state.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        self.disconnect();
        if thread.join().is_err() {
            tracing::error!(volume = %self.volume.name, "socket thread panicked");
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a connection arriving while a frontend is attached waits for that frontend's
/// disconnection to finish before it is refused: a VMM that reconnects at once after closing
/// its socket is served, not refused.
const HANDOVER_WAIT_MS: i32 = 500;

/// Pause after an error that retrying at once would not fix.
const ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Waits until one of `fds` is readable; returns which are (None if poll fails).
fn poll_readable<const N: usize>(fds: [RawFd; N]) -> Option<[bool; N]> {
    poll_readable_for(fds, -1)
}

/// Waits up to `timeout_ms` (-1: forever) until one of `fds` is readable; returns which are
/// (None if poll fails).
fn poll_readable_for<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> Option<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: pfds is a valid array of N pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if rc >= 0 {
            return Some(pfds.map(|p| p.revents != 0));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            tracing::error!("poll failed: {err}");
            return None;
        }
    }
}

struct Server {
    volume: Arc<VolumeIo>,
    listener: Listener,
    stop: EventFd,
    state: Arc<ExportState>,
}

impl Server {
    fn stopping(&self) -> bool {
        self.state.stopping.load(Ordering::Acquire)
    }

    fn run(mut self) {
        let name = self.volume.name.clone();
        loop {
            let Some([incoming, stop]) =
                poll_readable([self.listener.as_raw_fd(), self.stop.as_raw_fd()])
            else {
                thread::sleep(ERROR_BACKOFF);
                continue;
            };
            if stop || self.stopping() {
                return;
            }
            if incoming {
                if let Err(e) = self.serve_one() {
                    tracing::error!(volume = %name, "frontend connection failed: {e}");
                    // Whatever failed (no memory, no threads, no fds) is not fixed by retrying
                    // at once.
                    thread::sleep(ERROR_BACKOFF);
                }
            }
        }
    }

    /// Sets up a device for the next frontend: fresh worker threads and rings.
    fn new_device(&self) -> Result<(Arc<BlkBackend>, VhostUserDaemon<Arc<BlkBackend>>), String> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(
            BlkBackend::new(self.volume.clone(), mem.clone())
                .map_err(|e| format!("cannot set up the device: {e}"))?,
        );
        let daemon = VhostUserDaemon::new(format!("vu-{}", self.volume.name), backend.clone(), mem)
            .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
        for (q, (handler, (completion, timer))) in daemon
            .get_epoll_handlers()
            .iter()
            .zip(backend.queue_fds())
            .enumerate()
        {
            handler
                .register_listener(completion, EventSet::IN, backend.completion_event_id(q))
                .map_err(|e| format!("cannot register the completion eventfd: {e}"))?;
            handler
                .register_listener(timer, EventSet::IN, backend.timer_event_id(q))
                .map_err(|e| format!("cannot register the throttling timerfd: {e}"))?;
        }
        Ok((backend, daemon))
    }

    /// Accepts one frontend and serves it until it disconnects (or the export stops). A peer
    /// that is not the owner is refused before any of its messages is read.
    fn serve_one(&mut self) -> Result<(), String> {
        let name = self.volume.name.clone();
        let stream = match self.listener.accept() {
            Ok(Some(stream)) => stream,
            // Gone before it was accepted.
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("cannot accept the frontend: {e}")),
        };
        let peer = peer_credentials(&stream);
        // Held until the connection is registered: an owner change either comes first (and
        // is what the peer is checked against) or finds the connection and drops it.
        let owner = lock(&self.state.owner);
        if let Some(o) = owner.as_ref() {
            match &peer {
                Ok(p) if p.uid == o.uid => {}
                Ok(p) => {
                    crate::volume_log!(
                        info,
                        &self.volume,
                        pid = p.pid,
                        uid = p.uid,
                        owner_uid = o.uid,
                        vm_id = o.vm_id.as_deref().unwrap_or(""),
                        "refused a frontend of another uid: the volume belongs to its owner's uid"
                    );
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
                Err(e) => {
                    crate::volume_log!(
                        info,
                        &self.volume,
                        "refused a frontend whose credentials cannot be read: {e}"
                    );
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
            }
        }
        let (backend, mut daemon) = self.new_device()?;
        let done = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let done_signal = done.try_clone().map_err(|e| e.to_string())?;
        self.listener.hand_over(stream);
        daemon
            .start(&mut self.listener)
            .map_err(|e| format!("cannot accept the frontend: {e}"))?;
        *lock(&self.state.connection) = daemon.shutdown_handle();
        backend.set_connection(daemon.shutdown_handle());
        *lock(&self.state.device) = Some(backend.clone());
        self.state.attached.store(true, Ordering::Release);
        drop(owner);
        self.volume.metrics.attached.set(1);
        match &peer {
            Ok(p) => tracing::info!(volume = %name, pid = p.pid, uid = p.uid, "frontend attached"),
            Err(_) => tracing::info!(volume = %name, "frontend attached"),
        }

        // The connection is served on the daemon's thread; a waiter thread turns its end into
        // an event this thread can poll beside the listener and the stop event.
        let waiter = thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || {
                let result = daemon.wait();
                let _ = done_signal.write(1);
                (daemon, result)
            });
        let result = match waiter {
            Ok(waiter) => {
                self.watch_connection(&done);
                match waiter.join() {
                    // Dropping the daemon stops and joins its worker threads; then no one
                    // submits I/O and what is in flight can be drained.
                    Ok((daemon, result)) => {
                        drop(daemon);
                        result.map_err(|e| e.to_string())
                    }
                    Err(_) => Err("connection thread panicked".to_string()),
                }
            }
            Err(e) => Err(format!("cannot start the waiter thread: {e}")),
        };
        lock(&self.state.connection).take();
        lock(&self.state.device).take();
        backend.drain();
        self.state.attached.store(false, Ordering::Release);
        self.volume.metrics.attached.set(0);
        if self.stopping() {
            // Keep the stop event readable for run().
            let _ = self.stop.write(1);
        }
        match result {
            Ok(()) => tracing::info!(volume = %name, "frontend detached"),
            Err(e) => tracing::info!(volume = %name, "frontend detached: {e}"),
        }
        Ok(())
    }

    /// While a frontend is attached: refuses other connections and passes a stop on to the
    /// connection. Returns when the connection has ended.
    fn watch_connection(&mut self, done: &EventFd) {
        loop {
            let Some([incoming, stop, finished]) = poll_readable([
                self.listener.as_raw_fd(),
                self.stop.as_raw_fd(),
                done.as_raw_fd(),
            ]) else {
                thread::sleep(ERROR_BACKOFF);
                continue;
            };
            if finished {
                return;
            }
            if stop {
                if let Some(conn) = lock(&self.state.connection).as_ref() {
                    conn.shutdown();
                }
                let _ = self.stop.read();
            }
            if incoming {
                // The attached frontend may be going away: if it finishes within the hand-over
                // wait, the newcomer stays queued and is served next.
                if let Some([true]) = poll_readable_for([done.as_raw_fd()], HANDOVER_WAIT_MS) {
                    return;
                }
                if let Ok(Some(stream)) = self.listener.accept() {
                    refuse_second(stream, &self.volume);
                }
            }
        }
    }
}

fn refuse_second(stream: UnixStream, volume: &VolumeIo) {
    let (pid, uid) = match peer_credentials(&stream) {
        Ok(p) => (i64::from(p.pid), i64::from(p.uid)),
        Err(_) => (-1, -1),
    };
    crate::volume_log!(
        info,
        volume,
        pid,
        uid,
        "refused a second frontend connection: the volume is attached to another one"
    );
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// The process at the other end of a Unix socket, as it was when it connected.
struct PeerCredentials {
    pid: i32,
    uid: u32,
}

fn peer_credentials(stream: &UnixStream) -> std::io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred that lives for the
    // call; the fd is open while `stream` is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
    })
}

/// Gives the socket file to the owner's uid with mode 0600, or without an owner to storaged's
/// own uid with mode 0660. The mode is narrowed to 0600 first, so that while ownership
/// changes no one gains access they are not to have.
fn set_socket_owner(path: &Path, owner: Option<&Owner>) -> Result<(), Error> {
    let permissions = |mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
            Error::Permissions {
                path: path.to_owned(),
                source,
            }
        })
    };
    let (uid, mode) = match owner {
        Some(o) => (o.uid, 0o600),
        // SAFETY: geteuid has no arguments and cannot fail.
        None => (unsafe { libc::geteuid() }, 0o660),
    };
    permissions(0o600)?;
    chown(path, Some(uid), None).map_err(|source| Error::Chown {
        path: path.to_owned(),
        uid,
        source,
    })?;
    permissions(mode)
}
