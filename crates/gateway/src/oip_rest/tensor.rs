//! JSON tensors of the Open Inference Protocol's REST API, to and from the
//! gRPC messages.
//!
//! Requests go to the worker with every input in `raw_input_contents`
//! (little-endian, row-major; BYTES elements each prefixed with their 4-byte
//! little-endian length), which is the one encoding that carries every
//! datatype, FP16 included. Outputs come back raw or typed and become flat,
//! row-major JSON arrays: numbers, `true`/`false` for BOOL, strings for
//! BYTES. JSON has no NaN or infinity; such values are written as `null`.
//!
//! The binary tensor data extension (what Triton's HTTP client sends by
//! default) carries tensors after the JSON instead: an input with
//! `parameters.binary_data_size` takes that many bytes of the binary tail, in
//! the order of `inputs`, in the same encoding as `raw_input_contents`; an
//! output asked for with `parameters.binary_data` (or every output, with the
//! request's `binary_data_output`) comes back the same way.

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

    /// Bytes per element; `None` for BYTES, whose elements vary.
    fn width(self) -> Option<usize> {
        Some(match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
            Dtype::Bytes => return None,
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

/// Parameters of the binary tensor data extension, read by the gateway and
/// not forwarded: the worker gets every tensor raw either way.
const BINARY_DATA_SIZE: &str = "binary_data_size";
const BINARY_DATA: &str = "binary_data";
const BINARY_DATA_OUTPUT: &str = "binary_data_output";

/// An inference request read from its body, and how the answer's outputs
/// are to be written.
#[derive(Debug)]
pub(crate) struct Infer {
    pub(crate) request: oip::ModelInferRequest,
    pub(crate) binary: BinaryOutputs,
}

/// Which outputs go back as binary data: those asked for with
/// `binary_data: true`, else the request's `binary_data_output`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct BinaryOutputs {
    default: bool,
    named: std::collections::HashMap<String, bool>,
}

impl BinaryOutputs {
    fn wants(&self, output: &str) -> bool {
        self.named.get(output).copied().unwrap_or(self.default)
    }
}

/// The gRPC request for an inference request body: its JSON part, and the
/// binary data after it (empty without the extension).
pub(crate) fn infer_request(
    model: &str,
    version: &str,
    body: &Map<String, Value>,
    binary: &[u8],
) -> Result<Infer, ApiError> {
    let fields = Fields::root(body);
    let inputs = fields
        .array("inputs")?
        .ok_or_else(|| ApiError::invalid("inputs", "'inputs' is required"))?;
    let mut request_parameters = parameters(&fields, "parameters")?;
    let mut binary_outputs = BinaryOutputs {
        default: take_bool(&mut request_parameters, "parameters", BINARY_DATA_OUTPUT)?,
        ..Default::default()
    };
    let mut request = oip::ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: fields.string("id")?.unwrap_or_default().to_string(),
        parameters: request_parameters,
        ..Default::default()
    };
    let mut tail = binary;
    for (i, input) in inputs.iter().enumerate() {
        let (tensor, raw) = input_tensor(&format!("inputs[{i}]"), input, &mut tail)?;
        request.inputs.push(tensor);
        request.raw_input_contents.push(raw);
    }
    if !tail.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} bytes of binary data follow the inputs' binary_data_size; \
             the sizes must account for every byte after the JSON",
            tail.len()
        )));
    }
    for (i, output) in fields.array("outputs")?.into_iter().flatten().enumerate() {
        let at = format!("outputs[{i}]");
        let map = object_at(&at, output)?;
        let fields = Fields::nested(map, &at);
        let name = fields.required_string("name")?.to_string();
        let mut parameters = parameters(&fields, "parameters")?;
        if parameters.contains_key(BINARY_DATA) {
            let wanted = take_bool(&mut parameters, &fields.path("parameters"), BINARY_DATA)?;
            binary_outputs.named.insert(name.clone(), wanted);
        }
        request
            .outputs
            .push(oip::model_infer_request::InferRequestedOutputTensor { name, parameters });
    }
    Ok(Infer {
        request,
        binary: binary_outputs,
    })
}

