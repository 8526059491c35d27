//! `POST /v1/chat/completions`: a conversation, rendered by the worker with
//! the model's chat template, answered as a `chat.completion` or streamed as
//! `chat.completion.chunk`s.

use axum::response::Response;
use lmgrid_proto::lmgrid::v1 as pb;
use serde_json::{Map, Value, json};

use super::params::{self, Unsupported, is_set};
use super::{Flavor, Generation};
use crate::http::call::{Call, JsonBody};
use crate::http::error::ApiError;
use crate::http::json::{Fields, type_name};

/// Roles a message may have; `developer` is OpenAI's newer name for `system`.
const ROLES: &str = "system, developer, user, assistant or tool";

const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        field: "logprobs",
        enabled: is_set,
        message: "log probabilities are not supported",
    },
    Unsupported {
        field: "top_logprobs",
        enabled: is_set,
        message: "log probabilities are not supported",
    },
    Unsupported {
        field: "tools",
        enabled: is_set,
        message: "tool calls are not supported",
    },
    Unsupported {
        field: "functions",
        enabled: is_set,
        message: "function calls are not supported",
    },
    Unsupported {
        field: "response_format",
        enabled: not_text_format,
        message: "only the 'text' response format is supported",
    },
];

fn not_text_format(value: &Value) -> bool {
    value.get("type").and_then(Value::as_str) != Some("text")
}

pub(super) async fn create(call: Call, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let generation = parse(&body, call.state().limits.max_tokens_cap)?;
    super::generate(call, generation, Flavor::Chat).await
}

/// Reads and checks a chat completion request.
pub(crate) fn parse(
    body: &Map<String, Value>,
    max_tokens_cap: u32,
) -> Result<Generation, ApiError> {
    let fields = Fields::root(body);
    let model = fields.required_string("model")?.to_string();
    let messages = fields
        .array("messages")?
        .ok_or_else(|| ApiError::invalid("messages", "'messages' is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must hold at least one message",
        ));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, message)| read_message(i, message))
        .collect::<Result<Vec<_>, _>>()?;
    params::refuse(&fields, UNSUPPORTED)?;
    params::user(&fields)?;
    let sampling = params::sampling(
        &fields,
        max_tokens_cap,
        &["max_completion_tokens", "max_tokens"],
    )?;
    let (stream, include_usage) = params::streaming(&fields)?;
    Ok(Generation {
        model,
        input: pb::generate_request::Input::Chat(pb::ChatMessages { messages }),
        sampling,
        stream,
        include_usage,
    })
}

fn read_message(index: usize, value: &Value) -> Result<pb::ChatMessage, ApiError> {
    let at = format!("messages[{index}]");
    let Value::Object(map) = value else {
        return Err(ApiError::invalid(
            at.clone(),
            format!("'{at}' must be an object, not {}", type_name(value)),
        ));
    };
    let fields = Fields::nested(map, &at);
    let role = match fields.required_string("role")? {
        "developer" => "system",
        role @ ("system" | "user" | "assistant" | "tool") => role,
        other => {
            let param = fields.path("role");
            return Err(ApiError::invalid(
                param.clone(),
                format!("'{param}' is '{other}'; expected {ROLES}"),
            ));
        }
    };
    let content = match fields.get("content") {
        // An assistant turn that only called tools has no content.
        None if role == "assistant" => String::new(),
        None => {
            let param = fields.path("content");
            return Err(ApiError::invalid(
                param.clone(),
                format!("'{param}' is required"),
            ));
        }
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => text_of_parts(&fields.path("content"), parts)?,
        Some(other) => {
            let param = fields.path("content");
            return Err(ApiError::invalid(
                param.clone(),
                format!(
                    "'{param}' must be a string or an array of content parts, not {}",
                    type_name(other)
                ),
            ));
        }
    };
    Ok(pb::ChatMessage {
        role: role.to_string(),
        content,
        name: fields.string("name")?.unwrap_or_default().to_string(),
    })
}

