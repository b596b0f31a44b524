//! The agent's state: an embedded database (redb) in the data dir, every change one write
//! transaction (committed durably, or not at all). Each table maps a name to the JSON of its
//! record, so that a record can gain fields without a migration.
//!
//! - `tenants`: tenant name → [`TenantRecord`] (its token's hash, never the token);
//! - `volumes`: `TENANT/NAME` → [`VolumeRecord`] (which storaged volume it is);
//! - `vms`: `TENANT/ID` → [`VmRecord`] (its spec, whether it should run, its process).
//!
//! redb locks the file: a second agent on the same data dir is refused at open.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("State database {path}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("State database: the token hash of tenant {tenant} is not 64 hex digits")]
    BadHash { tenant: String },
    #[error("State database {path}: the record of {key:?} in {table} does not decode")]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The first VM of `prefix` (a tenant's keys) with a volume `wanted` names: the volume and
/// the VM's id.
fn attached(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<Option<(String, String)>, TxError> {
    for entry in t.range(prefix..)? {
        let (k, v) = entry?;
        if !k.value().starts_with(prefix) {
            break;
        }
        // A record that does not decode holds nothing: the next read of it says so.
        let Ok(vm) = serde_json::from_slice::<VmRecord>(v.value()) else {
            continue;
        };
        if let Some(vol) = vm.spec.volumes.iter().find(|x| wanted(&x.name)) {
            return Ok(Some((vol.name.clone(), vm.id)));
        }
    }
    Ok(None)
}

/// redb's error (large, so boxed) as the closures run in a transaction return it.
struct TxError(Box<redb::Error>);

macro_rules! tx_error_from {
    ($($e:ty),*) => {$(
        impl From<$e> for TxError {
            fn from(e: $e) -> Self {
                TxError(Box::new(e.into()))
            }
        }
    )*};
}
tx_error_from!(redb::TableError, redb::StorageError, redb::Error);

/// A tenant as the database keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub name: String,
    /// The SHA-256 of its token, in hex.
    pub token_sha256: String,
    pub created_unix: u64,
}

/// A tenant's volume as the database keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub tenant: String,
    pub name: String,
    /// Its name in storaged.
    pub storaged_name: String,
    /// False from before storaged is asked to create it until it has: a record found so at
    /// start is settled by asking storaged whether the volume exists.
    pub created: bool,
    /// Set (in the transaction that checks no VM has it) before storaged is asked to delete
    /// it: no VM attaches it from then on.
    #[serde(default)]
    pub deleting: bool,
}

impl VolumeRecord {
    fn key(tenant: &str, name: &str) -> String {
        format!("{tenant}/{name}")
    }
}

/// What [`Store::insert_vm`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    Yes,
    /// The tenant has a VM of that id.
    Exists,
    /// A volume of its spec is not there to attach (missing, not created, being deleted).
    NoVolume(String),
    /// A volume of its spec is another VM's.
    VolumeTaken {
        volume: String,
        vm: String,
    },
}

/// What [`Store::start_volume_delete`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteStart {
    /// Marked deleting: no VM attaches it any more.
    Marked(VolumeRecord),
    NotFound,
    AttachedTo(String),
}

/// A tenant's VM as the database keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub tenant: String,
    pub id: String,
    pub spec: VmSpec,
    /// Whether it should run: set by a create with `start` and by start, cleared by stop,
    /// kill and the restart cap.
    pub want_running: bool,
    /// The running vmm's pid (at start the agent finds it again by its API socket, not by
    /// this number, which another process may have by then).
    pub pid: Option<u32>,
    pub started_unix: Option<u64>,
    pub restarts: u32,
    /// When the restart policy started it again, within the restart window (Unix seconds):
    /// the backoff and the cap count them.
    #[serde(default)]
    pub recent_restarts_unix: Vec<u64>,
    pub last_exit: Option<agent_api::LastExit>,
    pub state: String,
    /// The uid its jailed vmm runs as (gid the same), given at its first jailed launch and
    /// kept until it is deleted.
    #[serde(default)]
    pub uid: Option<u32>,
}

/// What a VM is made of, as its create said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub volumes: Vec<agent_api::VmVolume>,
    pub restart_policy: agent_api::RestartPolicy,
}

