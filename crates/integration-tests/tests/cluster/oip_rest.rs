//! The Open Inference Protocol's REST API on the gateway's public HTTP port: server and model
//! health, metadata, and inference with JSON tensors (or binary ones, after the JSON)
//! forwarded to the worker serving the model, with errors as `{"error": "..."}`.

use lmgrid_integration_tests::{http_get, http_post_json, http_request};
use lmgrid_test_support::EtcdServer;
use serde_json::{Value, json};

use crate::openai::{add_mul_sandbox, add_mul_sandbox_with, json_of};

#[tokio::test(flavor = "multi_thread")]
async fn oip_rest_serves_health_metadata_and_inference() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let (_sandbox, _repo, http) = add_mul_sandbox(&etcd).await?;

    let server = http_get(http, "/v2").await?;
    assert_eq!(server.status, 200, "{}", server.body);
    let server = json_of(&server)?;
    assert_eq!(server["name"], "lmgrid");
    assert_eq!(server["version"], lmgrid_core::VERSION);
    assert_eq!(server["extensions"], json!(["binary_tensor_data"]));
    assert_eq!(http_get(http, "/v2/health/live").await?.status, 200);
    assert_eq!(http_get(http, "/v2/health/ready").await?.status, 200);

    let expected_metadata = json!({
        "name": "add_mul",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "b", "datatype": "FP32", "shape": [-1, 4]},
        ],
        "outputs": [
            {"name": "sum", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "product", "datatype": "FP32", "shape": [-1, 4]},
        ],
    });
    for path in ["/v2/models/add_mul", "/v2/models/add_mul/versions/1"] {
        let metadata = http_get(http, path).await?;
        assert_eq!(metadata.status, 200, "{path}: {}", metadata.body);
        let mut metadata = json_of(&metadata)?;
        // The platform string is the worker's to choose; the rest is the model's signature.
        assert!(metadata["platform"].is_string(), "{metadata}");
        metadata["platform"] = expected_metadata["platform"].clone();
        assert_eq!(metadata, expected_metadata, "{path}");
    }
    let ready = http_get(http, "/v2/models/add_mul/ready").await?;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(json_of(&ready)?, json!({"name": "add_mul", "ready": true}));
    assert_eq!(
        http_get(http, "/v2/models/add_mul/versions/1/ready")
            .await?
            .status,
        200
    );

    // Nested and flat data, every output, then one requested output.
    let request = json!({
        "id": "req-7",
        "inputs": [
            {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
            {"name": "b", "shape": [2, 4], "datatype": "FP32", "data": [0.5, 0.5, 0.5, 0.5, 2, 2, 2, 2]},
        ]
    });
    let response = http_post_json(http, "/v2/models/add_mul/infer", &request.to_string()).await?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        json_of(&response)?,
        json!({
            "model_name": "add_mul",
            "model_version": "1",
            "id": "req-7",
            "outputs": [
                {"name": "sum", "datatype": "FP32", "shape": [2, 4],
                 "data": [1.5, 2.5, 3.5, 4.5, 7.0, 8.0, 9.0, 10.0]},
                {"name": "product", "datatype": "FP32", "shape": [2, 4],
                 "data": [0.5, 1.0, 1.5, 2.0, 10.0, 12.0, 14.0, 16.0]},
            ]
        })
    );
    let mut only_product = request.clone();
    only_product["outputs"] = json!([{"name": "product"}]);
    let response = http_post_json(
        http,
        "/v2/models/add_mul/versions/1/infer",
        &only_product.to_string(),
    )
    .await?;
    let body = json_of(&response)?;
    let names: Vec<&str> = body["outputs"]
        .as_array()
        .map(|o| o.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["product"], "{body}");

    // The binary tensor data extension: `a` after the JSON, `b` in it, the answer as JSON.
    let binary_a: Vec<u8> = [1f32, 2., 3., 4.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let header = json!({
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32",
             "parameters": {"binary_data_size": binary_a.len()}},
            {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [2, 2, 2, 2]},
        ],
        "outputs": [{"name": "sum", "parameters": {"binary_data": false}}],
    })
    .to_string();
    let length = header.len().to_string();
    let response = http_request(
        http,
        "POST",
        "/v2/models/add_mul/infer",
        &[("inference-header-content-length", &length)],
        &[header.as_bytes(), &binary_a].concat(),
    )
    .await?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("inference-header-content-length"), None);
    assert_eq!(
        json_of(&response)?["outputs"],
        json!([{"name": "sum", "datatype": "FP32", "shape": [1, 4], "data": [3.0, 4.0, 5.0, 6.0]}])
    );
    Ok(())
}

