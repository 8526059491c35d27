//! The request fields chat and completion requests share: sampling, limits,
//! streaming, and the OpenAI features this gateway refuses rather than
//! ignores.

use lmgrid_proto::lmgrid::v1 as pb;
use serde_json::Value;

use crate::http::error::ApiError;
use crate::http::json::{Fields, type_name};

/// The most stop sequences a request may give, as in OpenAI's API.
const MAX_STOP_SEQUENCES: usize = 4;

/// The most completions one request may ask for (`n`), as in OpenAI's API.
const MAX_N: u64 = 128;

/// Sampling parameters from the request. `max_tokens_keys` are the names
/// the token limit goes by, in order of preference; `cap` bounds it. A
/// request that names none gets the model's own default (0 on the wire).
pub(crate) fn sampling(
    fields: &Fields<'_>,
    cap: u32,
    max_tokens_keys: &[&str],
) -> Result<pb::SamplingParams, ApiError> {
    let mut max_tokens = None;
    for key in max_tokens_keys {
        if let Some(limit) = fields.integer(key, 1, u64::from(u32::MAX))? {
            if limit > u64::from(cap) {
                return Err(ApiError::invalid(
                    *key,
                    format!("'{key}' is {limit}, above this gateway's limit of {cap} tokens"),
                ));
            }
            max_tokens.get_or_insert(limit as u32);
        }
    }
    let repetition_penalty = fields.number("repetition_penalty", 0.0, 10.0)?;
    if repetition_penalty == Some(0.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            "'repetition_penalty' must be greater than 0",
        ));
    }
    Ok(pb::SamplingParams {
        max_tokens: max_tokens.unwrap_or(0),
        temperature: fields.number("temperature", 0.0, 2.0)?.map(|v| v as f32),
        top_p: fields.number("top_p", 0.0, 1.0)?.map(|v| v as f32),
        top_k: fields
            .integer("top_k", 0, u64::from(u32::MAX))?
            .map(|v| v as u32),
        seed: fields.bits64("seed")?,
        repetition_penalty: repetition_penalty.map(|v| v as f32),
        presence_penalty: fields
            .number("presence_penalty", -2.0, 2.0)?
            .map(|v| v as f32),
        frequency_penalty: fields
            .number("frequency_penalty", -2.0, 2.0)?
            .map(|v| v as f32),
        stop: stop_sequences(fields)?,
        n: fields.integer("n", 1, MAX_N)?.unwrap_or(1) as u32,
    })
}

/// `stop`: a string or an array of up to four strings.
fn stop_sequences(fields: &Fields<'_>) -> Result<Vec<String>, ApiError> {
    let stops: Vec<&Value> = match fields.get("stop") {
        None => return Ok(Vec::new()),
        Some(one @ Value::String(_)) => vec![one],
        Some(Value::Array(many)) => many.iter().collect(),
        Some(other) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "'stop' must be a string or an array of strings, not {}",
                    type_name(other)
                ),
            ));
        }
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "'stop' holds {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                stops.len()
            ),
        ));
    }
    stops
        .into_iter()
        .enumerate()
        .map(|(i, stop)| match stop {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            Value::String(_) => Err(ApiError::invalid(
                "stop",
                "'stop' sequences must not be empty",
            )),
            other => Err(ApiError::invalid(
                "stop",
                format!("'stop[{i}]' must be a string, not {}", type_name(other)),
            )),
        })
        .collect()
}

/// `stream` and `stream_options.include_usage`.
pub(crate) fn streaming(fields: &Fields<'_>) -> Result<(bool, bool), ApiError> {
    let stream = fields.bool("stream")?.unwrap_or(false);
    let Some(options) = fields.object("stream_options")? else {
        return Ok((stream, false));
    };
    if !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    let include_usage = Fields::nested(options, "stream_options")
        .bool("include_usage")?
        .unwrap_or(false);
    Ok((stream, include_usage))
}

/// The user id, checked for type; lmgrid keeps no per-user record of it.
pub(crate) fn user(fields: &Fields<'_>) -> Result<(), ApiError> {
    fields.string("user").map(drop)
}

