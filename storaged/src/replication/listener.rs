//! The replication listener on `[replication] listen`: every connection is a TLS handshake
//! first ([`super::tls`]), given at most [`HANDSHAKE_TIMEOUT`]; a peer without a certificate
//! the CA signed, or that does not finish in time, is refused and logged with its address and
//! the reason. At most [`MAX_PENDING`] handshakes run at once, so a flood of connections costs
//! bounded memory. A peer that completes the handshake is handed to the session handler.
//! When told to stop, the listener stops accepting and waits (at most [`SESSION_DRAIN`]) for
//! the sessions under way, so that the daemon's volumes are shut down after them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::server::TlsStream;

use super::tls::Tls;

/// Time a peer has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
pub const MAX_PENDING: usize = 64;

/// How long a stopping listener waits for the sessions under way before it abandons them.
pub const SESSION_DRAIN: Duration = Duration::from_secs(30);

/// Errors starting the listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot listen for replication peers on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the replication address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Accepts peers until `stop` turns true; each authenticated peer goes to `session`, with a
/// receiver of `stop` for it to end its waits by.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    tls: Tls,
    mut stop: watch::Receiver<bool>,
    session: F,
) where
    F: Fn(TlsStream<TcpStream>, SocketAddr, watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let acceptor = tls.acceptor();
    let session = Arc::new(session);
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        // Finished sessions are forgotten as they end.
        while sessions.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = pending.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopped(&mut stop) => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: the next accept may work; do not spin.
                    tracing::warn!("replication listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let acceptor = acceptor.clone();
        let session = session.clone();
        let session_stop = stop.clone();
        sessions.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            match handshake {
                Ok(Ok(stream)) => {
                    tracing::info!(%peer, "replication peer authenticated");
                    session(stream, peer, session_stop).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "replication peer refused: TLS handshake failed: {e}")
                }
                Err(_) => tracing::warn!(
                    %peer,
                    "replication peer refused: no TLS handshake within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(SESSION_DRAIN, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = sessions.len(),
            "replication sessions still under way after {} s: abandoned",
            SESSION_DRAIN.as_secs()
        );
        sessions.abort_all();
    }
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
