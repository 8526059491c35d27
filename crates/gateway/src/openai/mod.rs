//! The OpenAI-compatible REST API: `/v1/models`, `/v1/chat/completions`,
//! `/v1/completions` (generation, unary or streamed as server-sent events)
//! and `/v1/embeddings`, translated to `lmgrid.v1` gRPC calls to a worker
//! serving the model.
//!
//! Requests are read field by field (`http::json`): keys this gateway does not
//! know are ignored, as OpenAI SDKs send many, while known keys are checked
//! for type and range, and the few features that are known but not offered
//! (log probabilities, tools) are refused rather than silently dropped.

mod chat;
mod completions;
mod embeddings;
mod models;
mod params;
mod sse;

use axum::Router;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use lmgrid_proto::lmgrid::v1 as pb;

use crate::admission::estimate_tokens;
use crate::http::AppState;
use crate::http::call::Call;
use crate::http::error::ApiError;
use crate::http::forward::{self, methods};
use crate::routing::{GENERATION, Target};

/// The routes of the OpenAI-compatible API.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models::list))
        .route("/v1/models/{model}", get(models::retrieve))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/completions", post(completions::create))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/usage", get(crate::admin::usage::own))
}

/// Which OpenAI API a generation request came through; it decides the shape
/// of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    Chat,
    Completion,
}

impl Flavor {
    /// What the endpoint serves, for messages.
    fn serves(self) -> &'static str {
        match self {
            Flavor::Chat => "chat completions",
            Flavor::Completion => "completions",
        }
    }

    /// The prefix of response ids.
    fn id_prefix(self) -> &'static str {
        match self {
            Flavor::Chat => "chatcmpl",
            Flavor::Completion => "cmpl",
        }
    }
}

/// A chat or completion request, read and checked, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Generation {
    pub(crate) model: String,
    pub(crate) input: pb::generate_request::Input,
    pub(crate) sampling: pb::SamplingParams,
    pub(crate) stream: bool,
    /// The client asked for a usage chunk at the end of the stream.
    pub(crate) include_usage: bool,
}

/// Sends a generation request to a worker serving its model and answers it:
/// a whole `chat.completion` / `text_completion`, or a stream of chunks.
async fn generate(
    mut call: Call,
    generation: Generation,
    flavor: Flavor,
) -> Result<Response, ApiError> {
    call.admit(&generation.model, reservation(&generation))
        .await?;
    let target = Target::work(&generation.model, "", Some(GENERATION));
    let plan = forward::plan(
        &call,
        target.prompt(Some(&generation.input)),
        flavor.serves(),
    )?;
    let request = pb::GenerateRequest {
        model: Some(pb::ModelRef {
            name: generation.model.clone(),
            version: String::new(),
        }),
        input: Some(generation.input),
        sampling: Some(generation.sampling),
        context: Some(call.context()),
        return_token_ids: false,
        // Always asked for, to meter usage; passed on only when the client
        // asked too.
        include_usage: true,
    };
    if generation.stream {
        let chunks = sse::Chunks::new(flavor, &generation.model, generation.include_usage);
        let upstream = forward::generate_stream(&call, &plan, request).await?;
        return Ok(sse::respond(call, upstream, chunks));
    }
    let response: pb::GenerateResponse =
        forward::unary(&call, &plan, methods::GENERATE, request).await?;
    call.record_usage(response.usage.as_ref());
    let body = match flavor {
        Flavor::Chat => chat::response(&generation.model, &response)?,
        Flavor::Completion => completions::response(&generation.model, &response)?,
    };
    Ok(Json(body).into_response())
}

/// The tokens to reserve for a generation: an estimate of the prompt plus
/// what each of its `n` completions may generate (nothing for a model
/// default the gateway does not know; the worker's count settles it).
fn reservation(generation: &Generation) -> u64 {
    let prompt = match &generation.input {
        pb::generate_request::Input::Prompt(text) => text.len(),
        pb::generate_request::Input::Chat(chat) => {
            chat.messages.iter().map(|m| m.content.len()).sum()
        }
    };
    let completions =
        u64::from(generation.sampling.max_tokens) * u64::from(generation.sampling.n.max(1));
    estimate_tokens(prompt).saturating_add(completions)
}

/// A new response id: `chatcmpl-…` or `cmpl-…`.
fn response_id(flavor: Flavor) -> String {
    format!("{}-{}", flavor.id_prefix(), uuid::Uuid::new_v4().simple())
}

/// Seconds since the Unix epoch, for `created`.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// OpenAI's `finish_reason` for a completion the worker finished: `stop` or
/// `length`; none while it goes on. A cancelled completion is an error: the
/// worker gave up on it (its deadline passed).
fn finish_reason(reason: pb::FinishReason) -> Result<Option<&'static str>, ApiError> {
    match reason {
        pb::FinishReason::Unspecified => Ok(None),
        pb::FinishReason::Stop => Ok(Some("stop")),
        pb::FinishReason::Length => Ok(Some("length")),
        pb::FinishReason::Cancelled => Err(ApiError::new(
            lmgrid_core::ErrorKind::DeadlineExceeded,
            "the worker cancelled the generation before it finished (its deadline passed)",
        )),
    }
}

/// The OpenAI `usage` object.
fn usage_json(usage: Option<&pb::Usage>) -> serde_json::Value {
    let usage = usage.copied().unwrap_or_default();
    let total = if usage.total_tokens == 0 {
        usage.prompt_tokens.saturating_add(usage.completion_tokens)
    } else {
        usage.total_tokens
    };
    serde_json::json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_map_to_openai_names() {
        assert_eq!(finish_reason(pb::FinishReason::Stop).unwrap(), Some("stop"));
        assert_eq!(
            finish_reason(pb::FinishReason::Length).unwrap(),
            Some("length")
        );
        assert_eq!(finish_reason(pb::FinishReason::Unspecified).unwrap(), None);
        let cancelled = finish_reason(pb::FinishReason::Cancelled).unwrap_err();
        assert_eq!(cancelled.status(), 504);
    }

    #[test]
    fn usage_totals_are_filled_in() {
        let usage = pb::Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            total_tokens: 0,
        };
        assert_eq!(
            usage_json(Some(&usage)),
            serde_json::json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
        );
        assert!(response_id(Flavor::Chat).starts_with("chatcmpl-"));
        assert!(response_id(Flavor::Completion).starts_with("cmpl-"));
    }
}
