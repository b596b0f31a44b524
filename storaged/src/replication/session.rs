//! What runs on an authenticated replication connection.
//!
//! - [`serve`], on the side that accepted it: the first message says what the peer wants. A
//!   `Create` asks this daemon to create the secondary of a relationship (the primary's name,
//!   id, size, tier, queues and encryption, with its key); the answer is `Accepted`, or
//!   `Refused` with the HTTP status and reason the primary's API passes on (409: a volume of
//!   that name exists here; 507: the pool has not the room; 400: what this daemon cannot
//!   take).
//!   A `Hello` from a primary starts its stream (`receiver.rs`), once `roles.rs` has said
//!   what the two sides are to each other (this side, a primary too, may have been
//!   superseded and become the secondary first). An `End` ends the relationship here.
//! - [`create_on_peer`], on the primary: connects to the peer, sends its `Create` and reads
//!   the answer; [`end_on_peer`] sends an `End`.
//!
//! Anything else first, a malformed frame, or nothing within [`FIRST_MESSAGE_TIMEOUT`]
//! closes the connection with a log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::link::{self, Link};
use super::roles::{self, Meeting, Side};
use super::tls::{self, Tls};
use super::wire::{DekBytes, Message, Role, VolumeSpec};
use super::{Relationship, ReplicationMode, ReplicationRole};
use crate::crypto::{self, Dek};
use crate::service::{self, ErrorKind, PrimaryLink, SecondaryOrigin, VolumeService};
use size::ByteSize;
use storaged_api::CreateVolume;

/// Time a peer has to send its first message once the handshake is done.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a primary gives the peer to connect, authenticate and answer a `Create` (which
/// creates a sparse file: a secondary takes room as data arrives).
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of a primary's request to its peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("'{0}' is not HOST:PORT")]
    BadPeer(String),
    #[error("cannot connect to the peer {peer}")]
    Connect {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ServerName(#[from] tls::Error),
    #[error("TLS handshake with the peer {peer} failed")]
    Handshake {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Link(#[from] link::Error),
    #[error("the peer {0} did not answer in time")]
    Timeout(String),
    #[error("the peer {0} closed the connection without an answer")]
    NoAnswer(String),
    #[error("the peer {peer} refused: {reason}")]
    Refused {
        peer: String,
        status: u16,
        reason: String,
    },
    #[error("the peer {0} answered with an unexpected message")]
    Unexpected(String),
}

/// Serves one authenticated peer connection. A daemon that stops (`stop` true) stops waiting
/// for the peer; a create under way is finished.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    service: Arc<VolumeService>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut link = Link::new(stream);
    let first = tokio::select! {
        r = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, link.recv()) => r,
        _ = stop.wait_for(|s| *s) => return,
    };
    let first = match first {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(%peer, "replication peer closed: {}", crate::error_chain(&e));
            return;
        }
        Err(_) => {
            tracing::warn!(
                %peer,
                "replication peer closed: nothing sent within {} s",
                FIRST_MESSAGE_TIMEOUT.as_secs()
            );
            return;
        }
    };
    let answer = match first {
        Message::Hello {
            relationship,
            role: Role::Primary,
            generation,
            diverged,
            won,
            listen,
            volume,
            ..
        } => {
            let side = Side {
                role: ReplicationRole::Primary,
                generation,
                diverged,
                won,
            };
            meet_primary(
                link,
                peer,
                relationship,
                side,
                listen,
                volume,
                service,
                stop,
            )
            .await;
            return;
        }
        Message::End { relationship } => {
            let service = service.clone();
            tokio::task::spawn_blocking(move || end(&service, peer, relationship))
                .await
                .unwrap_or_else(|e| Message::Refused {
                    status: 500,
                    reason: format!("the end failed: {e}"),
                })
        }
        Message::Create {
            relationship,
            volume,
            dek,
        } => {
            let service = service.clone();
            tokio::task::spawn_blocking(move || {
                create_secondary(&service, peer, relationship, volume, dek)
            })
            .await
            .unwrap_or_else(|e| Message::Refused {
                status: 500,
                reason: format!("the create failed: {e}"),
            })
        }
        other => {
            tracing::warn!(%peer, message = ?other.message_type(), "replication peer closed: its first message is not one a session starts with");
            Message::Goodbye {
                reason: "expected Create first".into(),
            }
        }
    };
    if let Err(e) = link.send(&answer).await {
        tracing::warn!(%peer, "replication peer: cannot send the answer: {}", crate::error_chain(&e));
    }
    link.wipe();
    link.shutdown().await;
}

