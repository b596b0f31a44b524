//! The agent's HTTP API (`/v1`, JSON), the same on its TCP address and its Unix socket.
//!
//! Every request passes [`authenticate`] first: its bearer token names the admin or a tenant
//! ([`Principal`], put in the request's extensions), or the answer is 401. Each call then
//! checks what that principal may do: the tenant calls are the admin's (403 for a tenant).
//! A mutating call (any method but GET and HEAD) writes one audit line, target `audit`: who,
//! the method and path, and the status, never a token. Errors are `{"error": "..."}` with
//! their 4xx/5xx, unknown paths and methods included.

use std::sync::Arc;

use agent_api::{CreateTenant, ErrorBody, Role, Whoami};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;

use crate::auth::{self, Authority, Principal};
use crate::tenants::{self, TenantRegistry};

/// What the handlers share.
pub struct ApiState {
    pub authority: Arc<Authority>,
    pub tenants: TenantRegistry,
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

impl From<tenants::Error> for ApiError {
    fn from(e: tenants::Error) -> Self {
        use tenants::Error as E;
        let status = match &e {
            E::InvalidName(_) => StatusCode::BAD_REQUEST,
            E::Exists(_) => StatusCode::CONFLICT,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::Store(_) | E::Token(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = crate::error_chain(&e);
        if status.is_server_error() {
            tracing::error!("API request failed: {message}");
        }
        ApiError(status, message)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The API's routes, behind [`authenticate`].
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{name}", delete(delete_tenant))
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
    const ROUTES: [&str; 3] = ["/v1/whoami", "/v1/tenants", "/v1/tenants/{name}"];

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