/// Asserts an Open Inference Protocol error: `status` and `{"error": message}` with `needle`
/// in the message.
fn assert_oip_error(
    response: &lmgrid_integration_tests::HttpResponse,
    status: u16,
    needle: &str,
) -> anyhow::Result<()> {
    let context = format!("{} {}", response.status, response.body);
    assert_eq!(response.status, status, "{context}");
    let body = json_of(response)?;
    let object = body.as_object().map(|o| o.len());
    assert_eq!(object, Some(1), "{context}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{context}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oip_rest_errors_are_messages_with_the_right_status() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let (_sandbox, _repo, http) = add_mul_sandbox(&etcd).await?;
    let infer = |a: Value| {
        json!({"inputs": [a, {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]})
            .to_string()
    };

    let short = infer(json!({"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}));
    let response = http_post_json(http, "/v2/models/add_mul/infer", &short).await?;
    assert_oip_error(
        &response,
        400,
        "input 'a': shape [1, 4] does not match the 2 elements",
    )?;
    // The worker's own refusal (a datatype the model does not take) comes back as a 400.
    let ints =
        infer(json!({"name": "a", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}));
    let response = http_post_json(http, "/v2/models/add_mul/infer", &ints).await?;
    assert_oip_error(&response, 400, "'a'")?;
    let response = http_post_json(http, "/v2/models/add_mul/infer", "{\"inputs\": [").await?;
    assert_oip_error(&response, 400, "not valid JSON")?;
    let fine =
        infer(json!({"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}));
    let response = http_post_json(http, "/v2/models/nope/infer", &fine).await?;
    assert_oip_error(&response, 404, "'nope'")?;
    let response = http_get(http, "/v2/models/add_mul/versions/9").await?;
    assert_oip_error(&response, 404, "version '9'")?;
    let response = http_get(http, "/v2/models/add_mul/versions/9/ready").await?;
    assert_oip_error(&response, 404, "version '9'")?;
    let response = http_get(http, "/v2/models/add_mul/infer").await?;
    assert_oip_error(&response, 405, "does not accept GET")?;
    let response = http_get(http, "/v2/models/add_mul/explain").await?;
    assert_oip_error(&response, 404, "no route")?;
    for (length, needle) in [
        ("100000", "the body is only"),
        ("ten", "must be the byte length of the JSON"),
        ("10", "not valid JSON"),
    ] {
        let response = http_request(
            http,
            "POST",
            "/v2/models/add_mul/infer",
            &[("inference-header-content-length", length)],
            fine.as_bytes(),
        )
        .await?;
        assert_oip_error(&response, 400, needle)?;
    }
    // Binary data the inputs do not account for is refused, not dropped.
    let length = fine.len().to_string();
    let response = http_request(
        http,
        "POST",
        "/v2/models/add_mul/infer",
        &[("inference-header-content-length", &length)],
        &[fine.as_bytes(), &[0u8; 4]].concat(),
    )
    .await?;
    assert_oip_error(&response, 400, "4 bytes of binary data follow")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_compressed_when_asked_unless_turned_off() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    // A model name long enough that the 404 naming it is over 1 KiB.
    let model = "m".repeat(1500);
    let path = format!("/v2/models/{model}");
    for (on, expected) in [(true, Some("gzip")), (false, None)] {
        let config = lmgrid_gateway::HttpConfig {
            compress_responses: on,
            ..Default::default()
        };
        let (_sandbox, _repo, http) = add_mul_sandbox_with(&etcd, config).await?;
        let asked = http_request(http, "GET", &path, &[("accept-encoding", "gzip")], b"").await?;
        assert_eq!(asked.status, 404, "{}", asked.body);
        assert_eq!(
            asked.header("content-encoding"),
            expected,
            "compress_responses: {on}"
        );
        let plain = http_request(http, "GET", &path, &[], b"").await?;
        assert_eq!(plain.status, 404);
        assert_eq!(plain.header("content-encoding"), None);
        assert!(plain.body.contains(&model), "{}", plain.body);
        // Small answers go as they are even when asked.
        let small = http_request(
            http,
            "GET",
            "/v2/models/add_mul",
            &[("accept-encoding", "gzip")],
            b"",
        )
        .await?;
        assert_eq!(small.status, 200);
        assert_eq!(small.header("content-encoding"), None);
    }
    Ok(())
}
