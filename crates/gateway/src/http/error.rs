//! Errors of the public HTTP APIs and the two shapes clients parse: the
//! OpenAI shape `{"error":{"message","type","param","code"}}` on `/v1` (and
//! unknown routes), and the Open Inference Protocol's `{"error":"message"}`
//! on `/v2`.
//!
//! Handlers return [`ApiError`]; its response carries the error in an
//! extension, and [`render`] — one layer per API family — writes the body in
//! that family's shape. Statuses come from `lmgrid_core::error`'s one mapping.

use std::borrow::Cow;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lmgrid_core::error::ErrorKind;
use serde_json::json;

use crate::routing::RouteError;

/// Seconds a client is asked to wait (`Retry-After`) before retrying a 503
/// or 429.
pub(crate) const RETRY_AFTER_SECONDS: u32 = 1;

/// An error answer of the public HTTP APIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// The request field at fault, when one is.
    param: Option<String>,
    code: Cow<'static, str>,
    retry_after: Option<u32>,
    /// A 401 that asks for a bearer token (`WWW-Authenticate: Bearer`).
    challenge: bool,
}

/// Which API family's error shape to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    OpenAi,
    Oip,
}

impl Shape {
    /// The shape of errors under `path`.
    pub(crate) fn of_path(path: &str) -> Shape {
        if path == "/v2" || path.starts_with("/v2/") {
            Shape::Oip
        } else {
            Shape::OpenAi
        }
    }
}

