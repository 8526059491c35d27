use super::proto::tensor_proto::DataType;
use super::*;

fn graph(model: &ModelProto) -> &GraphProto {
    model.graph.as_ref().expect("model has a graph")
}

fn names(values: &[ValueInfoProto]) -> Vec<&str> {
    values
        .iter()
        .map(|value| value.name.as_deref().unwrap_or_default())
        .collect()
}

fn op_types(graph: &GraphProto) -> Vec<&str> {
    graph
        .node
        .iter()
        .map(|node| node.op_type.as_deref().unwrap_or_default())
        .collect()
}

fn all_fixtures() -> Vec<ModelProto> {
    let mut models: Vec<ModelProto> = ElemType::ALL
        .into_iter()
        .map(|elem| identity(elem, &[2, 3]))
        .collect();
    models.extend([add_mul(), variable_seq(), mlp(4, 8, 2, 3, 7).model]);
    models
}

#[test]
fn fixtures_survive_an_encode_decode_round_trip() {
    for model in all_fixtures() {
        let bytes = model.to_bytes();
        assert_eq!(ModelProto::from_bytes(&bytes).unwrap(), model);
    }
}

#[test]
fn encoding_follows_onnx_proto_field_numbers_and_proto2_rules() {
    use prost::Message as _;

    let opset = OperatorSetIdProto {
        domain: Some(String::new()),
        version: Some(17),
    };
    // Field 1 (an empty string, present), then field 2 as a varint.
    assert_eq!(opset.encode_to_vec(), [0x0a, 0x00, 0x10, 17]);

    // Repeated numbers are not packed: one key per element.
    let tensor = TensorProto::from_f32("t", &[1, 2], &[1.0, 2.0]);
    let mut expected = vec![0x08, 1, 0x08, 2, 0x10, 1, 0x42, 1, b't', 0x4a, 8];
    expected.extend([1.0f32, 2.0].iter().flat_map(|value| value.to_le_bytes()));
    assert_eq!(tensor.encode_to_vec(), expected);

    // A zero-valued optional field is still encoded, as ONNX's own writer does.
    let attribute = AttributeProto::float("alpha", 0.0);
    let mut expected = vec![0x0a, 5];
    expected.extend(b"alpha");
    expected.extend([0x15, 0, 0, 0, 0, 0xa0, 0x01, 1]);
    assert_eq!(attribute.encode_to_vec(), expected);

    let input = ValueInfoProto::tensor("x", ElemType::Int64, &[Dim::batch(), Dim::Fixed(3)]);
    let mut expected = vec![0x0a, 1, b'x', 0x12, 19, 0x0a, 17, 0x08, 7, 0x12, 13];
    expected.extend([0x0a, 7, 0x12, 5]);
    expected.extend(b"batch");
    expected.extend([0x0a, 2, 0x08, 3]);
    assert_eq!(input.encode_to_vec(), expected);
}

#[test]
fn built_models_declare_ir_version_and_opset() {
    let model = add_mul();
    assert_eq!(model.ir_version, Some(8));
    assert_eq!(model.producer_name.as_deref(), Some(PRODUCER_NAME));
    assert_eq!(
        model.opset_import,
        [OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }]
    );
}

#[test]
fn identity_covers_every_element_type() {
    for elem in ElemType::ALL {
        let model = identity(elem, &[2, 3]);
        let graph = graph(&model);
        assert_eq!(op_types(graph), ["Identity"]);
        assert_eq!(names(&graph.input), ["x"]);
        assert_eq!(names(&graph.output), ["y"]);
        let shape = vec![Dim::batch(), Dim::Fixed(2), Dim::Fixed(3)];
        for value in graph.input.iter().chain(&graph.output) {
            assert_eq!(value.elem_type(), Some(elem));
            assert_eq!(value.shape(), Some(shape.clone()));
        }
    }
    let scalar_rows = identity(ElemType::Bool, &[]);
    assert_eq!(
        graph(&scalar_rows).input[0].shape(),
        Some(vec![Dim::batch()])
    );
}

#[test]
fn add_mul_has_two_inputs_and_two_outputs() {
    let model = add_mul();
    let graph = graph(&model);
    assert_eq!(names(&graph.input), ["a", "b"]);
    assert_eq!(names(&graph.output), ["sum", "product"]);
    assert_eq!(op_types(graph), ["Add", "Mul"]);
    for value in graph.input.iter().chain(&graph.output) {
        assert_eq!(value.elem_type(), Some(ElemType::Float));
        assert_eq!(value.shape(), Some(vec![Dim::batch(), Dim::Fixed(4)]));
    }
}

#[test]
fn variable_seq_has_two_dynamic_axes() {
    let model = variable_seq();
    let graph = graph(&model);
    let shape = Some(vec![Dim::batch(), Dim::dynamic("seq")]);
    assert_eq!(graph.input[0].shape(), shape);
    assert_eq!(graph.output[0].shape(), shape);
    assert_eq!(op_types(graph), ["Mul"]);
    let two = &graph.initializer[0];
    assert!(two.dims.is_empty(), "the factor is a scalar");
    assert_eq!(two.raw_data.as_deref(), Some(&2.0f32.to_le_bytes()[..]));
}

#[test]
fn broken_bytes_are_not_a_model() {
    assert!(ModelProto::from_bytes(&broken()).is_err());
}

