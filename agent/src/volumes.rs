//! Tenants' volumes: created, changed and deleted through storaged's admin API, each a
//! storaged volume named `TENANT_NAME` (`_` is in neither name, so no two tenants' names meet),
//! each known to the agent by a record in its database. A tenant sees only the volumes it has
//! records for under its name: another tenant's, and storaged volumes the agent did not make,
//! do not exist for it.
//!
//! A create writes its record first, marked not yet created, then asks storaged, then marks it
//! created; a delete asks storaged, then removes the record. So a storaged volume of a tenant
//! always has its record, and a record left marked by a crash in between is settled at the
//! next start ([`VolumeRegistry::settle`]): kept if storaged has the volume, dropped if not.
//! storaged's own refusals (a size it does not take, a full pool, a busy volume) are passed on
//! with their status and reason.

use std::sync::Arc;

use agent_api::{CreateVolume, UpdateVolume, Volume};
use storaged_api::client::AdminClient;

use crate::store::{self, Store, VolumeRecord};
use crate::tenants::valid_name;

/// Errors of the volume calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Invalid volume name {0:?}: 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("Volume name {name:?} is too long for tenant {tenant}: the two together are at most 62 characters")]
    NameTooLong { tenant: String, name: String },
    #[error("No volume {0}")]
    NotFound(String),
    #[error("Volume {0} exists")]
    Exists(String),
    #[error("No tenant {0}")]
    NoTenant(String),
    #[error("Volume {volume} is attached to VM {vm}: delete the VM first")]
    InUse { volume: String, vm: String },
    /// storaged refused, saying why.
    #[error("storaged: {message}")]
    Refused { status: u16, message: String },
    #[error("storaged cannot be reached")]
    Unreachable(#[source] storaged_api::client::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl From<storaged_api::client::Error> for Error {
    fn from(e: storaged_api::client::Error) -> Self {
        match e {
            storaged_api::client::Error::Api { status, message } => {
                Error::Refused { status, message }
            }
            other => Error::Unreachable(other),
        }
    }
}

/// The longest a tenant's and a volume's names may be together (with the `_` between them,
/// storaged's longest name: 63).
const MAX_NAMES_LEN: usize = 62;

/// The tenants' volumes.
pub struct VolumeRegistry {
    store: Arc<Store>,
    storaged: AdminClient,
}

impl VolumeRegistry {
    pub fn new(store: Arc<Store>, storaged: AdminClient) -> Self {
        VolumeRegistry { store, storaged }
    }

    /// Creates `req` as a volume of `tenant`.
    pub fn create(&self, tenant: &str, req: &CreateVolume) -> Result<Volume, Error> {
        let name = &req.name;
        if !valid_name(name) {
            return Err(Error::InvalidName(name.clone()));
        }
        if tenant.len() + name.len() > MAX_NAMES_LEN {
            return Err(Error::NameTooLong {
                tenant: tenant.to_string(),
                name: name.clone(),
            });
        }
        if !self.store.tenants()?.iter().any(|t| t.name == tenant) {
            return Err(Error::NoTenant(tenant.to_string()));
        }
        let mut record = VolumeRecord {
            tenant: tenant.to_string(),
            name: name.clone(),
            storaged_name: format!("{tenant}_{name}"),
            created: false,
            deleting: false,
        };
        if !self.store.insert_volume(&record)? {
            return Err(Error::Exists(name.clone()));
        }
        let create = storaged_api::CreateVolume {
            name: record.storaged_name.clone(),
            size: req.size,
            tier: req.tier.clone(),
            read_only: false,
            num_queues: None,
            preallocate: req.preallocate,
            device: None,
            iops_limit: req.iops_limit,
            bandwidth_limit: req.bandwidth_limit,
            encryption: req.encryption.clone(),
            // Served to the agent (root) only until a VM has it.
            owner: Some(storaged_api::Owner {
                uid: 0,
                vm_id: None,
            }),
        };
        let info = match self.storaged.create_volume(&create) {
            Ok(info) => info,
            // Refused: not created, the record goes.
            Err(
                e @ storaged_api::client::Error::Api {
                    status: 400..=499, ..
                },
            ) => {
                let _ = self.store.remove_volume(tenant, name);
                return Err(e.into());
            }
            // Unknown (no answer, or a 5xx): storaged may have made it. The record stays,
            // pending, for the next settle to decide; a retry meanwhile is a 409.
            Err(e) => {
                if matches!(e, storaged_api::client::Error::Connect { .. }) {
                    // Not reached at all: nothing was made.
                    let _ = self.store.remove_volume(tenant, name);
                }
                return Err(e.into());
            }
        };
        record.created = true;
        self.store.put_volume(&record)?;
        Ok(view(&record, &info))
    }

