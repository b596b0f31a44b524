//! What the main thread, the vCPU threads and the API share: how the VM ended (the first
//! [`Exit`] reported), pausing, and the vCPU exit counters (by [`ExitKind`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::exit::{Exit, ExitKind};
use crate::sys;

/// Shared state of a running VM.
pub struct Control {
    exit: Mutex<Option<Exit>>,
    /// Readable once the VM has ended.
    pub exit_event: EventFd,
    pause: AtomicBool,
    parked: AtomicUsize,
    gate: Mutex<()>,
    resumed: Condvar,
    threads: Mutex<Vec<sys::Thread>>,
    /// vCPU exits counted, by [`ExitKind::index`].
    exits: [AtomicU64; ExitKind::ALL.len()],
    pub vcpus: usize,
}

/// Signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Installs the (empty) handler of [`kick_signal`], so it interrupts KVM_RUN (no
/// SA_RESTART: it returns EINTR) instead of killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    sys::install_empty_handler(kick_signal())
}

impl Control {
    pub fn new(vcpus: usize) -> std::io::Result<Control> {
        Ok(Control {
            exit: Mutex::new(None),
            exit_event: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
            pause: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            gate: Mutex::new(()),
            resumed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            exits: Default::default(),
            vcpus,
        })
    }

    /// Records how the VM ended; the first report wins.
    pub fn end(&self, e: Exit) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(e);
            let _ = self.exit_event.write(1);
        }
    }

    pub fn ended(&self) -> Option<Exit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Called by each vCPU thread once, to be kicked on pause.
    pub fn register_vcpu_thread(&self) {
        let me = sys::current_thread();
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(me);
    }

    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Called by a vCPU thread before each KVM_RUN: parks it while the VM is paused.
    pub fn park_if_paused(&self) {
        if !self.pause.load(Ordering::Acquire) {
            return;
        }
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        self.parked.fetch_add(1, Ordering::AcqRel);
        while self.pause.load(Ordering::Acquire) && self.ended().is_none() {
            g = self
                .resumed
                .wait_timeout(g, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }

    /// Stops every vCPU; returns once all are parked. False (and the VM left running) if that
    /// takes more than a second, or the VM has ended: its vCPU threads may be gone.
    pub fn pause(&self) -> bool {
        if self.ended().is_some() {
            return false;
        }
        self.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.parked.load(Ordering::Acquire) < self.vcpus {
            if Instant::now() > deadline || self.ended().is_some() {
                self.resume();
                return false;
            }
            // A kick that lands just before KVM_RUN is lost: kick until all are parked.
            for t in self
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                // SAFETY: `t` is a vCPU thread of this process; they only return after the VM
                // has ended, which was checked just above (a kick racing that end finds the
                // thread still on its way out of its loop).
                let _ = unsafe { sys::signal_thread(*t, kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn resume(&self) {
        let _g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        self.pause.store(false, Ordering::Release);
        self.resumed.notify_all();
    }

    /// Counts a vCPU exit of `kind`.
    pub fn count(&self, kind: ExitKind) {
        self.exits[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The vCPU exits of `kind` so far.
    pub fn exits(&self, kind: ExitKind) -> u64 {
        self.exits[kind.index()].load(Ordering::Relaxed)
    }
}
