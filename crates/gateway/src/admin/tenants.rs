//! Tenant and key handlers of the admin API. Keys are generated here, shown
//! once in the answer that creates them, and stored only as digests.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use lmgrid_core::ErrorKind;
use serde_json::{Map, Value, json};

use super::AdminBody;
use super::{AdminState, store_failed, unix_now};
use crate::auth::config::MAX_LIMIT;
use crate::auth::{
    ANONYMOUS, KeyInfo, KeyRecord, Priority, StoreError, Tenant, keys, valid_tenant_name,
};
use crate::http::error::ApiError;
use crate::http::json::{Fields, type_name};

/// The most models a tenant's allow-list may name.
const MAX_ALLOWED_MODELS: usize = 256;

/// The most keys one tenant may hold at once.
const MAX_KEYS: usize = 16;

/// A tenant as the admin API shows it: never a key digest.
fn view(tenant: &Tenant) -> Value {
    json!({
        "name": tenant.name,
        "requests_per_minute": tenant.limits.requests_per_minute,
        "tokens_per_minute": tenant.limits.tokens_per_minute,
        "max_concurrent": tenant.limits.max_concurrent,
        "priority": tenant.priority.as_str(),
        "allowed_models": tenant.allowed_models,
        "keys": tenant.keys.iter().map(|k| json!({"id": k.id, "created": k.created})).collect::<Vec<_>>(),
        "created": tenant.created,
    })
}

fn name_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(name)| name)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// What a write of tenant `name` answers when the store refused it: 409
/// `tenant_changed` when another write got there first (through another
/// gateway replica: each replica serialises its own), else 503.
fn write_failed(action: &str, name: &str, error: &StoreError) -> ApiError {
    match error {
        StoreError::Conflict(_) => {
            tracing::info!(
                tenant = name,
                action,
                "tenant changed meanwhile; write refused"
            );
            ApiError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "{action}: tenant '{name}' changed while this request ran (another admin \
                     request, through another gateway); nothing was changed, read it and retry"
                ),
            )
            .with_code("tenant_changed")
        }
        other => store_failed(action, other),
    }
}

/// Revokes a key minted for a write that was then refused, so that no key
/// outlives the answer that would have shown it.
async fn unmint(state: &AdminState, key: &keys::NewKey) {
    if let Err(error) = state.store.delete_key(&key.sha256).await {
        tracing::error!(key_id = key.id, %error, "revoke a key of a refused write");
    }
}

/// Tenant `name` as this replica last saw it, with the revision a write of it names.
fn read_tenant(state: &AdminState, name: &str) -> Result<Tenant, ApiError> {
    state
        .auth
        .directory()
        .tenants
        .get(name)
        .cloned()
        .ok_or_else(|| not_found(name))
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no tenant '{name}'")).with_code("tenant_not_found")
}

/// Applies the limit, priority and allow-list fields present in `body` to
/// `tenant`.
fn apply_fields(tenant: &mut Tenant, body: &Map<String, Value>) -> Result<(), ApiError> {
    let fields = Fields::root(body);
    if let Some(v) = fields.integer("requests_per_minute", 0, MAX_LIMIT)? {
        tenant.limits.requests_per_minute = v;
    }
    if let Some(v) = fields.integer("tokens_per_minute", 0, MAX_LIMIT)? {
        tenant.limits.tokens_per_minute = v;
    }
    if let Some(v) = fields.integer("max_concurrent", 0, MAX_LIMIT)? {
        tenant.limits.max_concurrent = v;
    }
    if let Some(priority) = fields.string("priority")? {
        tenant.priority = Priority::parse(priority).ok_or_else(|| {
            ApiError::invalid(
                "priority",
                format!("'priority' is '{priority}'; expected low, normal or high"),
            )
        })?;
    }
    if let Some(models) = fields.array("allowed_models")? {
        if models.len() > MAX_ALLOWED_MODELS {
            return Err(ApiError::invalid(
                "allowed_models",
                format!("'allowed_models' may name at most {MAX_ALLOWED_MODELS} models"),
            ));
        }
        tenant.allowed_models = models
            .iter()
            .map(|model| match model {
                Value::String(name) if !name.is_empty() && name.len() <= 256 => Ok(name.clone()),
                other => Err(ApiError::invalid(
                    "allowed_models",
                    format!(
                        "'allowed_models' must hold model names, not {}",
                        type_name(other)
                    ),
                )),
            })
            .collect::<Result<_, _>>()?;
    }
    Ok(())
}

