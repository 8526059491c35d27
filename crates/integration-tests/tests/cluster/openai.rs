//! The OpenAI-compatible REST API on the gateway's public HTTP port: models from discovery,
//! embeddings from the real MiniLM, and every error in the OpenAI shape with the status a
//! client expects.

use std::net::SocketAddr;

use anyhow::Context as _;
use base64::Engine as _;
use lmgrid_integration_tests::{
    HttpResponse, SETTLE_TIMEOUT, Sandbox, http_get, http_post_json, http_request,
};
use lmgrid_test_support::onnx;
use lmgrid_test_support::{EtcdServer, wait_until};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::inference::minilm_repository;

/// The body of `response` as JSON.
pub(crate) fn json_of(response: &HttpResponse) -> anyhow::Result<Value> {
    serde_json::from_str(&response.body)
        .with_context(|| format!("{} is not JSON: {:?}", response.status, response.body))
}

/// Asserts an OpenAI-shaped error: `status`, `code`, `param`, and a message containing
/// `needle`.
pub(crate) fn assert_openai_error(
    response: &HttpResponse,
    status: u16,
    code: &str,
    param: Option<&str>,
    needle: &str,
) -> anyhow::Result<()> {
    let body = json_of(response)?;
    let context = format!("{} {}", response.status, response.body);
    assert_eq!(response.status, status, "{context}");
    assert_eq!(body["error"]["code"], code, "{context}");
    assert_eq!(body["error"]["param"], json!(param), "{context}");
    assert!(body["error"]["type"].is_string(), "{context}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{context}");
    assert!(
        response.header("x-request-id").is_some(),
        "no request id: {context}"
    );
    Ok(())
}

/// Waits until `GET /v1/models` at `http` lists every model of `models`.
pub(crate) async fn wait_for_models(http: SocketAddr, models: &[&str]) -> anyhow::Result<()> {
    let what = format!("the gateway to list {models:?}");
    wait_until(SETTLE_TIMEOUT, &what, || async move {
        let Ok(response) = http_get(http, "/v1/models").await else {
            return false;
        };
        let Ok(body) = serde_json::from_str::<Value>(&response.body) else {
            return false;
        };
        let listed: Vec<&str> = body["data"]
            .as_array()
            .map(|data| data.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        models.iter().all(|m| listed.contains(m))
    })
    .await
}

fn norm(values: &[f32]) -> f32 {
    values.iter().map(|v| v * v).sum::<f32>().sqrt()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|v| v as f32)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_api_lists_models_and_embeds_text_with_minilm() -> anyhow::Result<()> {
    let repo = minilm_repository()?;
    onnx::model_repository(
        repo.path(),
        "add_mul",
        &[("1", &onnx::add_mul())],
        "max_batch_size: 8\n",
    )?;
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .worker_with_models(repo.path())
        .gateway()
        .build()
        .await?;
    let http = sandbox.node("gateway").http_addr();
    wait_for_models(http, &["minilm", "add_mul"]).await?;

    let models = http_get(http, "/v1/models").await?;
    assert_eq!(models.status, 200, "{}", models.body);
    let body = json_of(&models)?;
    assert_eq!(body["object"], "list");
    assert!(
        body["data"].as_array().is_some_and(|d| d.contains(
            &json!({"id": "minilm", "object": "model", "created": 0, "owned_by": "lmgrid"})
        )),
        "{body}"
    );
    let one = http_get(http, "/v1/models/minilm").await?;
    assert_eq!(json_of(&one)?["id"], "minilm", "{}", one.body);
    let missing = http_get(http, "/v1/models/gpt-4").await?;
    assert_openai_error(&missing, 404, "model_not_found", Some("model"), "'gpt-4'")?;

    let texts = ["This is a test sentence.", "Paris is in France."];
    let request = json!({"model": "minilm", "input": texts}).to_string();
    let response = http_request(
        http,
        "POST",
        "/v1/embeddings",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "test-embed-1"),
        ],
        request.as_bytes(),
    )
    .await?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("x-request-id"), Some("test-embed-1"));
    let body = json_of(&response)?;
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "minilm");
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0,
        "{body}"
    );
    let data = body["data"].as_array().context("no data")?;
    assert_eq!(data.len(), 2);
    let mut vectors = Vec::new();
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let values = floats(&item["embedding"]);
        assert_eq!(values.len(), 384);
        assert!((norm(&values) - 1.0).abs() < 1e-5);
        vectors.push(values);
    }

    // base64 is the same vectors as little-endian f32s, as OpenAI's SDKs ask for by default.
    let request = json!({"model": "minilm", "input": texts, "encoding_format": "base64"});
    let response = http_post_json(http, "/v1/embeddings", &request.to_string()).await?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response
            .header("x-request-id")
            .is_some_and(|id| id.starts_with("req-"))
    );
    for (item, want) in json_of(&response)?["data"]
        .as_array()
        .context("no data")?
        .iter()
        .zip(&vectors)
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(item["embedding"].as_str().context("not a base64 string")?)?;
        let got: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(&got, want);
    }

    let request = json!({"model": "minilm", "input": "Paris", "dimensions": 64});
    let response = http_post_json(http, "/v1/embeddings", &request.to_string()).await?;
    let values = floats(&json_of(&response)?["data"][0]["embedding"]);
    assert_eq!(values.len(), 64, "{}", response.body);
    assert!((norm(&values) - 1.0).abs() < 1e-5);

    // Models of the wrong kind and token inputs are refused, saying why.
    let chat = json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]});
    let response = http_post_json(http, "/v1/chat/completions", &chat.to_string()).await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        Some("model"),
        "'minilm' is an embedding model",
    )?;
    let tensor = json!({"model": "add_mul", "input": "hi"});
    let response = http_post_json(http, "/v1/embeddings", &tensor.to_string()).await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        Some("model"),
        "a tensor model",
    )?;
    let tokens = json!({"model": "minilm", "input": [[101, 2023]]});
    let response = http_post_json(http, "/v1/embeddings", &tokens.to_string()).await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        Some("input"),
        "only text",
    )?;

    // The gateway counts what it served, per route and model.
    let metrics = http_get(sandbox.node("gateway").admin_addr(), "/metrics").await?;
    assert!(
        metrics.body.contains(
            r#"lmgrid_gateway_requests_total{model="minilm",route="/v1/embeddings",status="200"}"#
        ),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains(r#"lmgrid_gateway_prompt_tokens_total{model="minilm"}"#),
        "{}",
        metrics.body
    );
    Ok(())
}

