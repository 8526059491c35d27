//! JSON tensors of the Open Inference Protocol's REST API, to and from the
//! gRPC messages.
//!
//! Requests go to the worker with every input in `raw_input_contents`
//! (little-endian, row-major; BYTES elements each prefixed with their 4-byte
//! little-endian length), which is the one encoding that carries every
//! datatype, FP16 included. Outputs come back raw or typed and become flat,
//! row-major JSON arrays: numbers, `true`/`false` for BOOL, strings for
//! BYTES. JSON has no NaN or infinity; such values are written as `null`.

use half::f16;
use lmgrid_proto::inference as oip;
use serde_json::{Map, Number, Value, json};

use crate::http::error::ApiError;
use crate::http::json::{Fields, type_name};

/// Datatypes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dtype {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

impl Dtype {
    pub(crate) fn parse(name: &str) -> Option<Dtype> {
        Some(match name {
            "BOOL" => Dtype::Bool,
            "UINT8" => Dtype::U8,
            "UINT16" => Dtype::U16,
            "UINT32" => Dtype::U32,
            "UINT64" => Dtype::U64,
            "INT8" => Dtype::I8,
            "INT16" => Dtype::I16,
            "INT32" => Dtype::I32,
            "INT64" => Dtype::I64,
            "FP16" => Dtype::F16,
            "FP32" => Dtype::F32,
            "FP64" => Dtype::F64,
            "BYTES" => Dtype::Bytes,
            _ => return None,
        })
    }

    /// Integer datatypes: their range.
    fn int_range(self) -> Option<(i128, i128)> {
        Some(match self {
            Dtype::U8 => (0, u8::MAX.into()),
            Dtype::U16 => (0, u16::MAX.into()),
            Dtype::U32 => (0, u32::MAX.into()),
            Dtype::U64 => (0, u64::MAX.into()),
            Dtype::I8 => (i8::MIN.into(), i8::MAX.into()),
            Dtype::I16 => (i16::MIN.into(), i16::MAX.into()),
            Dtype::I32 => (i32::MIN.into(), i32::MAX.into()),
            Dtype::I64 => (i64::MIN.into(), i64::MAX.into()),
            _ => return None,
        })
    }
}

const DATATYPES: &str =
    "BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64 or BYTES";

/// The gRPC request for an inference request body.
pub(crate) fn infer_request(
    model: &str,
    version: &str,
    body: &Map<String, Value>,
) -> Result<oip::ModelInferRequest, ApiError> {
    let fields = Fields::root(body);
    let inputs = fields
        .array("inputs")?
        .ok_or_else(|| ApiError::invalid("inputs", "'inputs' is required"))?;
    let mut request = oip::ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: fields.string("id")?.unwrap_or_default().to_string(),
        parameters: parameters(&fields, "parameters")?,
        ..Default::default()
    };
    for (i, input) in inputs.iter().enumerate() {
        let (tensor, raw) = input_tensor(&format!("inputs[{i}]"), input)?;
        request.inputs.push(tensor);
        request.raw_input_contents.push(raw);
    }
    for (i, output) in fields.array("outputs")?.into_iter().flatten().enumerate() {
        let at = format!("outputs[{i}]");
        let map = object_at(&at, output)?;
        let fields = Fields::nested(map, &at);
        request
            .outputs
            .push(oip::model_infer_request::InferRequestedOutputTensor {
                name: fields.required_string("name")?.to_string(),
                parameters: parameters(&fields, "parameters")?,
            });
    }
    Ok(request)
}

fn object_at<'a>(at: &str, value: &'a Value) -> Result<&'a Map<String, Value>, ApiError> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::invalid(
            at,
            format!("'{at}' must be an object, not {}", type_name(other)),
        )),
    }
}

fn input_tensor(
    at: &str,
    value: &Value,
) -> Result<(oip::model_infer_request::InferInputTensor, Vec<u8>), ApiError> {
    let fields = Fields::nested(object_at(at, value)?, at);
    let name = fields.required_string("name")?;
    let datatype = fields.required_string("datatype")?;
    let dtype = Dtype::parse(datatype).ok_or_else(|| {
        ApiError::invalid(
            fields.path("datatype"),
            format!("input '{name}': unknown datatype '{datatype}'; expected {DATATYPES}"),
        )
    })?;
    let shape = fields
        .array("shape")?
        .ok_or_else(|| {
            ApiError::invalid(
                fields.path("shape"),
                format!("input '{name}': 'shape' is required"),
            )
        })?
        .iter()
        .map(|dim| dim.as_u64().and_then(|d| i64::try_from(d).ok()))
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| {
            ApiError::invalid(
                fields.path("shape"),
                format!("input '{name}': 'shape' must hold non-negative integers"),
            )
        })?;
    let parameters = parameters(&fields, "parameters")?;
    if parameters.contains_key("binary_data_size") {
        return Err(ApiError::invalid(
            fields.path("parameters"),
            "the binary tensor data extension is not supported; send tensor data as JSON",
        ));
    }
    let data = fields.get("data").ok_or_else(|| {
        ApiError::invalid(
            fields.path("data"),
            format!("input '{name}': 'data' is required"),
        )
    })?;
    let mut elements = Vec::new();
    flatten(data, &mut elements);
    let expected = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .filter(|&n| n == elements.len() as u64);
    if expected.is_none() {
        return Err(ApiError::invalid(
            fields.path("data"),
            format!(
                "input '{name}': shape {shape:?} does not match the {} elements of 'data'",
                elements.len()
            ),
        ));
    }
    let raw = encode(dtype, &elements).map_err(|(index, value)| {
        ApiError::invalid(
            fields.path("data"),
            format!("input '{name}': element {index} ({value}) is not a valid {datatype} value"),
        )
    })?;
    let tensor = oip::model_infer_request::InferInputTensor {
        name: name.to_string(),
        datatype: datatype.to_string(),
        shape,
        parameters,
        contents: None,
    };
    Ok((tensor, raw))
}

