//! Streamed generation as server-sent events, the way OpenAI streams: one
//! `data: {chunk}` event per piece of text (the first chat chunk of each
//! choice carries `role: "assistant"`), the finish reason on the last chunk
//! of each choice, a usage chunk with no choices when the client asked for
//! it, then `data: [DONE]`. A failure after the stream started is an event
//! `data: {"error": {...}}`, and the stream ends without `[DONE]`.
//!
//! The response body owns the upstream gRPC stream: when the client goes
//! away, axum drops the body, the upstream call is dropped with it, and the
//! worker cancels the sequence.

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use lmgrid_proto::lmgrid::v1 as pb;
use serde_json::{Value, json};

use super::Flavor;
use crate::http::call::{Call, deadline_exceeded};
use crate::http::error::ApiError;
use crate::metrics::TokenClock;
use crate::routing::Upstream;

/// Answers with the event stream of `upstream`, which has its first message
/// already (so that a worker's refusal was still an HTTP error status rather
/// than an event).
pub(super) fn respond(
    call: Call,
    upstream: Upstream<pb::GenerateStreamResponse>,
    chunks: Chunks,
) -> Response {
    let clock = TokenClock::new(call.model_label().to_string(), call.started());
    let events = Events {
        upstream,
        chunks,
        clock,
        deadline: call.deadline(true),
        call,
        pending: VecDeque::new(),
        done: false,
    };
    let body = Body::from_stream(futures::stream::unfold(events, Events::next));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The state of one event stream.
struct Events {
    upstream: Upstream<pb::GenerateStreamResponse>,
    chunks: Chunks,
    clock: TokenClock,
    deadline: Instant,
    call: Call,
    pending: VecDeque<Bytes>,
    done: bool,
}

impl Events {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Events)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            let next = tokio::time::timeout_at(self.deadline.into(), self.upstream.message()).await;
            match next {
                Ok(Ok(Some(message))) => {
                    if !message.text_delta.is_empty() {
                        self.clock.tick();
                    }
                    match self.chunks.message(&message) {
                        Ok(chunks) => self.pending.extend(chunks.iter().map(event)),
                        Err(error) => self.fail(&error),
                    }
                }
                Ok(Ok(None)) => {
                    self.call.record_usage(self.chunks.usage.as_ref());
                    self.pending.extend(self.chunks.end().iter().map(event));
                    self.pending
                        .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.done = true;
                }
                Ok(Err(status)) => self.fail(&ApiError::from_status(&status)),
                Err(_) => self.fail(&deadline_exceeded()),
            }
        }
    }

    fn fail(&mut self, error: &ApiError) {
        tracing::warn!(
            request_id = %self.call.request_id(),
            status = error.status().as_u16(),
            error = %error.message(),
            "streamed generation failed"
        );
        self.pending.push_back(event(&error.openai_body()));
        self.done = true;
    }
}

/// One server-sent event carrying `value`.
fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Turns upstream messages into OpenAI chunks; pure, so tests can drive it.
#[derive(Debug)]
pub(super) struct Chunks {
    flavor: Flavor,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// The choices that have had their first chunk.
    started: BTreeSet<u32>,
    usage: Option<pb::Usage>,
}

impl Chunks {
    pub(super) fn new(flavor: Flavor, model: &str, include_usage: bool) -> Chunks {
        Chunks {
            flavor,
            id: super::response_id(flavor),
            created: super::unix_now(),
            model: model.to_string(),
            include_usage,
            started: BTreeSet::new(),
            usage: None,
        }
    }