/// The text of content parts (`[{"type": "text", "text": "..."}]`), one
/// line per part; other kinds of parts (images, audio) are refused.
fn text_of_parts(at: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let part_at = format!("{at}[{i}]");
        let Value::Object(map) = part else {
            return Err(ApiError::invalid(
                part_at.clone(),
                format!(
                    "'{part_at}' must be a content part object, not {}",
                    type_name(part)
                ),
            ));
        };
        let fields = Fields::nested(map, &part_at);
        match fields.required_string("type")? {
            "text" => texts.push(fields.required_string("text")?.to_string()),
            other => {
                return Err(ApiError::invalid(
                    fields.path("type"),
                    format!("only text content parts are supported, and '{part_at}' is '{other}'"),
                ));
            }
        }
    }
    Ok(texts.join("\n"))
}

/// The `chat.completion` object for a finished generation.
pub(super) fn response(model: &str, response: &pb::GenerateResponse) -> Result<Value, ApiError> {
    let choices = response
        .completions
        .iter()
        .map(|completion| {
            Ok(json!({
                "index": completion.index,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": null,
                "finish_reason": super::finish_reason(completion.finish_reason())?,
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(json!({
        "id": super::response_id(Flavor::Chat),
        "object": "chat.completion",
        "created": super::unix_now(),
        "model": model,
        "choices": choices,
        "usage": super::usage_json(response.usage.as_ref()),
        "system_fingerprint": null,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(body: Value) -> Result<Generation, ApiError> {
        match body {
            Value::Object(map) => parse(&map, 512),
            _ => unreachable!("tests pass objects"),
        }
    }

    fn messages(generation: &Generation) -> Vec<(String, String)> {
        match &generation.input {
            pb::generate_request::Input::Chat(chat) => chat
                .messages
                .iter()
                .map(|m| (m.role.clone(), m.content.clone()))
                .collect(),
            other => panic!("not a chat: {other:?}"),
        }
    }

    #[test]
    fn messages_become_a_chat() {
        let generation = parse_json(json!({
            "model": "smollm",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}
                ]},
                {"role": "assistant", "content": null, "tool_calls": []},
                {"role": "user", "content": "Well?", "name": "ann"}
            ],
            "temperature": 0,
            "max_completion_tokens": 8,
            "stream": true,
            "stream_options": {"include_usage": true},
            "parallel_tool_calls": false,
            "store": false
        }))
        .unwrap();
        assert_eq!(generation.model, "smollm");
        assert_eq!(
            messages(&generation),
            [
                ("system".into(), "Be brief.".into()),
                ("user".into(), "What is\n2+2?".into()),
                ("assistant".into(), String::new()),
                ("user".into(), "Well?".into()),
            ]
        );
        assert_eq!(generation.sampling.temperature, Some(0.0));
        assert_eq!(generation.sampling.max_tokens, 8);
        assert!(generation.stream && generation.include_usage);
    }

    #[test]
    fn malformed_messages_name_the_field() {
        for (body, param) in [
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": ["hi"]}), "messages[0]"),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "bot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 3}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "http://x"}}
                ]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": 5, "messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}),
                "tools",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "user": 1}),
                "user",
            ),
        ] {
            let err = parse_json(body.clone()).unwrap_err();
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.openai_body()["error"]["param"], param, "{body}");
        }
    }

    #[test]
    fn a_finished_generation_is_a_chat_completion() {
        let response = pb::GenerateResponse {
            model: None,
            completions: vec![pb::Completion {
                index: 0,
                text: "Paris.".into(),
                finish_reason: pb::FinishReason::Stop as i32,
                ..Default::default()
            }],
            usage: Some(pb::Usage {
                prompt_tokens: 12,
                completion_tokens: 3,
                total_tokens: 15,
            }),
        };
        let body = super::response("smollm", &response).unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["model"], "smollm");
        assert_eq!(
            body["choices"],
            json!([{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                    "logprobs": null, "finish_reason": "stop"}])
        );
        assert_eq!(body["usage"]["total_tokens"], 15);
    }
}
