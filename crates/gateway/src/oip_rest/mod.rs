//! The Open Inference Protocol (KServe v2) over REST: server and model
//! health, metadata, and inference with JSON tensors (or the binary tensor
//! data extension's), forwarded as gRPC to a worker serving the model. Health
//! answers are in the status code (200 for true, 400 for false); errors are
//! `{"error": "message"}` with the status of their kind.

mod tensor;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use lmgrid_core::oip;
use lmgrid_proto::inference as pb;
use serde::Deserialize;
use serde_json::json;

use crate::http::AppState;
use crate::http::call::Call;
use crate::http::encoding::read_body;
use crate::http::error::ApiError;
use crate::http::forward::{self, methods};
use crate::http::json::parse_object;
use crate::routing::Target;

/// The header of the protocol's binary tensor data extension: the length of
/// the JSON at the start of a body that has binary data after it.
const BINARY_HEADER: &str = "inference-header-content-length";

/// The protocol extensions the REST API offers.
const EXTENSIONS: &[&str] = &["binary_tensor_data"];

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
    let mut extensions = metadata.extensions;
    extensions.extend(EXTENSIONS.iter().map(|e| e.to_string()));
    Json(json!({
        "name": metadata.name,
        "version": metadata.version,
        "extensions": extensions,
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

/// An inference request body: a JSON object, then the binary data of the
/// binary tensor data extension when the `Inference-Header-Content-Length`
/// header says where the JSON ends. At most `http.max_body_bytes` in all.
struct TensorBody {
    json: serde_json::Map<String, serde_json::Value>,
    binary: axum::body::Bytes,
}

impl FromRequest<AppState> for TensorBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<TensorBody, ApiError> {
        let json_length = match request.headers().get(BINARY_HEADER) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "the {BINARY_HEADER} header must be the byte length of the JSON \
                             at the start of the body, not {value:?}"
                        ))
                    })?,
            ),
        };
        let mut body = read_body(request, state.limits.max_body_bytes).await?;
        let binary = match json_length {
            None => axum::body::Bytes::new(),
            Some(length) if length <= body.len() => body.split_off(length),
            Some(length) => {
                return Err(ApiError::bad_request(format!(
                    "the {BINARY_HEADER} header says the JSON is {length} bytes, \
                     but the body is only {} bytes",
                    body.len()
                )));
            }
        };
        Ok(TensorBody {
            json: parse_object(&body)?,
            binary,
        })
    }
}

async fn infer(
    mut call: Call,
    path: Result<Path<ModelPath>, PathRejection>,
    body: Result<TensorBody, ApiError>,
) -> Result<Response, ApiError> {
    let ModelPath { model, version } = model_path(path)?;
    call.set_model(&model)?;
    let TensorBody { json, binary } = body?;
    let tensor::Infer {
        request,
        binary: binary_outputs,
    } = tensor::infer_request(&model, &version, &json, &binary)?;
    // Tensors have no tokens: a request counts only against requests per
    // minute and concurrency.
    call.admit(&model, 0).await?;
    let plan = forward::plan(&call, Target::work(&model, &version, None), "this request")?;
    let response: pb::ModelInferResponse =
        forward::unary(&call, &plan, methods::MODEL_INFER, request).await?;
    let body = tensor::infer_response(response, &binary_outputs)?;
    let Some(data) = body.binary else {
        return Ok(Json(body.json).into_response());
    };
    let mut bytes = serde_json::to_vec(&body.json).map_err(|error| {
        ApiError::new(
            lmgrid_core::ErrorKind::Internal,
            format!("could not write the answer: {error}"),
        )
    })?;
    let json_length = HeaderValue::from(bytes.len());
    bytes.extend_from_slice(&data);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::HeaderName::from_static(BINARY_HEADER), json_length),
        ],
        bytes,
    )
        .into_response())
}
