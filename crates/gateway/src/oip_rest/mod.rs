//! The Open Inference Protocol (KServe v2) over REST: server and model
//! health, metadata, and inference with JSON tensors, forwarded as gRPC to a
//! worker serving the model. Health answers are in the status code (200 for
//! true, 400 for false); errors are `{"error": "message"}` with the status of
//! their kind.

mod tensor;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use lmgrid_core::oip;
use lmgrid_proto::inference as pb;
use serde::Deserialize;
use serde_json::json;

use crate::http::AppState;
use crate::http::call::{Call, JsonBody};
use crate::http::error::ApiError;
use crate::http::forward::{self, methods};
use crate::routing::Target;

/// The header of the protocol's binary tensor data extension, which this
/// gateway does not offer.
const BINARY_HEADER: &str = "inference-header-content-length";

/// The routes of the protocol.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(server_live))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
}

/// The model (and version) named in the path.
#[derive(Debug, Deserialize)]
struct ModelPath {
    model: String,
    #[serde(default)]
    version: String,
}

fn model_path(path: Result<Path<ModelPath>, PathRejection>) -> Result<ModelPath, ApiError> {
    path.map(|Path(path)| path)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// 200 with `body` when `yes`, else 400 with it.
fn health(yes: bool, body: serde_json::Value) -> Response {
    let status = if yes {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Json(body)).into_response()
}

/// Server-level answers need no API key: they are health checks.
async fn server_metadata() -> Json<serde_json::Value> {
    let metadata = oip::server_metadata();
    Json(json!({
        "name": metadata.name,
        "version": metadata.version,
        "extensions": metadata.extensions,
    }))
}

async fn server_live() -> Response {
    health(oip::server_live().live, json!({"live": true}))
}

async fn server_ready(State(state): State<AppState>) -> Response {
    let ready = oip::server_ready(&state.readiness).ready;
    health(ready, json!({ "ready": ready }))
}

async fn model_metadata(
    mut call: Call,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ModelPath { model, version } = model_path(path)?;
    call.set_model(&model)?;
    let plan = forward::plan(&call, Target::about(&model, &version), "this request")?;
    let request = pb::ModelMetadataRequest {
        name: model,
        version,
    };
    let metadata: pb::ModelMetadataResponse =
        forward::unary(&call, &plan, methods::MODEL_METADATA, request).await?;
    let tensors = |tensors: &[pb::model_metadata_response::TensorMetadata]| {
        tensors
            .iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect::<Vec<_>>()
    };
    Ok(Json(json!({
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": tensors(&metadata.inputs),
        "outputs": tensors(&metadata.outputs),
    })))
}

async fn model_ready(
    mut call: Call,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let ModelPath { model, version } = model_path(path)?;
    call.set_model(&model)?;
    let plan = forward::plan(&call, Target::about(&model, &version), "this request")?;
    let request = pb::ModelReadyRequest {
        name: model.clone(),
        version,
    };
    let ready =
        forward::unary::<_, pb::ModelReadyResponse>(&call, &plan, methods::MODEL_READY, request)
            .await?
            .ready;
    Ok(health(ready, json!({"name": model, "ready": ready})))
}

async fn infer(
    mut call: Call,
    path: Result<Path<ModelPath>, PathRejection>,
    headers: HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ModelPath { model, version } = model_path(path)?;
    call.set_model(&model)?;
    if headers.contains_key(BINARY_HEADER) {
        return Err(ApiError::bad_request(
            "the binary tensor data extension is not supported; send tensor data as JSON",
        ));
    }
    let JsonBody(body) = body?;
    let request = tensor::infer_request(&model, &version, &body)?;
    // Tensors have no tokens: a request counts only against requests per
    // minute and concurrency.
    call.admit(&model, 0).await?;
    let plan = forward::plan(&call, Target::work(&model, &version, None), "this request")?;
    let response: pb::ModelInferResponse =
        forward::unary(&call, &plan, methods::MODEL_INFER, request).await?;
    Ok(Json(tensor::infer_response(response)?))
}
