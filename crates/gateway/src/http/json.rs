//! Reading JSON request bodies field by field: lenient about keys it does not
//! know (OpenAI SDKs send many), strict about the types and ranges of the
//! ones it does, and every error names the field (`param`) and says what was
//! expected and what came.

use serde_json::{Map, Value};

use super::error::ApiError;

/// Parses a request body that must be a JSON object.
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            type_name(&other)
        ))),
        Err(error) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {error}"
        ))),
    }
}

/// "a string", "an array", ... for messages.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of one JSON object, at a path (`messages[2]`) within the body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
    at: &'a str,
}

impl<'a> Fields<'a> {
    /// The top-level object of a body.
    pub(crate) fn root(map: &'a Map<String, Value>) -> Fields<'a> {
        Fields { map, at: "" }
    }

    /// An object nested at `at`.
    pub(crate) fn nested(map: &'a Map<String, Value>, at: &'a str) -> Fields<'a> {
        Fields { map, at }
    }

    /// The request-wide name of field `name`: `messages[2].content`.
    pub(crate) fn path(&self, name: &str) -> String {
        if self.at.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.at)
        }
    }

    /// The value of `name`; `null` counts as absent, as OpenAI treats it.
    pub(crate) fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn wrong_type(&self, name: &str, expected: &str, got: &Value) -> ApiError {
        let param = self.path(name);
        ApiError::invalid(
            param.clone(),
            format!("'{param}' must be {expected}, not {}", type_name(got)),
        )
    }

    pub(crate) fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(name, "a string", other)),
        }
    }

    pub(crate) fn required_string(&self, name: &str) -> Result<&'a str, ApiError> {
        self.string(name)?.ok_or_else(|| {
            let param = self.path(name);
            ApiError::invalid(param.clone(), format!("'{param}' is required"))
        })
    }

    pub(crate) fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(name, "a boolean", other)),
        }
    }

    /// A number within `min..=max`.
    pub(crate) fn number(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        let value = match self.get(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(other) => return Err(self.wrong_type(name, "a number", other)),
        };
        if !(min..=max).contains(&value) {
            let param = self.path(name);
            return Err(ApiError::invalid(
                param.clone(),
                format!("'{param}' must be between {min} and {max}, got {value}"),
            ));
        }
        Ok(Some(value))
    }

    /// A whole number within `min..=max`.
    pub(crate) fn integer(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let value = match self.get(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n,
            Some(other) => return Err(self.wrong_type(name, "an integer", other)),
        };
        let param = self.path(name);
        let Some(whole) = as_whole(value) else {
            return Err(ApiError::invalid(
                param.clone(),
                format!("'{param}' must be an integer, got {value}"),
            ));
        };
        match u64::try_from(whole) {
            Ok(v) if (min..=max).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::invalid(
                param.clone(),
                format!("'{param}' must be between {min} and {max}, got {value}"),
            )),
        }
    }

    /// Any whole number that fits 64 bits, signed or not, as its two's
    /// complement bits (a seed).
    pub(crate) fn bits64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        let value = match self.get(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n,
            Some(other) => return Err(self.wrong_type(name, "an integer", other)),
        };
        if let Some(v) = value.as_u64() {
            return Ok(Some(v));
        }
        if let Some(v) = value.as_i64() {
            return Ok(Some(v as u64));
        }
        let param = self.path(name);
        Err(ApiError::invalid(
            param.clone(),
            format!("'{param}' must be a 64-bit integer, got {value}"),
        ))
    }

    pub(crate) fn object(&self, name: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(other) => Err(self.wrong_type(name, "an object", other)),
        }
    }

    pub(crate) fn array(&self, name: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(self.wrong_type(name, "an array", other)),
        }
    }
}

/// A JSON number as a whole number: integers, and floats without a fraction
/// (`16.0`, which some clients send for integers).
fn as_whole(value: &serde_json::Number) -> Option<i128> {
    if let Some(v) = value.as_u64() {
        return Some(i128::from(v));
    }
    if let Some(v) = value.as_i64() {
        return Some(i128::from(v));
    }
    let f = value.as_f64()?;
    // Bounds keep the cast exact; a float this large is no sensible count.
    (f.fract() == 0.0 && f.abs() < 1e18).then_some(f as i128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn bodies_must_be_json_objects() {
        let err = parse_object(b"{\"model\": ").unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(
            err.message()
                .starts_with("the request body is not valid JSON"),
            "{err:?}"
        );
        let err = parse_object(b"[1]").unwrap_err();
        assert_eq!(
            err.message(),
            "the request body must be a JSON object, not an array"
        );
        let err = parse_object(b"  ").unwrap_err();
        assert!(err.message().contains("empty"), "{err:?}");
        assert!(parse_object(b"{}").unwrap().is_empty());
    }

    #[test]
    fn wrong_types_name_the_field() {
        let map = object(json!({"temperature": "hot", "n": 1.5, "stream": 1, "x": null}));
        let fields = Fields::root(&map);
        let err = fields.number("temperature", 0.0, 2.0).unwrap_err();
        assert_eq!(err.openai_body()["error"]["param"], "temperature");
        assert_eq!(
            err.message(),
            "'temperature' must be a number, not a string"
        );
        let err = fields.integer("n", 1, 8).unwrap_err();
        assert_eq!(err.message(), "'n' must be an integer, got 1.5");
        let err = fields.bool("stream").unwrap_err();
        assert_eq!(err.message(), "'stream' must be a boolean, not a number");
        assert_eq!(fields.string("x").unwrap(), None, "null is absent");
        assert_eq!(fields.string("missing").unwrap(), None);
        let err = fields.required_string("model").unwrap_err();
        assert_eq!(err.message(), "'model' is required");
    }

    #[test]
    fn ranges_are_checked() {
        let map = object(json!({"t": 3, "n": 0, "m": 16.0, "seed": -1, "big": 1e30}));
        let fields = Fields::nested(&map, "outer");
        let err = fields.number("t", 0.0, 2.0).unwrap_err();
        assert_eq!(err.message(), "'outer.t' must be between 0 and 2, got 3");
        assert!(fields.integer("n", 1, 8).is_err());
        assert_eq!(fields.integer("m", 1, 32).unwrap(), Some(16));
        assert_eq!(fields.bits64("seed").unwrap(), Some(u64::MAX));
        assert!(fields.integer("big", 0, u64::MAX).is_err());
        assert!(fields.bits64("big").is_err());
    }
}
