//! The agent's HTTP API (`/v1`, JSON), the same on its TCP address and its Unix socket.
//!
//! Every request passes [`authenticate`] first: its bearer token names the admin or a tenant
//! ([`Principal`], put in the request's extensions), or the answer is 401. Each call then
//! checks what that principal may do: the tenant calls are the admin's (403 for a tenant); a
//! volume call acts in the caller's own namespace, the admin's in the one `?tenant=NAME` (or,
//! for a create, the body's `tenant`) names. A tenant naming another tenant finds nothing
//! there (404), as it finds nothing of another tenant's anywhere.
//! A mutating call (any method but GET and HEAD) writes one audit line, target `audit`: who,
//! the method and path, and the status, never a token. Errors are `{"error": "..."}` with
//! their 4xx/5xx, unknown paths and methods included.

use std::sync::Arc;
use std::time::Duration;

use agent_api::{CreateTenant, CreateVm, CreateVolume, ErrorBody, Role, UpdateVolume, Whoami};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;

use crate::auth::{self, Authority, Principal};
use crate::tenants::{self, TenantRegistry};
use crate::vms::{self, VmSupervisor};
use crate::volumes::{self, VolumeRegistry};

/// What the handlers share.
pub struct ApiState {
    pub authority: Arc<Authority>,
    pub tenants: TenantRegistry,
    pub volumes: VolumeRegistry,
    pub vms: Arc<VmSupervisor>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// An error answer: a status and `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl ApiError {
    /// The answer `status` with `e`'s whole chain; a server error is logged too.
    fn of(status: StatusCode, e: &dyn std::error::Error) -> Self {
        let message = crate::error_chain(e);
        if status.is_server_error() {
            tracing::error!("API request failed: {message}");
        }
        ApiError(status, message)
    }
}

impl From<tenants::Error> for ApiError {
    fn from(e: tenants::Error) -> Self {
        use tenants::Error as E;
        let status = match &e {
            E::InvalidName(_) => StatusCode::BAD_REQUEST,
            E::Exists(_) | E::HasObjects { .. } => StatusCode::CONFLICT,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::Store(_) | E::Token(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::of(status, &e)
    }
}

impl From<volumes::Error> for ApiError {
    fn from(e: volumes::Error) -> Self {
        ApiError::from_volumes(&e)
    }
}

impl ApiError {
    fn from_volumes(e: &volumes::Error) -> Self {
        use volumes::Error as E;
        let status = match &e {
            E::InvalidName(_) | E::NameTooLong { .. } => StatusCode::BAD_REQUEST,
            E::NotFound(_) | E::NoTenant(_) => StatusCode::NOT_FOUND,
            E::Exists(_) | E::InUse { .. } => StatusCode::CONFLICT,
            // storaged's 4xx is the caller's to fix; its 5xx is storaged's fault.
            E::Refused { status, .. } => StatusCode::from_u16(*status)
                .ok()
                .filter(|s| s.is_client_error())
                .unwrap_or(StatusCode::BAD_GATEWAY),
            E::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::of(status, e)
    }
}

impl From<vms::Error> for ApiError {
    fn from(e: vms::Error) -> Self {
        use vms::Error as E;
        let status = match &e {
            E::InvalidId(_) | E::Invalid(_) => StatusCode::BAD_REQUEST,
            E::NotFound(_) | E::NoTenant(_) => StatusCode::NOT_FOUND,
            E::Exists(_) | E::VolumeInUse { .. } | E::Busy(_) => StatusCode::CONFLICT,
            E::Storaged(inner) => return ApiError::from_volumes(inner),
            E::Spawn { .. } | E::Dir { .. } | E::Store(_) | E::Cgroup(_) | E::Jail(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::of(status, &e)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The API's routes, behind [`authenticate`].
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{name}", delete(delete_tenant))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(get_volume).patch(update_volume).delete(delete_volume),
        )
        .route("/v1/images", get(list_images))
        .route("/metrics", get(metrics))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/console", get(vm_console))
        .route("/v1/vms/{id}/{action}", post(vm_action))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .with_state(state)
}

/// Identifies the request's principal (401 if none) and audits a mutating call.
async fn authenticate(
    State(state): State<Arc<ApiState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD);
    let action = format!("{} {}", req.method(), req.uri().path());
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer);
    let principal = match token {
        None => Err("No bearer token: send Authorization: Bearer TOKEN"),
        Some(t) => state
            .authority
            .identify(t)
            .ok_or("Unknown or revoked token"),
    };
    let (who, resp) = match principal {
        Ok(p) => {
            let who = p.audit_name().to_string();
            req.extensions_mut().insert(p);
            (who, next.run(req).await)
        }
        Err(why) => (
            "-".to_string(),
            ApiError(StatusCode::UNAUTHORIZED, why.to_string()).into_response(),
        ),
    };
    if mutating {
        tracing::info!(target: "audit", tenant = %who, action = %action, outcome = resp.status().as_u16(), "audit");
    }
    resp
}

fn admin_only(p: &Principal) -> ApiResult<()> {
    match p {
        Principal::Admin => Ok(()),
        Principal::Tenant(_) => Err(ApiError(
            StatusCode::FORBIDDEN,
            "Only the node's admin token may do this".into(),
        )),
    }
}

/// A volume's own IOPS and bandwidth limits replace its tier's: a tenant that set its own
/// could take more than the tier it pays for, from the other tenants on the node. They are
/// the admin's to set.
fn limits_are_the_admins(p: &Principal, sets_limits: bool) -> ApiResult<()> {
    if sets_limits && *p != Principal::Admin {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "iops_limit and bandwidth_limit replace the tier's: only the node's admin sets them (pick a tier)".into(),
        ));
    }
    Ok(())
}

/// Decodes a JSON body, naming the field that is wrong.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let bad = |msg: String| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("Invalid request body: {msg}"),
        )
    };
    if body.is_empty() {
        return Err(bad("empty; expected a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value =
        serde_path_to_error::deserialize(&mut de).map_err(|e| match e.path().to_string() {
            p if p == "." => bad(e.into_inner().to_string()),
            p => bad(format!("{p}: {}", e.into_inner())),
        })?;
    de.end().map_err(|e| bad(e.to_string()))?;
    Ok(value)
}

/// Runs a blocking call (the database commits with an fsync) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Internal error: {e}"),
        )
    })?
}

