//! Tensors as the worker handles them: a datatype, a shape and typed data.
//!
//! Converts from and to the Open Inference Protocol (typed `contents` or
//! little-endian `raw_input_contents`), validating sizes and value ranges,
//! and concatenates and splits tensors along the batch (first) dimension for
//! the dynamic batcher.
//!
//! BYTES elements are text here: ONNX Runtime's string tensors hold
//! NUL-terminated UTF-8, so an element that is not UTF-8 or holds a NUL byte
//! is refused when the request is decoded.

use half::f16;
use lmgrid_proto::inference as pb;

/// An Open Inference Protocol datatype the worker can compute with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    /// The protocol's name (`FP32`, `INT64`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn parse(name: &str) -> Option<DataType> {
        Some(match name {
            "BOOL" => DataType::Bool,
            "UINT8" => DataType::Uint8,
            "UINT16" => DataType::Uint16,
            "UINT32" => DataType::Uint32,
            "UINT64" => DataType::Uint64,
            "INT8" => DataType::Int8,
            "INT16" => DataType::Int16,
            "INT32" => DataType::Int32,
            "INT64" => DataType::Int64,
            "FP16" => DataType::Fp16,
            "FP32" => DataType::Fp32,
            "FP64" => DataType::Fp64,
            "BYTES" => DataType::Bytes,
            _ => return None,
        })
    }

    /// Bytes per element in raw little-endian form; `None` for BYTES, whose
    /// elements are each a 4-byte little-endian length and that many bytes.
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Typed tensor data, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Uint16(Vec<u16>),
    Uint32(Vec<u32>),
    Uint64(Vec<u64>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp16(Vec<f16>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    /// BYTES, each element UTF-8 text without NUL bytes.
    Bytes(Vec<String>),
}

/// Applies `$body` to the typed vector inside a `TensorData`, binding it to `$v`.
macro_rules! with_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::Uint8($v) => $body,
            TensorData::Uint16($v) => $body,
            TensorData::Uint32($v) => $body,
            TensorData::Uint64($v) => $body,
            TensorData::Int8($v) => $body,
            TensorData::Int16($v) => $body,
            TensorData::Int32($v) => $body,
            TensorData::Int64($v) => $body,
            TensorData::Fp16($v) => $body,
            TensorData::Fp32($v) => $body,
            TensorData::Fp64($v) => $body,
            TensorData::Bytes($v) => $body,
        }
    };
}

/// Rebuilds a `TensorData` of the same variant as `$like` from `$v`'s expression.
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => TensorData::Bool($body),
            TensorData::Uint8($v) => TensorData::Uint8($body),
            TensorData::Uint16($v) => TensorData::Uint16($body),
            TensorData::Uint32($v) => TensorData::Uint32($body),
            TensorData::Uint64($v) => TensorData::Uint64($body),
            TensorData::Int8($v) => TensorData::Int8($body),
            TensorData::Int16($v) => TensorData::Int16($body),
            TensorData::Int32($v) => TensorData::Int32($body),
            TensorData::Int64($v) => TensorData::Int64($body),
            TensorData::Fp16($v) => TensorData::Fp16($body),
            TensorData::Fp32($v) => TensorData::Fp32($body),
            TensorData::Fp64($v) => TensorData::Fp64($body),
            TensorData::Bytes($v) => TensorData::Bytes($body),
        }
    };
}

