//! A blocking client of the agent's API on its Unix socket, used by `agentctl` and the tests,
//! over `unix-http` (one request per connection, every request with the caller's bearer token).
//! An answer other than 2xx is [`Error::Api`] with its status and the agent's message.

use std::path::Path;

pub use unix_http::{Error, Response};

use crate::{CreateTenant, TenantCreated, TenantInfo, Whoami};

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
        let resp = self
            .http
            .request("DELETE", &format!("/v1/tenants/{name}"), None)?;
        if resp.is_success() {
            return Ok(());
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
