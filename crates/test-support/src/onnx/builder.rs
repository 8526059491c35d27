//! [`GraphBuilder`] and the element types and dimensions it describes values with.

use super::proto::tensor_shape_proto::{Dimension, dimension};
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, tensor_proto::DataType, type_proto,
};
use super::{IR_VERSION, OPSET_VERSION, PRODUCER_NAME};

/// The tensor element types lmgrid serves, each one an ONNX [`DataType`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    Bool,
    Uint8,
    Int8,
    Int16,
    Int32,
    Int64,
    Float16,
    Float,
    Double,
    Uint16,
    Uint32,
    Uint64,
    /// Text (the protocol's BYTES): variable-length elements, so never in `raw_data`.
    String,
}

impl ElemType {
    /// Every element type, for tests that cover them all.
    pub const ALL: [Self; 13] = [
        Self::Bool,
        Self::Uint8,
        Self::Int8,
        Self::Int16,
        Self::Int32,
        Self::Int64,
        Self::Float16,
        Self::Float,
        Self::Double,
        Self::Uint16,
        Self::Uint32,
        Self::Uint64,
        Self::String,
    ];

    /// The ONNX data type.
    pub fn data_type(self) -> DataType {
        match self {
            Self::Bool => DataType::Bool,
            Self::Uint8 => DataType::Uint8,
            Self::Int8 => DataType::Int8,
            Self::Int16 => DataType::Int16,
            Self::Int32 => DataType::Int32,
            Self::Int64 => DataType::Int64,
            Self::Float16 => DataType::Float16,
            Self::Float => DataType::Float,
            Self::Double => DataType::Double,
            Self::Uint16 => DataType::Uint16,
            Self::Uint32 => DataType::Uint32,
            Self::Uint64 => DataType::Uint64,
            Self::String => DataType::String,
        }
    }

    /// The element type of an ONNX data type number, if it is one lmgrid serves.
    pub fn from_data_type(data_type: i32) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|elem| i32::from(elem.data_type()) == data_type)
    }

    /// Bytes per element in a tensor's `raw_data` (one for `Bool`); `None` for `String`,
    /// whose elements vary in length and never go in `raw_data`.
    pub fn byte_size(self) -> Option<usize> {
        match self {
            Self::Bool | Self::Uint8 | Self::Int8 => Some(1),
            Self::Int16 | Self::Uint16 | Self::Float16 => Some(2),
            Self::Int32 | Self::Uint32 | Self::Float => Some(4),
            Self::Int64 | Self::Uint64 | Self::Double => Some(8),
            Self::String => None,
        }
    }
}

/// One axis of a graph input's or output's shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A size every tensor of this value has.
    Fixed(i64),
    /// A size that varies between runs, named by a symbol; axes sharing a symbol share a size.
    Dynamic(String),
}

impl Dim {
    /// The symbol the fixtures name their leading, batch axis with.
    pub const BATCH: &'static str = "batch";

    /// The dynamic batch axis, [`Dim::BATCH`].
    pub fn batch() -> Self {
        Self::dynamic(Self::BATCH)
    }

    /// A dynamic axis named `symbol`.
    pub fn dynamic(symbol: &str) -> Self {
        Self::Dynamic(symbol.to_owned())
    }
}

impl From<i64> for Dim {
    fn from(size: i64) -> Self {
        Self::Fixed(size)
    }
}

impl From<&Dim> for Dimension {
    fn from(dim: &Dim) -> Self {
        let value = match dim {
            Dim::Fixed(size) => dimension::Value::DimValue(*size),
            Dim::Dynamic(symbol) => dimension::Value::DimParam(symbol.clone()),
        };
        Self { value: Some(value) }
    }
}

impl TensorProto {
    /// A tensor named `name` holding `raw_data`, the little-endian elements in row-major
    /// order.
    ///
    /// # Panics
    ///
    /// Panics unless `raw_data` holds exactly as many elements as `dims` says, or for
    /// `String`, which has no raw form.
    pub fn from_raw(name: &str, elem: ElemType, dims: &[i64], raw_data: Vec<u8>) -> Self {
        let count = element_count(dims);
        let size = elem
            .byte_size()
            .unwrap_or_else(|| panic!("tensor `{name}`: {elem:?} has no raw_data form"));
        assert_eq!(
            raw_data.len(),
            count * size,
            "tensor `{name}` of shape {dims:?} needs {count} {elem:?} elements"
        );
        Self {
            dims: dims.to_vec(),
            data_type: Some(elem.data_type().into()),
            name: Some(name.to_owned()),
            raw_data: Some(raw_data),
        }
    }

    /// A `FLOAT` tensor; an empty `dims` makes a scalar.
    ///
    /// # Panics
    ///
    /// Panics unless `values` has as many elements as `dims` says.
    pub fn from_f32(name: &str, dims: &[i64], values: &[f32]) -> Self {
        let raw = values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        Self::from_raw(name, ElemType::Float, dims, raw)
    }

    /// An `INT64` tensor, as the shape operand of `Reshape`; an empty `dims` makes a scalar.
    ///
    /// # Panics
    ///
    /// Panics unless `values` has as many elements as `dims` says.
    pub fn from_i64(name: &str, dims: &[i64], values: &[i64]) -> Self {
        let raw = values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        Self::from_raw(name, ElemType::Int64, dims, raw)
    }
}

