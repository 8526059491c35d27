//! `POST /v1/completions`: a raw text prompt, tokenized as is, answered as a
//! `text_completion` or streamed as `text_completion` chunks.

use axum::response::Response;
use lmgrid_proto::lmgrid::v1 as pb;
use serde_json::{Map, Value, json};

use super::params::{self, Unsupported, is_set};
use super::{Flavor, Generation};
use crate::http::call::{Call, JsonBody};
use crate::http::error::ApiError;
use crate::http::json::{Fields, type_name};

const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        field: "echo",
        enabled: is_set,
        message: "echoing the prompt is not supported",
    },
    Unsupported {
        field: "logprobs",
        enabled: is_set,
        message: "log probabilities are not supported",
    },
    Unsupported {
        field: "suffix",
        enabled: is_set,
        message: "suffixes (insertion) are not supported",
    },
    Unsupported {
        field: "best_of",
        enabled: more_than_one,
        message: "best_of above 1 is not supported; use n",
    },
];

fn more_than_one(value: &Value) -> bool {
    value.as_f64().is_none_or(|n| n > 1.0)
}

pub(super) async fn create(call: Call, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let generation = parse(&body, call.state().limits.max_tokens_cap)?;
    super::generate(call, generation, Flavor::Completion).await
}

/// Reads and checks a completion request.
pub(crate) fn parse(
    body: &Map<String, Value>,
    max_tokens_cap: u32,
) -> Result<Generation, ApiError> {
    let fields = Fields::root(body);
    let model = fields.required_string("model")?.to_string();
    let prompt = prompt(&fields)?;
    params::refuse(&fields, UNSUPPORTED)?;
    params::user(&fields)?;
    let sampling = params::sampling(&fields, max_tokens_cap, &["max_tokens"])?;
    let (stream, include_usage) = params::streaming(&fields)?;
    Ok(Generation {
        model,
        input: pb::generate_request::Input::Prompt(prompt),
        sampling,
        stream,
        include_usage,
    })
}

/// `prompt`: a string, or an array holding one string. Several prompts and
/// token-id prompts are refused, each with its reason.
fn prompt(fields: &Fields<'_>) -> Result<String, ApiError> {
    let token_ids = || {
        ApiError::invalid(
            "prompt",
            "'prompt' must be text; token-id prompts are not supported",
        )
    };
    match fields.get("prompt") {
        None => Err(ApiError::invalid("prompt", "'prompt' is required")),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Err(ApiError::invalid("prompt", "'prompt' must not be empty")),
            [Value::String(text)] => Ok(text.clone()),
            [Value::Number(_), ..] | [Value::Array(_), ..] => Err(token_ids()),
            items if items.iter().all(Value::is_string) => Err(ApiError::invalid(
                "prompt",
                format!(
                    "'prompt' holds {} prompts; this gateway takes one prompt per request",
                    items.len()
                ),
            )),
            [first, ..] => Err(ApiError::invalid(
                "prompt",
                format!(
                    "'prompt' must be a string or an array of one string; it holds {}",
                    type_name(first)
                ),
            )),
        },
        Some(other) => Err(ApiError::invalid(
            "prompt",
            format!("'prompt' must be a string, not {}", type_name(other)),
        )),
    }
}

/// The `text_completion` object for a finished generation.
pub(super) fn response(model: &str, response: &pb::GenerateResponse) -> Result<Value, ApiError> {
    let choices = response
        .completions
        .iter()
        .map(|completion| {
            Ok(json!({
                "index": completion.index,
                "text": completion.text,
                "logprobs": null,
                "finish_reason": super::finish_reason(completion.finish_reason())?,
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(json!({
        "id": super::response_id(Flavor::Completion),
        "object": "text_completion",
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

    #[test]
    fn a_prompt_is_a_string_or_one_string_in_an_array() {
        for prompt in [json!("Once upon"), json!(["Once upon"])] {
            let generation =
                parse_json(json!({"model": "m", "prompt": prompt, "max_tokens": 5})).unwrap();
            assert_eq!(
                generation.input,
                pb::generate_request::Input::Prompt("Once upon".into())
            );
            assert_eq!(generation.sampling.max_tokens, 5);
            assert!(!generation.stream);
        }
    }

    #[test]
    fn other_prompts_are_refused_with_their_reason() {
        for (prompt, needle) in [
            (json!([1, 2, 3]), "token-id"),
            (json!([[1, 2], [3]]), "token-id"),
            (json!(["a", "b"]), "holds 2 prompts"),
            (json!([]), "must not be empty"),
            (json!(["a", 1]), "array of one string"),
            (json!({"text": "a"}), "must be a string"),
        ] {
            let err = parse_json(json!({"model": "m", "prompt": prompt})).unwrap_err();
            assert_eq!(err.status(), 400);
            assert_eq!(err.openai_body()["error"]["param"], "prompt");
            assert!(err.message().contains(needle), "{prompt}: {err:?}");
        }
        let err = parse_json(json!({"model": "m"})).unwrap_err();
        assert_eq!(err.message(), "'prompt' is required");
    }

    #[test]
    fn unsupported_options_are_refused_when_on() {
        let body =
            json!({"model": "m", "prompt": "x", "echo": false, "best_of": 1, "logprobs": null});
        parse_json(body).unwrap();
        for (field, value) in [
            ("echo", json!(true)),
            ("logprobs", json!(2)),
            ("suffix", json!("end")),
            ("best_of", json!(3)),
        ] {
            let mut body = json!({"model": "m", "prompt": "x"});
            body[field] = value;
            let err = parse_json(body).unwrap_err();
            assert_eq!(err.openai_body()["error"]["param"], field);
        }
    }

    #[test]
    fn a_finished_generation_is_a_text_completion() {
        let response = pb::GenerateResponse {
            model: None,
            completions: vec![pb::Completion {
                index: 0,
                text: " there was".into(),
                finish_reason: pb::FinishReason::Length as i32,
                ..Default::default()
            }],
            usage: None,
        };
        let body = super::response("m", &response).unwrap();
        assert_eq!(body["object"], "text_completion");
        assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(body["choices"][0]["text"], " there was");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["usage"]["total_tokens"], 0);
    }
}