impl TensorData {
    pub fn dtype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::Uint8(_) => DataType::Uint8,
            TensorData::Uint16(_) => DataType::Uint16,
            TensorData::Uint32(_) => DataType::Uint32,
            TensorData::Uint64(_) => DataType::Uint64,
            TensorData::Int8(_) => DataType::Int8,
            TensorData::Int16(_) => DataType::Int16,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Fp16(_) => DataType::Fp16,
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
            TensorData::Bytes(_) => DataType::Bytes,
        }
    }

    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty vector of `dtype` with room for `capacity` elements.
    pub fn with_capacity(dtype: DataType, capacity: usize) -> TensorData {
        match dtype {
            DataType::Bool => TensorData::Bool(Vec::with_capacity(capacity)),
            DataType::Uint8 => TensorData::Uint8(Vec::with_capacity(capacity)),
            DataType::Uint16 => TensorData::Uint16(Vec::with_capacity(capacity)),
            DataType::Uint32 => TensorData::Uint32(Vec::with_capacity(capacity)),
            DataType::Uint64 => TensorData::Uint64(Vec::with_capacity(capacity)),
            DataType::Int8 => TensorData::Int8(Vec::with_capacity(capacity)),
            DataType::Int16 => TensorData::Int16(Vec::with_capacity(capacity)),
            DataType::Int32 => TensorData::Int32(Vec::with_capacity(capacity)),
            DataType::Int64 => TensorData::Int64(Vec::with_capacity(capacity)),
            DataType::Fp16 => TensorData::Fp16(Vec::with_capacity(capacity)),
            DataType::Fp32 => TensorData::Fp32(Vec::with_capacity(capacity)),
            DataType::Fp64 => TensorData::Fp64(Vec::with_capacity(capacity)),
            DataType::Bytes => TensorData::Bytes(Vec::with_capacity(capacity)),
        }
    }

    /// Appends `other`, which must have the same datatype.
    fn extend(&mut self, other: &TensorData) -> bool {
        match (self, other) {
            (TensorData::Bool(a), TensorData::Bool(b)) => a.extend_from_slice(b),
            (TensorData::Uint8(a), TensorData::Uint8(b)) => a.extend_from_slice(b),
            (TensorData::Uint16(a), TensorData::Uint16(b)) => a.extend_from_slice(b),
            (TensorData::Uint32(a), TensorData::Uint32(b)) => a.extend_from_slice(b),
            (TensorData::Uint64(a), TensorData::Uint64(b)) => a.extend_from_slice(b),
            (TensorData::Int8(a), TensorData::Int8(b)) => a.extend_from_slice(b),
            (TensorData::Int16(a), TensorData::Int16(b)) => a.extend_from_slice(b),
            (TensorData::Int32(a), TensorData::Int32(b)) => a.extend_from_slice(b),
            (TensorData::Int64(a), TensorData::Int64(b)) => a.extend_from_slice(b),
            (TensorData::Fp16(a), TensorData::Fp16(b)) => a.extend_from_slice(b),
            (TensorData::Fp32(a), TensorData::Fp32(b)) => a.extend_from_slice(b),
            (TensorData::Fp64(a), TensorData::Fp64(b)) => a.extend_from_slice(b),
            (TensorData::Bytes(a), TensorData::Bytes(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        true
    }

    /// Elements `start..end`.
    fn slice(&self, start: usize, end: usize) -> TensorData {
        map_data!(self, v => v[start..end].to_vec())
    }

    /// Little-endian raw bytes, as in `raw_output_contents`.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.dtype().size().unwrap_or(8));
        match self {
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
            TensorData::Uint8(v) => out.extend_from_slice(v),
            TensorData::Int8(v) => out.extend(v.iter().map(|x| x.to_le_bytes()[0])),
            TensorData::Uint16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Uint32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Uint64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Fp16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Fp32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Fp64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Bytes(v) => v.iter().for_each(|s| {
                // Decoded elements came with a u32 length; model outputs
                // larger than 4 GiB cannot be sent in a gRPC message anyway.
                let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }),
        }
        out
    }

    /// Parses the little-endian raw bytes of input `name`; for fixed-size
    /// datatypes the length must be a whole number of elements (checked by
    /// the caller against the shape).
    fn from_le_bytes(name: &str, dtype: DataType, bytes: &[u8]) -> Result<TensorData, TensorError> {
        fn read<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().unwrap_or([0; N])))
                .collect()
        }
        Ok(match dtype {
            DataType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
            DataType::Uint8 => TensorData::Uint8(bytes.to_vec()),
            DataType::Int8 => TensorData::Int8(read(bytes, i8::from_le_bytes)),
            DataType::Uint16 => TensorData::Uint16(read(bytes, u16::from_le_bytes)),
            DataType::Uint32 => TensorData::Uint32(read(bytes, u32::from_le_bytes)),
            DataType::Uint64 => TensorData::Uint64(read(bytes, u64::from_le_bytes)),
            DataType::Int16 => TensorData::Int16(read(bytes, i16::from_le_bytes)),
            DataType::Int32 => TensorData::Int32(read(bytes, i32::from_le_bytes)),
            DataType::Int64 => TensorData::Int64(read(bytes, i64::from_le_bytes)),
            DataType::Fp16 => TensorData::Fp16(read(bytes, f16::from_le_bytes)),
            DataType::Fp32 => TensorData::Fp32(read(bytes, f32::from_le_bytes)),
            DataType::Fp64 => TensorData::Fp64(read(bytes, f64::from_le_bytes)),
            DataType::Bytes => TensorData::Bytes(bytes_elements(name, bytes)?),
        })
    }
}

