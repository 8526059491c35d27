//! The admin API (`/admin/v1`): tenants, their keys and everyone's usage,
//! behind the admin token (`auth.admin_token`, sent as a bearer token).
//! Served on the gateway's admin port, and on the public port when
//! `auth.admin_on_public_port` is set; without a token it is not served.
//!
//! | request | answer |
//! |---|---|
//! | `POST /admin/v1/tenants` | 201: the tenant and its first key (shown once) |
//! | `GET /admin/v1/tenants` | every tenant |
//! | `GET`, `PATCH`, `DELETE /admin/v1/tenants/{name}` | one tenant; change its limits; remove it and its keys |
//! | `POST /admin/v1/tenants/{name}/keys` | 201: a new key; `{"revoke_existing": true}` rotates |
//! | `DELETE /admin/v1/tenants/{name}/keys/{key_id}` | revoke one key |
//! | `GET /admin/v1/usage` | every tenant's usage (`usage.rs`) |
//!
//! Writes on one replica are serialised; two replicas writing the same
//! tenant at the same moment is last-writer-wins.

mod tenants;
pub(crate) mod usage;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

use crate::auth::config::TenantDefaults;
use crate::auth::{Authenticator, TenantStore, keys};
use crate::http::call::{REQUEST_ID, request_id_from};
use crate::http::encoding::read_body;
use crate::http::error::{ApiError, Shape, render};
use crate::http::json::parse_object;
use crate::usage::Usage;

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    pub(crate) store: Arc<dyn TenantStore>,
    pub(crate) auth: Authenticator,
    pub(crate) usage: Usage,
    pub(crate) token: Arc<str>,
    pub(crate) defaults: TenantDefaults,
    /// Serialises this replica's writes.
    pub(crate) writes: Arc<tokio::sync::Mutex<()>>,
}

/// The admin API's routes.
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/admin/v1/tenants",
            post(tenants::create).get(tenants::list),
        )
        .route(
            "/admin/v1/tenants/{name}",
            get(tenants::get)
                .patch(tenants::update)
                .delete(tenants::remove),
        )
        .route("/admin/v1/tenants/{name}/keys", post(tenants::create_key))
        .route(
            "/admin/v1/tenants/{name}/keys/{key_id}",
            delete(tenants::revoke_key),
        )
        .route("/admin/v1/usage", get(usage::all))
        .layer(from_fn_with_state(state.clone(), require_token))
        .layer(from_fn(with_request_id))
        .layer(from_fn(|request: Request, next: Next| {
            render(Shape::OpenAi, request, next)
        }))
        .with_state(state)
}

/// Answers with the client's `x-request-id`, or a new one, as the public API
/// does; every admin request is logged with it.
async fn with_request_id(request: Request, next: Next) -> Response {
    let id = request_id_from(request.headers());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let mut response = next.run(request).await;
    tracing::info!(
        target: "lmgrid_gateway::access",
        %method, path, status = response.status().as_u16(), request_id = %id, "admin request"
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Lets through only requests that carry the admin token.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(keys::bearer);
    match presented {
        Some(token) if keys::constant_time_eq(token, &state.token) => next.run(request).await,
        _ => ApiError::unauthenticated(
            "the admin API needs the admin token: send 'Authorization: Bearer <auth.admin_token>'",
        )
        .with_code("invalid_admin_token")
        .into_response(),
    }
}

/// The admin token kept in `path` (`lmgrid up`'s `<data-dir>/admin-token`):
/// read when the file exists, else made up and written there, readable by
/// the owner only.
pub fn admin_token_file(path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().len() >= 16 => return Ok(text.trim().to_string()),
        Ok(_) => {
            return Err(format!(
                "{} holds no admin token of 16 or more characters",
                path.display()
            ));
        }
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("read {}: {error}", path.display()));
        }
        Err(_) => {}
    }
    let token = format!(
        "lmgadm-{}",
        keys::random_token(32).map_err(|e| e.to_string())?
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(token)
}

/// The largest admin request body.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// An admin request's JSON object; an empty body is an empty object.
#[derive(Debug)]
pub(crate) struct AdminBody(pub(crate) serde_json::Map<String, serde_json::Value>);

impl FromRequest<AdminState> for AdminBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &AdminState) -> Result<AdminBody, ApiError> {
        let bytes = read_body(request, MAX_BODY_BYTES).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(AdminBody(Default::default()));
        }
        Ok(AdminBody(parse_object(&bytes)?))
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 500 for a store that failed, logged here where it is handled.
fn store_failed(action: &str, error: &crate::auth::StoreError) -> ApiError {
    tracing::error!(action, %error, "tenant store");
    ApiError::new(
        lmgrid_core::ErrorKind::Unavailable,
        format!("{action}: the tenant store failed: {error}"),
    )
}