impl ValueInfoProto {
    /// A tensor value named `name`.
    pub fn tensor(name: &str, elem: ElemType, shape: &[Dim]) -> Self {
        let tensor = type_proto::Tensor {
            elem_type: Some(elem.data_type().into()),
            shape: Some(TensorShapeProto {
                dim: shape.iter().map(Dimension::from).collect(),
            }),
        };
        Self {
            name: Some(name.to_owned()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(tensor)),
            }),
        }
    }

    /// The element type, when this is a tensor of a type lmgrid serves.
    pub fn elem_type(&self) -> Option<ElemType> {
        ElemType::from_data_type(self.tensor_type()?.elem_type?)
    }

    /// The shape, when this is a tensor whose every axis is fixed or named.
    pub fn shape(&self) -> Option<Vec<Dim>> {
        let dims = &self.tensor_type()?.shape.as_ref()?.dim;
        dims.iter()
            .map(|dim| match dim.value.as_ref()? {
                dimension::Value::DimValue(size) => Some(Dim::Fixed(*size)),
                dimension::Value::DimParam(symbol) => Some(Dim::Dynamic(symbol.clone())),
            })
            .collect()
    }

    fn tensor_type(&self) -> Option<&type_proto::Tensor> {
        match self.r#type.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(tensor) => Some(tensor),
        }
    }
}

/// Builds a single-graph model in the default ONNX domain at [`OPSET_VERSION`].
///
/// Values are declared in the order they are added; nodes must be added in topological order
/// (each after the nodes producing its inputs), as ONNX requires. Nothing is checked beyond
/// that initializers match their shapes: a mistake shows when ONNX Runtime loads the model.
///
/// ```
/// use lmgrid_test_support::onnx::{Dim, ElemType, GraphBuilder};
///
/// let model = GraphBuilder::new("double")
///     .input("x", ElemType::Float, &[Dim::batch(), Dim::Fixed(3)])
///     .output("y", ElemType::Float, &[Dim::batch(), Dim::Fixed(3)])
///     .initializer_f32("two", &[], &[2.0])
///     .node("Mul", &["x", "two"], &["y"], vec![])
///     .build();
/// assert_eq!(model.graph.unwrap().node.len(), 1);
/// ```
#[derive(Clone, Debug)]
pub struct GraphBuilder {
    graph: GraphProto,
}

impl GraphBuilder {
    /// An empty graph named `name`.
    pub fn new(name: &str) -> Self {
        Self {
            graph: GraphProto {
                name: Some(name.to_owned()),
                ..GraphProto::default()
            },
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: ElemType, shape: &[Dim]) -> &mut Self {
        self.graph
            .input
            .push(ValueInfoProto::tensor(name, elem, shape));
        self
    }

    /// Declares a graph output; some node must produce a value of that name.
    pub fn output(&mut self, name: &str, elem: ElemType, shape: &[Dim]) -> &mut Self {
        self.graph
            .output
            .push(ValueInfoProto::tensor(name, elem, shape));
        self
    }

    /// Adds a constant, which nodes read by its name.
    pub fn initializer(&mut self, tensor: TensorProto) -> &mut Self {
        self.graph.initializer.push(tensor);
        self
    }

    /// Adds a `FLOAT` constant of shape `dims` (empty for a scalar), row-major `values`.
    ///
    /// # Panics
    ///
    /// Panics unless `values` has as many elements as `dims` says.
    pub fn initializer_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> &mut Self {
        self.initializer(TensorProto::from_f32(name, dims, values))
    }

    /// Adds an `INT64` constant of shape `dims` (empty for a scalar), row-major `values`.
    ///
    /// # Panics
    ///
    /// Panics unless `values` has as many elements as `dims` says.
    pub fn initializer_i64(&mut self, name: &str, dims: &[i64], values: &[i64]) -> &mut Self {
        self.initializer(TensorProto::from_i64(name, dims, values))
    }

    /// Appends a call of the default-domain operator `op_type`, named `<op_type>_<index>`.
    /// An empty input name skips an optional input.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> &mut Self {
        let name = format!("{op_type}_{}", self.graph.node.len());
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|&input| input.to_owned()).collect(),
            output: outputs.iter().map(|&output| output.to_owned()).collect(),
            name: Some(name),
            op_type: Some(op_type.to_owned()),
            attribute: attributes,
            domain: None,
        });
        self
    }

    /// The graph built so far.
    pub fn graph(&self) -> &GraphProto {
        &self.graph
    }

    /// The model: this graph at IR version [`IR_VERSION`], importing the default domain at
    /// [`OPSET_VERSION`].
    pub fn build(&self) -> ModelProto {
        ModelProto {
            ir_version: Some(IR_VERSION),
            producer_name: Some(PRODUCER_NAME.to_owned()),
            graph: Some(self.graph.clone()),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET_VERSION),
            }],
        }
    }
}

/// The number of elements in a tensor of shape `dims`; a scalar (no dims) has one.
///
/// # Panics
///
/// Panics on a negative dimension.
pub(crate) fn element_count(dims: &[i64]) -> usize {
    dims.iter()
        .map(|&dim| usize::try_from(dim).expect("tensor dimensions are not negative"))
        .product()
}