/// The elements of a BYTES tensor's raw contents: each a 4-byte little-endian
/// length and that many bytes of UTF-8 text without NUL.
fn bytes_elements(name: &str, bytes: &[u8]) -> Result<Vec<String>, TensorError> {
    let mut elements = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let index = elements.len();
        let element = rest
            .split_first_chunk::<4>()
            .and_then(|(len, tail)| {
                let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
                Some((tail.get(..len)?, &tail[len..]))
            })
            .map(|(element, tail)| {
                rest = tail;
                element
            })
            .ok_or_else(|| {
                TensorError(format!(
                    "input '{name}': BYTES element {index} runs past the end of the raw contents \
                     (each element is a 4-byte little-endian length and that many bytes)"
                ))
            })?;
        elements.push(text_element(name, index, element.to_vec())?);
    }
    Ok(elements)
}

/// One BYTES element as text ONNX Runtime can take.
fn text_element(name: &str, index: usize, bytes: Vec<u8>) -> Result<String, TensorError> {
    if bytes.contains(&0) {
        return Err(TensorError(format!(
            "input '{name}': BYTES element {index} holds a NUL byte, which ONNX Runtime's \
             string tensors cannot carry"
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        TensorError(format!(
            "input '{name}': BYTES element {index} is not UTF-8; ONNX Runtime's string tensors \
             hold text"
        ))
    })
}

/// A named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Why a tensor in a request is unacceptable; the message names the tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TensorError(pub String);

/// A tensor larger than the model accepts (RESOURCE_EXHAUSTED, not INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Invalid(#[from] TensorError),
    #[error("{0}")]
    TooLarge(String),
}

fn element_count(name: &str, shape: &[i64]) -> Result<usize, TensorError> {
    let mut count: usize = 1;
    for &dim in shape {
        let dim = usize::try_from(dim).map_err(|_| {
            TensorError(format!(
                "input '{name}': shape {shape:?} has a negative dimension"
            ))
        })?;
        count = count
            .checked_mul(dim)
            .ok_or_else(|| TensorError(format!("input '{name}': shape {shape:?} is too large")))?;
    }
    Ok(count)
}

impl Tensor {
    pub fn dtype(&self) -> DataType {
        self.data.dtype()
    }

    /// The batch (first) dimension; 1 for scalars.
    pub fn batch(&self) -> usize {
        self.shape
            .first()
            .map_or(1, |&d| usize::try_from(d).unwrap_or(0))
    }

    /// Decodes one request input. `raw` is its `raw_input_contents` entry
    /// when the request used raw contents. `max_elements` bounds the size.
    pub fn from_request(
        input: pb::model_infer_request::InferInputTensor,
        raw: Option<&[u8]>,
        max_elements: usize,
    ) -> Result<Tensor, DecodeError> {
        let name = input.name;
        let dtype = DataType::parse(&input.datatype).ok_or_else(|| {
            TensorError(format!(
                "input '{name}': unsupported datatype '{}' (supported: BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES)",
                input.datatype
            ))
        })?;
        let count = element_count(&name, &input.shape)?;
        if count > max_elements {
            return Err(DecodeError::TooLarge(format!(
                "input '{name}': {count} elements exceed the limit of {max_elements}"
            )));
        }
        let data = match raw {
            Some(bytes) => {
                if let Some(expected) = dtype.size().map(|size| count * size)
                    && bytes.len() != expected
                {
                    return Err(DecodeError::Invalid(TensorError(format!(
                        "input '{name}': raw contents hold {} bytes, but shape {:?} of {dtype} needs {expected}",
                        bytes.len(),
                        input.shape
                    ))));
                }
                TensorData::from_le_bytes(&name, dtype, bytes)?
            }
            None => from_contents(&name, dtype, input.contents.unwrap_or_default())?,
        };
        if data.len() != count {
            return Err(DecodeError::Invalid(TensorError(format!(
                "input '{name}': {} values given, but shape {:?} needs {count}",
                data.len(),
                input.shape
            ))));
        }
        Ok(Tensor {
            name,
            shape: input.shape,
            data,
        })
    }

    /// Encodes as a response output; typed `contents` unless `raw`, in which
    /// case the bytes are returned for `raw_output_contents`.
    pub fn into_response(
        self,
        raw: bool,
    ) -> (pb::model_infer_response::InferOutputTensor, Option<Vec<u8>>) {
        let mut output = pb::model_infer_response::InferOutputTensor {
            name: self.name,
            datatype: self.data.dtype().as_str().to_string(),
            shape: self.shape,
            ..Default::default()
        };
        if raw || matches!(self.data, TensorData::Fp16(_)) {
            // FP16 has no typed contents field in the protocol.
            return (output, Some(self.data.to_le_bytes()));
        }
        let mut contents = pb::InferTensorContents::default();
        match self.data {
            TensorData::Bool(v) => contents.bool_contents = v,
            TensorData::Uint8(v) => contents.uint_contents = v.into_iter().map(u32::from).collect(),
            TensorData::Uint16(v) => {
                contents.uint_contents = v.into_iter().map(u32::from).collect()
            }
            TensorData::Uint32(v) => contents.uint_contents = v,
            TensorData::Uint64(v) => contents.uint64_contents = v,
            TensorData::Int8(v) => contents.int_contents = v.into_iter().map(i32::from).collect(),
            TensorData::Int16(v) => contents.int_contents = v.into_iter().map(i32::from).collect(),
            TensorData::Int32(v) => contents.int_contents = v,
            TensorData::Int64(v) => contents.int64_contents = v,
            TensorData::Fp32(v) => contents.fp32_contents = v,
            TensorData::Fp64(v) => contents.fp64_contents = v,
            TensorData::Bytes(v) => {
                contents.bytes_contents = v.into_iter().map(String::into_bytes).collect()
            }
            TensorData::Fp16(_) => {}
        }
        output.contents = Some(contents);
        (output, None)
    }
}

fn from_contents(
    name: &str,
    dtype: DataType,
    contents: pb::InferTensorContents,
) -> Result<TensorData, TensorError> {
    fn narrow<S: Copy + std::fmt::Display, T: TryFrom<S>>(
        name: &str,
        dtype: DataType,
        values: Vec<S>,
    ) -> Result<Vec<T>, TensorError> {
        values
            .into_iter()
            .map(|v| {
                T::try_from(v).map_err(|_| {
                    TensorError(format!(
                        "input '{name}': value {v} is out of range for {dtype}"
                    ))
                })
            })
            .collect()
    }
    let wrong_field = |field: &str| {
        TensorError(format!(
            "input '{name}': datatype {dtype} expects its values in contents.{field} or raw_input_contents"
        ))
    };
    let pb::InferTensorContents {
        bool_contents,
        int_contents,
        int64_contents,
        uint_contents,
        uint64_contents,
        fp32_contents,
        fp64_contents,
        bytes_contents,
    } = contents;
    let others_empty = |used: usize| {
        let total = bool_contents.len()
            + int_contents.len()
            + int64_contents.len()
            + uint_contents.len()
            + uint64_contents.len()
            + fp32_contents.len()
            + fp64_contents.len()
            + bytes_contents.len();
        total == used
    };
    let data = match dtype {
        DataType::Bool if others_empty(bool_contents.len()) => TensorData::Bool(bool_contents),
        DataType::Bool => return Err(wrong_field("bool_contents")),
        DataType::Int8 | DataType::Int16 | DataType::Int32 if !others_empty(int_contents.len()) => {
            return Err(wrong_field("int_contents"));
        }
        DataType::Int8 => TensorData::Int8(narrow(name, dtype, int_contents)?),
        DataType::Int16 => TensorData::Int16(narrow(name, dtype, int_contents)?),
        DataType::Int32 => TensorData::Int32(int_contents),
        DataType::Int64 if others_empty(int64_contents.len()) => TensorData::Int64(int64_contents),
        DataType::Int64 => return Err(wrong_field("int64_contents")),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32
            if !others_empty(uint_contents.len()) =>
        {
            return Err(wrong_field("uint_contents"));
        }
        DataType::Uint8 => TensorData::Uint8(narrow(name, dtype, uint_contents)?),
        DataType::Uint16 => TensorData::Uint16(narrow(name, dtype, uint_contents)?),
        DataType::Uint32 => TensorData::Uint32(uint_contents),
        DataType::Uint64 if others_empty(uint64_contents.len()) => {
            TensorData::Uint64(uint64_contents)
        }
        DataType::Uint64 => return Err(wrong_field("uint64_contents")),
        DataType::Fp32 if others_empty(fp32_contents.len()) => TensorData::Fp32(fp32_contents),
        DataType::Fp32 => return Err(wrong_field("fp32_contents")),
        DataType::Fp64 if others_empty(fp64_contents.len()) => TensorData::Fp64(fp64_contents),
        DataType::Fp64 => return Err(wrong_field("fp64_contents")),
        DataType::Bytes if others_empty(bytes_contents.len()) => TensorData::Bytes(
            bytes_contents
                .into_iter()
                .enumerate()
                .map(|(index, bytes)| text_element(name, index, bytes))
                .collect::<Result<_, _>>()?,
        ),
        DataType::Bytes => return Err(wrong_field("bytes_contents")),
        DataType::Fp16 => {
            return Err(TensorError(format!(
                "input '{name}': FP16 has no typed contents field; send it in raw_input_contents"
            )));
        }
    };
    Ok(data)
}

/// Concatenates same-named tensors of several requests along the batch
/// dimension. The caller guarantees equal datatypes and non-batch shapes.
pub fn concat(parts: &[&Tensor]) -> Tensor {
    let first = parts[0];
    let total_batch: i64 = parts
        .iter()
        .map(|t| t.shape.first().copied().unwrap_or(1))
        .sum();
    let mut shape = first.shape.clone();
    if let Some(batch) = shape.first_mut() {
        *batch = total_batch;
    }
    let capacity = parts.iter().map(|t| t.data.len()).sum();
    let mut data = TensorData::with_capacity(first.dtype(), capacity);
    for part in parts {
        let same = data.extend(&part.data);
        debug_assert!(same, "batched tensors share a datatype");
    }
    Tensor {
        name: first.name.clone(),
        shape,
        data,
    }
}

/// Pads the second dimension of a `[batch, length, ...]` tensor to `length`
/// with zeros (the padding id, mask and type id of sequence models); a tensor
/// already that long, or of rank below 2, is returned as it is.
pub fn pad_sequence(tensor: Tensor, length: usize) -> Tensor {
    fn pad<T: Clone + Default>(v: &[T], rows: usize, from: usize, to: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(rows * to);
        for r in 0..rows {
            out.extend_from_slice(&v[r * from..(r + 1) * from]);
            out.resize((r + 1) * to, T::default());
        }
        out
    }
    let (Some(&old), Ok(new)) = (tensor.shape.get(1), i64::try_from(length)) else {
        return tensor;
    };
    if old >= new {
        return tensor;
    }
    let rows = tensor.batch();
    let Some(from) = tensor.data.len().checked_div(rows) else {
        return tensor;
    };
    let inner = from / usize::try_from(old.max(1)).unwrap_or(1);
    let to = inner * length;
    let mut shape = tensor.shape;
    shape[1] = new;
    Tensor {
        name: tensor.name,
        shape,
        data: map_data!(&tensor.data, v => pad(v, rows, from, to)),
    }
}

/// Splits a batched output back into per-request tensors of `batches[i]` rows.
/// Returns `None` if the output's first dimension does not equal the sum.
pub fn split(tensor: &Tensor, batches: &[usize]) -> Option<Vec<Tensor>> {
    let total: usize = batches.iter().sum();
    if tensor.batch() != total || tensor.shape.is_empty() {
        return None;
    }
    let row = tensor.data.len().checked_div(total).unwrap_or(0);
    let mut start = 0;
    let mut parts = Vec::with_capacity(batches.len());
    for &rows in batches {
        let end = start + rows * row;
        let mut shape = tensor.shape.clone();
        shape[0] = i64::try_from(rows).unwrap_or(i64::MAX);
        parts.push(Tensor {
            name: tensor.name.clone(),
            shape,
            data: tensor.data.slice(start, end),
        });
        start = end;
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        datatype: &str,
        shape: &[i64],
    ) -> pb::model_infer_request::InferInputTensor {
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_round_trips_every_datatype() {
        for dtype in [
            DataType::Bool,
            DataType::Uint8,
            DataType::Uint16,
            DataType::Uint32,
            DataType::Uint64,
            DataType::Int8,
            DataType::Int16,
            DataType::Int32,
            DataType::Int64,
            DataType::Fp16,
            DataType::Fp32,
            DataType::Fp64,
        ] {
            let size = dtype.size().unwrap_or_default();
            let bytes: Vec<u8> = (0..6 * size).map(|i| (i % 2) as u8).collect();
            let tensor =
                Tensor::from_request(input("x", dtype.as_str(), &[2, 3]), Some(&bytes), 100)
                    .unwrap();
            assert_eq!(tensor.dtype(), dtype);
            assert_eq!(tensor.data.to_le_bytes(), bytes, "{dtype}");
        }
    }

    #[test]
    fn bytes_are_length_prefixed_text_raw_or_typed() {
        let raw: Vec<u8> = ["", "héllo", "a b"]
            .iter()
            .flat_map(|s| [&(s.len() as u32).to_le_bytes()[..], s.as_bytes()].concat())
            .collect();
        let tensor = Tensor::from_request(input("s", "BYTES", &[3]), Some(&raw), 100).unwrap();
        let text = vec![String::new(), "héllo".to_string(), "a b".to_string()];
        assert_eq!(tensor.data, TensorData::Bytes(text.clone()));
        assert_eq!(tensor.data.to_le_bytes(), raw);
        let (output, bytes) = tensor.clone().into_response(false);
        assert!(bytes.is_none());
        assert_eq!(output.datatype, "BYTES");
        assert_eq!(
            output.contents.unwrap().bytes_contents,
            text.iter()
                .map(|s| s.as_bytes().to_vec())
                .collect::<Vec<_>>()
        );

        let mut typed = input("s", "BYTES", &[1, 2]);
        typed.contents = Some(pb::InferTensorContents {
            bytes_contents: vec![b"x".to_vec(), b"yz".to_vec()],
            ..Default::default()
        });
        let tensor = Tensor::from_request(typed.clone(), None, 100).unwrap();
        assert_eq!(
            tensor.data,
            TensorData::Bytes(vec!["x".to_string(), "yz".to_string()])
        );

        // Batching and padding keep elements whole.
        let both = concat(&[&tensor, &tensor]);
        assert_eq!(both.shape, [2, 2]);
        assert_eq!(
            split(&both, &[1, 1]).unwrap(),
            vec![tensor.clone(), tensor.clone()]
        );
        let padded = pad_sequence(tensor, 3);
        assert_eq!(
            padded.data,
            TensorData::Bytes(vec!["x".into(), "yz".into(), String::new()])
        );

        for (bytes, needle) in [
            (vec![5, 0, 0, 0, b'a'], "element 0 runs past the end"),
            (vec![1, 0, 0], "element 0 runs past the end"),
            (vec![1, 0, 0, 0, 0xff], "element 0 is not UTF-8"),
            (
                [&[1u8, 0, 0, 0, b'a'][..], &[1, 0, 0, 0, 0]].concat(),
                "element 1 holds a NUL byte",
            ),
        ] {
            let err = Tensor::from_request(input("s", "BYTES", &[2]), Some(&bytes), 100)
                .unwrap_err()
                .to_string();
            assert!(err.contains("input 's'") && err.contains(needle), "{err}");
        }
        let err = Tensor::from_request(input("s", "BYTES", &[2]), Some(&raw), 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 values given"), "{err}");
        typed.contents = Some(pb::InferTensorContents {
            int_contents: vec![1, 2],
            ..Default::default()
        });
        let err = Tensor::from_request(typed, None, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bytes_contents"), "{err}");
    }

    #[test]
    fn typed_contents_are_checked_for_field_count_and_range() {
        let mut x = input("x", "INT8", &[3]);
        x.contents = Some(pb::InferTensorContents {
            int_contents: vec![1, -2, 127],
            ..Default::default()
        });
        let t = Tensor::from_request(x.clone(), None, 100).unwrap();
        assert_eq!(t.data, TensorData::Int8(vec![1, -2, 127]));

        x.contents = Some(pb::InferTensorContents {
            int_contents: vec![1, 2, 300],
            ..Default::default()
        });
        let err = Tensor::from_request(x.clone(), None, 100).unwrap_err();
        assert!(
            err.to_string().contains("'x'")
                && err.to_string().contains("300")
                && err.to_string().contains("INT8"),
            "{err}"
        );

        x.contents = Some(pb::InferTensorContents {
            fp32_contents: vec![1.0; 3],
            ..Default::default()
        });
        let err = Tensor::from_request(x.clone(), None, 100).unwrap_err();
        assert!(err.to_string().contains("int_contents"), "{err}");

        x.contents = Some(pb::InferTensorContents {
            int_contents: vec![1, 2],
            ..Default::default()
        });
        let err = Tensor::from_request(x, None, 100).unwrap_err();
        assert!(
            err.to_string().contains("2 values given") && err.to_string().contains("needs 3"),
            "{err}"
        );
    }

    #[test]
    fn bad_shapes_datatypes_and_sizes_are_named() {
        let err = Tensor::from_request(input("q", "STRINGY", &[1]), None, 100).unwrap_err();
        assert!(
            err.to_string().contains("'q'") && err.to_string().contains("STRINGY"),
            "{err}"
        );
        let err = Tensor::from_request(input("q", "FP32", &[-1, 2]), None, 100).unwrap_err();
        assert!(err.to_string().contains("negative"), "{err}");
        let err =
            Tensor::from_request(input("q", "FP32", &[1000, 1000]), Some(&[]), 100).unwrap_err();
        assert!(err.to_string().contains("exceed the limit"), "{err}");
        let err = Tensor::from_request(input("q", "FP32", &[2]), Some(&[0; 7]), 100).unwrap_err();
        assert!(
            err.to_string().contains("7 bytes") && err.to_string().contains("needs 8"),
            "{err}"
        );
        let err = Tensor::from_request(input("q", "FP16", &[1]), None, 100).unwrap_err();
        assert!(err.to_string().contains("raw_input_contents"), "{err}");
    }

    #[test]
    fn concat_then_split_restores_each_part() {
        let a = Tensor {
            name: "x".into(),
            shape: vec![1, 2],
            data: TensorData::Fp32(vec![1.0, 2.0]),
        };
        let b = Tensor {
            name: "x".into(),
            shape: vec![2, 2],
            data: TensorData::Fp32(vec![3.0, 4.0, 5.0, 6.0]),
        };
        let joined = concat(&[&a, &b]);
        assert_eq!(joined.shape, vec![3, 2]);
        let parts = split(&joined, &[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
        assert!(split(&joined, &[1, 1]).is_none());
    }

    #[test]
    fn responses_use_typed_or_raw_contents() {
        let t = Tensor {
            name: "y".into(),
            shape: vec![2],
            data: TensorData::Uint8(vec![7, 9]),
        };
        let (out, raw) = t.clone().into_response(false);
        assert!(raw.is_none());
        assert_eq!(out.contents.unwrap().uint_contents, vec![7, 9]);
        let (out, raw) = t.into_response(true);
        assert_eq!(raw.unwrap(), vec![7, 9]);
        assert_eq!(out.datatype, "UINT8");
        assert!(out.contents.is_none());
    }
}
