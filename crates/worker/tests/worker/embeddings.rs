//! `EmbeddingService/Embed` over the real all-MiniLM-L6-v2 that `cargo xtask models` converts
//! into the cache (`$LMGRID_CACHE_DIR`, else `~/.cache/lmgrid`). Without it these tests fail,
//! saying so: they are the proof that the worker serves a real encoder.
//!
//! Unit vectors of 384; paraphrases closer than unrelated sentences; a text embeds the same
//! alone, in a padded batch and in a batch formed across concurrent requests; `dimensions`
//! truncates and renormalises; bad requests name their problem.

use anyhow::Context as _;
use lmgrid_proto::inference::model_infer_request::InferInputTensor;
use lmgrid_proto::inference::{InferTensorContents, ModelInferRequest};
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::lmgrid::v1::embedding_service_client::EmbeddingServiceClient;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{
    Repo, TestWorker, assert_close, assert_status, cached_model, fp32_output, linked_repo, metric,
};

/// ONNX Runtime sums padded and unpadded sequences in different orders; padding is masked,
/// so anything beyond this is a bug.
const TOLERANCE: f32 = 1e-5;
const DIMENSIONS: usize = 384;

/// A repository serving the converted model as `name`, with its own `config.yaml` or, if
/// `config` is `None`, the one `cargo xtask models` wrote. Each test uses its own name, so the
/// per-model metrics are its own.
fn minilm_repo(name: &str, config: Option<&str>) -> anyhow::Result<Repo> {
    linked_repo(&cached_model("all-minilm-l6-v2", "embedding"), name, config)
}

async fn client(worker: &TestWorker) -> anyhow::Result<EmbeddingServiceClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", worker.addr))?
        .connect()
        .await
        .context("connect to the worker")?;
    Ok(EmbeddingServiceClient::new(channel))
}

fn request(model: &str, texts: &[&str], dimensions: u32) -> pb::EmbedRequest {
    pb::EmbedRequest {
        model: Some(pb::ModelRef {
            name: model.to_string(),
            version: String::new(),
        }),
        inputs: texts.iter().map(|t| t.to_string()).collect(),
        context: None,
        dimensions,
    }
}

async fn embed(
    client: &mut EmbeddingServiceClient<Channel>,
    model: &str,
    texts: &[&str],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let response = client.embed(request(model, texts, 0)).await?.into_inner();
    Ok(response.embeddings.into_iter().map(|e| e.values).collect())
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b))
}

