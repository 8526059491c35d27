//! `POST /v1/embeddings`: text in, vectors out, from a worker serving an
//! embedding model (`lmgrid.v1.EmbeddingService/Embed`).

use axum::response::{IntoResponse, Json, Response};
use base64::Engine as _;
use lmgrid_proto::lmgrid::v1 as pb;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::admission::estimate_tokens;
use crate::http::call::{Call, JsonBody};
use crate::http::error::ApiError;
use crate::http::forward::{self, methods};
use crate::http::json::{Fields, type_name};
use crate::routing::{EMBEDDING, Target};

/// The most texts one request may embed, as in OpenAI's API.
const MAX_INPUTS: usize = 2048;

/// An embeddings request, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbeddingRequest {
    pub(crate) model: String,
    pub(crate) inputs: Vec<String>,
    pub(crate) dimensions: u32,
    pub(crate) base64: bool,
}

pub(super) async fn create(mut call: Call, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let request = parse(&body)?;
    let text: usize = request.inputs.iter().map(String::len).sum();
    call.admit(&request.model, estimate_tokens(text)).await?;
    let target = Target::work(&request.model, "", Some(EMBEDDING));
    let plan = forward::plan(&call, target, "embeddings")?;
    let message = pb::EmbedRequest {
        model: Some(pb::ModelRef {
            name: request.model.clone(),
            version: String::new(),
        }),
        inputs: request.inputs.clone(),
        context: Some(call.context()),
        dimensions: request.dimensions,
    };
    let response: pb::EmbedResponse = forward::unary(&call, &plan, methods::EMBED, message).await?;
    call.record_usage(response.usage.as_ref());
    Ok(Json(render(&request, response)).into_response())
}

/// Reads and checks an embeddings request.
pub(crate) fn parse(body: &Map<String, Value>) -> Result<EmbeddingRequest, ApiError> {
    let fields = Fields::root(body);
    let model = fields.required_string("model")?.to_string();
    let inputs = inputs(&fields)?;
    let dimensions = fields
        .integer("dimensions", 1, u64::from(u32::MAX))?
        .map_or(0, |d| d as u32);
    let base64 = match fields.string("encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("'encoding_format' is '{other}'; expected 'float' or 'base64'"),
            ));
        }
    };
    fields.string("user")?;
    Ok(EmbeddingRequest {
        model,
        inputs,
        dimensions,
        base64,
    })
}

/// `input`: a string or an array of strings. Token-id inputs are refused.
fn inputs(fields: &Fields<'_>) -> Result<Vec<String>, ApiError> {
    let token_ids = || {
        ApiError::invalid(
            "input",
            "only text input is supported; 'input' must be a string or an array of strings, \
             not token ids",
        )
    };
    let items = match fields.get("input") {
        None => return Err(ApiError::invalid("input", "'input' is required")),
        Some(Value::String(text)) => return Ok(vec![text.clone()]),
        Some(Value::Array(items)) => items,
        Some(Value::Number(_)) => return Err(token_ids()),
        Some(other) => {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "'input' must be a string or an array of strings, not {}",
                    type_name(other)
                ),
            ));
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid("input", "'input' must not be empty"));
    }
    if items.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "'input' holds {} texts; at most {MAX_INPUTS} are allowed per request",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(text) => Ok(text.clone()),
            Value::Number(_) | Value::Array(_) => Err(token_ids()),
            other => Err(ApiError::invalid(
                "input",
                format!("'input[{i}]' must be a string, not {}", type_name(other)),
            )),
        })
        .collect()
}

#[derive(Debug, Serialize)]
struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: u32,
    embedding: Vector,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    /// Little-endian f32s in standard base64.
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

fn render(request: &EmbeddingRequest, response: pb::EmbedResponse) -> EmbeddingList {
    let usage = response.usage.unwrap_or_default();
    let mut embeddings = response.embeddings;
    embeddings.sort_by_key(|e| e.index);
    let data = embeddings
        .into_iter()
        .map(|embedding| EmbeddingData {
            object: "embedding",
            index: embedding.index,
            embedding: if request.base64 {
                Vector::Base64(base64_f32(&embedding.values))
            } else {
                Vector::Float(embedding.values)
            },
        })
        .collect();
    EmbeddingList {
        object: "list",
        data,
        model: request.model.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.total_tokens.max(usage.prompt_tokens),
        },
    }
}

/// `values` as little-endian f32 bytes in standard base64, as OpenAI's SDKs
/// decode `encoding_format: "base64"`.
fn base64_f32(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(body: Value) -> Result<EmbeddingRequest, ApiError> {
        match body {
            Value::Object(map) => parse(&map),
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn inputs_are_a_string_or_strings() {
        let one = parse_json(json!({"model": "minilm", "input": "hello"})).unwrap();
        assert_eq!(one.inputs, ["hello"]);
        assert!(!one.base64);
        let many = parse_json(json!({
            "model": "minilm", "input": ["a", "b"], "dimensions": 64,
            "encoding_format": "base64", "user": "u-1"
        }))
        .unwrap();
        assert_eq!(many.inputs, ["a", "b"]);
        assert_eq!(many.dimensions, 64);
        assert!(many.base64);
    }

    #[test]
    fn token_inputs_and_bad_fields_are_refused() {
        for (body, param, needle) in [
            (json!({"model": "m", "input": [1, 2]}), "input", "only text"),
            (
                json!({"model": "m", "input": [[1, 2]]}),
                "input",
                "only text",
            ),
            (json!({"model": "m", "input": 5}), "input", "only text"),
            (json!({"model": "m", "input": []}), "input", "not be empty"),
            (
                json!({"model": "m", "input": ["a", null]}),
                "input",
                "'input[1]'",
            ),
            (json!({"model": "m"}), "input", "required"),
            (json!({"input": "a"}), "model", "required"),
            (
                json!({"model": "m", "input": "a", "dimensions": 0}),
                "dimensions",
                "between",
            ),
            (
                json!({"model": "m", "input": "a", "encoding_format": "hex"}),
                "encoding_format",
                "'hex'",
            ),
        ] {
            let err = parse_json(body.clone()).unwrap_err();
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.openai_body()["error"]["param"], param, "{body}");
            assert!(err.message().contains(needle), "{body}: {err:?}");
        }
    }

    #[test]
    fn responses_are_openai_lists_in_input_order() {
        let request = parse_json(json!({"model": "minilm", "input": ["a", "b"]})).unwrap();
        let response = pb::EmbedResponse {
            model: None,
            embeddings: vec![
                pb::Embedding {
                    index: 1,
                    values: vec![0.0, 1.0],
                },
                pb::Embedding {
                    index: 0,
                    values: vec![0.5, -0.5],
                },
            ],
            usage: Some(pb::Usage {
                prompt_tokens: 4,
                completion_tokens: 0,
                total_tokens: 4,
            }),
        };
        let body = serde_json::to_value(render(&request, response)).unwrap();
        assert_eq!(
            body,
            json!({
                "object": "list",
                "data": [
                    {"object": "embedding", "index": 0, "embedding": [0.5, -0.5]},
                    {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
                ],
                "model": "minilm",
                "usage": {"prompt_tokens": 4, "total_tokens": 4},
            })
        );
    }

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 is 0x3f800000: bytes 00 00 80 3f.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }
}
