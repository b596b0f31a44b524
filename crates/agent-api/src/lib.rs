//! The node agent's API as types, shared by the agent, `agentctl` and the tests: the requests
//! it accepts (`deny_unknown_fields`: a misspelt field is a 400, not a default) and the answers
//! it gives. Every error answer is a 4xx/5xx with [`ErrorBody`].
//!
//! Every call carries a bearer token: the node's admin token, or a tenant's. [`Whoami`] says
//! which one a token is.

use serde::{Deserialize, Serialize};
pub use size::ByteSize;

pub mod client;

/// Who a token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The node's operator: sees and acts on every tenant's objects, and on the tenants.
    Admin,
    /// A tenant: sees and acts on its own objects only.
    Tenant,
}

/// `GET /v1/whoami`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    pub role: Role,
    /// The tenant's name (none for the admin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// `POST /v1/tenants` (admin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1 to 63 of `a-z`, `0-9` and `-`, starting with a letter or digit.
    pub name: String,
}

/// The answer to `POST /v1/tenants`: the tenant's token, shown this once (the agent keeps
/// only its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantCreated {
    pub name: String,
    pub token: String,
}

/// A tenant as `GET /v1/tenants` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub name: String,
    /// When it was created, in seconds since the Unix epoch.
    pub created_unix: u64,
}

/// `POST /v1/volumes`: a volume of the caller's (a tenant's), or, for the admin, of `tenant`.
/// The other fields are storaged's (see storaged's `openapi.yaml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// 1 to 63 of `a-z`, `0-9` and `-`, starting with a letter or digit; with the tenant's
    /// name, at most 62 characters. Unique per tenant.
    pub name: String,
    pub size: ByteSize,
    /// A performance tier (storaged's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// "aes-xts-plain64" (storaged's default) or "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_limit: Option<u64>,
    /// Bytes/s (a number or a size such as "100MiB").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocate: Option<bool>,
    /// Whose volume it is: the admin's calls name it; a tenant's leave it out (or name
    /// themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// `PATCH /v1/volumes/{name}`: what to change (storaged's rules: a volume only grows).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateVolume {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<ByteSize>,
}

/// A volume as the agent shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub tenant: String,
    pub size_bytes: u64,
    /// The size as storaged writes it ("10GiB").
    pub size: String,
    pub tier: String,
    pub encryption: String,
    /// The volume's own limits (none: its tier's).
    pub iops_limit: Option<u64>,
    pub bandwidth_limit: Option<u64>,
    /// storaged's state of it: "serving" or "failed".
    pub state: String,
}

/// What the agent does when a VM's vmm ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Start it again whatever the end (but a stop or kill through the API).
    Always,
    /// Start it again when it failed: a crash, a vmm failure, a signal; not a guest power-off
    /// or reset.
    #[default]
    OnFailure,
    /// Leave it ended.
    Never,
}

/// A volume attached to a VM: one of its tenant's, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmVolume {
    pub name: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /v1/vms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// The caller's id for the VM (a retried create with the same id and spec is answered
    /// with the VM it made); a new one when absent. 1 to 63 of `a-z`, `0-9` and `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default = "one")]
    pub vcpus: u8,
    pub memory: ByteSize,
    /// A file of the image catalog, by its path relative to it.
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub volumes: Vec<VmVolume>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Whether it starts now (default true).
    #[serde(default = "yes")]
    pub start: bool,
    /// Whose VM: the admin's calls name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

fn one() -> u8 {
    1
}

fn yes() -> bool {
    true
}

/// How a VM's vmm last ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// Its exit code (none: a signal ended it, or it ended while the agent was away and
    /// its log does not say).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// In words: vmm's exit-code table, or what the agent knows.
    pub meaning: String,
    /// Whether the restart policy counts it a failure.
    pub failure: bool,
    /// When, in seconds since the Unix epoch.
    pub at_unix: u64,
}

/// A VM as the agent shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub tenant: String,
    /// "running", "stopping", "stopped" (ended, not to be started again), "restarting"
    /// (ended, to be started again after its backoff), "failed" (ended too often: the
    /// restart cap), "stopped" also before a first start.
    pub state: String,
    pub pid: Option<u32>,
    /// The uid its jailed vmm runs as (none unjailed, or before its first launch).
    pub uid: Option<u32>,
    pub uptime_seconds: Option<u64>,
    /// How often the agent started it again after it ended.
    pub restarts: u32,
    pub last_exit: Option<LastExit>,
    pub vcpus: u8,
    pub memory: String,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub volumes: Vec<VmVolume>,
    pub restart_policy: RestartPolicy,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_tenant_with_an_unknown_field_does_not_parse() {
        let r = serde_json::from_str::<CreateTenant>(r#"{"name":"a","nmae":"b"}"#);
        assert!(r.is_err());
    }

    #[test]
    fn the_admin_has_no_tenant_in_whoami() {
        let w = Whoami {
            role: Role::Admin,
            tenant: None,
        };
        assert_eq!(serde_json::to_string(&w).unwrap(), r#"{"role":"admin"}"#);
    }
}