impl ApiError {
    /// An error of `kind`, with its status and code.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        let retry_after = matches!(kind, ErrorKind::Unavailable | ErrorKind::ResourceExhausted)
            .then_some(RETRY_AFTER_SECONDS);
        ApiError {
            status: kind.http_status(),
            message: message.into(),
            param: None,
            code: Cow::Borrowed(kind.as_str()),
            retry_after,
            challenge: false,
        }
    }

    /// 401: no API key, or one no tenant has.
    pub(crate) fn unauthenticated(message: impl Into<String>) -> ApiError {
        let mut error =
            ApiError::new(ErrorKind::Unauthenticated, message).with_code("invalid_api_key");
        error.challenge = true;
        error
    }

    /// 403: the caller's tenant may not use `model`.
    pub(crate) fn model_not_allowed(model: &str) -> ApiError {
        ApiError::new(
            ErrorKind::PermissionDenied,
            format!("this API key may not use the model '{model}'"),
        )
        .with_param("model")
        .with_code("model_not_allowed")
    }

    /// 429 over the tenant's limits, retrying after `retry_after` seconds
    /// when waiting helps.
    pub(crate) fn rate_limited(message: impl Into<String>, retry_after: Option<u32>) -> ApiError {
        let mut error =
            ApiError::new(ErrorKind::ResourceExhausted, message).with_code("rate_limit_exceeded");
        error.retry_after = retry_after;
        error
    }

    /// 503: the model's queue at this gateway is full or the wait too long.
    pub(crate) fn overloaded(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Unavailable, message).with_code("model_overloaded")
    }

    /// A 400 about the request field `param`.
    pub(crate) fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InvalidArgument, message).with_param(param)
    }

    /// A 400 about the request as a whole.
    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InvalidArgument, message)
    }

    /// 413: the body is larger than `limit` bytes.
    pub(crate) fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is larger than this gateway's limit of {limit} bytes"
            ),
            param: None,
            code: Cow::Borrowed("request_too_large"),
            retry_after: None,
            challenge: false,
        }
    }

    /// 415: the body is compressed with `encoding`, which the gateway does
    /// not decode.
    pub(crate) fn unsupported_encoding(encoding: &str) -> ApiError {
        ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!(
                "Content-Encoding {encoding:?} is not supported; send the request body \
                 uncompressed, or as gzip or deflate"
            ),
            param: None,
            code: Cow::Borrowed("unsupported_content_encoding"),
            retry_after: None,
            challenge: false,
        }
    }

    /// 404 for a path no route serves.
    pub(crate) fn no_route(method: &str, path: &str) -> ApiError {
        ApiError::new(ErrorKind::NotFound, format!("no route for {method} {path}"))
    }

    /// 405 for a known path asked with a method it does not serve.
    pub(crate) fn method_not_allowed(method: &str, path: &str, allow: Option<&str>) -> ApiError {
        let message = match allow {
            Some(allow) if !allow.is_empty() => {
                format!("{path} does not accept {method}; it accepts {allow}")
            }
            _ => format!("{path} does not accept {method}"),
        };
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message,
            param: None,
            code: Cow::Borrowed("method_not_allowed"),
            retry_after: None,
            challenge: false,
        }
    }

    /// An upstream (worker) gRPC status, as the client should see it.
    pub(crate) fn from_status(status: &tonic::Status) -> ApiError {
        let kind = ErrorKind::from_grpc_code(status.code());
        let message = if status.message().is_empty() {
            format!("the worker failed the request ({})", kind.as_str())
        } else {
            status.message().to_string()
        };
        ApiError::new(kind, message)
    }

    /// A routing failure for `model`; `wanted` says what the endpoint serves
    /// (`chat completions`), for the message about a model of another kind.
    pub(crate) fn from_route(error: RouteError, wanted: &str) -> ApiError {
        match &error {
            RouteError::NotServed { model, version } => ApiError::new(
                ErrorKind::NotFound,
                if version.is_empty() {
                    format!("the model '{model}' does not exist or no ready worker serves it")
                } else {
                    format!(
                        "version '{version}' of the model '{model}' does not exist or no ready \
                         worker serves it"
                    )
                },
            )
            .with_param("model")
            .with_code("model_not_found"),
            RouteError::WrongKind { model, served, .. } => ApiError::invalid(
                "model",
                format!(
                    "the model '{model}' is {} model and cannot serve {wanted}",
                    served
                        .iter()
                        .map(|kind| with_article(kind))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            ),
            RouteError::EmptyName => ApiError::invalid("model", "'model' must not be empty"),
            RouteError::NoWorkers | RouteError::Exhausted { .. } => {
                ApiError::new(error.kind(), error.to_string())
            }
        }
    }

    pub(crate) fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub(crate) fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Cow::Borrowed(code);
        self
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The OpenAI error object, also sent as an event when a stream fails.
    pub(crate) fn openai_body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.openai_type(),
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The `type` of an OpenAI error object, by status class.
    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            500.. => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The response in `shape`.
    pub(crate) fn render(&self, shape: Shape) -> Response {
        let body = match shape {
            Shape::OpenAi => self.openai_body(),
            Shape::Oip => json!({ "error": self.message }),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn with_article(kind: &str) -> String {
    match kind.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {kind}"),
        _ => format!("a {kind}"),
    }
}

impl IntoResponse for ApiError {
    /// The OpenAI shape, with the error kept in the response's extensions
    /// so that [`render`] can rewrite it in its family's shape.
    fn into_response(self) -> Response {
        let mut response = self.render(Shape::OpenAi);
        response.extensions_mut().insert(self);
        response
    }
}

impl From<RouteError> for ApiError {
    fn from(error: RouteError) -> ApiError {
        ApiError::from_route(error, "this request")
    }
}

/// Middleware of one API family: writes every error of its routes in
/// `shape`, including the 405 that axum answers for a method a route does
/// not serve.
pub(crate) async fn render(shape: Shape, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if let Some(error) = response.extensions().get::<ApiError>() {
        if shape == Shape::OpenAi {
            return response;
        }
        let mut rendered = error.render(shape);
        *rendered.extensions_mut() = response.extensions().clone();
        return rendered;
    }
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        let allow = response.headers().get(header::ALLOW).cloned();
        let listed = allow.as_ref().and_then(|v| v.to_str().ok());
        let error = ApiError::method_not_allowed(method.as_str(), &path, listed);
        let mut rendered = error.render(shape);
        if let Some(allow) = allow {
            rendered.headers_mut().insert(header::ALLOW, allow);
        }
        rendered.extensions_mut().insert(error);
        return rendered;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn openai_errors_name_type_param_and_code() {
        let error = ApiError::invalid("temperature", "'temperature' must be a number");
        let response = error.render(Shape::OpenAi);
        assert_eq!(response.status(), 400);
        assert_eq!(
            body_json(response).await,
            json!({"error": {
                "message": "'temperature' must be a number",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_argument",
            }})
        );
    }

    #[tokio::test]
    async fn oip_errors_are_a_message() {
        let error = ApiError::new(ErrorKind::NotFound, "model 'x' is not served by any worker");
        let response = error.render(Shape::Oip);
        assert_eq!(response.status(), 404);
        assert_eq!(
            body_json(response).await,
            json!({"error": "model 'x' is not served by any worker"})
        );
    }

    #[test]
    fn unavailable_and_exhausted_ask_to_retry_after_a_while() {
        for (code, status) in [
            (tonic::Code::Unavailable, 503),
            (tonic::Code::ResourceExhausted, 429),
        ] {
            let error = ApiError::from_status(&tonic::Status::new(code, "busy"));
            let response = error.render(Shape::OpenAi);
            assert_eq!(response.status(), status);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        }
        let response = ApiError::bad_request("no").render(Shape::OpenAi);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn worker_codes_map_through_the_core_mapping() {
        for (code, status, kind) in [
            (tonic::Code::InvalidArgument, 400, "invalid_request_error"),
            (tonic::Code::NotFound, 404, "invalid_request_error"),
            (tonic::Code::ResourceExhausted, 429, "rate_limit_error"),
            (tonic::Code::Unavailable, 503, "server_error"),
            (tonic::Code::DeadlineExceeded, 504, "server_error"),
            (tonic::Code::Internal, 500, "server_error"),
        ] {
            let error = ApiError::from_status(&tonic::Status::new(code, "x"));
            assert_eq!(error.status(), status, "{code:?}");
            assert_eq!(error.openai_body()["error"]["type"], kind, "{code:?}");
        }
        let silent = ApiError::from_status(&tonic::Status::new(tonic::Code::Internal, ""));
        assert!(silent.message().contains("internal"), "{silent:?}");
    }

    #[test]
    fn routing_failures_say_what_the_model_is() {
        let missing = ApiError::from_route(
            RouteError::NotServed {
                model: "gpt-4".into(),
                version: String::new(),
            },
            "chat completions",
        );
        assert_eq!(missing.status(), 404);
        let body = missing.openai_body();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert!(missing.message().contains("'gpt-4'"), "{missing:?}");

        let wrong = ApiError::from_route(
            RouteError::WrongKind {
                model: "minilm".into(),
                served: vec!["embedding".into()],
                wanted: "generation",
            },
            "chat completions",
        );
        assert_eq!(wrong.status(), 400);
        assert_eq!(
            wrong.message(),
            "the model 'minilm' is an embedding model and cannot serve chat completions"
        );
        let none = ApiError::from_route(RouteError::NoWorkers, "chat completions");
        assert_eq!(none.status(), 503);
        assert_eq!(none.retry_after, Some(RETRY_AFTER_SECONDS));
    }

    #[tokio::test]
    async fn auth_and_limit_errors_have_openai_codes_and_headers() {
        let response = ApiError::unauthenticated("no key").render(Shape::OpenAi);
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let body = body_json(response).await;
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "authentication_error");

        let response = ApiError::model_not_allowed("gpt-4").render(Shape::OpenAi);
        assert_eq!(response.status(), 403);
        let body = body_json(response).await;
        assert_eq!(body["error"]["code"], "model_not_allowed");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "permission_error");

        let response = ApiError::rate_limited("slow down", Some(20)).render(Shape::OpenAi);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "20");
        assert_eq!(
            body_json(response).await["error"]["code"],
            "rate_limit_exceeded"
        );
        let response = ApiError::rate_limited("too big", None).render(Shape::OpenAi);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());

        let response = ApiError::overloaded("queue full").render(Shape::OpenAi);
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn errors_shapes_follow_the_path() {
        assert_eq!(Shape::of_path("/v2/models/m/infer"), Shape::Oip);
        assert_eq!(Shape::of_path("/v2"), Shape::Oip);
        assert_eq!(Shape::of_path("/v1/models"), Shape::OpenAi);
        assert_eq!(Shape::of_path("/v2x"), Shape::OpenAi);
    }
}
