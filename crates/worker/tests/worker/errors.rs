//! Every bad request is refused before it reaches a model, with the right code and a message
//! that names the tensor or field at fault and what was expected.

use lmgrid_proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, infer_parameter::ParameterChoice,
};
use lmgrid_test_support::onnx;
use tonic::Code;

use crate::support::{
    Repo, TestWorker, assert_status, fp32_input, fp32_request, with_outputs, with_parameter,
};

/// `add_mul` (inputs `a`, `b`: FP32 [-1, 4]) allowing 8 rows, and an identity of 100
/// features allowing 150 elements per input.
async fn worker() -> anyhow::Result<TestWorker> {
    let repo = Repo::new()?
        .model("am", &[("1", &onnx::add_mul())], "max_batch_size: 8\n")?
        .model(
            "small",
            &[("1", &onnx::identity(onnx::ElemType::Float, &[100]))],
            "max_batch_size: 8\nmax_input_elements: 150\n",
        )?;
    TestWorker::start(repo).await
}

/// A valid `am` request of `rows` rows.
fn am(rows: usize) -> ModelInferRequest {
    let n = rows * 4;
    let shape = [i64::try_from(rows).unwrap(), 4];
    ModelInferRequest {
        model_name: "am".to_string(),
        inputs: vec![
            fp32_input("a", &shape, vec![1.0; n]),
            fp32_input("b", &shape, vec![2.0; n]),
        ],
        ..Default::default()
    }
}

