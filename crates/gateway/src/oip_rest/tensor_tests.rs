use super::*;

fn request(body: Value) -> Result<oip::ModelInferRequest, ApiError> {
    with_binary(body, &[]).map(|infer| infer.request)
}

fn with_binary(body: Value, binary: &[u8]) -> Result<Infer, ApiError> {
    match body {
        Value::Object(map) => infer_request("m", "1", &map, binary),
        _ => unreachable!("tests pass objects"),
    }
}

fn json_answer(response: oip::ModelInferResponse) -> Result<Value, ApiError> {
    let body = infer_response(response, &BinaryOutputs::default())?;
    assert!(body.binary.is_none());
    Ok(body.json)
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
            "inputs[0].parameters.binary_data_size",
            "only 0 remain",
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
    let body = json_answer(raw).unwrap();
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
    let body = json_answer(typed).unwrap();
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
    let err = json_answer(response).unwrap_err();
    assert_eq!(err.status(), 500);
    assert!(err.message().contains("output 'y'"), "{err:?}");
    assert_eq!(decode_raw(Dtype::Bytes, &[5, 0, 0, 0, b'a']), None);
}

#[test]
fn binary_inputs_take_their_bytes_in_order_and_the_extension_parameters_stay_here() {
    let floats: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let strings = [&2u32.to_le_bytes()[..], b"hi", &0u32.to_le_bytes()].concat();
    let infer = with_binary(
        json!({
            "parameters": {"binary_data_output": true, "priority": 1},
            "inputs": [
                {"name": "a", "shape": [1, 2], "datatype": "FP32",
                 "parameters": {"binary_data_size": 8}},
                {"name": "j", "shape": [1], "datatype": "INT8", "data": [-1]},
                {"name": "s", "shape": [2], "datatype": "BYTES",
                 "parameters": {"binary_data_size": 10, "keep": "me"}},
                {"name": "e", "shape": [0], "datatype": "FP64",
                 "parameters": {"binary_data_size": 0}},
            ],
            "outputs": [
                {"name": "y", "parameters": {"binary_data": false}},
                {"name": "z"},
            ],
        }),
        &[floats.clone(), strings.clone()].concat(),
    )
    .unwrap();
    let request = &infer.request;
    assert_eq!(
        request.raw_input_contents,
        [floats, vec![255], strings, vec![]]
    );
    assert!(request.inputs[0].parameters.is_empty());
    assert_eq!(
        request.inputs[2].parameters.keys().collect::<Vec<_>>(),
        ["keep"]
    );
    assert_eq!(
        request.parameters.keys().collect::<Vec<_>>(),
        ["priority"],
        "binary_data_output is the gateway's to read"
    );
    assert!(request.outputs.iter().all(|o| o.parameters.is_empty()));
    assert!(!infer.binary.wants("y"), "asked for as JSON");
    assert!(infer.binary.wants("z"), "the request's default");
    assert!(infer.binary.wants("unlisted"));
    let json_only = with_binary(json!({"inputs": []}), &[]).unwrap();
    assert_eq!(json_only.binary, BinaryOutputs::default());
}