#[test]
fn mlp_layers_match_the_graph() {
    let mlp = mlp(5, 16, 2, 3, 42);
    assert_eq!((mlp.input_size(), mlp.output_size()), (5, 3));
    let graph = graph(&mlp.model);
    assert_eq!(
        op_types(graph),
        [
            "MatMul", "Add", "Relu", "MatMul", "Add", "Relu", "MatMul", "Add"
        ]
    );
    assert_eq!(
        graph.input[0].shape(),
        Some(vec![Dim::batch(), Dim::Fixed(5)])
    );
    assert_eq!(
        graph.output[0].shape(),
        Some(vec![Dim::batch(), Dim::Fixed(3)])
    );
    let shapes: Vec<(&str, &[i64])> = graph
        .initializer
        .iter()
        .map(|tensor| (tensor.name.as_deref().unwrap(), &tensor.dims[..]))
        .collect();
    assert_eq!(
        shapes,
        [
            ("w0", &[5, 16][..]),
            ("b0", &[16]),
            ("w1", &[16, 16]),
            ("b1", &[16]),
            ("w2", &[16, 3]),
            ("b2", &[3]),
        ]
    );
    let relus: Vec<bool> = mlp.layers.iter().map(|layer| layer.relu).collect();
    assert_eq!(relus, [true, true, false]);
    for layer in &mlp.layers {
        let fan_in = layer.inputs as f32;
        let weight_bound = (if layer.relu { 6.0 } else { 3.0 } / fan_in).sqrt();
        let bias_bound = 1.0 / fan_in.sqrt();
        for (values, bound) in [(&layer.weights, weight_bound), (&layer.bias, bias_bound)] {
            assert!(values.iter().all(|value| value.abs() <= bound));
            assert!(values.iter().any(|value| *value < 0.0));
            assert!(values.iter().any(|value| *value > 0.0));
        }
    }
}

#[test]
fn mlp_is_deterministic_for_a_seed() {
    let x = random_f32(1, 3 * 6);
    let first = mlp(6, 8, 3, 2, 99);
    let again = mlp(6, 8, 3, 2, 99);
    assert_eq!(first, again);
    assert_eq!(first.model.to_bytes(), again.model.to_bytes());
    let y = first.reference(&x);
    assert_eq!(y.len(), 3 * 2);
    assert_eq!(y, again.reference(&x));
    assert!(
        y.iter()
            .all(|value| value.is_finite() && value.abs() < 10.0)
    );
    assert_ne!(mlp(6, 8, 3, 2, 100).layers, first.layers);
}

#[test]
fn mlp_without_hidden_layers_is_one_linear_layer() {
    let mlp = mlp(2, 0, 0, 1, 3);
    assert_eq!(op_types(graph(&mlp.model)), ["MatMul", "Add"]);
    assert_eq!(mlp.layers.len(), 1);
}

#[test]
fn mlp_reference_computes_matmul_bias_and_relu() {
    let hidden = Linear {
        // [[1, -1], [2, 0]]: columns are outputs.
        weights: vec![1.0, -1.0, 2.0, 0.0],
        bias: vec![0.5, 0.0],
        inputs: 2,
        outputs: 2,
        relu: true,
    };
    let out = Linear {
        weights: vec![1.0, -3.0],
        bias: vec![-1.0],
        inputs: 2,
        outputs: 1,
        relu: false,
    };
    let mlp = Mlp {
        model: ModelProto::default(),
        layers: vec![hidden, out],
    };
    // Row [1, 1]: hidden [3.5, relu(-1) = 0], output 3.5 - 1 = 2.5.
    // Row [-1, 0]: hidden [relu(-0.5) = 0, 1], output -3 - 1 = -4.
    assert_eq!(mlp.reference(&[1.0, 1.0, -1.0, 0.0]), [2.5, -4.0]);
}

#[test]
fn random_values_come_from_splitmix64() {
    // SplitMix64 seeded with 0 starts 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4.
    let expected = [0xe220a8_u32, 0x6e789e].map(|top| 2.0 * (top as f32 / 16_777_216.0) - 1.0);
    assert_eq!(random_f32(0, 2), expected);
    assert!(random_f32(5, 1000).iter().all(|v| (-1.0..1.0).contains(v)));
}

#[test]
fn elem_types_map_to_onnx_data_types() {
    let data_types: Vec<DataType> = ElemType::ALL.map(ElemType::data_type).to_vec();
    assert_eq!(
        data_types,
        [
            DataType::Bool,
            DataType::Uint8,
            DataType::Int8,
            DataType::Int16,
            DataType::Int32,
            DataType::Int64,
            DataType::Float16,
            DataType::Float,
            DataType::Double,
            DataType::Uint16,
            DataType::Uint32,
            DataType::Uint64,
            DataType::String,
        ]
    );
    for elem in ElemType::ALL {
        assert_eq!(
            ElemType::from_data_type(elem.data_type().into()),
            Some(elem)
        );
    }
    assert_eq!(ElemType::from_data_type(DataType::Bfloat16.into()), None);
}

#[test]
#[should_panic(expected = "needs 6 Float elements")]
fn initializers_must_match_their_shape() {
    TensorProto::from_f32("w", &[2, 3], &[1.0; 5]);
}

#[test]
fn model_repository_lays_out_versions_and_config() {
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (identity(ElemType::Float, &[2]), add_mul());
    let dir = model_repository(root.path(), "m", &[("1", &one), ("2", &two)], "x: 1\n").unwrap();
    assert_eq!(dir, root.path().join("m"));
    let read = |version: &str| std::fs::read(dir.join(version).join(MODEL_FILE)).unwrap();
    assert_eq!(ModelProto::from_bytes(&read("1")).unwrap(), one);
    assert_eq!(ModelProto::from_bytes(&read("2")).unwrap(), two);
    assert_eq!(
        std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap(),
        "x: 1\n"
    );
    let broken_path = write_model_bytes(&dir.join("3"), &broken()).unwrap();
    assert_eq!(std::fs::read(broken_path).unwrap(), broken());
}
