//! The system calls the agent makes itself, each behind a small wrapper that holds the
//! `unsafe`: a process's pidfd, reaping a child through it, signalling it, the pid serving a
//! Unix socket.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

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

/// The pid of the process serving the Unix socket at `path` (its peer credential,
/// `SO_PEERCRED`), if one accepts connections there.
pub fn socket_peer_pid(path: &std::path::Path) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let stream = std::os::unix::net::UnixStream::connect(path).ok()?;
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
