//! CPU affinity of the daemon's two kinds of threads (config `[cpus]`): the data plane (each
//! volume's socket thread, and the queue workers and io_uring workers it starts, which
//! inherit its CPUs) and the control plane (the main thread and the async runtime's threads:
//! the admin API, metrics, replication streams). Either set alone leaves the other kind on
//! every CPU the daemon may use.
//!
//! A set is written as Linux writes CPU lists (`cpuset(7)`): `"0-3,8,10-11"`.

use std::fmt;
use std::io;

/// Highest CPU number a set can hold (`CPU_SETSIZE` less one).
pub const MAX_CPU: usize = libc::CPU_SETSIZE as usize - 1;

/// Errors parsing or applying a CPU list.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("'{0}' is not a CPU list (such as 0-3,8)")]
    Syntax(String),
    #[error("CPU {0} is past the highest a set can hold ({MAX_CPU})")]
    TooHigh(usize),
    #[error("the CPU list is empty")]
    Empty,
    #[error("CPUs {missing} are not among those this daemon may run on ({allowed})")]
    NotAllowed { missing: CpuList, allowed: CpuList },
    #[error("cannot read the CPUs this daemon may run on")]
    GetAffinity(#[source] io::Error),
    #[error("cannot move the thread to CPUs {cpus}")]
    SetAffinity {
        cpus: CpuList,
        #[source]
        source: io::Error,
    },
}

/// A set of CPUs, in ascending order without repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// Parses a Linux CPU list: comma-separated numbers and inclusive ranges.
    pub fn parse(text: &str) -> Result<CpuList, Error> {
        let syntax = || Error::Syntax(text.to_owned());
        let number = |s: &str| -> Result<usize, Error> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            let n: usize = s.parse().map_err(|_| Error::TooHigh(usize::MAX))?;
            if n > MAX_CPU {
                return Err(Error::TooHigh(n));
            }
            Ok(n)
        };
        let mut cpus = Vec::new();
        for part in text.split(',') {
            match part.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if first > last {
                        return Err(syntax());
                    }
                    cpus.extend(first..=last);
                }
                None => cpus.push(number(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            return Err(Error::Empty);
        }
        Ok(CpuList(cpus))
    }

    /// The CPUs the calling thread may run on.
    pub fn allowed() -> Result<CpuList, Error> {
        // SAFETY: cpu_set_t is plain bits; all zeros is an empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is the calling thread.
        let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        if r != 0 {
            return Err(Error::GetAffinity(io::Error::last_os_error()));
        }
        // SAFETY: CPU_ISSET reads a bit of a valid set, each index below CPU_SETSIZE.
        let cpus = (0..=MAX_CPU)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect();
        Ok(CpuList(cpus))
    }

    /// This set, if every CPU in it is one the calling thread may run on.
    pub fn check_allowed(self) -> Result<CpuList, Error> {
        let allowed = Self::allowed()?;
        let missing: Vec<usize> = self
            .0
            .iter()
            .copied()
            .filter(|c| !allowed.0.contains(c))
            .collect();
        if missing.is_empty() {
            Ok(self)
        } else {
            Err(Error::NotAllowed {
                missing: CpuList(missing),
                allowed,
            })
        }
    }

    /// Moves the calling thread onto these CPUs; threads it starts afterwards inherit them.
    pub fn pin_current_thread(&self) -> Result<(), Error> {
        // SAFETY: cpu_set_t is plain bits; all zeros is an empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in &self.0 {
            // SAFETY: `c` is at most MAX_CPU (checked by `parse`), within the set.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is the calling thread.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        if r != 0 {
            return Err(Error::SetAffinity {
                cpus: self.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for CpuList {
    /// The list as Linux writes it, runs of CPUs as ranges.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut sep = "";
        while i < self.0.len() {
            let first = self.0[i];
            let mut last = first;
            while i + 1 < self.0.len() && self.0[i + 1] == last + 1 {
                i += 1;
                last = self.0[i];
            }
            if first == last {
                write!(f, "{sep}{first}")?;
            } else {
                write!(f, "{sep}{first}-{last}")?;
            }
            sep = ",";
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_linux_writes_them_and_print_back_in_short() {
        let l = CpuList::parse("8,0-3, 2,10-11").unwrap();
        assert_eq!(l.0, vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(l.to_string(), "0-3,8,10-11");
        assert_eq!(CpuList::parse("5").unwrap().to_string(), "5");
    }

    #[test]
    fn malformed_lists_are_refused() {
        for bad in ["", "a", "1-", "-1", "3-1", "1,,2", "+1", "1-2-3"] {
            assert!(CpuList::parse(bad).is_err(), "{bad:?} was taken");
        }
        assert!(matches!(CpuList::parse("1024"), Err(Error::TooHigh(1024))));
    }

    #[test]
    fn a_thread_pinned_runs_only_on_its_cpus_and_its_children_inherit_them() {
        let allowed = CpuList::allowed().unwrap();
        let first = CpuList(vec![allowed.0[0]]);
        let (mine, child) = std::thread::spawn(move || {
            first.pin_current_thread().unwrap();
            let child = std::thread::spawn(|| CpuList::allowed().unwrap())
                .join()
                .unwrap();
            (CpuList::allowed().unwrap(), child)
        })
        .join()
        .unwrap();
        assert_eq!(mine.0, vec![allowed.0[0]]);
        assert_eq!(child, mine);
        // The test's own thread kept every CPU.
        assert_eq!(CpuList::allowed().unwrap(), allowed);
    }

    #[test]
    fn cpus_the_daemon_may_not_use_are_named() {
        let e = CpuList::parse(&MAX_CPU.to_string())
            .unwrap()
            .check_allowed()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("CPUs {MAX_CPU} are not among")),
            "{e}"
        );
    }
}
