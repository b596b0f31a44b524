//! A small blocking client for the admin API on its Unix socket, used by `storagectl`, the
//! tests and the node agent: std's `UnixStream`, no async runtime. One request per connection
//! (`Connection: close`).
//!
//! The typed calls ([`AdminClient::create_volume`], [`AdminClient::volume`], ...) send and
//! return the types of this crate; an answer other than 2xx is [`Error::Api`] with its status
//! and the daemon's message. [`AdminClient::request`] sends any request and returns the raw
//! [`Response`], for callers that check statuses and bodies themselves.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{CreateVolume, Deleted, ErrorBody, Info, KeyStatus, Rotated, UpdateVolume, VolumeInfo};

/// Errors talking to the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot connect to {path} (is storaged running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on the admin socket")]
    Io(#[from] std::io::Error),
    #[error("Malformed HTTP response: {0}")]
    Malformed(String),
    /// The daemon answered with an error status; `message` is its `"error"`.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("Cannot encode the request body")]
    Encode(#[source] serde_json::Error),
    #[error("Unexpected answer to {target} (HTTP {status})")]
    Decode {
        target: String,
        status: u16,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The HTTP status of an error answer; `None` for errors that got no answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Client of one admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        AdminClient {
            path: path.as_ref().to_owned(),
        }
    }

    /// Sends one request; `body` is sent as JSON if given.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&str>,
    ) -> Result<Response, Error> {
        let mut stream = UnixStream::connect(&self.path).map_err(|source| Error::Connect {
            path: self.path.clone(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        let body = body.unwrap_or("");
        let mut req =
            format!("{method} {target} HTTP/1.1\r\nHost: storaged\r\nConnection: close\r\n");
        if !body.is_empty() || matches!(method, "POST" | "PATCH" | "PUT") {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse_response(&raw)
    }

    pub fn get(&self, target: &str) -> Result<Response, Error> {
        self.request("GET", target, None)
    }

    /// Sends one request with a typed body and decodes a 2xx answer as `R`.
    fn call<R: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&impl Serialize>,
    ) -> Result<R, Error> {
        let body = body
            .map(serde_json::to_string)
            .transpose()
            .map_err(Error::Encode)?;
        let resp = self.request(method, target, body.as_deref())?;
        if !resp.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&resp.body)
                .map(|b| b.error)
                .unwrap_or(resp.body);
            return Err(Error::Api {
                status: resp.status,
                message,
            });
        }
        serde_json::from_str(&resp.body).map_err(|source| Error::Decode {
            target: target.to_string(),
            status: resp.status,
            source,
        })
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

fn parse_response(raw: &[u8]) -> Result<Response, Error> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Malformed("no end of headers".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Malformed(format!("status line '{status_line}'")))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> Result<String, Error> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| Error::Malformed("truncated chunk".into()))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| Error::Malformed(format!("chunk size '{size}'")))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| Error::Malformed("short chunk".into()))?;
        out.push_str(chunk);
        s = rest.get(size + 2..).unwrap_or("");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (201, "{}"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "abcde");
        assert!(parse_response(b"garbage").is_err());
    }
}
