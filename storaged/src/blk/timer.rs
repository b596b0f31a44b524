//! A one-shot, non-blocking timerfd: a queue worker sleeps in its epoll loop until a throttled
//! request's tokens are there, or until its volume's limits change (the timer is the queue's
//! [`QueueWaker`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::qos::QueueWaker;

/// A CLOCK_MONOTONIC timerfd, non-blocking and close-on-exec.
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    /// Fires once, `after` from now (at least 1 ns: zero would disarm it). Replaces any
    /// earlier setting.
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        self.settime(&spec)
    }

    /// Stops the timer and clears a pending expiry.
    pub fn disarm(&self) -> io::Result<()> {
        // SAFETY: an all-zero itimerspec is a valid value (it disarms the timer).
        let spec: libc::itimerspec = unsafe { std::mem::zeroed() };
        self.settime(&spec)?;
        self.clear();
        Ok(())
    }

    /// Consumes the expiry count, so epoll stops reporting the fd.
    pub fn clear(&self) {
        let mut count = 0u64;
        // SAFETY: reads at most 8 bytes into `count`; the fd is non-blocking, so an unexpired
        // timer returns EAGAIN instead of blocking.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn settime(&self, spec: &libc::itimerspec) -> io::Result<()> {
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A queue's timer, fired at once when its volume's limits change, so that the worker checks
/// its waiting request against the new ones.
impl QueueWaker for Timer {
    fn wake(&self) {
        let _ = self.arm(Duration::from_nanos(1));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::qos::{Limits, Overrides, QosConfig, QosSlot, TB};
    use crate::volume::Tier;

    fn readable(t: &Timer, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: t.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
    }

    #[test]
    fn fires_once_and_clears() {
        let t = Timer::new().unwrap();
        assert!(!readable(&t, 0));
        t.arm(Duration::from_micros(100)).unwrap();
        assert!(readable(&t, 5000));
        t.clear();
        assert!(!readable(&t, 10));
    }

    #[test]
    fn disarm_cancels_a_pending_expiry() {
        let t = Timer::new().unwrap();
        t.arm(Duration::from_millis(20)).unwrap();
        t.disarm().unwrap();
        assert!(!readable(&t, 60));
    }

    #[test]
    fn a_limit_change_wakes_the_queues_at_once() {
        let slot = QosSlot::default();
        let timer = Arc::new(Timer::new().unwrap());
        slot.add_waker(&timer);
        timer.arm(Duration::from_secs(3600)).unwrap();
        let overrides = Overrides {
            iops_limit: Some(100),
            bandwidth_limit: None,
        };
        slot.set(&Limits::compute(
            &QosConfig::default(),
            Tier::Mass,
            TB,
            overrides,
        ));
        assert!(readable(&timer, 5000));
        assert!(slot.current().1.is_some());
    }
}