async fn whoami(Extension(p): Extension<Principal>) -> Json<Whoami> {
    Json(match p {
        Principal::Admin => Whoami {
            role: Role::Admin,
            tenant: None,
        },
        Principal::Tenant(name) => Whoami {
            role: Role::Tenant,
            tenant: Some(name),
        },
    })
}

async fn create_tenant(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    admin_only(&p)?;
    let req: CreateTenant = parse_body(&body)?;
    let created = blocking(move || Ok(state.tenants.create(&req.name)?)).await?;
    tracing::info!(tenant = %created.name, "tenant created");
    Ok((StatusCode::CREATED, Json(created)))
}

async fn list_tenants(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult<impl IntoResponse> {
    admin_only(&p)?;
    Ok(Json(blocking(move || Ok(state.tenants.list()?)).await?))
}

async fn delete_tenant(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    admin_only(&p)?;
    let n = name.clone();
    blocking(move || Ok(state.tenants.delete(&n)?)).await?;
    tracing::info!(tenant = %name, "tenant revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// The value of parameter `name` in a query, and the query without it.
fn take_param(query: Option<&str>, name: &str) -> (Option<String>, Option<String>) {
    let mut value = None;
    let mut rest = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if k == name => value = Some(v.to_string()),
            _ => rest.push(pair),
        }
    }
    (value, (!rest.is_empty()).then(|| rest.join("&")))
}

/// The `tenant` of a query string; any other key is refused.
fn query_tenant(query: Option<&str>) -> ApiResult<Option<String>> {
    let mut tenant = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("tenant", v)) if tenants::valid_name(v) => tenant = Some(v.to_string()),
            Some(("tenant", v)) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid tenant name {v:?} in the query"),
                ))
            }
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("Unknown query parameter {pair:?}: only tenant=NAME is taken"),
                ))
            }
        }
    }
    Ok(tenant)
}

/// The namespace a volume call acts in: the tenant's own (naming another is a 404), or the
/// one the admin names (it must name one).
fn scope(p: &Principal, named: Option<String>, what: &str) -> ApiResult<String> {
    match (p, named) {
        (Principal::Tenant(own), None) => Ok(own.clone()),
        (Principal::Tenant(own), Some(t)) if &t == own => Ok(t),
        (Principal::Tenant(_), Some(_)) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("No {what} there"),
        )),
        (Principal::Admin, Some(t)) => Ok(t),
        (Principal::Admin, None) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            "The admin acts in a tenant's namespace: name it (?tenant=NAME, or \"tenant\" in a create)"
                .into(),
        )),
    }
}

/// The namespace a listing covers: as [`scope`], but the admin naming none lists every
/// tenant's (`None`).
fn list_scope(p: &Principal, query: Option<&str>, what: &str) -> ApiResult<Option<String>> {
    match (p, query_tenant(query)?) {
        (Principal::Admin, None) => Ok(None),
        (_, named) => scope(p, named, what).map(Some),
    }
}

