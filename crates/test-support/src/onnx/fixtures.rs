//! Ready-made models for tests and benchmarks, each with a dynamic leading batch axis named
//! [`Dim::BATCH`].

use super::builder::{Dim, ElemType, GraphBuilder};
use super::proto::ModelProto;

/// `y = Identity(x)`: input `x` and output `y` of type `elem` and shape
/// `[batch, inner_dims...]`. Serves every element type unchanged.
pub fn identity(elem: ElemType, inner_dims: &[i64]) -> ModelProto {
    let shape: Vec<Dim> = std::iter::once(Dim::batch())
        .chain(inner_dims.iter().map(|&dim| Dim::Fixed(dim)))
        .collect();
    GraphBuilder::new("identity")
        .input("x", elem, &shape)
        .output("y", elem, &shape)
        .node("Identity", &["x"], &["y"], vec![])
        .build()
}

/// Two `FLOAT [batch, 4]` inputs `a` and `b`, and two outputs of the same type: `sum = a + b`
/// and `product = a * b`.
pub fn add_mul() -> ModelProto {
    let shape = [Dim::batch(), Dim::Fixed(4)];
    GraphBuilder::new("add_mul")
        .input("a", ElemType::Float, &shape)
        .input("b", ElemType::Float, &shape)
        .output("sum", ElemType::Float, &shape)
        .output("product", ElemType::Float, &shape)
        .node("Add", &["a", "b"], &["sum"], vec![])
        .node("Mul", &["a", "b"], &["product"], vec![])
        .build()
}

/// `y = x * 2` for `x` and `y` of type `FLOAT [batch, seq]`: the second axis varies too, so
/// requests of different lengths must never be batched together.
pub fn variable_seq() -> ModelProto {
    let shape = [Dim::batch(), Dim::dynamic("seq")];
    GraphBuilder::new("variable_seq")
        .input("x", ElemType::Float, &shape)
        .output("y", ElemType::Float, &shape)
        .initializer_f32("two", &[], &[2.0])
        .node("Mul", &["x", "two"], &["y"], vec![])
        .build()
}

/// Bytes that are not an ONNX model, for tests of failed loads: they do not even parse as a
/// protobuf message.
pub fn broken() -> Vec<u8> {
    // `l` (0x6c) reads as an end-group tag of field 13, which no message can start with.
    b"lmgrid: this is not an ONNX model\n".to_vec()
}

/// A multilayer perceptron with seeded random weights, built by [`mlp`], and the weights
/// themselves, so [`Mlp::reference`] can check ONNX Runtime's answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    /// Input `x` of type `FLOAT [batch, input]`, output `y` of type `FLOAT [batch, output]`.
    pub model: ModelProto,
    /// The linear layers in order: each hidden layer, then the output layer.
    pub layers: Vec<Linear>,
}

/// One fully connected layer of an [`Mlp`]: `ReLU?(x · weights + bias)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// Row-major `[inputs, outputs]`, the layout of the `MatMul` operand.
    pub weights: Vec<f32>,
    /// `[outputs]`.
    pub bias: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
    /// Whether a ReLU follows: true for hidden layers, false for the output layer.
    pub relu: bool,
}

