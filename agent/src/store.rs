//! The agent's state: an embedded database (redb) in the data dir, every change one write
//! transaction (committed durably, or not at all). Each table maps a name to the JSON of its
//! record, so that a record can gain fields without a migration.
//!
//! - `tenants`: tenant name → [`TenantRecord`] (its token's hash, never the token).
//!
//! redb locks the file: a second agent on the same data dir is refused at open.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");

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
tx_error_from!(redb::TableError, redb::StorageError);

/// A tenant as the database keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub name: String,
    /// The SHA-256 of its token, in hex.
    pub token_sha256: String,
    pub created_unix: u64,
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

    /// Adds a tenant; false (and nothing written) if one of that name exists.
    pub fn insert_tenant(&self, tenant: &TenantRecord) -> Result<bool, Error> {
        let value = serde_json::to_vec(tenant).map_err(|source| Error::Corrupt {
            path: self.path.clone(),
            table: "tenants",
            key: tenant.name.clone(),
            source,
        })?;
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
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = tx.open_table(TENANTS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            let record = serde_json::from_slice(v.value()).map_err(|source| Error::Corrupt {
                path: self.path.clone(),
                table: "tenants",
                key: k.value().to_string(),
                source,
            })?;
            out.push(record);
        }
        Ok(out)
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
    fn a_second_open_of_the_same_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let _s = Store::open(&path).unwrap();
        assert!(matches!(Store::open(&path), Err(Error::Open { .. })));
    }
}