#[test]
fn bad_binary_inputs_are_named() {
    let input = |datatype: &str, shape: Value, size: Value| {
        json!({"name": "a", "shape": shape, "datatype": datatype,
               "parameters": {"binary_data_size": size}})
    };
    for (inputs, binary, param, needle) in [
        (
            vec![input("FP32", json!([2]), json!(8))],
            vec![0u8; 4],
            "inputs[0].parameters.binary_data_size",
            "only 4 remain",
        ),
        (
            vec![input("FP32", json!([1]), json!(4))],
            vec![0u8; 6],
            "",
            "2 bytes of binary data follow",
        ),
        (
            vec![input("FP32", json!([2]), json!(4))],
            vec![0u8; 4],
            "inputs[0].parameters.binary_data_size",
            "4 bytes of binary data do not hold 2 elements of 4 bytes",
        ),
        (
            vec![input("FP32", json!([1]), json!(-4))],
            vec![0u8; 4],
            "inputs[0].parameters.binary_data_size",
            "non-negative integer",
        ),
        (
            vec![input("FP32", json!([1]), json!("4"))],
            vec![0u8; 4],
            "inputs[0].parameters.binary_data_size",
            "non-negative integer",
        ),
        (
            vec![input("BOOL", json!([2]), json!(2))],
            vec![1, 2],
            "inputs[0].parameters.binary_data_size",
            "BOOL element 1 is 2",
        ),
        (
            vec![input("BYTES", json!([1]), json!(6))],
            [&5u32.to_le_bytes()[..], b"ab"].concat(),
            "inputs[0].parameters.binary_data_size",
            "runs past the end",
        ),
        (
            vec![input("BYTES", json!([2]), json!(5))],
            [&1u32.to_le_bytes()[..], b"a"].concat(),
            "inputs[0].parameters.binary_data_size",
            "holds 1 BYTES elements; the shape needs 2",
        ),
        (
            vec![
                json!({"name": "a", "shape": [1], "datatype": "FP32", "data": [1],
                        "parameters": {"binary_data_size": 4}}),
            ],
            vec![0u8; 4],
            "inputs[0].data",
            "not both",
        ),
        (
            vec![json!({"name": "a", "shape": [1], "datatype": "FP32", "data": [1]})],
            vec![0u8; 4],
            "",
            "4 bytes of binary data follow",
        ),
    ] {
        let err = with_binary(json!({ "inputs": inputs }), &binary).unwrap_err();
        assert_eq!(err.status(), 400, "{inputs:?}");
        let expected = if param.is_empty() {
            Value::Null
        } else {
            param.into()
        };
        assert_eq!(err.openai_body()["error"]["param"], expected, "{inputs:?}");
        assert!(err.message().contains(needle), "{inputs:?}: {err:?}");
    }
    for (body, param) in [
        (
            json!({"inputs": [], "parameters": {"binary_data_output": 1}}),
            "parameters.binary_data_output",
        ),
        (
            json!({"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}),
            "outputs[0].parameters.binary_data",
        ),
    ] {
        let err = with_binary(body, &[]).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(err.openai_body()["error"]["param"], param);
        assert!(err.message().contains("must be a boolean"), "{err:?}");
    }
}

#[test]
fn binary_outputs_follow_the_json_in_order() {
    use oip::model_infer_response::InferOutputTensor;
    let output = |name: &str, datatype: &str, shape: Vec<i64>| InferOutputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let sum = [1.5f32.to_le_bytes(), 2.5f32.to_le_bytes()].concat();
    let strings = [&1u32.to_le_bytes()[..], b"a"].concat();
    let response = || oip::ModelInferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        outputs: vec![
            output("sum", "FP32", vec![1, 2]),
            output("as_json", "INT32", vec![1]),
            output("s", "BYTES", vec![1]),
        ],
        raw_output_contents: vec![sum.clone(), 7i32.to_le_bytes().to_vec(), strings.clone()],
        ..Default::default()
    };
    let binary = BinaryOutputs {
        default: true,
        named: [("as_json".to_string(), false)].into(),
    };
    let body = infer_response(response(), &binary).unwrap();
    assert_eq!(body.binary, Some([sum.clone(), strings.clone()].concat()));
    assert_eq!(
        body.json["outputs"],
        json!([
            {"name": "sum", "datatype": "FP32", "shape": [1, 2],
             "parameters": {"binary_data_size": 8}},
            {"name": "as_json", "datatype": "INT32", "shape": [1], "data": [7]},
            {"name": "s", "datatype": "BYTES", "shape": [1],
             "parameters": {"binary_data_size": 5}},
        ])
    );

    // Typed contents are written raw too.
    let typed = oip::ModelInferResponse {
        outputs: vec![InferOutputTensor {
            contents: Some(oip::InferTensorContents {
                int_contents: vec![-1, 2],
                ..Default::default()
            }),
            ..output("z", "INT16", vec![2])
        }],
        ..Default::default()
    };
    let body = infer_response(typed.clone(), &binary).unwrap();
    assert_eq!(body.binary, Some(vec![255, 255, 2, 0]));
    assert_eq!(body.json["outputs"][0]["parameters"]["binary_data_size"], 4);

    // A raw output that does not fit its shape is the worker's error.
    let mut short = response();
    short.raw_output_contents[0].pop();
    let err = infer_response(short, &binary).unwrap_err();
    assert_eq!(err.status(), 500);
    assert!(err.message().contains("output 'sum'"), "{err:?}");
    let mut out_of_range = typed;
    if let Some(contents) = out_of_range.outputs[0].contents.as_mut() {
        contents.int_contents[0] = 1 << 20;
    }
    assert_eq!(
        infer_response(out_of_range, &binary).unwrap_err().status(),
        500
    );
}