/// A perceptron from `input` to `output` features through `layers` hidden layers of `hidden`
/// features, each `MatMul`, `Add`, `Relu`; the output layer is `MatMul`, `Add`.
///
/// Weights and biases are uniform, drawn from a SplitMix64 stream seeded with `seed`, so a
/// seed always gives the same model. For inputs of order one (such as [`random_f32`]'s) the
/// activations stay of order one at any depth: weights are within ±√(6/fan-in) before a ReLU
/// (He initialisation, which makes up for the half a ReLU zeroes) and ±√(3/fan-in) in the
/// output layer, and biases within ±1/√fan-in. With `layers == 0`, `hidden` is unused and
/// the model is a single linear layer.
///
/// # Panics
///
/// Panics if `input` or `output` is zero, or `hidden` is zero while `layers` is not.
pub fn mlp(input: usize, hidden: usize, layers: usize, output: usize, seed: u64) -> Mlp {
    assert!(input > 0 && output > 0, "an MLP needs inputs and outputs");
    assert!(layers == 0 || hidden > 0, "hidden layers need features");
    let mut rng = SplitMix64(seed);
    let mut builder = GraphBuilder::new("mlp");
    builder
        .input("x", ElemType::Float, &[Dim::batch(), dim(input)])
        .output("y", ElemType::Float, &[Dim::batch(), dim(output)]);
    let widths: Vec<usize> = std::iter::once(input)
        .chain(std::iter::repeat_n(hidden, layers))
        .chain(std::iter::once(output))
        .collect();
    let mut value = String::from("x");
    let mut linears = Vec::with_capacity(layers + 1);
    for (index, pair) in widths.windows(2).enumerate() {
        let (inputs, outputs) = (pair[0], pair[1]);
        let relu = index < layers;
        let fan_in = inputs as f32;
        let weight_bound = if relu { 6.0 } else { 3.0 } / fan_in;
        let (weight_bound, bias_bound) = (weight_bound.sqrt(), 1.0 / fan_in.sqrt());
        let linear = Linear {
            weights: (0..inputs * outputs)
                .map(|_| rng.uniform(weight_bound))
                .collect(),
            bias: (0..outputs).map(|_| rng.uniform(bias_bound)).collect(),
            inputs,
            outputs,
            relu,
        };
        let (weights, bias) = (format!("w{index}"), format!("b{index}"));
        let (product, sum) = (format!("matmul{index}"), format!("add{index}"));
        let result = if linear.relu {
            format!("hidden{index}")
        } else {
            "y".to_owned()
        };
        builder
            .initializer_f32(&weights, &[size(inputs), size(outputs)], &linear.weights)
            .initializer_f32(&bias, &[size(outputs)], &linear.bias)
            .node("MatMul", &[&value, &weights], &[&product], vec![]);
        if linear.relu {
            builder
                .node("Add", &[&product, &bias], &[&sum], vec![])
                .node("Relu", &[&sum], &[&result], vec![]);
        } else {
            builder.node("Add", &[&product, &bias], &[&result], vec![]);
        }
        value = result;
        linears.push(linear);
    }
    Mlp {
        model: builder.build(),
        layers: linears,
    }
}

impl Mlp {
    /// Features per input row.
    pub fn input_size(&self) -> usize {
        self.layers.first().map_or(0, |layer| layer.inputs)
    }

    /// Features per output row.
    pub fn output_size(&self) -> usize {
        self.layers.last().map_or(0, |layer| layer.outputs)
    }

    /// The model's forward pass in plain `f32` arithmetic: `x` is row-major
    /// `[batch, input]`, the result row-major `[batch, output]`. ONNX Runtime sums in a
    /// different order, so compare with a tolerance (1e-5 holds for the sizes tests use).
    ///
    /// # Panics
    ///
    /// Panics unless `x.len()` is a multiple of the input size.
    pub fn reference(&self, x: &[f32]) -> Vec<f32> {
        let input = self.input_size();
        assert!(
            input > 0 && x.len().is_multiple_of(input),
            "input of {} values is not [batch, {input}]",
            x.len()
        );
        let mut rows: Vec<Vec<f32>> = x.chunks(input).map(<[f32]>::to_vec).collect();
        for layer in &self.layers {
            for row in &mut rows {
                *row = layer.forward(row);
            }
        }
        rows.concat()
    }
}

impl Linear {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        (0..self.outputs)
            .map(|j| {
                let dot: f32 = x
                    .iter()
                    .enumerate()
                    .map(|(i, &value)| value * self.weights[i * self.outputs + j])
                    .sum();
                let sum = dot + self.bias[j];
                if self.relu { sum.max(0.0) } else { sum }
            })
            .collect()
    }
}

/// `len` values uniform in [-1, 1) from a SplitMix64 stream seeded with `seed`: reproducible
/// inputs for the fixtures.
pub fn random_f32(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..len).map(|_| rng.uniform(1.0)).collect()
}

/// Steele, Lea and Flood's SplitMix64: tiny, fast, and the same stream on every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-bound, bound): the top 24 bits make an exact `f32` in [0, 1).
    fn uniform(&mut self, bound: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32;
        (2.0 * unit - 1.0) * bound
    }
}

fn dim(features: usize) -> Dim {
    Dim::Fixed(size(features))
}

fn size(features: usize) -> i64 {
    i64::try_from(features).expect("feature counts fit in i64")
}
