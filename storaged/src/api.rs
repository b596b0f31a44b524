//! Admin API: HTTP/1.1 + JSON under `/v1`, served on a Unix socket (see `openapi.yaml`).
//!
//! Bodies are parsed here, not by an extractor, so every malformed request gets a JSON error
//! naming what is wrong. Volume operations run on the blocking pool: creating a preallocated
//! volume or draining a deleted one's I/O takes real time. The service takes its own locks,
//! never across I/O on a volume's storage, so such an operation holds up no other request.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use storaged_api::{CreateVolume, ErrorBody, Info, StartReplication, UpdateVolume};

use crate::metrics::Metrics;
use crate::service::{self, ErrorKind, VolumeService};

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct ApiState {
    pub service: Arc<VolumeService>,
    pub metrics: Metrics,
    pub metrics_url: Option<String>,
    /// The replication listener's bound address, if it listens.
    pub replication_listen: Option<String>,
    /// The replication link's TLS, when `[replication]` is configured.
    pub replication_tls: Option<crate::replication::tls::Tls>,
    /// Turns true when the daemon stops (for the tasks the API starts).
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// An error answer: a status and `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

/// The HTTP status of each kind of service error: the one place they are mapped.
fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict | ErrorKind::Busy => StatusCode::CONFLICT,
        ErrorKind::PoolFull => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::NotServing => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<service::Error> for ApiError {
    fn from(e: service::Error) -> Self {
        let status = status_of(e.kind());
        if status.is_server_error() {
            tracing::error!("API request failed: {}", crate::error_chain(&e));
        }
        ApiError(status, crate::error_chain(&e))
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "Request body is empty; expected a JSON object".into(),
        ));
    }
    let bad = |msg: String| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("Invalid request body: {msg}"),
        )
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // Name the field: "iops_limit: invalid value: integer `-5`, expected u64".
        let path = e.path().to_string();
        match path.as_str() {
            "." => bad(e.into_inner().to_string()),
            _ => bad(format!("{path}: {}", e.into_inner())),
        }
    })?;
    de.end().map_err(|e| bad(e.to_string()))?;
    Ok(value)
}

/// Runs a service call on the blocking pool.
async fn with_service<T, F>(state: &ApiState, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&VolumeService) -> Result<T, service::Error> + Send + 'static,
{
    let svc = state.service.clone();
    tokio::task::spawn_blocking(move || f(&svc))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Internal error: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

async fn list_volumes(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let v = with_service(&s, |svc| Ok(svc.list())).await?;
    Ok(Json(v))
}

async fn create_volume(State(s): State<ApiState>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let req: CreateVolume = parse_body(&body)?;
    let v = with_service(&s, move |svc| svc.create(req)).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn get_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let v = with_service(&s, move |svc| svc.get(&name)).await?;
    Ok(Json(v))
}

async fn update_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: UpdateVolume = parse_body(&body)?;
    let v = with_service(&s, move |svc| svc.update(&name, req)).await?;
    Ok(Json(v))
}

