//! How things end: why the VM ended ([`Exit`]), the code the process exits with
//! ([`ProcessExit`], the table `vmm --help` prints and the README lists), and the kinds of
//! vCPU exit the VM counts ([`ExitKind`], `GET /v1/vm/counters`).

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest reset the machine (i8042, or KVM's reset system event).
    Reset,
    /// The guest powered off (ACPI S5, or KVM's shutdown system event).
    PowerOff,
    /// The guest crashed (triple fault, or a crash it reported: KVM's crash system event) or
    /// KVM could not run it.
    Crash(String),
    /// A signal (SIGTERM, SIGINT) stopped the VMM.
    Signal(i32),
    /// `POST /v1/vm/shutdown`.
    ApiShutdown,
    /// `POST /v1/vm/kill`.
    ApiKill,
}

impl Exit {
    /// What the process exits with when the VM ended so.
    pub fn process_exit(&self) -> ProcessExit {
        match self {
            Exit::Reset | Exit::PowerOff | Exit::ApiShutdown => ProcessExit::Ended,
            Exit::Crash(_) => ProcessExit::Crashed,
            Exit::ApiKill => ProcessExit::Killed,
            Exit::Signal(n) => ProcessExit::Signal(*n),
        }
    }

    /// The process exit code (see [`ProcessExit`]).
    pub fn code(&self) -> i32 {
        i32::from(self.process_exit().code())
    }
}

/// What the process exits with. [`ProcessExit::TABLE`] says it in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessExit {
    /// 0: the guest reset or powered off, or the API shut the VM down.
    Ended,
    /// 1: the VMM failed.
    Failed,
    /// 2: the configuration was refused before the guest started.
    Refused,
    /// 3: the guest crashed or KVM could not run it.
    Crashed,
    /// 4: the API killed the VM.
    Killed,
    /// 128 + N: stopped by signal N.
    Signal(i32),
}

impl ProcessExit {
    /// Each exit code and what it means, in order; `vmm --help` prints it and the README's
    /// list starts each item with it.
    pub const TABLE: [(&'static str, &'static str); 6] = [
        (
            "0",
            "the guest reset or powered off, or the API shut the VM down",
        ),
        ("1", "the VMM failed"),
        (
            "2",
            "the configuration was refused before the guest started",
        ),
        ("3", "the guest crashed or KVM could not run it"),
        ("4", "the API killed the VM"),
        ("128+N", "stopped by signal N (SIGTERM: 143)"),
    ];

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            ProcessExit::Ended => 0,
            ProcessExit::Failed => 1,
            ProcessExit::Refused => 2,
            ProcessExit::Crashed => 3,
            ProcessExit::Killed => 4,
            ProcessExit::Signal(n) => (128 + n) as u8,
        }
    }

    /// [`ProcessExit::TABLE`] as `--help` text.
    pub fn help() -> String {
        let mut s = String::from("Exit codes:");
        for (code, what) in Self::TABLE {
            s.push_str(&format!("\n  {code:<7} {what}"));
        }
        s
    }
}

impl From<ProcessExit> for std::process::ExitCode {
    fn from(e: ProcessExit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// The kinds of vCPU exit counted, in the order of their counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    /// `KVM_RUN` returned EINTR or EAGAIN: kicked (pause) or interrupted.
    Interrupted,
    /// A triple fault.
    Shutdown,
    /// Every other exit: those that end the VM (system events, internal errors, unhandled).
    Other,
}

impl ExitKind {
    /// Every kind, each at its [`ExitKind::index`].
    pub const ALL: [ExitKind; 8] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Interrupted,
        ExitKind::Shutdown,
        ExitKind::Other,
    ];

    /// Where the kind's counter is.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind's name in `GET /v1/vm/counters` (`vcpu_exits`).
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Shutdown => "shutdown",
            ExitKind::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_exit_kind_is_at_its_index_under_a_name_of_its_own() {
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
        let mut names: Vec<_> = ExitKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ExitKind::ALL.len());
    }

    #[test]
    fn the_exit_codes_are_the_table_in_order() {
        let codes = [
            ProcessExit::Ended,
            ProcessExit::Failed,
            ProcessExit::Refused,
            ProcessExit::Crashed,
            ProcessExit::Killed,
        ]
        .map(|e| e.code().to_string());
        let table: Vec<_> = ProcessExit::TABLE.iter().map(|(c, _)| *c).collect();
        assert_eq!(&table[..5], codes);
        assert_eq!(ProcessExit::Signal(libc::SIGTERM).code(), 143);
        assert_eq!(Exit::Signal(libc::SIGINT).code(), 130);
        assert_eq!(Exit::ApiKill.code(), 4);
    }

    #[test]
    fn the_readme_lists_every_exit_code_as_the_table_says_it() {
        let readme = include_str!("../../README.md");
        for (code, what) in ProcessExit::TABLE {
            let item = format!("  - {code}: {what}");
            assert!(readme.contains(&item), "README.md lacks '{item}'");
        }
    }
}
