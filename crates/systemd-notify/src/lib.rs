//! systemd readiness notification (`sd_notify`): a datagram to `$NOTIFY_SOCKET`, for the
//! daemons whose units are `Type=notify` (storaged, the agent).

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to systemd if it is listening; a no-op otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