/// Collects the leaves of nested arrays in row-major order.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        leaf => out.push(leaf),
    }
}

/// Little-endian raw bytes of `elements`; on failure, the index and value of
/// the element that does not fit.
fn encode(dtype: Dtype, elements: &[&Value]) -> Result<Vec<u8>, (usize, String)> {
    let mut raw = Vec::with_capacity(elements.len() * 4);
    for (i, value) in elements.iter().enumerate() {
        let bad = || (i, value.to_string());
        match dtype {
            Dtype::Bool => raw.push(u8::from(value.as_bool().ok_or_else(bad)?)),
            Dtype::Bytes => {
                let text = value.as_str().ok_or_else(bad)?;
                let len = u32::try_from(text.len()).map_err(|_| bad())?;
                raw.extend_from_slice(&len.to_le_bytes());
                raw.extend_from_slice(text.as_bytes());
            }
            Dtype::F16 | Dtype::F32 | Dtype::F64 => {
                let v = value.as_f64().ok_or_else(bad)?;
                match dtype {
                    Dtype::F16 if v.abs() <= f64::from(f16::MAX) => {
                        raw.extend_from_slice(&f16::from_f64(v).to_le_bytes());
                    }
                    Dtype::F32 if v.abs() <= f64::from(f32::MAX) => {
                        raw.extend_from_slice(&(v as f32).to_le_bytes());
                    }
                    Dtype::F64 => raw.extend_from_slice(&v.to_le_bytes()),
                    _ => return Err(bad()),
                }
            }
            int => {
                let (min, max) = int.int_range().ok_or_else(bad)?;
                let v = value
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| value.as_u64().map(i128::from))
                    .filter(|v| (min..=max).contains(v))
                    .ok_or_else(bad)?;
                let bytes = v.to_le_bytes();
                let width = match int {
                    Dtype::U8 | Dtype::I8 => 1,
                    Dtype::U16 | Dtype::I16 => 2,
                    Dtype::U32 | Dtype::I32 => 4,
                    _ => 8,
                };
                raw.extend_from_slice(&bytes[..width]);
            }
        }
    }
    Ok(raw)
}

/// The response body for a gRPC response.
pub(crate) fn infer_response(response: oip::ModelInferResponse) -> Result<Value, ApiError> {
    let raw = &response.raw_output_contents;
    if !raw.is_empty() && raw.len() != response.outputs.len() {
        return Err(worker_error(format!(
            "{} raw outputs for {} outputs",
            raw.len(),
            response.outputs.len()
        )));
    }
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for (i, output) in response.outputs.iter().enumerate() {
        let dtype = Dtype::parse(&output.datatype).ok_or_else(|| {
            worker_error(format!(
                "output '{}' has unknown datatype '{}'",
                output.name, output.datatype
            ))
        })?;
        let data = match raw.get(i) {
            Some(bytes) => decode_raw(dtype, bytes),
            None => decode_typed(dtype, output.contents.as_ref()),
        }
        .ok_or_else(|| {
            worker_error(format!(
                "output '{}' holds malformed {} data",
                output.name, output.datatype
            ))
        })?;
        let mut tensor = json!({
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
            "data": data,
        });
        if !output.parameters.is_empty() {
            tensor["parameters"] = parameters_json(&output.parameters);
        }
        outputs.push(tensor);
    }
    let mut body = json!({
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    });
    if !response.id.is_empty() {
        body["id"] = response.id.into();
    }
    if !response.parameters.is_empty() {
        body["parameters"] = parameters_json(&response.parameters);
    }
    Ok(body)
}