    /// The chunks for one upstream message: none, or one with its text and,
    /// on a choice's last message, its finish reason.
    pub(super) fn message(
        &mut self,
        message: &pb::GenerateStreamResponse,
    ) -> Result<Vec<Value>, ApiError> {
        if let Some(usage) = message.usage {
            self.usage = Some(usage);
        }
        let first = self.started.insert(message.index);
        let finish = super::finish_reason(message.finish_reason())?;
        let announce = first && self.flavor == Flavor::Chat;
        if message.text_delta.is_empty() && finish.is_none() && !announce {
            return Ok(Vec::new());
        }
        let choice = match self.flavor {
            Flavor::Chat => {
                let mut delta = serde_json::Map::new();
                if announce {
                    delta.insert("role".into(), "assistant".into());
                }
                if announce || !message.text_delta.is_empty() {
                    delta.insert("content".into(), message.text_delta.clone().into());
                }
                json!({"index": message.index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Flavor::Completion => json!({
                "index": message.index,
                "text": message.text_delta,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        Ok(vec![self.envelope(vec![choice], None)])
    }

    /// The chunks after the last message: the usage chunk, when asked for.
    pub(super) fn end(&self) -> Vec<Value> {
        if !self.include_usage {
            return Vec::new();
        }
        vec![self.envelope(Vec::new(), Some(super::usage_json(self.usage.as_ref())))]
    }

    fn envelope(&self, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            // OpenAI sends `usage: null` on every chunk but the last one.
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(index: u32, text: &str, finish: pb::FinishReason) -> pb::GenerateStreamResponse {
        pb::GenerateStreamResponse {
            index,
            text_delta: text.into(),
            finish_reason: finish as i32,
            ..Default::default()
        }
    }

    #[test]
    fn chat_chunks_announce_the_role_then_carry_text_and_the_finish() {
        let mut chunks = Chunks::new(Flavor::Chat, "smollm", true);
        let first = chunks
            .message(&delta(0, "The", pb::FinishReason::Unspecified))
            .unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0]["object"], "chat.completion.chunk");
        assert_eq!(first[0]["model"], "smollm");
        assert_eq!(
            first[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "The"})
        );
        assert_eq!(first[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(first[0]["usage"], Value::Null);

        let next = chunks
            .message(&delta(0, " capital", pb::FinishReason::Unspecified))
            .unwrap();
        assert_eq!(
            next[0]["choices"][0]["delta"],
            json!({"content": " capital"})
        );
        assert_eq!(next[0]["id"], first[0]["id"]);

        let mut last = delta(0, "", pb::FinishReason::Stop);
        last.usage = Some(pb::Usage {
            prompt_tokens: 9,
            completion_tokens: 2,
            total_tokens: 11,
        });
        let finish = chunks.message(&last).unwrap();
        assert_eq!(finish[0]["choices"][0]["delta"], json!({}));
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");

        let end = chunks.end();
        assert_eq!(end.len(), 1);
        assert_eq!(end[0]["choices"], json!([]));
        assert_eq!(end[0]["usage"]["total_tokens"], 11);
    }

    #[test]
    fn completion_chunks_carry_text_and_skip_empty_messages() {
        let mut chunks = Chunks::new(Flavor::Completion, "m", false);
        assert!(
            chunks
                .message(&delta(0, "", pb::FinishReason::Unspecified))
                .unwrap()
                .is_empty()
        );
        let text = chunks
            .message(&delta(0, "Hi", pb::FinishReason::Length))
            .unwrap();
        assert_eq!(text[0]["object"], "text_completion");
        assert_eq!(
            text[0]["choices"][0],
            json!({"index": 0, "text": "Hi", "logprobs": null, "finish_reason": "length"})
        );
        assert!(text[0].get("usage").is_none(), "no usage unless asked for");
        assert!(chunks.end().is_empty());
    }

    #[test]
    fn each_choice_is_announced_once() {
        let mut chunks = Chunks::new(Flavor::Chat, "m", false);
        for index in [0, 1] {
            let out = chunks
                .message(&delta(index, "a", pb::FinishReason::Unspecified))
                .unwrap();
            assert_eq!(out[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(out[0]["choices"][0]["index"], index);
        }
        let out = chunks
            .message(&delta(1, "b", pb::FinishReason::Unspecified))
            .unwrap();
        assert!(out[0]["choices"][0]["delta"].get("role").is_none());
    }

    #[test]
    fn a_cancelled_choice_is_an_error() {
        let mut chunks = Chunks::new(Flavor::Chat, "m", false);
        let err = chunks
            .message(&delta(0, "", pb::FinishReason::Cancelled))
            .unwrap_err();
        assert_eq!(err.status(), 504);
        assert_eq!(
            event(&err.openai_body()).slice(..15),
            Bytes::from_static(b"data: {\"error\":")
        );
    }
}
