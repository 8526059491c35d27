//! `GET /v1/models` and `GET /v1/models/{model}`: the models ready workers
//! serve now, from discovery.

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::response::Json;
use serde::Serialize;

use crate::http::call::Call;
use crate::http::error::ApiError;
use crate::routing::{ModelEntry, RouteError};

/// The owner every model reports.
const OWNER: &str = "lmgrid";

#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ModelObject {
    id: String,
    object: &'static str,
    /// lmgrid keeps no creation time for models; 0 says so.
    created: u64,
    owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

fn object(entry: &ModelEntry) -> ModelObject {
    ModelObject {
        id: entry.name.clone(),
        object: "model",
        created: 0,
        owned_by: OWNER,
    }
}

/// The models the caller may use.
pub(super) async fn list(call: Call) -> Json<ModelList> {
    let tenant = &call.identity().tenant;
    let data = call
        .state()
        .workers
        .models()
        .iter()
        .filter(|entry| tenant.allows(&entry.name))
        .map(object)
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

pub(super) async fn retrieve(
    mut call: Call,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelObject>, ApiError> {
    let Path(model) = model.map_err(|e| ApiError::bad_request(e.body_text()))?;
    call.set_model(&model)?;
    let workers = &call.state().workers;
    if let Some(entry) = workers.models().iter().find(|entry| entry.name == model) {
        return Ok(Json(object(entry)));
    }
    let error = if workers.any_ready() {
        RouteError::NotServed {
            model,
            version: String::new(),
        }
    } else {
        RouteError::NoWorkers
    };
    Err(ApiError::from_route(error, "requests"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_have_the_openai_shape() {
        let entry = ModelEntry {
            name: "minilm".into(),
            versions: ["1".to_string()].into(),
            kinds: ["embedding".to_string()].into(),
        };
        assert_eq!(
            serde_json::to_value(object(&entry)).unwrap(),
            serde_json::json!({"id": "minilm", "object": "model", "created": 0, "owned_by": "lmgrid"})
        );
    }
}