/// A primary's `Hello` for relationship `relationship`: this side receives its stream if it
/// is the secondary, or becomes it if `roles::meet` says this side was superseded; otherwise
/// (the peer was superseded, or both were written: split brain) it answers with its own
/// `Hello` as a primary, from which the peer reaches the same verdict, and closes.
#[allow(clippy::too_many_arguments)]
async fn meet_primary<S>(
    mut link: Link<S>,
    peer: SocketAddr,
    relationship: [u8; 16],
    side: Side,
    listen: String,
    volume: VolumeSpec,
    service: Arc<VolumeService>,
    stop: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = uuid::Uuid::from_bytes(relationship).to_string();
    let local = service
        .volume_of_relationship(&id)
        .and_then(|name| Some((service.local_side(&name)?, name)));
    let mut verdict = local.as_ref().map(|(l, _)| roles::meet(*l, side));
    if let (Some(Meeting::Demote { generation }), Some((_, name))) = (verdict, &local) {
        tracing::warn!(volume = %name, %peer, generation, "replication: the peer is the primary of a newer generation; this side becomes its secondary");
        let demoted =
            tokio::task::block_in_place(|| service.demote_to(name, generation, 0, !side.won));
        match demoted {
            Ok(()) => {}
            // Written while cut off, seen once fenced: a split brain after all.
            Err(_) if !side.won && service.local_side(name).is_some_and(|s| s.diverged) => {
                verdict = Some(Meeting::SplitBrain);
            }
            Err(e) => {
                tracing::error!(volume = %name, "replication: cannot become the secondary: {}", crate::error_chain(&e));
                let _ = link
                    .send(&Message::Refused {
                        status: 500,
                        reason: format!("cannot become the secondary: {e}"),
                    })
                    .await;
                return;
            }
        }
    }
    let local = local.and_then(|(_, name)| Some((service.local_side(&name)?, name)));
    if let (Some(v @ (Meeting::PeerDemotes | Meeting::SplitBrain)), Some((local, name))) =
        (verdict, local)
    {
        {
            if v == Meeting::SplitBrain {
                service.note_split_brain(&name, side.generation);
                tracing::error!(volume = %name, %peer, peer_generation = side.generation, "replication: split brain: both sides were written as primaries since they were level; resolve with keep = local or peer");
            }
            let Some(PrimaryLink {
                relationship: rel,
                spec,
                block_size,
                ..
            }) = service.primary_link(&name)
            else {
                return;
            };
            let _ = link
                .send(&Message::Hello {
                    relationship,
                    role: Role::Primary,
                    generation: local.generation,
                    shared_seq: 0,
                    diverged: local.diverged,
                    won: rel.won,
                    epoch: 0,
                    consistent: true,
                    listen: String::new(),
                    volume: wire_spec(&spec, block_size),
                    all_regions: false,
                    regions: Vec::new(),
                })
                .await;
            link.shutdown().await;
            return;
        }
    }
    super::receiver::serve(
        link,
        peer,
        relationship,
        listen,
        side.generation,
        volume,
        service,
        stop,
    )
    .await;
}

/// A peer's `End`: this side's volume of the relationship leaves it, keeping its data. A
/// stream that is ending is given a few seconds to.
fn end(service: &VolumeService, peer: SocketAddr, relationship: [u8; 16]) -> Message {
    let id = uuid::Uuid::from_bytes(relationship).to_string();
    let Some(name) = service.volume_of_relationship(&id) else {
        return Message::Accepted { relationship };
    };
    let mut tries = 0;
    loop {
        match service.unreplicate(&name) {
            Ok(_) => {
                tracing::info!(volume = %name, %peer, "replication ended by the peer");
                return Message::Accepted { relationship };
            }
            Err(e) if tries < 50 && matches!(e.kind(), ErrorKind::Conflict | ErrorKind::Busy) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Message::Refused {
                    status: status_of(&e),
                    reason: e.to_string(),
                }
            }
        }
    }
}

