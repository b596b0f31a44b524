//! A blocking client of the agent's API on its Unix socket, used by `agentctl` and the tests,
//! over `unix-http` (one request per connection, every request with the caller's bearer token).
//! An answer other than 2xx is [`Error::Api`] with its status and the agent's message.

use std::path::Path;

pub use unix_http::{Error, Response};

use crate::{
    CreateTenant, CreateVm, CreateVolume, TenantCreated, TenantInfo, UpdateVolume, Vm, Volume,
    Whoami,
};

/// `?tenant=NAME` where a tenant is named (the admin's calls), else nothing.
fn tenant_query(tenant: Option<&str>) -> String {
    tenant.map(|t| format!("?tenant={t}")).unwrap_or_default()
}

/// Client of one agent socket, with one token.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: unix_http::Client,
}

impl AgentClient {
    /// A client of the socket at `path` that sends `token` with every request.
    pub fn new(path: impl AsRef<Path>, token: &str) -> Self {
        AgentClient {
            http: unix_http::Client::new(path, "agent").with_bearer(token),
        }
    }

    /// Sends any request; the raw answer.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&str>,
    ) -> Result<Response, Error> {
        self.http.request(method, target, body)
    }

    pub fn whoami(&self) -> Result<Whoami, Error> {
        self.http.call("GET", "/v1/whoami", None::<&()>)
    }

    pub fn create_tenant(&self, name: &str) -> Result<TenantCreated, Error> {
        let req = CreateTenant {
            name: name.to_string(),
        };
        self.http.call("POST", "/v1/tenants", Some(&req))
    }

    pub fn tenants(&self) -> Result<Vec<TenantInfo>, Error> {
        self.http.call("GET", "/v1/tenants", None::<&()>)
    }

    /// Revokes the tenant's token (`DELETE /v1/tenants/NAME`).
    pub fn delete_tenant(&self, name: &str) -> Result<(), Error> {
        self.no_content("DELETE", &format!("/v1/tenants/{name}"))
    }

    pub fn create_volume(&self, req: &CreateVolume) -> Result<Volume, Error> {
        self.http.call("POST", "/v1/volumes", Some(req))
    }

    /// The caller's volumes; the admin's: `tenant`'s, or every tenant's.
    pub fn volumes(&self, tenant: Option<&str>) -> Result<Vec<Volume>, Error> {
        let q = tenant_query(tenant);
        self.http
            .call("GET", &format!("/v1/volumes{q}"), None::<&()>)
    }

    pub fn volume(&self, name: &str, tenant: Option<&str>) -> Result<Volume, Error> {
        let q = tenant_query(tenant);
        self.http
            .call("GET", &format!("/v1/volumes/{name}{q}"), None::<&()>)
    }

    pub fn update_volume(
        &self,
        name: &str,
        tenant: Option<&str>,
        req: &UpdateVolume,
    ) -> Result<Volume, Error> {
        let q = tenant_query(tenant);
        self.http
            .call("PATCH", &format!("/v1/volumes/{name}{q}"), Some(req))
    }

    pub fn delete_volume(&self, name: &str, tenant: Option<&str>) -> Result<(), Error> {
        let q = tenant_query(tenant);
        self.no_content("DELETE", &format!("/v1/volumes/{name}{q}"))
    }

    /// The image catalog's files.
    pub fn images(&self) -> Result<Vec<String>, Error> {
        self.http.call("GET", "/v1/images", None::<&()>)
    }

    pub fn create_vm(&self, req: &CreateVm) -> Result<Vm, Error> {
        self.http.call("POST", "/v1/vms", Some(req))
    }

    /// The caller's VMs; the admin's: `tenant`'s, or every tenant's.
    pub fn vms(&self, tenant: Option<&str>) -> Result<Vec<Vm>, Error> {
        let q = tenant_query(tenant);
        self.http.call("GET", &format!("/v1/vms{q}"), None::<&()>)
    }

    pub fn vm(&self, id: &str, tenant: Option<&str>) -> Result<Vm, Error> {
        let q = tenant_query(tenant);
        self.http
            .call("GET", &format!("/v1/vms/{id}{q}"), None::<&()>)
    }

    /// `POST /v1/vms/ID/ACTION`: `start`, `stop`, `kill` or `restart`; for a stop or restart,
    /// how long the guest has to power off (`None`: the agent's default).
    pub fn vm_action(
        &self,
        id: &str,
        action: &str,
        timeout_seconds: Option<u64>,
        tenant: Option<&str>,
    ) -> Result<Vm, Error> {
        let mut q = tenant_query(tenant);
        if let Some(t) = timeout_seconds {
            q.push(if q.is_empty() { '?' } else { '&' });
            q.push_str(&format!("timeout_seconds={t}"));
        }
        self.http
            .call("POST", &format!("/v1/vms/{id}/{action}{q}"), None::<&()>)
    }

    pub fn delete_vm(&self, id: &str, tenant: Option<&str>) -> Result<(), Error> {
        let q = tenant_query(tenant);
        self.no_content("DELETE", &format!("/v1/vms/{id}{q}"))
    }

    /// The tail of the VM's serial console.
    pub fn console(&self, id: &str, tenant: Option<&str>) -> Result<String, Error> {
        let q = tenant_query(tenant);
        self.text("GET", &format!("/v1/vms/{id}/console{q}"))
    }

    /// A call answered 204, no body.
    fn no_content(&self, method: &str, target: &str) -> Result<(), Error> {
        self.text(method, target).map(|_| ())
    }

    /// A call whose 2xx answer is its body as it is (not JSON); any other, its error.
    fn text(&self, method: &str, target: &str) -> Result<String, Error> {
        let resp = self.http.request(method, target, None)?;
        if resp.is_success() {
            return Ok(resp.body);
        }
        Err(Error::Api {
            status: resp.status,
            message: resp.json()["error"]
                .as_str()
                .unwrap_or(&resp.body)
                .to_string(),
        })
    }
}