fn worker_error(message: String) -> ApiError {
    ApiError::new(
        lmgrid_core::ErrorKind::Internal,
        format!("the worker's answer is malformed: {message}"),
    )
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Values of little-endian raw bytes; `None` if the length does not fit.
fn decode_raw(dtype: Dtype, bytes: &[u8]) -> Option<Vec<Value>> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> Value) -> Option<Vec<Value>> {
        if !bytes.len().is_multiple_of(N) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().unwrap_or([0; N])))
                .collect(),
        )
    }
    match dtype {
        Dtype::Bool => each(bytes, |[b]: [u8; 1]| Value::Bool(b != 0)),
        Dtype::U8 => each(bytes, |b: [u8; 1]| u8::from_le_bytes(b).into()),
        Dtype::U16 => each(bytes, |b: [u8; 2]| u16::from_le_bytes(b).into()),
        Dtype::U32 => each(bytes, |b: [u8; 4]| u32::from_le_bytes(b).into()),
        Dtype::U64 => each(bytes, |b: [u8; 8]| u64::from_le_bytes(b).into()),
        Dtype::I8 => each(bytes, |b: [u8; 1]| i8::from_le_bytes(b).into()),
        Dtype::I16 => each(bytes, |b: [u8; 2]| i16::from_le_bytes(b).into()),
        Dtype::I32 => each(bytes, |b: [u8; 4]| i32::from_le_bytes(b).into()),
        Dtype::I64 => each(bytes, |b: [u8; 8]| i64::from_le_bytes(b).into()),
        Dtype::F16 => each(bytes, |b: [u8; 2]| float(f16::from_le_bytes(b).to_f64())),
        Dtype::F32 => each(bytes, |b: [u8; 4]| float(f32::from_le_bytes(b).into())),
        Dtype::F64 => each(bytes, |b: [u8; 8]| float(f64::from_le_bytes(b))),
        Dtype::Bytes => {
            let mut values = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                let (len, tail) = rest.split_first_chunk::<4>()?;
                let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
                let element = tail.get(..len)?;
                values.push(String::from_utf8_lossy(element).into_owned().into());
                rest = &tail[len..];
            }
            Some(values)
        }
    }
}

/// Values of typed contents; `None` for FP16, which has no typed field.
fn decode_typed(dtype: Dtype, contents: Option<&oip::InferTensorContents>) -> Option<Vec<Value>> {
    let empty = oip::InferTensorContents::default();
    let c = contents.unwrap_or(&empty);
    Some(match dtype {
        Dtype::Bool => c.bool_contents.iter().map(|&v| v.into()).collect(),
        Dtype::U8 | Dtype::U16 | Dtype::U32 => c.uint_contents.iter().map(|&v| v.into()).collect(),
        Dtype::U64 => c.uint64_contents.iter().map(|&v| v.into()).collect(),
        Dtype::I8 | Dtype::I16 | Dtype::I32 => c.int_contents.iter().map(|&v| v.into()).collect(),
        Dtype::I64 => c.int64_contents.iter().map(|&v| v.into()).collect(),
        Dtype::F32 => c.fp32_contents.iter().map(|&v| float(v.into())).collect(),
        Dtype::F64 => c.fp64_contents.iter().map(|&v| float(v)).collect(),
        Dtype::Bytes => c
            .bytes_contents
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned().into())
            .collect(),
        Dtype::F16 => return None,
    })
}

/// `parameters` of a request or tensor: booleans, integers, floats and
/// strings.
fn parameters(
    fields: &Fields<'_>,
    name: &str,
) -> Result<std::collections::HashMap<String, oip::InferParameter>, ApiError> {
    use oip::infer_parameter::ParameterChoice;
    let Some(map) = fields.object(name)? else {
        return Ok(Default::default());
    };
    map.iter()
        .map(|(key, value)| {
            let choice = match value {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => ParameterChoice::Int64Param(i),
                    (None, Some(u)) => ParameterChoice::Uint64Param(u),
                    _ => ParameterChoice::DoubleParam(n.as_f64().unwrap_or_default()),
                },
                other => {
                    let param = format!("{}.{key}", fields.path(name));
                    return Err(ApiError::invalid(
                        param.clone(),
                        format!(
                            "'{param}' must be a boolean, number or string, not {}",
                            type_name(other)
                        ),
                    ));
                }
            };
            Ok((
                key.clone(),
                oip::InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

fn parameters_json(parameters: &std::collections::HashMap<String, oip::InferParameter>) -> Value {
    use oip::infer_parameter::ParameterChoice;
    let map = parameters
        .iter()
        .map(|(key, parameter)| {
            let value = match &parameter.parameter_choice {
                Some(ParameterChoice::BoolParam(b)) => (*b).into(),
                Some(ParameterChoice::Int64Param(i)) => (*i).into(),
                Some(ParameterChoice::Uint64Param(u)) => (*u).into(),
                Some(ParameterChoice::DoubleParam(d)) => float(*d),
                Some(ParameterChoice::StringParam(s)) => s.clone().into(),
                None => Value::Null,
            };
            (key.clone(), value)
        })
        .collect();
    Value::Object(map)
}

#[cfg(test)]
#[path = "tensor_tests.rs"]
mod tests;
