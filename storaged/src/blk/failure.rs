//! A volume whose storage lost written data: a FLUSH (`fdatasync`) failed.
//!
//! When write-back fails, the kernel may mark the dirty pages clean and drop them, and reports
//! the error once (errseq, Linux 4.13 on): the next `fdatasync` succeeds although the data
//! never reached the disk, as PostgreSQL learned in 2018. So the first failed FLUSH (or final
//! sync at shutdown) fails the volume. From then on FLUSH, writes, write-zeroes and discards
//! are answered IOERR, without reaching the storage (a request in flight when the volume
//! fails is answered IOERR at its completion): the guest is never again told its data is safe,
//! nor writes on top of what was lost. Reads are still served, so the guest can copy off what
//! it can. Only an operator clears the state (`POST /v1/volumes/{name}/clear-failure`), having
//! dealt with the storage and the guest's data.
//!
//! The failure is recorded in `DATA_DIR/failed/ID.json`, written and fsynced by the queue
//! worker before the FLUSH that found it is answered, so a restart, which forgets what the page
//! cache knew, keeps the volume failed. (The catalog is written by the control plane under its
//! lock, which a data-path thread must not wait for.) A record that cannot be read keeps the
//! volume failed too.
//!
//! What does not fail the volume: a write, read or discard that fails. Its error is reported
//! for that request, and nothing was reported as done that was not (a full file system's
//! `ENOSPC` goes away with room).
//!
//! At the edges: the kernel reports the error to one `fdatasync` of the file, so a FLUSH that
//! ran at the same time on another queue may succeed; if its answer comes before the failing
//! one's, it is answered OK. Every FLUSH answered after that is IOERR.

use std::fs::{self, DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use prometheus::IntGauge;
use serde::{Deserialize, Serialize};

use super::request::Operation;

/// Errors writing or removing a failure record.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot write the failure record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot remove the failure record {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why and when a volume failed; the content of its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoFailure {
    /// What failed, e.g. "fdatasync failed: Input/output error (os error 5)".
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// Where the failure record of the volume with id `id` lives.
pub fn record_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("failed").join(format!("{id}.json"))
}

/// Whether a failed volume answers `op` with IOERR: everything that writes or promises that
/// writes are durable.
pub fn refused(op: &Operation) -> bool {
    match op {
        Operation::Write { .. }
        | Operation::Flush
        | Operation::Discard(_)
        | Operation::WriteZeroes(_) => true,
        Operation::Read { .. } | Operation::GetId { .. } => false,
    }
}

fn now() -> u64 {
    crate::unix_time().as_secs()
}

/// The failed state of one volume, shared by its queues and the control plane.
pub struct FailureState {
    /// Read on every completion, so the data path takes no lock.
    failed: AtomicBool,
    /// The failure as the control plane reads it; held only to read or change it, never
    /// across I/O, so a hung disk under the record cannot hold up the admin API.
    record: Mutex<Option<IoFailure>>,
    /// Serialises writing and removing the record file.
    io: Mutex<()>,
    path: PathBuf,
    /// `storaged_volume_failed`: 1 while failed.
    gauge: IntGauge,
}