/// `POST /v1/volumes/{name}/replication`: asks the peer to create the secondary, then records
/// the relationship here. The peer's refusal is answered with the status it gave (409: it has
/// a volume of that name; 507: its pool is full); a peer that cannot be reached or
/// authenticated with 502, one that does not answer with 504.
async fn start_replication(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    use crate::replication::session::{self, Error as PeerError};
    use crate::replication::wire::{DekBytes, Message};
    use crate::replication::{Relationship, ReplicationRole};

    let req: StartReplication = parse_body(&body)?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let Some(tls) = s.replication_tls.clone() else {
        return Err(bad(
            "replication is not configured here: set [replication] cert, key and ca".into(),
        ));
    };
    if req.rpo_seconds == 0 {
        return Err(bad("rpo_seconds must be at least 1".into()));
    }
    let source_name = name.clone();
    let (spec, dek, block_size) =
        with_service(&s, move |svc| svc.replication_source(&source_name)).await?;
    let relationship = uuid::Uuid::new_v4();
    let create = Message::Create {
        relationship: *relationship.as_bytes(),
        volume: session::wire_spec(&spec, block_size),
        dek: dek.map(|k| DekBytes::new(k.as_bytes().to_vec())),
    };
    session::create_on_peer(&tls, &req.peer, &create)
        .await
        .map_err(|e| {
            let status = match &e {
                PeerError::BadPeer(_) | PeerError::ServerName(_) => StatusCode::BAD_REQUEST,
                // The peer's word for what is wrong with the request; anything else it says
                // is its own failure.
                PeerError::Refused { status, .. } if (400..500).contains(status) || *status == 507 => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                PeerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            tracing::warn!(volume = %name, peer = %req.peer, "replication not started: {}", crate::error_chain(&e));
            ApiError(status, crate::error_chain(&e))
        })?;
    let rel = Relationship {
        id: relationship.to_string(),
        role: ReplicationRole::Primary,
        peer: req.peer.clone(),
        mode: req.mode,
        rpo_seconds: req.rpo_seconds,
        generation: 0,
        won: false,
    };
    let v = with_service(&s, move |svc| svc.set_relationship(&name, rel)).await?;
    s.service.wake_senders();
    Ok((StatusCode::CREATED, Json(v)))
}

/// `POST /v1/volumes/{name}/promote[?force=true]`: failover to this secondary.
async fn promote(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    params: Result<Query<ForceParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let force = force_param(params)?;
    let v = with_service(&s, move |svc| svc.promote(&name, force)).await?;
    Ok(Json(v))
}

/// `POST /v1/volumes/{name}/demote`: a superseded primary becomes its peer's secondary.
async fn demote(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let v = with_service(&s, move |svc| svc.demote(&name)).await?;
    Ok(Json(v))
}

/// How long a switchover may take to drain, sync and swap.
const SWITCHOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `POST /v1/volumes/{name}/switchover`: fences the primary's frontends, lets the stream
/// drain, has the secondary promote itself and becomes its secondary; answers once done.
/// 504 when it could not finish in time (this side stays fenced if the peer may have been
/// promoted).
async fn switchover(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let begun = name.clone();
    let done = with_service(&s, move |svc| svc.begin_switchover(&begun)).await?;
    let outcome = match tokio::time::timeout(SWITCHOVER_TIMEOUT, done).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err("the volume's sender ended".into()),
        Err(_) => {
            let why = format!(
                "not done within {} s (is the link too slow for what was written?)",
                SWITCHOVER_TIMEOUT.as_secs()
            );
            s.service.end_switchover(&name, Err(why.clone()), false);
            return Err(ApiError(StatusCode::GATEWAY_TIMEOUT, why));
        }
    };
    outcome.map_err(|why| ApiError(StatusCode::CONFLICT, format!("switchover failed: {why}")))?;
    let v = with_service(&s, move |svc| svc.replication_info(&name)).await?;
    Ok(Json(v))
}

/// `POST /v1/volumes/{name}/resolve` `{"keep": "local" | "peer"}`: ends a split brain.
async fn resolve(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: storaged_api::Resolve = parse_body(&body)?;
    let v = with_service(&s, move |svc| svc.resolve(&name, req.keep)).await?;
    Ok(Json(v))
}

/// `POST /v1/volumes/{name}/unreplicate`: ends the relationship here, and on the peer if it
/// can be reached.
async fn unreplicate(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let ended = name.clone();
    let (relationship, peer) = with_service(&s, move |svc| svc.unreplicate(&ended)).await?;
    let peer_ended = match (&s.replication_tls, uuid::Uuid::parse_str(&relationship)) {
        (Some(tls), Ok(id)) => {
            match crate::replication::session::end_on_peer(tls, &peer, *id.as_bytes()).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(volume = %name, %peer, "replication ended here, but the peer was not told: {}", crate::error_chain(&e));
                    false
                }
            }
        }
        _ => false,
    };
    Ok(Json(storaged_api::Unreplicated {
        name,
        relationship,
        peer_ended,
    }))
}

async fn get_replication(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let v = with_service(&s, move |svc| svc.replication_info(&name)).await?;
    Ok(Json(v))
}

async fn clear_failure(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let v = with_service(&s, move |svc| svc.clear_failure(&name)).await?;
    Ok(Json(v))
}

/// `?force=true` of a delete or a promote.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceParams {
    #[serde(default)]
    force: bool,
}

fn force_param(
    params: Result<Query<ForceParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<bool> {
    let Query(params) = params.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("Invalid query: {}", e.body_text()),
        )
    })?;
    Ok(params.force)
}

async fn delete_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    params: Result<Query<ForceParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let force = force_param(params)?;
    let v = with_service(&s, move |svc| svc.delete(&name, force)).await?;
    Ok(Json(v))
}

