//! Who a request is: the bearer token of its `Authorization` header, checked against the
//! admin token's hash and every tenant's ([`crate::tokens::matches`], constant time, all of
//! them compared). No token, or one that matches none (never issued, or revoked), is no one.

use std::sync::RwLock;

use crate::tokens::{self, TokenHash};

/// Who a request acts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant(String),
}

impl Principal {
    /// How the audit log names it.
    pub fn audit_name(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Tenant(name) => name,
        }
    }
}

/// The tokens the agent accepts, as their hashes.
pub struct Authority {
    admin: TokenHash,
    tenants: RwLock<Vec<(String, TokenHash)>>,
}

impl Authority {
    pub fn new(admin: TokenHash, tenants: Vec<(String, TokenHash)>) -> Self {
        Authority {
            admin,
            tenants: RwLock::new(tenants),
        }
    }

    /// Who `token` is, if anyone.
    pub fn identify(&self, token: &str) -> Option<Principal> {
        let h = tokens::hash(token);
        let mut found = tokens::matches(&h, &self.admin).then_some(Principal::Admin);
        let tenants = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        for (name, known) in tenants.iter() {
            if tokens::matches(&h, known) && found.is_none() {
                found = Some(Principal::Tenant(name.clone()));
            }
        }
        found
    }

    /// Accepts `hash` as tenant `name`'s token from now on.
    pub fn add_tenant(&self, name: &str, hash: TokenHash) {
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        tenants.push((name.to_string(), hash));
    }

    /// Stops accepting tenant `name`'s token.
    pub fn remove_tenant(&self, name: &str) {
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        tenants.retain(|(n, _)| n != name);
    }
}

/// The token of an `Authorization` header value: `Bearer TOKEN` (the scheme in any case).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_is_its_owner_and_a_revoked_one_is_no_one() {
        let a = Authority::new(
            tokens::hash("root"),
            vec![("t1".into(), tokens::hash("one"))],
        );
        a.add_tenant("t2", tokens::hash("two"));
        assert_eq!(a.identify("root"), Some(Principal::Admin));
        assert_eq!(a.identify("one"), Some(Principal::Tenant("t1".into())));
        assert_eq!(a.identify("two"), Some(Principal::Tenant("t2".into())));
        assert_eq!(a.identify("three"), None);
        a.remove_tenant("t1");
        assert_eq!(a.identify("one"), None);
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
