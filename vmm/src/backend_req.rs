//! The backend request channel of a disk (vhost-user BACKEND_REQ): the socket on which the
//! backend sends the VMM messages of its own. The only one handled is CONFIG_CHANGE_MSG (a
//! storaged volume grew): [`ConfigWatch`] marks the configuration stale and raises the
//! disk's interrupt; the transport fetches the configuration again at the guest's next look
//! at it.
//!
//! Each disk's channel is served by a thread of its own ([`ThreadKind::Device`], `disk-cfg`),
//! blocked on the socket. It ends when the backend closes the channel; a message it cannot
//! handle is logged and skipped, and it gives up after more than 100 such in a row.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vmm_sys_util::eventfd::EventFd;

use crate::threads::{self, ThreadKind};

/// Most failed messages in a row before the channel is given up on.
const MAX_FAILURES: u32 = 100;

/// Errors setting up a backend request channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-user backend request channel failed")]
    Channel(#[source] vhost::Error),
    #[error("vhost-user SET_BACKEND_REQ_FD failed")]
    SetFd(#[source] vhost::Error),
    #[error("Cannot start the backend request thread")]
    Thread(#[source] std::io::Error),
}

/// Receives the backend's configuration-change messages (a storaged volume grew): marks the
/// configuration stale and interrupts the guest, which then reads it again.
pub struct ConfigWatch {
    /// Set on a configuration change; the transport clears it when it fetches the new one.
    pub changed: Arc<AtomicBool>,
    /// The disk's interrupt (its irqfd).
    pub irq: EventFd,
}

impl VhostUserFrontendReqHandler for ConfigWatch {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.changed.store(true, Ordering::Release);
        self.irq.write(1)?;
        Ok(0)
    }
}

/// Opens the channel of the backend behind `frontend` (SET_BACKEND_REQ_FD) and serves it
/// with `watch` on a thread of its own. `reply_ack`: the backend asks for replies (REPLY_ACK
/// negotiated).
pub fn serve(
    frontend: &mut Frontend,
    socket: &Path,
    watch: ConfigWatch,
    reply_ack: bool,
) -> Result<(), Error> {
    let mut handler = FrontendReqHandler::new(Arc::new(watch))
        .map_err(|e| Error::Channel(vhost::Error::VhostUserProtocol(e)))?;
    handler.set_reply_ack_flag(reply_ack);
    frontend
        .set_backend_request_fd(&handler.get_tx_raw_fd())
        .map_err(Error::SetFd)?;
    let name = socket.display().to_string();
    threads::spawn(ThreadKind::Device, "disk-cfg", move || {
        let mut failures = 0;
        loop {
            match handler.handle_request() {
                Ok(_) => failures = 0,
                Err(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::SocketBroken(_)
                    | vhost::vhost_user::Error::PartialMessage,
                ) => break,
                Err(e) => {
                    tracing::warn!(disk = %name, "backend request: {e}");
                    failures += 1;
                    if failures > MAX_FAILURES {
                        break;
                    }
                }
            }
        }
        tracing::debug!(disk = %name, "backend request channel closed");
    })
    .map_err(Error::Thread)?;
    Ok(())
}