/// Removes the boolean parameter `key` (false when absent).
fn take_bool(
    parameters: &mut std::collections::HashMap<String, oip::InferParameter>,
    at: &str,
    key: &str,
) -> Result<bool, ApiError> {
    use oip::infer_parameter::ParameterChoice;
    match parameters.remove(key).and_then(|p| p.parameter_choice) {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(b),
        Some(_) => {
            let param = format!("{at}.{key}");
            Err(ApiError::invalid(
                param.clone(),
                format!("'{param}' must be a boolean"),
            ))
        }
    }
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
    tail: &mut &[u8],
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
    let elements = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| {
            ApiError::invalid(
                fields.path("shape"),
                format!("input '{name}': shape {shape:?} holds too many elements"),
            )
        })?;
    let mut parameters = parameters(&fields, "parameters")?;
    let raw = match parameters.remove(BINARY_DATA_SIZE) {
        Some(size) => {
            let param = format!("{}.{BINARY_DATA_SIZE}", fields.path("parameters"));
            if fields.get("data").is_some() {
                return Err(ApiError::invalid(
                    fields.path("data"),
                    format!(
                        "input '{name}' has both 'data' and '{param}'; \
                         send its data as JSON or as binary, not both"
                    ),
                ));
            }
            binary_input(name, dtype, elements, &param, &size, tail)?
        }
        None => json_input(name, (dtype, datatype), elements, &shape, &fields)?,
    };
    let tensor = oip::model_infer_request::InferInputTensor {
        name: name.to_string(),
        datatype: datatype.to_string(),
        shape,
        parameters,
        contents: None,
    };
    Ok((tensor, raw))
}

/// The raw bytes of an input given as JSON `data`.
fn json_input(
    name: &str,
    (dtype, datatype): (Dtype, &str),
    count: u64,
    shape: &[i64],
    fields: &Fields<'_>,
) -> Result<Vec<u8>, ApiError> {
    let data = fields.get("data").ok_or_else(|| {
        ApiError::invalid(
            fields.path("data"),
            format!("input '{name}': 'data' is required"),
        )
    })?;
    let mut elements = Vec::new();
    flatten(data, &mut elements);
    if count != elements.len() as u64 {
        return Err(ApiError::invalid(
            fields.path("data"),
            format!(
                "input '{name}': shape {shape:?} does not match the {} elements of 'data'",
                elements.len()
            ),
        ));
    }
    encode(dtype, &elements).map_err(|(index, value)| {
        ApiError::invalid(
            fields.path("data"),
            format!("input '{name}': element {index} ({value}) is not a valid {datatype} value"),
        )
    })
}

/// The raw bytes of an input sent as binary data: the next `size` bytes of
/// `tail`, which must encode exactly `count` elements of `dtype`.
fn binary_input(
    name: &str,
    dtype: Dtype,
    count: u64,
    param: &str,
    size: &oip::InferParameter,
    tail: &mut &[u8],
) -> Result<Vec<u8>, ApiError> {
    use oip::infer_parameter::ParameterChoice;
    let size = match size.parameter_choice {
        Some(ParameterChoice::Int64Param(n)) => u64::try_from(n).ok(),
        Some(ParameterChoice::Uint64Param(n)) => Some(n),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError::invalid(
            param,
            format!("'{param}' must be a non-negative integer (a byte count)"),
        )
    })?;
    let Some(bytes) = usize::try_from(size).ok().and_then(|n| tail.get(..n)) else {
        return Err(ApiError::invalid(
            param,
            format!(
                "input '{name}' takes {size} bytes of binary data, but only {} remain \
                 after the JSON (its length is the Inference-Header-Content-Length header)",
                tail.len()
            ),
        ));
    };
    *tail = &tail[bytes.len()..];
    check_raw(dtype, bytes, count)
        .map_err(|problem| ApiError::invalid(param, format!("input '{name}': {problem}")))?;
    Ok(bytes.to_vec())
}

/// Checks that raw bytes hold exactly `count` well-formed elements.
fn check_raw(dtype: Dtype, bytes: &[u8], count: u64) -> Result<(), String> {
    let Some(width) = dtype.width() else {
        let mut rest = bytes;
        let mut seen = 0u64;
        while !rest.is_empty() {
            let malformed = || {
                format!(
                    "BYTES element {seen} runs past the end of its {} bytes",
                    bytes.len()
                )
            };
            let (len, after) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
            let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| malformed())?;
            rest = after.get(len..).ok_or_else(malformed)?;
            seen += 1;
        }
        return if seen == count {
            Ok(())
        } else {
            Err(format!(
                "the binary data holds {seen} BYTES elements; the shape needs {count}"
            ))
        };
    };
    if count.checked_mul(width as u64) != Some(bytes.len() as u64) {
        return Err(format!(
            "{} bytes of binary data do not hold {count} elements of {width} bytes",
            bytes.len()
        ));
    }
    if dtype == Dtype::Bool
        && let Some(at) = bytes.iter().position(|&b| b > 1)
    {
        return Err(format!(
            "BOOL element {at} is {}; BOOL bytes are 0 or 1",
            bytes[at]
        ));
    }
    Ok(())
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
                let width = int.width().ok_or_else(bad)?;
                raw.extend_from_slice(&v.to_le_bytes()[..width]);
            }
        }
    }
    Ok(raw)
}