async fn info(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let url = s.metrics_url.clone();
    let replication_listen = s.replication_listen.clone();
    let v = with_service(&s, move |svc| {
        Ok(Info {
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: svc.data_dir().to_owned(),
            admin_socket: svc.paths().admin_socket.clone(),
            socket_dir: svc.paths().socket_dir.clone(),
            metrics_url: url,
            replication_listen,
            pool_capacity_bytes: svc.pool_capacity(),
            allocated_bytes: svc.allocated_bytes(),
        })
    })
    .await?;
    Ok(Json(v))
}

async fn key_status(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let v = with_service(&s, |svc| svc.key_status()).await?;
    Ok(Json(v))
}

async fn rotate_keys(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let v = with_service(&s, |svc| svc.rotate_keys()).await?;
    Ok(Json(v))
}

async fn metrics(State(m): State<Metrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "No such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed on this endpoint".into(),
    )
}

/// The admin API router.
pub fn router(state: ApiState) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state.metrics.clone());
    Router::new()
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(get_volume).patch(update_volume).delete(delete_volume),
        )
        .route("/v1/volumes/{name}/clear-failure", post(clear_failure))
        .route(
            "/v1/volumes/{name}/replication",
            get(get_replication).post(start_replication),
        )
        .route("/v1/volumes/{name}/promote", post(promote))
        .route("/v1/volumes/{name}/demote", post(demote))
        .route("/v1/volumes/{name}/switchover", post(switchover))
        .route("/v1/volumes/{name}/resolve", post(resolve))
        .route("/v1/volumes/{name}/unreplicate", post(unreplicate))
        .route("/v1/info", get(info))
        .route("/v1/keys", get(key_status))
        .route("/v1/keys/rotate", post(rotate_keys))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .merge(metrics)
}

/// The metrics router served on TCP.
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .fallback(not_found)
        .with_state(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_service_error_has_the_status_the_api_answered_before_kinds() {
        use crate::backing::Error as B;
        let not_there = || B::Open {
            path: "/dev/nothing".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let denied = || B::Open {
            path: "/dev/sda".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let cases = [
            (service::Error::BadRequest("x".into()), 400),
            (service::Error::Shrink("v".into(), 2, 1), 400),
            (service::Error::Backing(not_there()), 400),
            (service::Error::NotFound("v".into()), 404),
            (service::Error::AlreadyExists("v".into()), 409),
            (service::Error::Attached("v".into()), 409),
            (service::Error::NotFailed("v".into()), 409),
            (service::Error::Busy("v".into(), "delete"), 409),
            (service::Error::RotationUnderWay, 409),
            (
                service::Error::Backing(B::DeviceBusy {
                    path: "/dev/sdb".into(),
                }),
                409,
            ),
            (
                service::Error::PoolFull {
                    requested: 2,
                    available: 1,
                    capacity: 1,
                },
                507,
            ),
            (service::Error::NotServing("v".into(), "gone".into()), 503),
            (service::Error::Backing(denied()), 500),
        ];
        for (e, status) in cases {
            let msg = e.to_string();
            assert_eq!(ApiError::from(e).0.as_u16(), status, "{msg}");
        }
    }

    /// Routes of [`super::router`]; each must be described in openapi.yaml.
    const ROUTES: [&str; 13] = [
        "/v1/volumes",
        "/v1/volumes/{name}",
        "/v1/volumes/{name}/clear-failure",
        "/v1/volumes/{name}/replication",
        "/v1/volumes/{name}/promote",
        "/v1/volumes/{name}/demote",
        "/v1/volumes/{name}/switchover",
        "/v1/volumes/{name}/resolve",
        "/v1/volumes/{name}/unreplicate",
        "/v1/info",
        "/v1/keys",
        "/v1/keys/rotate",
        "/metrics",
    ];

    #[test]
    fn openapi_file_describes_every_route() {
        let spec = include_str!("../openapi.yaml");
        for route in ROUTES {
            assert!(
                spec.lines().any(|l| l == format!("  {route}:")),
                "openapi.yaml lacks {route}"
            );
        }
        let documented = spec
            .lines()
            .filter(|l| l.starts_with("  /") && l.ends_with(':'))
            .count();
        assert_eq!(
            documented,
            ROUTES.len(),
            "openapi.yaml documents routes the router lacks"
        );
    }
}
