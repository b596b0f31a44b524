//! The node agent: a tenant-authenticated API (HTTP + JSON on a TCP address and a Unix
//! socket) for the node's tenants and their volumes, the tokens checked on every call, its
//! state in an embedded database in the data dir.
//!
//! - [`config`]: the TOML file and its defaults;
//! - [`tokens`]: bearer tokens, their hashes, the admin token file;
//! - [`auth`]: who a request is;
//! - [`store`]: the state database;
//! - [`tenants`]: creating, listing and revoking tenants;
//! - [`volumes`]: the tenants' volumes, made through storaged's admin API;
//! - [`vms`]: the tenants' VMs, each a vmm process started, watched and started again;
//! - [`jail`]: each vmm's jail: its uid, mount namespace and root, rlimits;
//! - [`cgroups`]: each VM's cgroups, with its CPU and memory limits;
//! - `sys`: the system calls the agent makes itself (pidfds, files in a jail);
//! - [`metrics`]: what `GET /metrics` answers;
//! - [`api`]: the routes, authentication and audit;
//! - [`tls`]: the API's TLS on its TCP address;
//! - [`daemon`]: wiring it all, until a signal.

pub mod api;
pub mod auth;
pub mod cgroups;
pub mod config;
pub mod daemon;
pub mod jail;
pub mod metrics;
pub mod store;
mod sys;
pub mod tenants;
pub mod tls;
pub mod tokens;
pub mod vms;
pub mod volumes;

/// Formats an error with its whole chain of sources: "a: b: c".
pub use errors::chain as error_chain;