/// Creates the secondary a peer's `Create` describes; the answer to send back.
fn create_secondary(
    service: &VolumeService,
    peer: SocketAddr,
    relationship: [u8; 16],
    volume: VolumeSpec,
    dek: Option<DekBytes>,
) -> Message {
    let refused = |status: u16, reason: String| {
        tracing::warn!(%peer, volume = %volume.name, "replication: refused to create a secondary: {reason}");
        Message::Refused { status, reason }
    };
    let dek = match dek.as_ref().map(|k| Dek::from_bytes(k.as_bytes())) {
        None => None,
        Some(Some(k)) => Some(k),
        Some(None) => {
            return refused(
                400,
                format!(
                    "the volume's key is not the {} bytes of XTS-AES-256",
                    crypto::DEK_LEN
                ),
            )
        }
    };
    let req = CreateVolume {
        name: volume.name.clone(),
        size: ByteSize(volume.size),
        tier: Some(volume.tier.clone()),
        num_queues: Some(volume.num_queues),
        encryption: Some(
            if volume.encrypted {
                crypto::CIPHER
            } else {
                "none"
            }
            .into(),
        ),
        read_only: false,
        // Sparse: the secondary takes room only as data arrives.
        preallocate: Some(false),
        device: None,
        iops_limit: None,
        bandwidth_limit: None,
        owner: None,
    };
    let origin = SecondaryOrigin {
        id: volume.id.clone(),
        dek,
        relationship: Relationship {
            id: uuid::Uuid::from_bytes(relationship).to_string(),
            role: ReplicationRole::Secondary,
            peer: peer.to_string(),
            mode: ReplicationMode::Async,
            rpo_seconds: 0,
            generation: 0,
            won: false,
        },
    };
    match service.create_secondary(req, origin, volume.block_size) {
        Ok(_) => {
            tracing::info!(%peer, volume = %volume.name, "replication: created the secondary of a peer's volume");
            Message::Accepted { relationship }
        }
        Err(e) => refused(status_of(&e), e.to_string()),
    }
}

/// The HTTP status a refusal carries, for the primary's API to answer with.
fn status_of(e: &service::Error) -> u16 {
    match e.kind() {
        ErrorKind::BadRequest => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Conflict => 409,
        ErrorKind::Busy => 409,
        ErrorKind::PoolFull => 507,
        ErrorKind::NotServing | ErrorKind::Internal => 500,
    }
}

/// Connects to `peer` (`HOST:PORT`) and authenticates both ways: the peer's certificate must
/// chain to the CA and name HOST.
pub async fn connect(
    tls: &Tls,
    peer: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let (host, _port) = peer
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| Error::BadPeer(peer.to_string()))?;
    let name = Tls::server_name(host)?;
    let tcp = TcpStream::connect(peer)
        .await
        .map_err(|source| Error::Connect {
            peer: peer.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    tls.connector()
        .connect(name, tcp)
        .await
        .map_err(|source| Error::Handshake {
            peer: peer.to_string(),
            source,
        })
}

/// Tells `peer` that relationship `relationship` ended: `Ok` once its volume left it.
pub async fn end_on_peer(tls: &Tls, peer: &str, relationship: [u8; 16]) -> Result<(), Error> {
    ask_peer(tls, peer, &Message::End { relationship }, &relationship).await
}

/// The primary's side of a `Create`: connects to `peer` (`HOST:PORT`), authenticates, sends
/// the message and returns the peer's `Accepted`, or why not.
pub async fn create_on_peer(tls: &Tls, peer: &str, create: &Message) -> Result<(), Error> {
    let Some(id) = sent_id(create) else {
        return Err(Error::Unexpected(peer.to_string()));
    };
    ask_peer(tls, peer, create, id).await
}

/// Sends `request` to `peer` on a connection of its own; `Ok` when the answer is `Accepted`
/// for relationship `id`.
async fn ask_peer(tls: &Tls, peer: &str, request: &Message, id: &[u8; 16]) -> Result<(), Error> {
    let create = request;
    let exchange = async {
        let stream = connect(tls, peer).await?;
        let mut link = Link::new(stream);
        let sent = link.send(create).await;
        link.wipe();
        sent?;
        let answer = link.recv().await?;
        link.shutdown().await;
        answer.ok_or_else(|| Error::NoAnswer(peer.to_string()))
    };
    match tokio::time::timeout(CREATE_TIMEOUT, exchange).await {
        Err(_) => Err(Error::Timeout(peer.to_string())),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Message::Accepted { relationship })) if &relationship == id => Ok(()),
        Ok(Ok(Message::Refused { status, reason })) => Err(Error::Refused {
            peer: peer.to_string(),
            status,
            reason,
        }),
        Ok(Ok(_)) => Err(Error::Unexpected(peer.to_string())),
    }
}

/// A volume as the link describes it.
pub fn wire_spec(spec: &crate::volume::VolumeSpec, block_size: u32) -> VolumeSpec {
    VolumeSpec {
        name: spec.name.to_string(),
        id: spec.id.clone(),
        size: spec.size_bytes,
        block_size,
        tier: spec.tier.to_string(),
        encrypted: spec.encryption.is_some(),
        num_queues: spec.num_queues,
    }
}

/// The relationship id of a `Create`.
fn sent_id(create: &Message) -> Option<&[u8; 16]> {
    match create {
        Message::Create { relationship, .. } => Some(relationship),
        _ => None,
    }
}