/// Texts of very different token counts, the last one past the 256-token truncation.
fn texts_of_different_lengths() -> Vec<String> {
    vec![
        "Hi.".to_string(),
        "This is a test sentence.".to_string(),
        "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."
            .to_string(),
        "Stocks fell sharply on Monday as investors worried about rising interest rates, \
         weaker earnings and the outlook for global growth in the coming year."
            .to_string(),
        "word ".repeat(400),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sentence_embeds_to_a_unit_vector_of_384() -> anyhow::Result<()> {
    let worker = TestWorker::start(minilm_repo("minilm", None)?).await?;
    let mut client = client(&worker).await?;
    let response = client
        .embed(request("minilm", &["This is a test sentence."], 0))
        .await?
        .into_inner();
    assert_eq!(
        response.model,
        Some(pb::ModelRef {
            name: "minilm".into(),
            version: "1".into()
        })
    );
    assert_eq!(response.embeddings.len(), 1);
    let embedding = &response.embeddings[0];
    assert_eq!(embedding.index, 0);
    assert_eq!(embedding.values.len(), DIMENSIONS);
    assert!(
        (norm(&embedding.values) - 1.0).abs() < TOLERANCE,
        "norm {}",
        norm(&embedding.values)
    );
    let usage = response.usage.context("usage")?;
    assert!(usage.prompt_tokens > 0, "{usage:?}");
    assert_eq!(usage.total_tokens, usage.prompt_tokens);
    assert_eq!(usage.completion_tokens, 0);

    // The model is listed as an embedding model, and registered like any other.
    let listed = worker.list().await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].kind, pb::ModelKind::Embedding as i32);
    let record = worker.record_where(|r| !r.models.is_empty()).await?;
    assert_eq!(record.models[0].name, "minilm");
    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn paraphrases_are_closer_than_unrelated_sentences() -> anyhow::Result<()> {
    let worker = TestWorker::start(minilm_repo("minilm", None)?).await?;
    let mut client = client(&worker).await?;
    let e = embed(
        &mut client,
        "minilm",
        &[
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The stock market fell sharply today.",
        ],
    )
    .await?;
    let paraphrase = cosine(&e[0], &e[1]);
    let unrelated = cosine(&e[0], &e[2]);
    assert!(
        paraphrase > unrelated + 0.3,
        "paraphrase {paraphrase} vs unrelated {unrelated}"
    );
    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_padded_batch_equals_each_text_embedded_alone() -> anyhow::Result<()> {
    let worker = TestWorker::start(minilm_repo("minilm", None)?).await?;
    let mut client = client(&worker).await?;
    let texts = texts_of_different_lengths();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let response = client
        .embed(request("minilm", &refs, 0))
        .await?
        .into_inner();
    let indices: Vec<u32> = response.embeddings.iter().map(|e| e.index).collect();
    assert_eq!(indices, [0, 1, 2, 3, 4]);
    let mut solo_tokens = 0;
    for (text, batched) in texts.iter().zip(&response.embeddings) {
        let alone = client
            .embed(request("minilm", &[text], 0))
            .await?
            .into_inner();
        let tokens = alone.usage.context("usage")?.prompt_tokens;
        solo_tokens += tokens;
        assert_close(
            &batched.values,
            &alone.embeddings[0].values,
            TOLERANCE,
            &format!("text of {tokens} tokens"),
        );
    }
    // Usage counts every token the model saw; the long text is truncated at 256.
    assert_eq!(response.usage.context("usage")?.prompt_tokens, solo_tokens);
    let long = client
        .embed(request("minilm", &[&texts[4]], 0))
        .await?
        .into_inner();
    assert_eq!(long.usage.context("usage")?.prompt_tokens, 256);
    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_of_different_lengths_share_batches() -> anyhow::Result<()> {
    // A queue delay far above the time the requests take to arrive, so that batches form even
    // on a busy machine.
    let config =
        "kind: embedding\nmax_batch_size: 32\ndynamic_batching:\n  max_queue_delay: 100ms\n";
    let worker = TestWorker::start(minilm_repo("minilm-concurrent", Some(config))?).await?;
    let mut solo_client = client(&worker).await?;
    let texts = texts_of_different_lengths();
    let mut solo = Vec::new();
    for text in &texts {
        solo.push(embed(&mut solo_client, "minilm-concurrent", &[text]).await?[0].clone());
    }
    let before = metric("lmgrid_worker_executions_total", "minilm-concurrent");

    // Twelve requests of one or two texts each, every length mixed with every other.
    let requests: Vec<Vec<usize>> = (0..12)
        .map(|i| {
            if i % 3 == 0 {
                vec![i % texts.len(), (i + 2) % texts.len()]
            } else {
                vec![i % texts.len()]
            }
        })
        .collect();
    let mut calls = JoinSet::new();
    for (i, picks) in requests.iter().cloned().enumerate() {
        let mut client = client(&worker).await?;
        let chosen: Vec<String> = picks.iter().map(|&k| texts[k].clone()).collect();
        calls.spawn(async move {
            let refs: Vec<&str> = chosen.iter().map(String::as_str).collect();
            (i, embed(&mut client, "minilm-concurrent", &refs).await)
        });
    }
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined?;
        let embeddings = result?;
        assert_eq!(embeddings.len(), requests[i].len(), "request {i}");
        for (got, &k) in embeddings.iter().zip(&requests[i]) {
            assert_close(got, &solo[k], TOLERANCE, &format!("request {i}, text {k}"));
        }
    }
    let executions = metric("lmgrid_worker_executions_total", "minilm-concurrent") - before;
    assert!(
        executions >= 1.0 && executions < requests.len() as f64,
        "{executions} executions for {} requests: nothing was batched",
        requests.len()
    );
    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn dimensions_truncate_and_renormalise() -> anyhow::Result<()> {
    let worker = TestWorker::start(minilm_repo("minilm", None)?).await?;
    let mut client = client(&worker).await?;
    let text = "This is a test sentence.";
    let full = embed(&mut client, "minilm", &[text]).await?.remove(0);
    let short = client
        .embed(request("minilm", &[text], 128))
        .await?
        .into_inner()
        .embeddings
        .remove(0)
        .values;
    assert_eq!(short.len(), 128);
    assert!(
        (norm(&short) - 1.0).abs() < TOLERANCE,
        "norm {}",
        norm(&short)
    );
    let prefix: Vec<f32> = full[..128].iter().map(|v| v / norm(&full[..128])).collect();
    assert_close(&short, &prefix, TOLERANCE, "128 dimensions");
    let same = client
        .embed(request("minilm", &[text], 384))
        .await?
        .into_inner()
        .embeddings
        .remove(0)
        .values;
    assert_close(&same, &full, TOLERANCE, "384 dimensions");
    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_name_their_problem() -> anyhow::Result<()> {
    let worker = TestWorker::start(minilm_repo("minilm", None)?).await?;
    let mut client = client(&worker).await?;
    let sentence = "This is a test sentence.";
    assert_status(
        client.embed(request("minilm", &[], 0)).await,
        Code::InvalidArgument,
        &["inputs is empty"],
    );
    assert_status(
        client.embed(request("minilm", &[sentence, ""], 0)).await,
        Code::InvalidArgument,
        &["inputs[1] is empty"],
    );
    let many = vec![sentence; 33];
    assert_status(
        client.embed(request("minilm", &many, 0)).await,
        Code::InvalidArgument,
        &["33 texts", "at most 32"],
    );
    assert_status(
        client.embed(request("minilm", &[sentence], 385)).await,
        Code::InvalidArgument,
        &["dimensions 385", "384"],
    );
    assert_status(
        client.embed(request("no-such-model", &[sentence], 0)).await,
        Code::NotFound,
        &["no-such-model"],
    );
    let mut versioned = request("minilm", &[sentence], 0);
    if let Some(model) = &mut versioned.model {
        model.version = "7".to_string();
    }
    assert_status(
        client.embed(versioned).await,
        Code::NotFound,
        &["'7'", "ready: 1"],
    );
    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn model_infer_serves_the_encoder_as_a_tensor_model() -> anyhow::Result<()> {
    let worker = TestWorker::start(minilm_repo("minilm", None)?).await?;
    let mut client = client(&worker).await?;
    let text = "This is a test sentence.";
    let embedded = embed(&mut client, "minilm", &[text]).await?.remove(0);
    // [CLS] this is a test sentence . [SEP], as the model's tokenizer has it.
    let ids = vec![101, 2023, 2003, 1037, 3231, 6251, 1012, 102];
    let input = |name: &str, values: Vec<i64>| InferInputTensor {
        name: name.to_string(),
        datatype: "INT64".to_string(),
        shape: vec![1, 8],
        contents: Some(InferTensorContents {
            int64_contents: values,
            ..Default::default()
        }),
        ..Default::default()
    };
    let response = worker
        .infer
        .clone()
        .model_infer(ModelInferRequest {
            model_name: "minilm".to_string(),
            inputs: vec![
                input("input_ids", ids),
                input("attention_mask", vec![1; 8]),
                input("token_type_ids", vec![0; 8]),
            ],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(response.outputs[0].name, "sentence_embedding");
    assert_close(
        &fp32_output(&response, 0),
        &embedded,
        TOLERANCE,
        "ModelInfer vs Embed",
    );
    worker.stop().await
}