async fn list_volumes(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> ApiResult<impl IntoResponse> {
    let tenant = list_scope(&p, query.as_deref(), "volumes")?;
    let volumes = blocking(move || Ok(state.volumes.list(tenant.as_deref())?)).await?;
    Ok(Json(volumes))
}

async fn create_volume(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: CreateVolume = parse_body(&body)?;
    limits_are_the_admins(
        &p,
        req.iops_limit.is_some() || req.bandwidth_limit.is_some(),
    )?;
    let tenant = scope(&p, req.tenant.clone(), "tenant")?;
    let v = blocking(move || Ok(state.volumes.create(&tenant, &req)?)).await?;
    tracing::info!(tenant = %v.tenant, volume = %v.name, size = %v.size, "volume created");
    Ok((StatusCode::CREATED, Json(v)))
}

async fn get_volume(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<impl IntoResponse> {
    let tenant = scope(&p, query_tenant(query.as_deref())?, "volume")?;
    Ok(Json(
        blocking(move || Ok(state.volumes.get(&tenant, &name)?)).await?,
    ))
}

async fn update_volume(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let tenant = scope(&p, query_tenant(query.as_deref())?, "volume")?;
    let req: UpdateVolume = parse_body(&body)?;
    limits_are_the_admins(
        &p,
        req.iops_limit.is_some() || req.bandwidth_limit.is_some(),
    )?;
    Ok(Json(
        blocking(move || Ok(state.volumes.update(&tenant, &name, &req)?)).await?,
    ))
}

async fn delete_volume(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<StatusCode> {
    let tenant = scope(&p, query_tenant(query.as_deref())?, "volume")?;
    let (t, n) = (tenant.clone(), name.clone());
    blocking(move || Ok(state.volumes.delete(&t, &n)?)).await?;
    tracing::info!(tenant = %tenant, volume = %name, "volume deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The Prometheus scrape (the admin's: it names every tenant's VMs).
async fn metrics(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult<impl IntoResponse> {
    admin_only(&p)?;
    let text = blocking(move || {
        let vms = state.vms.list(None)?;
        let counters = state.vms.counters();
        let refs: Vec<_> = counters.iter().map(|(v, c)| (v, c.clone())).collect();
        state
            .metrics
            .encode(&vms, &refs)
            .map_err(|e| ApiError::of(StatusCode::INTERNAL_SERVER_ERROR, &e))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

async fn list_images(State(state): State<Arc<ApiState>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(blocking(move || Ok(state.vms.images())).await?))
}

async fn list_vms(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> ApiResult<impl IntoResponse> {
    let tenant = list_scope(&p, query.as_deref(), "VMs")?;
    Ok(Json(
        blocking(move || Ok(state.vms.list(tenant.as_deref())?)).await?,
    ))
}

async fn create_vm(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: CreateVm = parse_body(&body)?;
    let tenant = scope(&p, req.tenant.clone(), "tenant")?;
    let (vm, created) = blocking(move || Ok(state.vms.create(&tenant, &req)?)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(vm)))
}

async fn get_vm(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<impl IntoResponse> {
    let tenant = scope(&p, query_tenant(query.as_deref())?, "VM")?;
    Ok(Json(
        blocking(move || Ok(state.vms.get(&tenant, &id)?)).await?,
    ))
}

async fn delete_vm(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<StatusCode> {
    let tenant = scope(&p, query_tenant(query.as_deref())?, "VM")?;
    blocking(move || Ok(state.vms.delete(&tenant, &id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The serial console's tail (its last 64 KiB), as text.
async fn vm_console(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<impl IntoResponse> {
    let tenant = scope(&p, query_tenant(query.as_deref())?, "VM")?;
    let bytes = blocking(move || Ok(state.vms.console(&tenant, &id, 64 << 10)?)).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

async fn vm_action(
    State(state): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path((id, action)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> ApiResult<impl IntoResponse> {
    // stop and restart take how long the guest has to power off.
    let (timeout, rest) = take_param(query.as_deref(), "timeout_seconds");
    let timeout = match (timeout, action.as_str()) {
        (None, _) => vms::STOP_TIMEOUT,
        (Some(t), "stop" | "restart") => match t.parse::<u64>().map(Duration::from_secs) {
            Ok(d) if d <= vms::MAX_STOP_TIMEOUT => d,
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "timeout_seconds {t:?}: a number of seconds, at most {}",
                        vms::MAX_STOP_TIMEOUT.as_secs()
                    ),
                ))
            }
        },
        (Some(_), _) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "timeout_seconds is for stop and restart".into(),
            ))
        }
    };
    let tenant = scope(&p, query_tenant(rest.as_deref())?, "VM")?;
    let vms = state.vms.clone();
    let vm = match action.as_str() {
        "start" => blocking(move || Ok(vms.start(&tenant, &id)?)).await?,
        "stop" => blocking(move || Ok(vms.stop(&tenant, &id, timeout)?)).await?,
        "kill" => blocking(move || Ok(vms.kill(&tenant, &id)?)).await?,
        "restart" => blocking(move || Ok(vms.restart(&tenant, &id, timeout)?)).await?,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("No VM action {other:?}: start, stop, kill or restart"),
            ))
        }
    };
    Ok(Json(vm))
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("No such endpoint: {method} {}", uri.path()),
    )
}

async fn no_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    /// Routes of [`super::router`]; each must be described in openapi.yaml.
    const ROUTES: [&str; 11] = [
        "/metrics",
        "/v1/whoami",
        "/v1/tenants",
        "/v1/tenants/{name}",
        "/v1/volumes",
        "/v1/volumes/{name}",
        "/v1/images",
        "/v1/vms",
        "/v1/vms/{id}",
        "/v1/vms/{id}/console",
        "/v1/vms/{id}/{action}",
    ];

    #[test]
    fn the_openapi_file_describes_every_route_and_no_other() {
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
