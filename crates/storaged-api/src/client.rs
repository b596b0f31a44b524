//! A blocking client for the admin API on its Unix socket, used by `storagectl`, the tests
//! and the node agent, over `unix-http` (one request per connection, no async runtime).
//!
//! The typed calls ([`AdminClient::create_volume`], [`AdminClient::volume`], ...) send and
//! return the types of this crate; an answer other than 2xx is [`Error::Api`] with its status
//! and the daemon's message. [`AdminClient::request`] sends any request and returns the raw
//! [`Response`], for callers that check statuses and bodies themselves.

use std::path::Path;

pub use unix_http::{Error, Response};

use crate::{
    CreateVolume, Deleted, Info, Keep, KeyStatus, ReplicationInfo, Resolve, Rotated,
    StartReplication, Unreplicated, UpdateVolume, VolumeInfo,
};

/// Client of one admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    http: unix_http::Client,
}

impl AdminClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        AdminClient {
            http: unix_http::Client::new(path, "storaged"),
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

    fn call<R: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<R, Error> {
        self.http.call(method, target, body)
    }

    /// `GET /v1/volumes`.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, Error> {
        self.call("GET", "/v1/volumes", None::<&()>)
    }

    /// `POST /v1/volumes`.
    pub fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo, Error> {
        self.call("POST", "/v1/volumes", Some(req))
    }

    /// `GET /v1/volumes/{name}`.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo, Error> {
        self.call("GET", &format!("/v1/volumes/{name}"), None::<&()>)
    }

    /// `PATCH /v1/volumes/{name}`.
    pub fn update_volume(&self, name: &str, req: &UpdateVolume) -> Result<VolumeInfo, Error> {
        self.call("PATCH", &format!("/v1/volumes/{name}"), Some(req))
    }

    /// `DELETE /v1/volumes/{name}`, with `?force=true` to disconnect an attached frontend.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<Deleted, Error> {
        let query = if force { "?force=true" } else { "" };
        self.call("DELETE", &format!("/v1/volumes/{name}{query}"), None::<&()>)
    }

    /// `POST /v1/volumes/{name}/clear-failure`.
    pub fn clear_failure(&self, name: &str) -> Result<VolumeInfo, Error> {
        self.call(
            "POST",
            &format!("/v1/volumes/{name}/clear-failure"),
            None::<&()>,
        )
    }

    /// `POST /v1/volumes/{name}/replication`.
    pub fn start_replication(
        &self,
        name: &str,
        req: &StartReplication,
    ) -> Result<ReplicationInfo, Error> {
        self.call(
            "POST",
            &format!("/v1/volumes/{name}/replication"),
            Some(req),
        )
    }

    /// `GET /v1/volumes/{name}/replication`.
    pub fn replication(&self, name: &str) -> Result<ReplicationInfo, Error> {
        self.call(
            "GET",
            &format!("/v1/volumes/{name}/replication"),
            None::<&()>,
        )
    }

    /// `POST /v1/volumes/{name}/promote`: the secondary becomes the primary (failover);
    /// `force` serves it even with no consistent image.
    pub fn promote(&self, name: &str, force: bool) -> Result<ReplicationInfo, Error> {
        let query = if force { "?force=true" } else { "" };
        self.call(
            "POST",
            &format!("/v1/volumes/{name}/promote{query}"),
            None::<&()>,
        )
    }

    /// `POST /v1/volumes/{name}/demote`: a superseded primary becomes its peer's secondary.
    pub fn demote(&self, name: &str) -> Result<ReplicationInfo, Error> {
        self.call("POST", &format!("/v1/volumes/{name}/demote"), None::<&()>)
    }

    /// `POST /v1/volumes/{name}/switchover`: the primary and its secondary swap roles, with
    /// no write lost.
    pub fn switchover(&self, name: &str) -> Result<ReplicationInfo, Error> {
        self.call(
            "POST",
            &format!("/v1/volumes/{name}/switchover"),
            None::<&()>,
        )
    }

    /// `POST /v1/volumes/{name}/resolve`: ends a split brain keeping one side's data.
    pub fn resolve(&self, name: &str, keep: Keep) -> Result<ReplicationInfo, Error> {
        self.call(
            "POST",
            &format!("/v1/volumes/{name}/resolve"),
            Some(&Resolve { keep }),
        )
    }

    /// `POST /v1/volumes/{name}/unreplicate`: ends the relationship.
    pub fn unreplicate(&self, name: &str) -> Result<Unreplicated, Error> {
        self.call(
            "POST",
            &format!("/v1/volumes/{name}/unreplicate"),
            None::<&()>,
        )
    }

    /// `GET /v1/info`.
    pub fn info(&self) -> Result<Info, Error> {
        self.call("GET", "/v1/info", None::<&()>)
    }

    /// `GET /v1/keys`.
    pub fn key_status(&self) -> Result<KeyStatus, Error> {
        self.call("GET", "/v1/keys", None::<&()>)
    }

    /// `POST /v1/keys/rotate`.
    pub fn rotate_keys(&self) -> Result<Rotated, Error> {
        self.call("POST", "/v1/keys/rotate", None::<&()>)
    }
}
