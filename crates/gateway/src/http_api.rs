//! The public HTTP API. The OpenAI-compatible and Open Inference Protocol
//! REST routes arrive with the gateway issue; until then every path answers
//! 404 with an error body in the OpenAI shape, which is what those clients
//! parse.

use axum::Router;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Json};

pub(crate) fn router() -> Router {
    Router::new().fallback(not_found)
}

async fn not_found(method: Method, uri: Uri) -> impl IntoResponse {
    let body = serde_json::json!({
        "error": {
            "message": format!("no route for {method} {}", uri.path()),
            "type": "invalid_request_error",
            "param": null,
            "code": "not_found",
        }
    });
    (StatusCode::NOT_FOUND, Json(body))
}
