use super::*;

fn request(body: Value) -> Result<oip::ModelInferRequest, ApiError> {
    match body {
        Value::Object(map) => infer_request("m", "1", &map),
        _ => unreachable!("tests pass objects"),
    }
}

#[test]
fn nested_and_flat_data_encode_the_same_row_major_bytes() {
    let nested = request(json!({
        "id": "r-1",
        "parameters": {"priority": 2},
        "inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3.5, -4]]}],
        "outputs": [{"name": "sum", "parameters": {"classification": 0}}]
    }))
    .unwrap();
    let flat = request(json!({
        "inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3.5, -4]}]
    }))
    .unwrap();
    assert_eq!(nested.raw_input_contents, flat.raw_input_contents);
    let expected: Vec<u8> = [1.0f32, 2.0, 3.5, -4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(nested.raw_input_contents[0], expected);
    assert_eq!(
        (nested.model_name.as_str(), nested.model_version.as_str()),
        ("m", "1")
    );
    assert_eq!(nested.id, "r-1");
    assert_eq!(nested.inputs[0].shape, [2, 2]);
    assert_eq!(nested.inputs[0].datatype, "FP32");
    assert!(nested.inputs[0].contents.is_none());
    assert_eq!(nested.outputs[0].name, "sum");
    assert!(nested.parameters.contains_key("priority"));
}

#[test]
fn every_datatype_encodes_little_endian() {
    for (datatype, data, bytes) in [
        ("BOOL", json!([true, false]), vec![1, 0]),
        ("UINT8", json!([255, 0]), vec![255, 0]),
        ("INT8", json!([-1, 2]), vec![255, 2]),
        ("UINT16", json!([258, 1]), vec![2, 1, 1, 0]),
        ("INT16", json!([-2, 0]), vec![254, 255, 0, 0]),
        (
            "INT32",
            json!([-1, 1]),
            vec![255, 255, 255, 255, 1, 0, 0, 0],
        ),
        ("UINT32", json!([1, 2]), vec![1, 0, 0, 0, 2, 0, 0, 0]),
        ("INT64", json!([-1, 0]), [[255u8; 8], [0u8; 8]].concat()),
        (
            "UINT64",
            json!([u64::MAX, 0]),
            [[255u8; 8], [0u8; 8]].concat(),
        ),
        ("FP16", json!([1.0, -2.0]), vec![0x00, 0x3c, 0x00, 0xc0]),
        (
            "FP64",
            json!([1.0, 0]),
            [1.0f64.to_le_bytes(), [0u8; 8]].concat(),
        ),
        (
            "BYTES",
            json!(["hi", ""]),
            vec![2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0],
        ),
    ] {
        let body =
            json!({"inputs": [{"name": "x", "shape": [2], "datatype": datatype, "data": data}]});
        let encoded = request(body).unwrap_or_else(|e| panic!("{datatype}: {e:?}"));
        assert_eq!(encoded.raw_input_contents[0], bytes, "{datatype}");
    }
}

#[test]
fn bad_tensors_name_the_input_and_the_field() {
    for (input, param, needle) in [
        (
            json!({"name": "a", "shape": [2], "datatype": "FP32", "data": [1]}),
            "inputs[0].data",
            "does not match",
        ),
        (
            json!({"name": "a", "shape": [2], "datatype": "FP32", "data": [1, "x"]}),
            "inputs[0].data",
            "element 1",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "UINT8", "data": [256]}),
            "inputs[0].data",
            "element 0",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "INT32", "data": [1.5]}),
            "inputs[0].data",
            "element 0",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "BOOL", "data": [1]}),
            "inputs[0].data",
            "not a valid BOOL",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "FP16", "data": [1e6]}),
            "inputs[0].data",
            "FP16",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "FP8", "data": [1]}),
            "inputs[0].datatype",
            "unknown datatype",
        ),
        (
            json!({"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]}),
            "inputs[0].shape",
            "non-negative",
        ),
        (
            json!({"name": "a", "datatype": "FP32", "data": [1]}),
            "inputs[0].shape",
            "required",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "FP32"}),
            "inputs[0].data",
            "required",
        ),
        (
            json!({"shape": [1], "datatype": "FP32", "data": [1]}),
            "inputs[0].name",
            "required",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}),
            "inputs[0].parameters",
            "binary",
        ),
        (
            json!({"name": "a", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"p": [1]}}),
            "inputs[0].parameters.p",
            "boolean, number or string",
        ),
        (json!("a"), "inputs[0]", "must be an object"),
    ] {
        let err = request(json!({ "inputs": [input.clone()] })).unwrap_err();
        assert_eq!(err.status(), 400, "{input}");
        assert_eq!(err.openai_body()["error"]["param"], param, "{input}");
        assert!(err.message().contains(needle), "{input}: {err:?}");
    }
    let err = request(json!({})).unwrap_err();
    assert_eq!(err.message(), "'inputs' is required");
}

#[test]
fn raw_and_typed_outputs_decode_to_flat_json() {
    use oip::model_infer_response::InferOutputTensor;
    let output = |name: &str, datatype: &str, shape: Vec<i64>| InferOutputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let raw = oip::ModelInferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        id: "r-1".into(),
        outputs: vec![
            output("y", "FP32", vec![1, 2]),
            output("h", "FP16", vec![1]),
            output("s", "BYTES", vec![2]),
            output("b", "BOOL", vec![1]),
        ],
        raw_output_contents: vec![
            [1.5f32.to_le_bytes(), f32::NAN.to_le_bytes()].concat(),
            vec![0x00, 0x3c],
            vec![1, 0, 0, 0, b'a', 0, 0, 0, 0],
            vec![1],
        ],
        ..Default::default()
    };
    let body = infer_response(raw).unwrap();
    assert_eq!(
        body,
        json!({
            "model_name": "m",
            "model_version": "1",
            "id": "r-1",
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, null]},
                {"name": "h", "datatype": "FP16", "shape": [1], "data": [1.0]},
                {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", ""]},
                {"name": "b", "datatype": "BOOL", "shape": [1], "data": [true]},
            ]
        })
    );

    let typed = oip::ModelInferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        outputs: vec![InferOutputTensor {
            contents: Some(oip::InferTensorContents {
                int64_contents: vec![-3, 4],
                ..Default::default()
            }),
            ..output("z", "INT64", vec![2])
        }],
        ..Default::default()
    };
    let body = infer_response(typed).unwrap();
    assert_eq!(body["outputs"][0]["data"], json!([-3, 4]));
    assert!(body.get("id").is_none());
}

#[test]
fn malformed_worker_answers_are_internal_errors() {
    use oip::model_infer_response::InferOutputTensor;
    let response = oip::ModelInferResponse {
        outputs: vec![InferOutputTensor {
            name: "y".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_output_contents: vec![vec![1, 2, 3]],
        ..Default::default()
    };
    let err = infer_response(response).unwrap_err();
    assert_eq!(err.status(), 500);
    assert!(err.message().contains("output 'y'"), "{err:?}");
    assert_eq!(decode_raw(Dtype::Bytes, &[5, 0, 0, 0, b'a']), None);
}