/// The body of an inference answer: JSON, and the binary data of the
/// outputs sent that way (`None` when there are none).
#[derive(Debug)]
pub(crate) struct InferBody {
    pub(crate) json: Value,
    pub(crate) binary: Option<Vec<u8>>,
}

/// The response body for a gRPC response.
pub(crate) fn infer_response(
    response: oip::ModelInferResponse,
    binary_outputs: &BinaryOutputs,
) -> Result<InferBody, ApiError> {
    let raw = &response.raw_output_contents;
    if !raw.is_empty() && raw.len() != response.outputs.len() {
        return Err(worker_error(format!(
            "{} raw outputs for {} outputs",
            raw.len(),
            response.outputs.len()
        )));
    }
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut binary: Option<Vec<u8>> = None;
    for (i, output) in response.outputs.iter().enumerate() {
        let dtype = Dtype::parse(&output.datatype).ok_or_else(|| {
            worker_error(format!(
                "output '{}' has unknown datatype '{}'",
                output.name, output.datatype
            ))
        })?;
        let malformed = || {
            worker_error(format!(
                "output '{}' holds malformed {} data",
                output.name, output.datatype
            ))
        };
        let mut tensor = json!({
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        });
        let mut parameters = parameters_json(&output.parameters);
        if binary_outputs.wants(&output.name) {
            let bytes = match raw.get(i) {
                Some(bytes) => {
                    let count = output
                        .shape
                        .iter()
                        .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))
                        .ok_or_else(malformed)?;
                    check_raw(dtype, bytes, count).map_err(|_| malformed())?;
                    std::borrow::Cow::Borrowed(bytes.as_slice())
                }
                None => std::borrow::Cow::Owned(
                    typed_raw(dtype, output.contents.as_ref()).ok_or_else(malformed)?,
                ),
            };
            parameters[BINARY_DATA_SIZE] = bytes.len().into();
            binary
                .get_or_insert_with(Vec::new)
                .extend_from_slice(&bytes);
        } else {
            let data = match raw.get(i) {
                Some(bytes) => decode_raw(dtype, bytes),
                None => decode_typed(dtype, output.contents.as_ref()),
            }
            .ok_or_else(malformed)?;
            tensor["data"] = data.into();
        }
        if parameters.as_object().is_some_and(|p| !p.is_empty()) {
            tensor["parameters"] = parameters;
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
    Ok(InferBody { json: body, binary })
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

/// Raw little-endian bytes of typed contents; `None` for FP16, which has
/// no typed field, and for values out of their datatype's range.
fn typed_raw(dtype: Dtype, contents: Option<&oip::InferTensorContents>) -> Option<Vec<u8>> {
    let empty = oip::InferTensorContents::default();
    let c = contents.unwrap_or(&empty);
    let mut raw = Vec::new();
    match dtype {
        Dtype::Bool => raw.extend(c.bool_contents.iter().map(|&b| u8::from(b))),
        Dtype::U8 => {
            for &v in &c.uint_contents {
                raw.push(u8::try_from(v).ok()?);
            }
        }
        Dtype::U16 => {
            for &v in &c.uint_contents {
                raw.extend_from_slice(&u16::try_from(v).ok()?.to_le_bytes());
            }
        }
        Dtype::U32 => c
            .uint_contents
            .iter()
            .for_each(|v| raw.extend_from_slice(&v.to_le_bytes())),
        Dtype::U64 => c
            .uint64_contents
            .iter()
            .for_each(|v| raw.extend_from_slice(&v.to_le_bytes())),
        Dtype::I8 => {
            for &v in &c.int_contents {
                raw.extend_from_slice(&i8::try_from(v).ok()?.to_le_bytes());
            }
        }
        Dtype::I16 => {
            for &v in &c.int_contents {
                raw.extend_from_slice(&i16::try_from(v).ok()?.to_le_bytes());
            }
        }
        Dtype::I32 => c
            .int_contents
            .iter()
            .for_each(|v| raw.extend_from_slice(&v.to_le_bytes())),
        Dtype::I64 => c
            .int64_contents
            .iter()
            .for_each(|v| raw.extend_from_slice(&v.to_le_bytes())),
        Dtype::F32 => c
            .fp32_contents
            .iter()
            .for_each(|v| raw.extend_from_slice(&v.to_le_bytes())),
        Dtype::F64 => c
            .fp64_contents
            .iter()
            .for_each(|v| raw.extend_from_slice(&v.to_le_bytes())),
        Dtype::Bytes => {
            for element in &c.bytes_contents {
                raw.extend_from_slice(&u32::try_from(element.len()).ok()?.to_le_bytes());
                raw.extend_from_slice(element);
            }
        }
        Dtype::F16 => return None,
    }
    Some(raw)
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