/// An OpenAI feature this gateway does not offer, refused when a request
/// turns it on.
pub(crate) struct Unsupported {
    pub(crate) field: &'static str,
    /// Whether the value turns the feature on.
    pub(crate) enabled: fn(&Value) -> bool,
    pub(crate) message: &'static str,
}

/// Refuses the first feature of `features` that the request turns on.
pub(crate) fn refuse(fields: &Fields<'_>, features: &[Unsupported]) -> Result<(), ApiError> {
    for feature in features {
        if let Some(value) = fields.get(feature.field)
            && (feature.enabled)(value)
        {
            return Err(ApiError::invalid(feature.field, feature.message));
        }
    }
    Ok(())
}

/// `true`, a non-zero number, a non-empty string, array or object.
pub(crate) fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn sampling_reads_every_field() {
        let map = object(json!({
            "max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 7,
            "repetition_penalty": 1.1, "presence_penalty": -0.5, "frequency_penalty": 0.25,
            "stop": ["\n\n", "END"], "n": 2, "logit_bias": {"50256": -100}
        }));
        let params = sampling(&Fields::root(&map), 1024, &["max_tokens"]).unwrap();
        assert_eq!(params.max_tokens, 64);
        assert_eq!(params.temperature, Some(0.5));
        assert_eq!(params.top_p, Some(0.9));
        assert_eq!(params.top_k, Some(40));
        assert_eq!(params.seed, Some(7));
        assert_eq!(params.repetition_penalty, Some(1.1));
        assert_eq!(params.presence_penalty, Some(-0.5));
        assert_eq!(params.frequency_penalty, Some(0.25));
        assert_eq!(params.stop, ["\n\n", "END"]);
        assert_eq!(params.n, 2);
    }

    #[test]
    fn the_cap_bounds_max_tokens_and_the_model_decides_without_one() {
        let none = object(json!({}));
        let params = sampling(&Fields::root(&none), 256, &["max_tokens"]).unwrap();
        assert_eq!(
            (params.max_tokens, params.n, params.temperature),
            (0, 1, None)
        );
        let over = object(json!({"max_completion_tokens": 257}));
        let keys = ["max_completion_tokens", "max_tokens"];
        let err = sampling(&Fields::root(&over), 256, &keys).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(err.openai_body()["error"]["param"], "max_completion_tokens");
        assert!(err.message().contains("limit of 256"), "{err:?}");
        let both = object(json!({"max_completion_tokens": 10, "max_tokens": 20}));
        let params = sampling(&Fields::root(&both), 256, &keys).unwrap();
        assert_eq!(params.max_tokens, 10, "max_completion_tokens wins");
    }

    #[test]
    fn bad_values_name_their_field() {
        for (body, param) in [
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"top_p": -0.1}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 1.5}), "max_tokens"),
            (json!({"stop": 5}), "stop"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": [""]}), "stop"),
            (json!({"seed": "x"}), "seed"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"top_k": -1}), "top_k"),
        ] {
            let map = object(body.clone());
            let err = sampling(&Fields::root(&map), 100, &["max_tokens"]).unwrap_err();
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.openai_body()["error"]["param"], param, "{body}");
        }
    }

    #[test]
    fn stream_options_need_a_stream() {
        let map = object(json!({"stream": true, "stream_options": {"include_usage": true}}));
        assert_eq!(streaming(&Fields::root(&map)).unwrap(), (true, true));
        let map = object(json!({"stream_options": {"include_usage": true}}));
        assert!(streaming(&Fields::root(&map)).is_err());
        let map = object(json!({"stream": "yes"}));
        assert!(streaming(&Fields::root(&map)).is_err());
        let map = object(json!({"stream": null}));
        assert_eq!(streaming(&Fields::root(&map)).unwrap(), (false, false));
    }

    #[test]
    fn unsupported_features_are_refused_only_when_on() {
        let features = [Unsupported {
            field: "logprobs",
            enabled: is_set,
            message: "log probabilities are not supported",
        }];
        let off = object(json!({"logprobs": false}));
        refuse(&Fields::root(&off), &features).unwrap();
        let on = object(json!({"logprobs": true}));
        let err = refuse(&Fields::root(&on), &features).unwrap_err();
        assert_eq!(err.openai_body()["error"]["param"], "logprobs");
    }
}