/// A new key for `tenant`, recorded in the store (not yet in the tenant).
async fn mint(state: &AdminState, tenant: &str) -> Result<(keys::NewKey, KeyInfo), ApiError> {
    let key = keys::generate().map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    let created = unix_now();
    let record = KeyRecord {
        tenant: tenant.to_string(),
        id: key.id.clone(),
        created,
    };
    state
        .store
        .put_key(&key.sha256, &record)
        .await
        .map_err(|e| store_failed("record the key", &e))?;
    let info = KeyInfo {
        id: key.id.clone(),
        sha256: key.sha256.clone(),
        created,
    };
    Ok((key, info))
}

/// `POST /admin/v1/tenants`: a tenant and its first key (unless
/// `"create_key": false`).
pub(super) async fn create(
    State(state): State<AdminState>,
    AdminBody(body): AdminBody,
) -> Result<Response, ApiError> {
    let fields = Fields::root(&body);
    let name = fields.required_string("name")?.to_string();
    if !valid_tenant_name(&name) || name == ANONYMOUS {
        return Err(ApiError::invalid(
            "name",
            format!(
                "'{name}' cannot name a tenant: use 1 to 63 of a-z, 0-9, '.', '_' and '-', \
                 starting with a letter or digit ('{ANONYMOUS}' is reserved)"
            ),
        ));
    }
    let create_key = fields.bool("create_key")?.unwrap_or(true);
    let mut tenant = Tenant {
        name: name.clone(),
        limits: state.defaults.limits(),
        priority: state.defaults.priority,
        allowed_models: Vec::new(),
        keys: Vec::new(),
        created: unix_now(),
        revision: 0,
    };
    apply_fields(&mut tenant, &body)?;
    let _writer = state.writes.lock().await;
    if state.auth.directory().tenants.contains_key(&name) {
        return Err(
            ApiError::new(ErrorKind::AlreadyExists, format!("tenant '{name}' exists"))
                .with_param("name")
                .with_code("tenant_exists"),
        );
    }
    let mut answer = json!({});
    let mut minted = None;
    if create_key {
        let (key, info) = mint(&state, &name).await?;
        tenant.keys.push(info);
        answer["key"] = key.secret.clone().into();
        answer["key_id"] = key.id.clone().into();
        minted = Some(key);
    }
    // Revision 0: only if no replica created it meanwhile.
    let tenant = match state.store.put_tenant(&tenant).await {
        Ok(stored) => stored,
        Err(error) => {
            if let Some(key) = &minted {
                unmint(&state, key).await;
            }
            return Err(match error {
                StoreError::Conflict(_) => {
                    ApiError::new(ErrorKind::AlreadyExists, format!("tenant '{name}' exists"))
                        .with_param("name")
                        .with_code("tenant_exists")
                }
                other => store_failed("create the tenant", &other),
            });
        }
    };
    tracing::info!(tenant = name, "tenant created");
    answer["tenant"] = view(&tenant);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `GET /admin/v1/tenants`.
pub(super) async fn list(State(state): State<AdminState>) -> Json<Value> {
    let directory = state.auth.directory();
    let data: Vec<Value> = directory.tenants.values().map(view).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /admin/v1/tenants/{name}`.
pub(super) async fn get(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let name = name_of(path)?;
    let directory = state.auth.directory();
    let tenant = directory
        .tenants
        .get(&name)
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(view(tenant)))
}

/// `PATCH /admin/v1/tenants/{name}`: changes the fields given.
pub(super) async fn update(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    AdminBody(body): AdminBody,
) -> Result<Json<Value>, ApiError> {
    let name = name_of(path)?;
    let _writer = state.writes.lock().await;
    let mut tenant = read_tenant(&state, &name)?;
    apply_fields(&mut tenant, &body)?;
    let tenant = state
        .store
        .put_tenant(&tenant)
        .await
        .map_err(|e| write_failed("update the tenant", &name, &e))?;
    tracing::info!(tenant = name, "tenant updated");
    Ok(Json(view(&tenant)))
}

/// `DELETE /admin/v1/tenants/{name}`: revokes its keys, then removes it.
pub(super) async fn remove(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let name = name_of(path)?;
    let _writer = state.writes.lock().await;
    let directory = state.auth.directory();
    let tenant = directory
        .tenants
        .get(&name)
        .ok_or_else(|| not_found(&name))?;
    // Every key pointing at the tenant, listed or not.
    let digests: Vec<&String> = directory
        .keys
        .iter()
        .filter(|(_, record)| record.tenant == name)
        .map(|(digest, _)| digest)
        .chain(tenant.keys.iter().map(|k| &k.sha256))
        .collect();
    for digest in digests {
        state
            .store
            .delete_key(digest)
            .await
            .map_err(|e| store_failed("revoke a key", &e))?;
    }
    state
        .store
        .delete_tenant(&name)
        .await
        .map_err(|e| store_failed("remove the tenant", &e))?;
    tracing::info!(tenant = name, "tenant removed");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /admin/v1/tenants/{name}/keys`: a new key, shown once; with
/// `"revoke_existing": true` every other key of the tenant is revoked
/// (rotation).
pub(super) async fn create_key(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    AdminBody(body): AdminBody,
) -> Result<Response, ApiError> {
    let name = name_of(path)?;
    let revoke = Fields::root(&body)
        .bool("revoke_existing")?
        .unwrap_or(false);
    let _writer = state.writes.lock().await;
    let mut tenant = read_tenant(&state, &name)?;
    if !revoke && tenant.keys.len() >= MAX_KEYS {
        return Err(ApiError::new(
            ErrorKind::FailedPrecondition,
            format!("tenant '{name}' has {MAX_KEYS} keys, the most it may; rotate or revoke one"),
        ));
    }
    let (key, info) = mint(&state, &name).await?;
    let old = if revoke {
        std::mem::take(&mut tenant.keys)
    } else {
        Vec::new()
    };
    tenant.keys.push(info);
    let tenant = match state.store.put_tenant(&tenant).await {
        Ok(stored) => stored,
        Err(error) => {
            unmint(&state, &key).await;
            return Err(write_failed("add the key", &name, &error));
        }
    };
    for revoked in &old {
        state
            .store
            .delete_key(&revoked.sha256)
            .await
            .map_err(|e| store_failed("revoke an old key", &e))?;
    }
    tracing::info!(
        tenant = name,
        key_id = key.id,
        revoked = old.len(),
        "key created"
    );
    let revoked: Vec<&str> = old.iter().map(|k| k.id.as_str()).collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": key.secret, "key_id": key.id, "revoked": revoked, "tenant": view(&tenant)})),
    )
        .into_response())
}

/// `DELETE /admin/v1/tenants/{name}/keys/{key_id}`.
pub(super) async fn revoke_key(
    State(state): State<AdminState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path((name, key_id)) = path.map_err(|r| ApiError::bad_request(r.body_text()))?;
    let _writer = state.writes.lock().await;
    let mut tenant = read_tenant(&state, &name)?;
    let Some(position) = tenant.keys.iter().position(|k| k.id == key_id) else {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            format!("tenant '{name}' has no key '{key_id}'"),
        )
        .with_code("key_not_found"));
    };
    let revoked = tenant.keys.remove(position);
    state
        .store
        .put_tenant(&tenant)
        .await
        .map_err(|e| write_failed("revoke the key", &name, &e))?;
    state
        .store
        .delete_key(&revoked.sha256)
        .await
        .map_err(|e| store_failed("revoke the key", &e))?;
    tracing::info!(tenant = name, key_id, "key revoked");
    Ok(StatusCode::NO_CONTENT)
}