impl FailureState {
    /// The state the record at `path` gives: failed if there is one, or one that cannot be
    /// read (the reason says so).
    pub fn load(path: PathBuf, gauge: IntGauge) -> Self {
        let record = match fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes).unwrap_or_else(|e| IoFailure {
                    reason: format!("failure record {} is corrupt: {e}", path.display()),
                    at: now(),
                }),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(IoFailure {
                reason: format!("cannot read failure record {}: {e}", path.display()),
                at: now(),
            }),
        };
        gauge.set(i64::from(record.is_some()));
        FailureState {
            failed: AtomicBool::new(record.is_some()),
            record: Mutex::new(record),
            io: Mutex::new(()),
            path,
            gauge,
        }
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why and when the volume failed, if it did.
    pub fn get(&self) -> Option<IoFailure> {
        crate::lock(&self.record).clone()
    }

    /// Fails the volume, records it and logs it; a volume already failed keeps its first
    /// failure and logs nothing.
    pub fn fail(&self, volume: &str, reason: String) {
        let failure = {
            let mut record = crate::lock(&self.record);
            if record.is_some() {
                return;
            }
            let failure = IoFailure { reason, at: now() };
            *record = Some(failure.clone());
            // Other queues answer IOERR from here on, while the record is written.
            self.failed.store(true, Ordering::Release);
            self.gauge.set(1);
            failure
        };
        tracing::error!(
            volume = %volume,
            reason = %failure.reason,
            "volume marked failed: data written since its last successful flush may be lost; \
             FLUSH, writes and discards are answered IOERR until an operator clears the failure"
        );
        let _io = crate::lock(&self.io);
        if !self.is_failed() {
            // Cleared by the operator before it could be written.
            return;
        }
        if let Err(e) = self.persist(&failure) {
            tracing::error!(
                volume = %volume,
                "the failure is not recorded, a restart would forget it: {}",
                crate::error_chain(&e)
            );
        }
    }

    /// Clears a failure (the operator's decision) and returns it; None if there was none.
    pub fn clear(&self) -> Result<Option<IoFailure>, Error> {
        let _io = crate::lock(&self.io);
        if crate::lock(&self.record).is_none() {
            return Ok(None);
        }
        let err = |source| Error::Remove {
            path: self.path.clone(),
            source,
        };
        match fs::remove_file(&self.path) {
            Ok(()) => sync_parent(&self.path).map_err(err)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let mut record = crate::lock(&self.record);
        self.gauge.set(0);
        self.failed.store(false, Ordering::Release);
        Ok(record.take())
    }

    fn persist(&self, failure: &IoFailure) -> Result<(), Error> {
        let err = |source| Error::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            if !dir.exists() {
                DirBuilder::new().mode(0o700).create(dir).map_err(err)?;
                sync_parent(dir).map_err(err)?;
            }
        }
        let mut bytes = serde_json::to_vec_pretty(failure).map_err(|e| err(e.into()))?;
        bytes.push(b'\n');
        crate::catalog::write_atomically(&self.path, &bytes).map_err(err)
    }
}

/// Makes a new or removed directory entry durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> IntGauge {
        IntGauge::new("failed", "test").unwrap()
    }

    #[test]
    fn a_failure_is_kept_across_reloads_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "id-1");
        let state = FailureState::load(path.clone(), gauge());
        assert!(!state.is_failed());
        state.fail("v", "fdatasync failed: Input/output error".into());
        state.fail("v", "a second failure".into());
        let first = state.get().unwrap();
        assert_eq!(first.reason, "fdatasync failed: Input/output error");
        let reloaded = FailureState::load(path.clone(), gauge());
        assert!(reloaded.is_failed());
        assert_eq!(reloaded.get(), Some(first.clone()));
        assert_eq!(reloaded.clear().unwrap(), Some(first));
        assert!(!reloaded.is_failed() && reloaded.gauge.get() == 0);
        assert_eq!(reloaded.clear().unwrap(), None, "cleared twice");
        assert!(!FailureState::load(path, gauge()).is_failed());
    }

    #[test]
    fn an_unreadable_record_keeps_the_volume_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "id-2");
        fs::create_dir(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{\"reason\": 3").unwrap();
        let state = FailureState::load(path, gauge());
        assert!(state.is_failed() && state.gauge.get() == 1);
        assert!(state.get().unwrap().reason.contains("corrupt"));
    }

    #[test]
    fn reads_are_served_and_everything_that_writes_is_refused() {
        assert!(refused(&Operation::Flush));
        assert!(refused(&Operation::Write {
            offset: 0,
            len: 4096
        }));
        assert!(refused(&Operation::Discard(Vec::new())));
        assert!(refused(&Operation::WriteZeroes(Vec::new())));
        assert!(!refused(&Operation::Read {
            offset: 0,
            len: 4096
        }));
        assert!(!refused(&Operation::GetId { len: 20 }));
    }
}
