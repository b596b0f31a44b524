//! A blocking client for vmm's API on its Unix socket (`--api-sock`), for the node agent and
//! the tests, over `unix-http`. Each call sends and returns the types of this crate; an
//! answer other than 2xx is [`Error::Api`] with its status and vmm's message (409 for a
//! transition the VM's state does not allow, 400 for a configuration the command line would
//! refuse too).

use std::path::Path;

pub use unix_http::{Error, Response};

use crate::{Counters, Transition, VmConfig, VmStatus};

/// Client of one vmm's API socket.
#[derive(Debug, Clone)]
pub struct VmmClient {
    http: unix_http::Client,
}

impl VmmClient {
    pub fn new(api_socket: impl AsRef<Path>) -> Self {
        VmmClient {
            http: unix_http::Client::new(api_socket, "vmm"),
        }
    }

    /// The same client, waiting at most `timeout` for each answer (a supervisor's calls: a
    /// vmm that does not answer must not hold it).
    pub fn with_timeout(self, timeout: std::time::Duration) -> Self {
        VmmClient {
            http: self.http.with_timeout(timeout),
        }
    }

    /// The same client, reading answers of at most `bytes` (a supervisor's calls: a vmm
    /// taken over by its guest must not make it hold more).
    pub fn with_max_response(self, bytes: u64) -> Self {
        VmmClient {
            http: self.http.with_max_response(bytes),
        }
    }

    /// Sends one request; `body` is sent as JSON if given.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&str>,
    ) -> Result<Response, Error> {
        self.http.request(method, target, body)
    }

    pub fn get(&self, target: &str) -> Result<Response, Error> {
        self.http.get(target)
    }

    /// `GET /v1/vm`: the VM's state and configuration.
    pub fn status(&self) -> Result<VmStatus, Error> {
        self.http.call("GET", "/v1/vm", None::<&()>)
    }

    /// `PUT /v1/vm/config`: configures a vmm started with only an API socket.
    pub fn configure(&self, config: &VmConfig) -> Result<VmStatus, Error> {
        self.http.call("PUT", "/v1/vm/config", Some(config))
    }

    /// `POST /v1/vm/start`.
    pub fn start(&self) -> Result<Transition, Error> {
        self.transition("start")
    }

    /// `POST /v1/vm/pause`.
    pub fn pause(&self) -> Result<Transition, Error> {
        self.transition("pause")
    }

    /// `POST /v1/vm/resume`.
    pub fn resume(&self) -> Result<Transition, Error> {
        self.transition("resume")
    }

    /// `POST /v1/vm/power-button`: the guest decides (a power-off ends vmm with 0).
    pub fn power_button(&self) -> Result<Transition, Error> {
        self.transition("power-button")
    }

    /// `POST /v1/vm/shutdown`: the VM ends and vmm exits with 0.
    pub fn shutdown(&self) -> Result<Transition, Error> {
        self.transition("shutdown")
    }

    /// `POST /v1/vm/kill`: vmm exits with 4.
    pub fn kill(&self) -> Result<Transition, Error> {
        self.transition("kill")
    }

    /// `GET /v1/vm/counters`.
    pub fn counters(&self) -> Result<Counters, Error> {
        self.http.call("GET", "/v1/vm/counters", None::<&()>)
    }

    fn transition(&self, name: &str) -> Result<Transition, Error> {
        self.http
            .call("POST", &format!("/v1/vm/{name}"), None::<&()>)
    }
}