/// A sandbox whose one worker serves the `add_mul` fixture (a tensor model), and the
/// gateway's public HTTP address once it lists the model.
pub(crate) async fn add_mul_sandbox(
    etcd: &EtcdServer,
) -> anyhow::Result<(Sandbox, TempDir, SocketAddr)> {
    add_mul_sandbox_with(etcd, Default::default()).await
}

/// [`add_mul_sandbox`] with the gateway's public HTTP settings `http`.
pub(crate) async fn add_mul_sandbox_with(
    etcd: &EtcdServer,
    http: lmgrid_gateway::HttpConfig,
) -> anyhow::Result<(Sandbox, TempDir, SocketAddr)> {
    let repo = TempDir::new()?;
    onnx::model_repository(
        repo.path(),
        "add_mul",
        &[("1", &onnx::add_mul())],
        "max_batch_size: 8\n",
    )?;
    let sandbox = Sandbox::builder(etcd)
        .worker_with_models(repo.path())
        .gateway()
        .gateway_http(http)
        .build()
        .await?;
    let http = sandbox.node("gateway").http_addr();
    wait_for_models(http, &["add_mul"]).await?;
    Ok((sandbox, repo, http))
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_errors_have_the_openai_shape_and_status() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let (_sandbox, _repo, http) = add_mul_sandbox(&etcd).await?;
    let chat = |extra: Value| {
        let mut body = json!({"model": "add_mul", "messages": [{"role": "user", "content": "hi"}]});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        body.to_string()
    };

    let response = http_post_json(http, "/v1/chat/completions", "{\"model\": ").await?;
    assert_openai_error(&response, 400, "invalid_argument", None, "not valid JSON")?;
    let response = http_post_json(
        http,
        "/v1/chat/completions",
        &chat(json!({"temperature": "hot"})),
    )
    .await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        Some("temperature"),
        "must be a number",
    )?;
    let response = http_post_json(
        http,
        "/v1/completions",
        &json!({"model": "add_mul", "prompt": "x", "max_tokens": 1_000_000}).to_string(),
    )
    .await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        Some("max_tokens"),
        "above this gateway's limit",
    )?;
    let response = http_post_json(
        http,
        "/v1/chat/completions",
        &chat(json!({"model": "no-such-model"})),
    )
    .await?;
    assert_openai_error(
        &response,
        404,
        "model_not_found",
        Some("model"),
        "'no-such-model'",
    )?;
    let response = http_post_json(http, "/v1/chat/completions", &chat(json!({}))).await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        Some("model"),
        "a tensor model",
    )?;

    // A body over the 2 MiB default limit.
    let huge = format!(
        "{{\"model\": \"add_mul\", \"input\": \"{}\"}}",
        "a".repeat(3 << 20)
    );
    let response = http_post_json(http, "/v1/embeddings", &huge).await?;
    assert_openai_error(
        &response,
        413,
        "request_too_large",
        None,
        "limit of 2097152 bytes",
    )?;

    let response = http_get(http, "/v1/chat/completions").await?;
    assert_openai_error(
        &response,
        405,
        "method_not_allowed",
        None,
        "does not accept GET",
    )?;
    assert_eq!(response.header("allow"), Some("POST"));
    let response = http_request(http, "DELETE", "/v1/models", &[], b"").await?;
    assert_openai_error(&response, 405, "method_not_allowed", None, "DELETE")?;
    let response = http_get(http, "/v1/nothing-here").await?;
    assert_openai_error(
        &response,
        404,
        "not_found",
        None,
        "no route for GET /v1/nothing-here",
    )?;

    let response = http_request(
        http,
        "POST",
        "/v1/chat/completions",
        &[("x-request-timeout", "soon")],
        chat(json!({})).as_bytes(),
    )
    .await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        None,
        "x-request-timeout",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_workers_the_http_apis_answer_503_with_retry_after() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd).gateway().build().await?;
    let http = sandbox.node("gateway").http_addr();

    let models = http_get(http, "/v1/models").await?;
    assert_eq!(json_of(&models)?, json!({"object": "list", "data": []}));
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for (path, body) in [
        ("/v1/chat/completions", chat.to_string()),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "hi"}).to_string(),
        ),
        (
            "/v1/embeddings",
            json!({"model": "m", "input": "hi"}).to_string(),
        ),
    ] {
        let response = http_post_json(http, path, &body).await?;
        assert_openai_error(&response, 503, "unavailable", None, "no worker is ready")?;
        assert_eq!(response.header("retry-after"), Some("1"), "{path}");
    }
    let response = http_get(http, "/v1/models/m").await?;
    assert_openai_error(&response, 503, "unavailable", None, "no worker")?;

    let infer = json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]});
    let response = http_post_json(http, "/v2/models/m/infer", &infer.to_string()).await?;
    assert_eq!(response.status, 503, "{}", response.body);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(
        json_of(&response)?,
        json!({"error": "no worker is ready; retry later"})
    );
    Ok(())
}