    fn record(&self, tenant: &str, name: &str) -> Result<VolumeRecord, Error> {
        match self.store.volume(tenant, name)? {
            Some(r) if r.created => Ok(r),
            _ => Err(Error::NotFound(name.to_string())),
        }
    }

    /// The tenant's volume `name`.
    pub fn get(&self, tenant: &str, name: &str) -> Result<Volume, Error> {
        let r = self.record(tenant, name)?;
        let info = self.storaged.volume(&r.storaged_name)?;
        Ok(view(&r, &info))
    }

    /// The volumes of `tenant` (every tenant's with `None`).
    pub fn list(&self, tenant: Option<&str>) -> Result<Vec<Volume>, Error> {
        let records = self.store.volumes(tenant)?;
        let infos = self.storaged.list_volumes()?;
        Ok(records
            .iter()
            .filter(|r| r.created)
            .filter_map(|r| {
                let info = infos.iter().find(|i| i.name == r.storaged_name);
                if info.is_none() {
                    tracing::warn!(tenant = %r.tenant, volume = %r.name, storaged_name = %r.storaged_name, "volume recorded but not in storaged");
                }
                info.map(|i| view(r, i))
            })
            .collect())
    }

    /// Changes the tenant's volume `name`.
    pub fn update(&self, tenant: &str, name: &str, req: &UpdateVolume) -> Result<Volume, Error> {
        let r = self.record(tenant, name)?;
        let update = storaged_api::UpdateVolume {
            size: req.size,
            tier: req.tier.clone(),
            iops_limit: req.iops_limit.map(Some),
            bandwidth_limit: req.bandwidth_limit.map(Some),
            ..Default::default()
        };
        let info = self.storaged.update_volume(&r.storaged_name, &update)?;
        Ok(view(&r, &info))
    }

    /// Deletes the tenant's volume `name`: marked deleting (if no VM has it), deleted in
    /// storaged, then its record.
    pub fn delete(&self, tenant: &str, name: &str) -> Result<(), Error> {
        let mut r = match self.store.start_volume_delete(tenant, name)? {
            store::DeleteStart::Marked(r) => r,
            store::DeleteStart::NotFound => return Err(Error::NotFound(name.to_string())),
            store::DeleteStart::AttachedTo(vm) => {
                return Err(Error::InUse {
                    volume: name.to_string(),
                    vm,
                })
            }
        };
        match self.storaged.delete_volume(&r.storaged_name, false) {
            Ok(_) => {}
            // Gone already (deleted past the agent): the record follows.
            Err(storaged_api::client::Error::Api { status: 404, .. }) => {}
            Err(e) => {
                r.deleting = false;
                self.store.put_volume(&r)?;
                return Err(e.into());
            }
        }
        self.store.remove_volume(tenant, name)?;
        Ok(())
    }

    /// Settles the records a crash left between their create and storaged's answer: kept
    /// (marked created) where storaged has the volume, dropped where it has not. Returns how
    /// many were settled; a storaged that cannot be reached leaves them for the next start.
    pub fn settle(&self) -> Result<usize, Error> {
        let pending: Vec<_> = self
            .store
            .volumes(None)?
            .into_iter()
            .filter(|r| !r.created)
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let infos = self.storaged.list_volumes()?;
        for mut r in pending.iter().cloned() {
            if infos.iter().any(|i| i.name == r.storaged_name) {
                r.created = true;
                self.store.put_volume(&r)?;
                tracing::info!(tenant = %r.tenant, volume = %r.name, "volume creation found done at start: kept");
            } else {
                self.store.remove_volume(&r.tenant, &r.name)?;
                tracing::info!(tenant = %r.tenant, volume = %r.name, "volume creation found not done at start: dropped");
            }
        }
        Ok(pending.len())
    }
}

/// The agent's view of a storaged volume.
fn view(r: &VolumeRecord, info: &storaged_api::VolumeInfo) -> Volume {
    Volume {
        name: r.name.clone(),
        tenant: r.tenant.clone(),
        size_bytes: info.size_bytes,
        size: info.size.clone(),
        tier: info.tier.to_string(),
        encryption: info.encryption.clone(),
        iops_limit: info.iops_limit,
        bandwidth_limit: info.bandwidth_limit,
        state: info.state.clone(),
    }
}