fn le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_are_invalid_arguments_that_name_the_tensor() -> anyhow::Result<()> {
    let worker = worker().await?;
    let mut client = worker.infer.clone();
    client.model_infer(am(2)).await?;
    let invalid = Code::InvalidArgument;

    let mut wrong_shape = am(2);
    wrong_shape.inputs[0].shape = vec![2, 3];
    let result = client.model_infer(wrong_shape).await;
    assert_status(result, invalid, &["input 'a'", "[2, 3]", "[-1, 4]"]);

    let mut wrong_rank = am(2);
    wrong_rank.inputs[1].shape = vec![8];
    let result = client.model_infer(wrong_rank).await;
    assert_status(result, invalid, &["input 'b'", "[8]", "[-1, 4]"]);

    let mut wrong_datatype = am(2);
    wrong_datatype.inputs[1].datatype = "FP64".to_string();
    let result = client.model_infer(wrong_datatype).await;
    assert_status(result, invalid, &["input 'b'", "FP64", "FP32"]);

    let mut unknown_datatype = am(2);
    unknown_datatype.inputs[0].datatype = "BF16".to_string();
    let result = client.model_infer(unknown_datatype).await;
    assert_status(result, invalid, &["input 'a'", "BF16", "FP32"]);

    let mut missing = am(2);
    missing.inputs.pop();
    let result = client.model_infer(missing).await;
    assert_status(result, invalid, &["input 'b'", "missing"]);

    let mut unknown = am(2);
    unknown.inputs[1].name = "c".to_string();
    let result = client.model_infer(unknown).await;
    assert_status(result, invalid, &["no input 'c'", "a, b"]);

    let mut duplicate = am(2);
    duplicate.inputs[1].name = "a".to_string();
    let result = client.model_infer(duplicate).await;
    assert_status(result, invalid, &["input 'a'", "twice"]);

    let mut too_few_values = am(2);
    too_few_values.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: vec![1.0; 7],
        ..Default::default()
    });
    let result = client.model_infer(too_few_values).await;
    assert_status(
        result,
        invalid,
        &["input 'a'", "7 values", "[2, 4]", "needs 8"],
    );

    let mut wrong_field = am(2);
    wrong_field.inputs[0].contents = Some(InferTensorContents {
        int_contents: vec![1; 8],
        ..Default::default()
    });
    let result = client.model_infer(wrong_field).await;
    assert_status(result, invalid, &["input 'a'", "fp32_contents"]);

    let mut inconsistent = am(2);
    inconsistent.inputs[1] = fp32_input("b", &[3, 4], vec![0.0; 12]);
    let result = client.model_infer(inconsistent).await;
    assert_status(result, invalid, &["input 'b'", "batch size 3", "'a' has 2"]);

    let result = client.model_infer(am(9)).await;
    assert_status(result, invalid, &["input 'a'", "batch size 9", "1..=8"]);

    let mut no_rows = am(0);
    no_rows.inputs.iter_mut().for_each(|i| i.contents = None);
    let result = client.model_infer(no_rows).await;
    assert_status(result, invalid, &["input 'a'", "batch size 0", "1..=8"]);

    let mut negative = am(2);
    negative.inputs[0].shape = vec![-2, 4];
    let result = client.model_infer(negative).await;
    assert_status(result, invalid, &["input 'a'", "negative"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_raw_contents_are_invalid_arguments() -> anyhow::Result<()> {
    let worker = worker().await?;
    let mut client = worker.infer.clone();
    let invalid = Code::InvalidArgument;
    let raw = |request: ModelInferRequest, contents: Vec<Vec<u8>>| {
        let mut request = request;
        request.inputs.iter_mut().for_each(|i| i.contents = None);
        request.raw_input_contents = contents;
        request
    };
    client
        .model_infer(raw(am(1), vec![le(&[1.0; 4]), le(&[2.0; 4])]))
        .await?;

    let result = client.model_infer(raw(am(1), vec![le(&[1.0; 4])])).await;
    assert_status(result, invalid, &["1 raw_input_contents", "2 inputs"]);

    let result = client
        .model_infer(raw(am(1), vec![le(&[1.0; 4]), le(&[2.0; 3])]))
        .await;
    assert_status(result, invalid, &["input 'b'", "12 bytes", "needs 16"]);

    let mut both = raw(am(1), vec![le(&[1.0; 4]), le(&[2.0; 4])]);
    both.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: vec![1.0; 4],
        ..Default::default()
    });
    let result = client.model_infer(both).await;
    assert_status(result, invalid, &["input 'a'", "not both"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_models_versions_and_outputs_are_refused() -> anyhow::Result<()> {
    let worker = worker().await?;
    let mut client = worker.infer.clone();

    let mut unknown_model = am(1);
    unknown_model.model_name = "nope".to_string();
    let result = client.model_infer(unknown_model).await;
    assert_status(result, Code::NotFound, &["'nope'", "not served"]);

    for version in ["2", "latest"] {
        let mut unknown_version = am(1);
        unknown_version.model_version = version.to_string();
        let result = client.model_infer(unknown_version).await;
        let quoted = format!("'{version}'");
        assert_status(result, Code::NotFound, &["'am'", &quoted, "ready: 1"]);
    }
    let mut explicit = am(1);
    explicit.model_version = "1".to_string();
    client.model_infer(explicit).await?;

    let mut unnamed = am(1);
    unnamed.model_name = String::new();
    let result = client.model_infer(unnamed).await;
    assert_status(result, Code::InvalidArgument, &["model name", "empty"]);

    let result = client.model_infer(with_outputs(am(1), &["ratio"])).await;
    let needles = ["no output 'ratio'", "sum, product"];
    assert_status(result, Code::InvalidArgument, &needles);

    let result = client
        .model_infer(with_outputs(am(1), &["sum", "product", "sum"]))
        .await;
    assert_status(result, Code::InvalidArgument, &["output 'sum'", "twice"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_parameters_are_invalid_arguments_that_name_the_parameter() -> anyhow::Result<()> {
    let worker = worker().await?;
    let mut client = worker.infer.clone();
    let invalid = Code::InvalidArgument;
    client
        .model_infer(with_parameter(am(1), "priority", 1))
        .await?;
    client
        .model_infer(with_parameter(am(1), "timeout", 10_000_000))
        .await?;

    let result = client
        .model_infer(with_parameter(am(1), "priority", 2))
        .await;
    assert_status(result, invalid, &["priority 2", "1..=1"]);
    let result = client
        .model_infer(with_parameter(am(1), "priority", -1))
        .await;
    assert_status(result, invalid, &["'priority'", "non-negative integer"]);

    let mut text = am(1);
    text.parameters.insert(
        "timeout".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("soon".to_string())),
        },
    );
    let result = client.model_infer(text).await;
    assert_status(result, invalid, &["'timeout'", "non-negative integer"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_and_out_of_range_inputs_are_refused() -> anyhow::Result<()> {
    let worker = worker().await?;
    let mut client = worker.infer.clone();
    client
        .model_infer(fp32_request("small", 1, vec![0.5; 100]))
        .await?;

    let result = client
        .model_infer(fp32_request("small", 2, vec![0.5; 200]))
        .await;
    let needles = ["input 'x'", "200 elements", "limit of 150"];
    assert_status(result, Code::ResourceExhausted, &needles);

    // A typed value that does not fit the tensor's datatype.
    let repo = Repo::new()?.model(
        "bytes",
        &[("1", &onnx::identity(onnx::ElemType::Uint8, &[2]))],
        "max_batch_size: 2\n",
    )?;
    let bytes = TestWorker::start(repo).await?;
    let request = ModelInferRequest {
        model_name: "bytes".to_string(),
        inputs: vec![
            lmgrid_proto::inference::model_infer_request::InferInputTensor {
                name: "x".to_string(),
                datatype: "UINT8".to_string(),
                shape: vec![1, 2],
                contents: Some(InferTensorContents {
                    uint_contents: vec![7, 256],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let result = bytes.infer.clone().model_infer(request).await;
    assert_status(
        result,
        Code::InvalidArgument,
        &["input 'x'", "256", "UINT8"],
    );
    Ok(())
}
