//! The node's tenants: created and revoked by the admin, each known by its name and its
//! token's hash, kept in the state database and, for the check of every request, in the
//! [`Authority`]. A token is returned once, at creation, and never kept.

use std::sync::Arc;

use agent_api::{TenantCreated, TenantInfo};

use crate::auth::Authority;
use crate::store::{self, Store, TenantRecord};
use crate::tokens;

/// Errors of the tenant calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Invalid tenant name {0:?}: 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("Tenant {0} exists")]
    Exists(String),
    #[error("No tenant {0}")]
    NotFound(String),
    #[error("Tenant {tenant} still has {vms} VMs and {volumes} volumes: delete them first")]
    HasObjects {
        tenant: String,
        vms: usize,
        volumes: usize,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Token(#[from] tokens::Error),
}

/// Whether `name` may name a tenant (or a tenant's object).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The tenants, in the database and in the authority that checks tokens.
pub struct TenantRegistry {
    store: Arc<Store>,
    authority: Arc<Authority>,
}

impl TenantRegistry {
    pub fn new(store: Arc<Store>, authority: Arc<Authority>) -> Self {
        TenantRegistry { store, authority }
    }

    /// Creates tenant `name` with a new token, which it returns (the only time it is shown).
    pub fn create(&self, name: &str) -> Result<TenantCreated, Error> {
        if !valid_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
        let token = tokens::generate()?;
        let hash = tokens::hash(&token);
        let record = TenantRecord {
            name: name.to_string(),
            token_sha256: tokens::to_hex(&hash),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        if !self.store.insert_tenant(&record)? {
            return Err(Error::Exists(name.to_string()));
        }
        self.authority.add_tenant(name, hash);
        Ok(TenantCreated {
            name: name.to_string(),
            token,
        })
    }

    /// Revokes tenant `name`: its token is refused from now on. A tenant that still has VMs
    /// or volumes is not deleted: a new tenant of the same name would get them.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        let (vms, volumes) = (
            self.store.vms(Some(name))?.len(),
            self.store.volumes(Some(name))?.len(),
        );
        if vms + volumes > 0 {
            return Err(Error::HasObjects {
                tenant: name.to_string(),
                vms,
                volumes,
            });
        }
        // Refused first, so that no request gets in between the two.
        self.authority.remove_tenant(name);
        if !self.store.remove_tenant(name)? {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<TenantInfo>, Error> {
        Ok(self
            .store
            .tenants()?
            .into_iter()
            .map(|t| TenantInfo {
                name: t.name,
                created_unix: t.created_unix,
            })
            .collect())
    }
}

/// The tenants' token hashes as the database holds them; a hash that does not read back is
/// an error naming its tenant, not a tenant locked out in silence.
pub fn known_hashes(store: &Store) -> Result<Vec<(String, tokens::TokenHash)>, store::Error> {
    store
        .tenants()?
        .into_iter()
        .map(|t| match tokens::from_hex(&t.token_sha256) {
            Some(h) => Ok((t.name, h)),
            None => Err(store::Error::BadHash { tenant: t.name }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(dir: &std::path::Path) -> (TenantRegistry, Arc<Authority>) {
        let store = Arc::new(Store::open(&dir.join("agent.redb")).unwrap());
        let authority = Arc::new(Authority::new(tokens::hash("admin"), Vec::new()));
        (TenantRegistry::new(store, authority.clone()), authority)
    }

    #[test]
    fn a_created_tenant_is_its_token_until_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (r, auth) = registry(dir.path());
        let t = r.create("acme").unwrap();
        assert_eq!(
            auth.identify(&t.token),
            Some(crate::auth::Principal::Tenant("acme".into()))
        );
        assert!(matches!(r.create("acme"), Err(Error::Exists(_))));
        r.delete("acme").unwrap();
        assert_eq!(auth.identify(&t.token), None);
        assert!(matches!(r.delete("acme"), Err(Error::NotFound(_))));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "-a", "A", "a b", "a/b", "a.b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["a", "0", "acme-1", &"a".repeat(63)] {
            assert!(valid_name(good), "{good:?}");
        }
    }

    #[test]
    fn the_token_is_not_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = registry(dir.path());
        let t = r.create("acme").unwrap();
        drop(r);
        let bytes = std::fs::read(dir.path().join("agent.redb")).unwrap();
        assert!(!bytes
            .windows(t.token.len())
            .any(|w| w == t.token.as_bytes()));
    }
}
