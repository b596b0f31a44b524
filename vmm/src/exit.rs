//! How things end: why the VM ended ([`Exit`]), the code the process exits with
//! ([`ProcessExit`], the table `vmm --help` prints and the README lists), and the kinds of
//! vCPU exit the VM counts ([`ExitKind`], `GET /v1/vm/counters`). The last two are the API's
//! types (`vmm-api`).

pub use vmm_api::{ExitKind, ProcessExit};

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
