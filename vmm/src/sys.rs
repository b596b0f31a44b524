//! The system calls vmm makes itself, each behind a small wrapper that holds the `unsafe`
//! and says why it is sound; callers get `io::Result`s. What the rust-vmm crates already
//! wrap (KVM ioctls in `kvm-ioctls`, eventfds in `vmm-sys-util`, mappings in `vm-memory`) is
//! used from them directly.
//!
//! - Guest memory: a sealable memfd, its seals, `MADV_HUGEPAGE` on its mapping.
//! - Stop signals: blocked and read from a signalfd; `poll` for readable descriptors.
//! - vCPU kicks: a signal handler that does nothing, and a signal sent to one thread.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// A thread of this process, as `pthread_kill` names it.
pub type Thread = libc::pthread_t;

/// `-1` from a libc call: the error in `errno`.
fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new memfd named `name`, close-on-exec and open to seals (`MFD_ALLOW_SEALING`).
pub fn memfd_create_sealable(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the result is checked.
    let fd = check(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Adds `seals` (`F_SEAL_*`) to a memfd.
pub fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int and touches no memory of ours; `file` is open.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(())
}

/// The seals (`F_SEAL_*`) a memfd has.
pub fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours; `file` is open.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) })
}

/// Advises the `len` bytes mapped at `addr` for transparent huge pages (`MADV_HUGEPAGE`).
/// Fails on a kernel without them, or a range that is not mapped.
pub fn advise_huge_pages(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: MADV_HUGEPAGE changes how a mapping is backed, never what it holds, and the
    // kernel checks the range: no memory of ours changes, whatever `addr` and `len` are.
    check(unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) })?;
    Ok(())
}

/// Blocks `signals` in the calling thread (and so in the threads it starts afterwards) and
/// returns a signalfd (blocking, close-on-exec) that reads them.
pub fn block_signals_to_signalfd(signals: &[libc::c_int]) -> io::Result<File> {
    // SAFETY: sigset_t is plain data; all zeroes is a valid value, emptied next.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset and sigaddset only write the set they are given; the signal
    // numbers are checked by sigaddset.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in signals {
            check(libc::sigaddset(&mut set, *s))?;
        }
    }
    // SAFETY: reads the set; changes only this thread's signal mask.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: -1 asks for a new signalfd; it reads the set; the result is checked.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) })?;
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reads one signal from a signalfd: its number. Blocks if none is pending.
pub fn read_signal(signalfd: &File) -> io::Result<libc::c_int> {
    // SAFETY: signalfd_siginfo is plain data; all zeroes is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    // SAFETY: reads at most size_of::<signalfd_siginfo>() bytes into `info`, which is that
    // large.
    let r = unsafe {
        libc::read(
            signalfd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            std::mem::size_of::<libc::signalfd_siginfo>(),
        )
    };
    match r {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(info.ssi_signo as libc::c_int),
    }
}

/// Waits until one of `fds` is readable, at most `timeout_ms` milliseconds (-1: no limit, 0:
/// does not wait); says which are (`POLLIN`).
pub fn poll_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `polled` holds N pollfds, which poll only reads and writes; a descriptor that
    // is not open comes back as POLLNVAL, not as an error.
    check(unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, timeout_ms) })?;
    Ok(polled.map(|p| p.revents & libc::POLLIN != 0))
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs a handler that does nothing for `signal`, without SA_RESTART: the signal
/// interrupts the system call it lands in (which returns EINTR) instead of ending the
/// process.
pub fn install_empty_handler(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: sigaction is plain data; all zeroes is a valid value (no flags, an empty mask
    // once emptied), filled in next.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = ignore_signal as *const () as usize;
    // SAFETY: sigemptyset writes the mask it is given; sigaction reads `sa`, whose handler is
    // a function of this program that does nothing (async-signal-safe).
    check(unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(signal, &sa, std::ptr::null_mut())
    })?;
    Ok(())
}

/// The calling thread.
pub fn current_thread() -> Thread {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Sends `signal` to `thread`.
///
/// # Safety
///
/// `thread` must be a thread of this process that has not been joined or, detached, has
/// not ended: the ID of any other is undefined behaviour to `pthread_kill`.
pub unsafe fn signal_thread(thread: Thread, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller's promise above.
    let r = unsafe { libc::pthread_kill(thread, signal) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A pipe whose write end holds at most `size` bytes (`F_SETPIPE_SZ`): (read end, write
/// end), close-on-exec.
#[cfg(test)]
pub fn pipe_of_size(size: libc::c_int) -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which has room for them; checked.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both are new descriptors nobody else owns.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours; `write` is open.
    check(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) })?;
    Ok((read, write))
}
