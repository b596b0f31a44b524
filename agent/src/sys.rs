//! The system calls the agent makes itself, each behind a small wrapper that holds the
//! `unsafe`: a process's pidfd, reaping a child through it, signalling it, the pid serving a
//! Unix socket; and opening the files of a directory a jailed vmm's uid owns, where a name
//! may have been made a symlink, a FIFO or another uid's file.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// How a reaped child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    Code(i32),
    Signal(i32),
}

/// A pidfd for process `pid` (`pidfd_open(2)`): readable once the process has ended.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reaps the child behind `pidfd` if it has ended (`waitid(P_PIDFD, WEXITED | WNOHANG)`):
/// `Ok(None)` while it runs; `Err` with ECHILD for a process that is not this one's child.
pub fn reap(pidfd: &OwnedFd) -> io::Result<Option<ChildExit>> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed siginfo_t is valid; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a descriptor `pidfd` owns, writing one siginfo_t alive for the call.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid, si_pid and si_status are the fields it set (si_pid 0:
    // nothing to reap yet).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        ChildExit::Code(status)
    } else {
        ChildExit::Signal(status)
    }))
}

/// Sends `sig` to the process behind `pidfd` (`pidfd_send_signal(2)`): never to a process
/// that reused its pid.
pub fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a descriptor `pidfd` owns, a signal number, no siginfo (null), no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the process behind `pidfd` still exists (signal 0).
pub fn alive(pidfd: &OwnedFd) -> bool {
    pidfd_signal(pidfd, 0).is_ok()
}

/// The real uid of process `pid` (`/proc/PID/status`).
pub fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The pid of the process serving the Unix socket at `path` (its peer credential,
/// `SO_PEERCRED`), if one accepts connections there.
pub fn socket_peer_pid(path: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // Bounded: a vmm (its guest's, if taken over) that accepts nothing cannot hold the agent.
    let stream = unix_http::connect(path, std::time::Duration::from_secs(1)).ok()?;
    // SAFETY: a zeroed ucred is valid; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt on a descriptor `stream` owns, writing one ucred of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// Opens `path` without following a symlink (`O_PATH | O_NOFOLLOW`) and checks what it is:
/// `Err` unless it has type `kind` (`S_IFSOCK`, `S_IFREG`) and belongs to one of `owners`.
fn open_checked(path: &Path, flags: i32, kind: u32, owners: &[u32]) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open(2) of a NUL-terminated path alive for the call; returns a new descriptor
    // or -1.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
    use std::os::unix::fs::MetadataExt;
    if meta.mode() & libc::S_IFMT != kind || !owners.contains(&meta.uid()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: not of the kind or owner expected", path.display()),
        ));
    }
    Ok(fd)
}

/// A Unix socket found without following a symlink and owned by an expected uid, reached
/// through its descriptor (`/proc/self/fd/N`, which a connect resolves to the socket itself)
/// for as long as this is held. A short path too, whatever the socket's.
pub struct SocketRef {
    fd: OwnedFd,
}

impl SocketRef {
    pub fn open(path: &Path, owners: &[u32]) -> io::Result<SocketRef> {
        open_checked(path, libc::O_PATH, libc::S_IFSOCK, owners).map(|fd| SocketRef { fd })
    }

    /// The path to connect to.
    pub fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Opens a regular file of one of `owners` for reading, without following a symlink and
/// without waiting on a FIFO.
pub fn open_own_file(path: &Path, owners: &[u32]) -> io::Result<std::fs::File> {
    let fd = open_checked(
        path,
        libc::O_RDONLY | libc::O_NONBLOCK,
        libc::S_IFREG,
        owners,
    )?;
    Ok(std::fs::File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The children are reaped through their pidfds, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn a_child_is_reaped_through_its_pidfd_with_its_code_and_signal() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let exit = loop {
            if let Some(e) = reap(&fd).unwrap() {
                break e;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(exit, ChildExit::Code(7));

        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        assert_eq!(reap(&fd).unwrap(), None);
        pidfd_signal(&fd, libc::SIGKILL).unwrap();
        let exit = loop {
            if let Some(e) = reap(&fd).unwrap() {
                break e;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(exit, ChildExit::Signal(libc::SIGKILL));
    }

    #[test]
    fn a_sockets_server_is_its_peer_credential() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(socket_peer_pid(&path), Some(std::process::id()));
        assert_eq!(socket_peer_pid(&dir.path().join("none.sock")), None);
    }

    #[test]
    fn a_process_that_is_not_a_child_cannot_be_reaped() {
        // PID 1 is no one's child.
        let fd = pidfd_open(1).unwrap();
        assert_eq!(reap(&fd).unwrap_err().raw_os_error(), Some(libc::ECHILD));
    }
}
