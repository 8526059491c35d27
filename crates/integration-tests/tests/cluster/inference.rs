//! The Open Inference Protocol through the gateway: model RPCs reach a worker that serves the
//! model, answers and errors come back unchanged, and traffic survives a worker leaving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use lmgrid_integration_tests::{SETTLE_TIMEOUT, Sandbox, connect};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::model_infer_request::InferInputTensor;
use lmgrid_proto::inference::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
};
use lmgrid_test_support::onnx::{self, ElemType};
use lmgrid_test_support::{EtcdServer, wait_until};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

/// A typed FP32 request for `model` with input `x` of `rows` rows.
pub(crate) fn request(model: &str, version: &str, rows: usize, x: Vec<f32>) -> ModelInferRequest {
    let width = x.len() / rows;
    ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        inputs: vec![InferInputTensor {
            name: "x".to_string(),
            datatype: "FP32".to_string(),
            shape: vec![rows as i64, width as i64],
            contents: Some(InferTensorContents {
                fp32_contents: x,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(crate) fn output(response: &lmgrid_proto::inference::ModelInferResponse) -> Vec<f32> {
    response.outputs[0]
        .contents
        .as_ref()
        .map(|c| c.fp32_contents.clone())
        .unwrap_or_default()
}

/// A client of the gateway, once the gateway sees a worker serving `model`.
pub(crate) async fn gateway_client(
    sandbox: &Sandbox,
    model: &str,
) -> anyhow::Result<GrpcInferenceServiceClient<Channel>> {
    let client =
        GrpcInferenceServiceClient::new(connect(sandbox.node("gateway").grpc_addr()).await?);
    wait_until(
        SETTLE_TIMEOUT,
        &format!("the gateway to route {model}"),
        || {
            let mut client = client.clone();
            let request = ModelReadyRequest {
                name: model.to_string(),
                version: String::new(),
            };
            async move {
                client
                    .model_ready(request)
                    .await
                    .is_ok_and(|r| r.into_inner().ready)
            }
        },
    )
    .await?;
    Ok(client)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_forwards_model_rpcs_to_the_worker_serving_the_model() -> anyhow::Result<()> {
    let repo = TempDir::new()?;
    let mlp = onnx::mlp(16, 32, 2, 8, 42);
    onnx::model_repository(
        repo.path(),
        "mlp",
        &[("1", &mlp.model)],
        "max_batch_size: 8\n",
    )?;
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .worker_with_models(repo.path())
        .gateway()
        .build()
        .await?;
    let mut client = gateway_client(&sandbox, "mlp").await?;

    let x = onnx::random_f32(1, 3 * 16);
    let response = client
        .model_infer(request("mlp", "", 3, x.clone()))
        .await?
        .into_inner();
    assert_eq!(
        (
            response.model_name.as_str(),
            response.model_version.as_str()
        ),
        ("mlp", "1")
    );
    assert_eq!(response.outputs[0].shape, vec![3, 8]);
    let want = mlp.reference(&x);
    for (i, (got, want)) in output(&response).iter().zip(&want).enumerate() {
        assert!((got - want).abs() <= 1e-5, "element {i}: {got} vs {want}");
    }

    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "mlp".to_string(),
            version: "1".to_string(),
        })
        .await?
        .into_inner();
    assert_eq!(metadata.versions, ["1"]);
    assert_eq!(metadata.inputs[0].shape, vec![-1, 16]);

    // The worker's refusals come back through the gateway unchanged.
    let result = client
        .model_infer(request("mlp", "", 2, vec![0.0; 2 * 15]))
        .await;
    let status = result.expect_err("a wrong shape");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("input 'x'"), "{status:?}");

    // Models and versions no worker serves are NOT_FOUND at the gateway.
    for (model, version) in [("nope", ""), ("mlp", "2")] {
        let status = client
            .model_infer(request(model, version, 1, vec![0.0; 16]))
            .await
            .expect_err("not served");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(
            status.message().contains("not served by any worker"),
            "{status:?}"
        );
        let ready = ModelReadyRequest {
            name: model.to_string(),
            version: version.to_string(),
        };
        let status = client.model_ready(ready).await.expect_err("not served");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_workers_the_gateway_answers_unavailable() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd).gateway().build().await?;
    let channel = connect(sandbox.node("gateway").grpc_addr()).await?;
    let mut client = GrpcInferenceServiceClient::new(channel);

    let status = client
        .model_infer(request("mlp", "", 1, vec![0.0; 4]))
        .await
        .expect_err("no workers");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no worker"), "{status:?}");
    let metadata = ModelMetadataRequest {
        name: "mlp".to_string(),
        version: String::new(),
    };
    let status = client
        .model_metadata(metadata)
        .await
        .expect_err("no workers");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_a_model_and_one_leaves_without_failing_a_request() -> anyhow::Result<()>
{
    // Each worker serves a different graph under the same name, so every answer tells which
    // worker computed it: the first returns x, the second 2x.
    let (first, second) = (TempDir::new()?, TempDir::new()?);
    let config = "max_batch_size: 4\n";
    let identity = onnx::identity(ElemType::Float, &[4]);
    onnx::model_repository(first.path(), "m", &[("1", &identity)], config)?;
    onnx::model_repository(second.path(), "m", &[("1", &onnx::variable_seq())], config)?;
    let etcd = EtcdServer::start().await?;
    // The leaving worker keeps accepting while the gateway's view catches up.
    let sandbox = Sandbox::builder(&etcd)
        .drain_delay(std::time::Duration::from_secs(2))
        .worker_with_models(first.path())
        .worker_with_models(second.path())
        .gateway()
        .build()
        .await?;
    let client = gateway_client(&sandbox, "m").await?;
    let x = vec![1.0, 2.0, 3.0, 4.0];
    let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();

    // Both serve: the gateway spreads requests over the two.
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    let (mut first_served, mut second_served) = (false, false);
    while !(first_served && second_served) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "requests never reached both workers"
        );
        let response = client
            .clone()
            .model_infer(request("m", "", 1, x.clone()))
            .await?;
        let y = output(&response.into_inner());
        first_served |= y == x;
        second_served |= y == doubled;
        anyhow::ensure!(y == x || y == doubled, "unexpected answer {y:?}");
    }

    // Traffic keeps flowing while the first worker shuts down gracefully.
    let leaving = Arc::new(AtomicBool::new(true));
    let traffic = tokio::spawn({
        let (mut client, leaving, x) = (client.clone(), leaving.clone(), x.clone());
        async move {
            let mut answers = Vec::new();
            while leaving.load(Ordering::SeqCst) {
                let result = client.model_infer(request("m", "", 1, x.clone())).await;
                answers.push(result.map(|r| output(&r.into_inner())));
            }
            answers
        }
    });
    sandbox.nodes("worker")[0].stop().await?;
    leaving.store(false, Ordering::SeqCst);
    let answers = traffic.await.context("the traffic task")?;
    assert!(!answers.is_empty());
    for answer in answers {
        let y =
            answer.map_err(|e| anyhow::anyhow!("a request failed while a worker left: {e:?}"))?;
        assert!(y == x || y == doubled, "{y:?}");
    }
    // Only the second worker is left to answer.
    let mut client = client.clone();
    for _ in 0..4 {
        let response = client.model_infer(request("m", "", 1, x.clone())).await?;
        assert_eq!(output(&response.into_inner()), doubled);
    }
    Ok(())
}

/// Every gRPC hop coalesces its HTTP/2 writes (`lmgrid_core::coalesce`): answers of many
/// calls share a write, frames of a megabyte go through unbuffered. Small and large calls at
/// once, through the gateway and straight to the worker, each come back whole and its own.
#[tokio::test(flavor = "multi_thread")]
async fn small_and_large_answers_come_back_whole_under_concurrent_load() -> anyhow::Result<()> {
    const WIDTH: usize = 1024;
    let repo = TempDir::new()?;
    let identity = onnx::identity(ElemType::Float, &[WIDTH as i64]);
    onnx::model_repository(
        repo.path(),
        "wide",
        &[("1", &identity)],
        "max_batch_size: 256\n",
    )?;
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .worker_with_models(repo.path())
        .gateway()
        .build()
        .await?;
    let routed = gateway_client(&sandbox, "wide").await?;
    let direct =
        GrpcInferenceServiceClient::new(connect(sandbox.node("worker").grpc_addr()).await?);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..96 {
        let mut client = if i % 2 == 0 { &routed } else { &direct }.clone();
        // One call in 16 carries 256 rows: a megabyte each way.
        let rows = if i % 16 < 2 { 256 } else { 1 + i % 3 };
        let x: Vec<f32> = (0..rows * WIDTH).map(|j| (i * 10_000 + j) as f32).collect();
        calls.spawn(async move {
            let answer = client
                .model_infer(request("wide", "", rows, x.clone()))
                .await;
            let y = output(&answer.with_context(|| format!("call {i}"))?.into_inner());
            anyhow::ensure!(y == x, "call {i} ({rows} rows) came back changed");
            anyhow::Ok(())
        });
    }
    while let Some(call) = calls.join_next().await {
        call??;
    }
    Ok(())
}

/// The MiniLM that `cargo xtask models` converts, in a fresh repository of its own.
pub(crate) fn minilm_repository() -> anyhow::Result<TempDir> {
    let cache = std::env::var_os("LMGRID_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/lmgrid"))
        })
        .context("neither LMGRID_CACHE_DIR nor HOME is set")?;
    let model = cache.join("models/all-minilm-l6-v2");
    anyhow::ensure!(
        model.join("1/model.onnx").is_file(),
        "{} has no converted MiniLM; run `cargo xtask models`",
        model.display()
    );
    let repo = TempDir::new()?;
    std::os::unix::fs::symlink(&model, repo.path().join("minilm"))?;
    Ok(repo)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_forwards_embeddings_to_the_worker_serving_the_model() -> anyhow::Result<()> {
    use lmgrid_proto::lmgrid::v1::embedding_service_client::EmbeddingServiceClient;
    use lmgrid_proto::lmgrid::v1::{EmbedRequest, ModelRef};

    let repo = minilm_repository()?;
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .worker_with_models(repo.path())
        .gateway()
        .build()
        .await?;
    gateway_client(&sandbox, "minilm").await?;
    let mut client =
        EmbeddingServiceClient::new(connect(sandbox.node("gateway").grpc_addr()).await?);
    let embed = |name: &str, inputs: &[&str]| EmbedRequest {
        model: Some(ModelRef {
            name: name.to_string(),
            version: String::new(),
        }),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };

    let response = client
        .embed(embed(
            "minilm",
            &["This is a test sentence.", "Paris is in France."],
        ))
        .await?
        .into_inner();
    assert_eq!(response.embeddings.len(), 2);
    for embedding in &response.embeddings {
        let norm: f32 = embedding.values.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert_eq!(embedding.values.len(), 384);
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    assert_eq!(
        response.model.map(|m| (m.name, m.version)),
        Some(("minilm".into(), "1".into()))
    );
    assert!(response.usage.is_some_and(|u| u.prompt_tokens > 0));

    // The worker's errors come back unchanged; an unserved model is NOT_FOUND.
    let status = client
        .embed(embed("minilm", &[]))
        .await
        .expect_err("empty inputs");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .embed(embed("nope", &["x"]))
        .await
        .expect_err("unknown model");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    Ok(())
}
