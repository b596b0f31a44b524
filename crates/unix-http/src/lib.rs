//! A small blocking client for an HTTP/1.1 + JSON API on a Unix socket: std's `UnixStream`, no
//! async runtime, one request per connection (`Connection: close`). storaged's admin API
//! (`storaged-api`) and vmm's API (`vmm-api`) are both reached through it.
//!
//! [`Client::call`] sends a typed body and decodes a 2xx answer; any other answer is
//! [`Error::Api`] with its status and the `"error"` of the body, which both daemons send on
//! every error. [`Client::request`] sends any request and returns the raw [`Response`], for
//! callers that check statuses and bodies themselves.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How long an answer may take by default: storaged's longest call (a create that fills a
/// preallocated volume, a key rotation) stays well inside it.
const READ_TIMEOUT: Duration = Duration::from_secs(600);

/// The largest answer taken by default.
const MAX_RESPONSE: u64 = 64 << 20;

/// Errors of a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot connect to {path} (is {daemon} running?)")]
    Connect {
        path: PathBuf,
        daemon: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on the API socket")]
    Io(#[from] std::io::Error),
    #[error("Malformed HTTP response: {0}")]
    Malformed(String),
    #[error("The answer took longer than {0:?}")]
    TimedOut(Duration),
    #[error("The answer is larger than {0} bytes")]
    TooLarge(u64),
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

/// The body of an error answer.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// Connects to the Unix stream socket at `path`, waiting at most `timeout`: a server that
/// does not accept, its backlog full, makes a plain connect wait for ever. The connect is
/// non-blocking, tried again while the backlog is full (EAGAIN); the stream it returns blocks.
pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid (AF_UNSPEC, empty path) before it is filled in.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path longer than a Unix socket address holds",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket that nothing else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: connect(2) on the socket `stream` owns, with an address alive for the call
        // and its size.
        let r = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Some(libc::EAGAIN) => return Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            _ => return Err(e),
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Client of one API socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    /// Who serves the socket ("storaged", "vmm"): the `Host` header, and named when the
    /// socket cannot be reached.
    daemon: &'static str,
    /// Sent as `Authorization: Bearer ...` with every request, where the API wants a token.
    bearer: Option<String>,
    /// How long the whole exchange may take: the request sent and the answer read, however
    /// slowly it comes.
    timeout: Duration,
    /// The largest answer read.
    max_response: u64,
}

impl Client {
    pub fn new(path: impl AsRef<Path>, daemon: &'static str) -> Self {
        Client {
            path: path.as_ref().to_owned(),
            daemon,
            bearer: None,
            timeout: READ_TIMEOUT,
            max_response: MAX_RESPONSE,
        }
    }

    /// The same client, giving each exchange at most `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same client, reading answers of at most `bytes` (a peer it does not trust cannot
    /// make it hold more).
    pub fn with_max_response(mut self, bytes: u64) -> Self {
        self.max_response = bytes;
        self
    }

    /// The same client, sending `token` as its bearer token.
    pub fn with_bearer(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request; `body` is sent as JSON if given.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&str>,
    ) -> Result<Response, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect(&self.path, self.timeout).map_err(|source| Error::Connect {
            path: self.path.clone(),
            daemon: self.daemon,
            source,
        })?;
        stream.set_write_timeout(Some(self.timeout))?;
        let body = body.unwrap_or("");
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.daemon
        );
        if let Some(token) = &self.bearer {
            req.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
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
        let mut chunk = [0u8; 16 << 10];
        loop {
            // The time left, whatever each read takes: an answer trickled a byte at a time
            // still ends at the deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::TimedOut(self.timeout));
            }
            stream.set_read_timeout(Some(left))?;
            let n = match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::TimedOut(self.timeout))
                }
                Err(e) => return Err(e.into()),
            };
            if (raw.len() + n) as u64 > self.max_response {
                return Err(Error::TooLarge(self.max_response));
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        parse_response(&raw)
    }

    pub fn get(&self, target: &str) -> Result<Response, Error> {
        self.request("GET", target, None)
    }

    /// Sends one request with a typed body (none: `None::<&()>`) and decodes a 2xx answer
    /// as `R`.
    pub fn call<R: DeserializeOwned>(
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

    /// A server on a socket in `dir` that reads a request and then runs `answer` on the
    /// connection.
    fn serve(dir: &Path, answer: impl FnOnce(&mut UnixStream) + Send + 'static) -> PathBuf {
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            answer(&mut c);
        });
        path
    }

    #[test]
    fn an_answer_trickled_past_the_timeout_ends_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), |c| {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n");
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(50));
                if c.write_all(b"X").is_err() {
                    return;
                }
            }
        });
        let client = Client::new(&path, "test").with_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let r = client.request("GET", "/", None);
        assert!(matches!(r, Err(Error::TimedOut(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_server_that_accepts_nothing_makes_the_connect_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Fill the backlog: nothing is ever accepted.
        let mut held = Vec::new();
        loop {
            match connect(&path, Duration::from_millis(50)) {
                Ok(s) => held.push(s),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
                    break;
                }
            }
            assert!(held.len() < 10_000, "the backlog never filled");
        }
        let client = Client::new(&path, "test").with_timeout(Duration::from_millis(200));
        let started = Instant::now();
        assert!(matches!(
            client.request("GET", "/", None),
            Err(Error::Connect { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }

    #[test]
    fn an_answer_larger_than_the_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), |c| {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let _ = c.write_all(&vec![b'x'; 100_000]);
        });
        let client = Client::new(&path, "test").with_max_response(10_000);
        let r = client.request("GET", "/", None);
        assert!(matches!(r, Err(Error::TooLarge(10_000))), "{r:?}");
    }

    #[test]
    fn an_unreachable_socket_names_the_daemon_expected_there() {
        let e = Client::new("/nonexistent/api.sock", "vmm")
            .get("/v1/vm")
            .unwrap_err();
        assert!(matches!(e, Error::Connect { .. }));
        assert_eq!(
            e.to_string(),
            "Cannot connect to /nonexistent/api.sock (is vmm running?)"
        );
        assert_eq!(e.status(), None);
    }
}