/// The open state database.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens the database at `path` (created if missing) with every table in it.
    pub fn open(path: &Path) -> Result<Store, Error> {
        let db = Database::create(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let store = Store {
            db,
            path: path.to_owned(),
        };
        store.write(|tx| {
            tx.open_table(TENANTS)?;
            tx.open_table(VOLUMES)?;
            tx.open_table(VMS)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> Error {
        Error::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    /// Runs `f` in one write transaction and commits it.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, TxError>,
    ) -> Result<T, Error> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let out = f(&tx).map_err(|e| Error::Db {
            path: self.path.clone(),
            source: e.0,
        })?;
        tx.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }

    fn encode<T: Serialize>(
        &self,
        table: &'static str,
        key: &str,
        v: &T,
    ) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(v).map_err(|source| Error::Corrupt {
            path: self.path.clone(),
            table,
            key: key.to_string(),
            source,
        })
    }

    /// Every record of `table` whose key starts with `prefix`, by key.
    fn scan<T: serde::de::DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        table: &'static str,
        prefix: &str,
    ) -> Result<Vec<T>, Error> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = tx.open_table(def).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in t.range(prefix..).map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            let record = serde_json::from_slice(v.value()).map_err(|source| Error::Corrupt {
                path: self.path.clone(),
                table,
                key: k.value().to_string(),
                source,
            })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Adds a volume record; false (and nothing written) if the tenant has one of that name.
    pub fn insert_volume(&self, v: &VolumeRecord) -> Result<bool, Error> {
        let key = VolumeRecord::key(&v.tenant, &v.name);
        let value = self.encode("volumes", &key, v)?;
        self.write(|tx| {
            let mut t = tx.open_table(VOLUMES)?;
            if t.get(key.as_str())?.is_some() {
                return Ok(false);
            }
            t.insert(key.as_str(), value.as_slice())?;
            Ok(true)
        })
    }

    /// Writes a volume record over the one of its key.
    pub fn put_volume(&self, v: &VolumeRecord) -> Result<(), Error> {
        let key = VolumeRecord::key(&v.tenant, &v.name);
        let value = self.encode("volumes", &key, v)?;
        self.write(|tx| {
            tx.open_table(VOLUMES)?
                .insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    /// Removes a volume record; false if there was none.
    pub fn remove_volume(&self, tenant: &str, name: &str) -> Result<bool, Error> {
        let key = VolumeRecord::key(tenant, name);
        self.write(|tx| {
            let removed = tx.open_table(VOLUMES)?.remove(key.as_str())?.is_some();
            Ok(removed)
        })
    }

    /// The record of the tenant's volume `name`.
    pub fn volume(&self, tenant: &str, name: &str) -> Result<Option<VolumeRecord>, Error> {
        let key = VolumeRecord::key(tenant, name);
        Ok(self
            .scan::<VolumeRecord>(VOLUMES, "volumes", &key)?
            .into_iter()
            .find(|v| v.tenant == tenant && v.name == name))
    }

    /// The volumes of `tenant` (all of them with `None`), by tenant and name.
    pub fn volumes(&self, tenant: Option<&str>) -> Result<Vec<VolumeRecord>, Error> {
        let prefix = tenant.map(|t| format!("{t}/")).unwrap_or_default();
        self.scan(VOLUMES, "volumes", &prefix)
    }

    /// Adds a VM record, in one transaction with the checks that its volumes are the
    /// tenant's, there, and attached to no other VM; nothing is written unless all hold.
    pub fn insert_vm(&self, v: &VmRecord) -> Result<Inserted, Error> {
        let key = VolumeRecord::key(&v.tenant, &v.id);
        let value = self.encode("vms", &key, v)?;
        let prefix = format!("{}/", v.tenant);
        self.write(|tx| {
            {
                let volumes = tx.open_table(VOLUMES)?;
                for wanted in &v.spec.volumes {
                    let k = VolumeRecord::key(&v.tenant, &wanted.name);
                    let usable = match volumes.get(k.as_str())? {
                        Some(g) => serde_json::from_slice::<VolumeRecord>(g.value())
                            .is_ok_and(|r| r.created && !r.deleting),
                        None => false,
                    };
                    if !usable {
                        return Ok(Inserted::NoVolume(wanted.name.clone()));
                    }
                }
            }
            let mut t = tx.open_table(VMS)?;
            if t.get(key.as_str())?.is_some() {
                return Ok(Inserted::Exists);
            }
            if let Some((volume, vm)) = attached(&t, &prefix, |name| {
                v.spec.volumes.iter().any(|w| w.name == name)
            })? {
                return Ok(Inserted::VolumeTaken { volume, vm });
            }
            t.insert(key.as_str(), value.as_slice())?;
            Ok(Inserted::Yes)
        })
    }

    /// Marks the tenant's volume `name` deleting, in one transaction with the check that no
    /// VM has it.
    pub fn start_volume_delete(&self, tenant: &str, name: &str) -> Result<DeleteStart, Error> {
        let key = VolumeRecord::key(tenant, name);
        let prefix = format!("{tenant}/");
        let path = self.path.clone();
        self.write(|tx| {
            if let Some((_, vm)) = attached(&tx.open_table(VMS)?, &prefix, |n| n == name)? {
                return Ok(DeleteStart::AttachedTo(vm));
            }
            let mut volumes = tx.open_table(VOLUMES)?;
            let record = match volumes.get(key.as_str())? {
                Some(g) => serde_json::from_slice::<VolumeRecord>(g.value()).ok(),
                None => None,
            };
            let Some(mut record) = record.filter(|r| r.created) else {
                return Ok(DeleteStart::NotFound);
            };
            record.deleting = true;
            let value = serde_json::to_vec(&record).map_err(|e| {
                redb::Error::Corrupted(format!("{}: volume {key}: {e}", path.display()))
            })?;
            volumes.insert(key.as_str(), value.as_slice())?;
            Ok(DeleteStart::Marked(record))
        })
    }

    /// Writes a VM record over the one of its key.
    pub fn put_vm(&self, v: &VmRecord) -> Result<(), Error> {
        let key = VolumeRecord::key(&v.tenant, &v.id);
        let value = self.encode("vms", &key, v)?;
        self.write(|tx| {
            tx.open_table(VMS)?.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    /// The uid of VM `tenant/id`: the one its record has, else `base` plus the smallest slot
    /// no other VM's record holds, written to its record in the same transaction. `None`: no
    /// such VM.
    pub fn assign_uid(&self, tenant: &str, id: &str, base: u32) -> Result<Option<u32>, Error> {
        let key = VolumeRecord::key(tenant, id);
        self.write(|tx| {
            let mut t = tx.open_table(VMS)?;
            let mut taken = Vec::new();
            let mut mine = None;
            for entry in t.iter()? {
                let (k, v) = entry?;
                // A record that cannot be read might hold a uid: none is given out blind.
                let r = serde_json::from_slice::<VmRecord>(v.value()).map_err(|e| {
                    redb::StorageError::Corrupted(format!("vms/{}: {e}", k.value()))
                })?;
                if k.value() == key {
                    mine = Some(r);
                } else if let Some(uid) = r.uid {
                    taken.push(uid);
                }
            }
            let Some(mut mine) = mine else {
                return Ok(None);
            };
            if let Some(uid) = mine.uid {
                return Ok(Some(uid));
            }
            taken.sort_unstable();
            let mut uid = base;
            for t in taken {
                if t == uid {
                    uid += 1;
                } else if t > uid {
                    break;
                }
            }
            mine.uid = Some(uid);
            let value = serde_json::to_vec(&mine)
                .map_err(|e| redb::StorageError::Corrupted(format!("vms/{key}: {e}")))?;
            t.insert(key.as_str(), value.as_slice())?;
            Ok(Some(uid))
        })
    }

    pub fn remove_vm(&self, tenant: &str, id: &str) -> Result<bool, Error> {
        let key = VolumeRecord::key(tenant, id);
        self.write(|tx| {
            let removed = tx.open_table(VMS)?.remove(key.as_str())?.is_some();
            Ok(removed)
        })
    }

    pub fn vm(&self, tenant: &str, id: &str) -> Result<Option<VmRecord>, Error> {
        Ok(self.vms(Some(tenant))?.into_iter().find(|v| v.id == id))
    }

    /// The VMs of `tenant` (all of them with `None`), by tenant and id.
    pub fn vms(&self, tenant: Option<&str>) -> Result<Vec<VmRecord>, Error> {
        let prefix = tenant.map(|t| format!("{t}/")).unwrap_or_default();
        self.scan(VMS, "vms", &prefix)
    }

    /// Adds a tenant; false (and nothing written) if one of that name exists.
    pub fn insert_tenant(&self, tenant: &TenantRecord) -> Result<bool, Error> {
        let value = self.encode("tenants", &tenant.name, tenant)?;
        self.write(|tx| {
            let mut t = tx.open_table(TENANTS)?;
            if t.get(tenant.name.as_str())?.is_some() {
                return Ok(false);
            }
            t.insert(tenant.name.as_str(), value.as_slice())?;
            Ok(true)
        })
    }

    /// Removes a tenant; false if there was none of that name.
    pub fn remove_tenant(&self, name: &str) -> Result<bool, Error> {
        self.write(|tx| {
            let mut t = tx.open_table(TENANTS)?;
            let removed = t.remove(name)?.is_some();
            Ok(removed)
        })
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> Result<Vec<TenantRecord>, Error> {
        self.scan(TENANTS, "tenants", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantRecord {
        TenantRecord {
            name: name.into(),
            token_sha256: "00".repeat(32),
            created_unix: 1,
        }
    }

    #[test]
    fn tenants_survive_a_reopen_and_a_name_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        {
            let s = Store::open(&path).unwrap();
            assert!(s.insert_tenant(&tenant("a")).unwrap());
            assert!(s.insert_tenant(&tenant("b")).unwrap());
            assert!(!s.insert_tenant(&tenant("a")).unwrap());
        }
        let s = Store::open(&path).unwrap();
        let names: Vec<_> = s.tenants().unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(s.remove_tenant("a").unwrap());
        assert!(!s.remove_tenant("a").unwrap());
        assert_eq!(s.tenants().unwrap(), [tenant("b")]);
    }

    #[test]
    fn volumes_are_kept_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("agent.redb")).unwrap();
        let v = |tenant: &str, name: &str| VolumeRecord {
            tenant: tenant.into(),
            name: name.into(),
            storaged_name: format!("{tenant}_{name}"),
            created: true,
            deleting: false,
        };
        assert!(s.insert_volume(&v("a", "data")).unwrap());
        assert!(s.insert_volume(&v("ab", "data")).unwrap());
        assert!(s.insert_volume(&v("a", "logs")).unwrap());
        assert!(!s.insert_volume(&v("a", "data")).unwrap());
        let names = |t| {
            s.volumes(t)
                .unwrap()
                .into_iter()
                .map(|v| format!("{}/{}", v.tenant, v.name))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Some("a")), ["a/data", "a/logs"]);
        assert_eq!(names(None), ["a/data", "a/logs", "ab/data"]);
        assert_eq!(s.volume("a", "dat").unwrap(), None);
        assert_eq!(s.volume("ab", "data").unwrap(), Some(v("ab", "data")));
        assert!(s.remove_volume("a", "data").unwrap());
        assert_eq!(names(Some("a")), ["a/logs"]);
    }

    #[test]
    fn a_second_open_of_the_same_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let _s = Store::open(&path).unwrap();
        assert!(matches!(Store::open(&path), Err(Error::Open { .. })));
    }

    #[test]
    fn each_vm_gets_the_lowest_free_uid_once_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("agent.redb")).unwrap();
        let vm = |tenant: &str, id: &str| VmRecord {
            tenant: tenant.into(),
            id: id.into(),
            spec: VmSpec {
                vcpus: 1,
                memory_bytes: 32 << 20,
                kernel: "k".into(),
                initrd: None,
                cmdline: None,
                volumes: Vec::new(),
                restart_policy: agent_api::RestartPolicy::Never,
            },
            want_running: false,
            pid: None,
            started_unix: None,
            restarts: 0,
            recent_restarts_unix: Vec::new(),
            last_exit: None,
            state: "stopped".into(),
            uid: None,
        };
        for (t, id) in [("a", "one"), ("a", "two"), ("b", "one")] {
            assert_eq!(s.insert_vm(&vm(t, id)).unwrap(), Inserted::Yes);
        }
        assert_eq!(s.assign_uid("a", "one", 500).unwrap(), Some(500));
        assert_eq!(s.assign_uid("b", "one", 500).unwrap(), Some(501));
        assert_eq!(s.assign_uid("a", "one", 500).unwrap(), Some(500), "kept");
        assert_eq!(s.vm("a", "one").unwrap().unwrap().uid, Some(500));
        // A deleted VM's uid is free again, for the next VM that needs one.
        assert!(s.remove_vm("a", "one").unwrap());
        assert_eq!(s.assign_uid("a", "two", 500).unwrap(), Some(500));
        assert_eq!(s.assign_uid("a", "ghost", 500).unwrap(), None);
    }
}
