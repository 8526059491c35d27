//! `cargo xtask bench embed`: all-MiniLM-L6-v2 sentences/s through the
//! worker's `Embed` against raw in-process ONNX Runtime.
//!
//! Rows:
//! - raw ONNX Runtime: the same tokenized sentences at batch 1 and 32, one
//!   session in a loop — the limit;
//! - the worker over gRPC: requests of 1 sentence at concurrency 1 and 32
//!   (the dynamic batcher forms the batches), and requests of 32 sentences.
//!
//! The model comes from `cargo xtask models`; `LMGRID_BENCH_SECONDS`
//! (default 5) sets the measuring time per row.

use std::time::{Duration, Instant};

use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::lmgrid::v1::embedding_service_client::EmbeddingServiceClient;
use lmgrid_worker::engine::{ProviderConfig, Runtime};
use ort::value::Tensor;
use tokio::task::JoinSet;
use tonic::transport::Channel;

mod support;
use support::{models_dir, percentile_ms, start_worker};

const MODEL: &str = "all-minilm-l6-v2";

/// Sentences of everyday length (8–20 tokens), cycled through.
const SENTENCES: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog.",
    "A lighthouse keeper watched the storm roll in from the sea.",
    "Embeddings map sentences to points in a vector space.",
    "She ordered a coffee and opened her laptop by the window.",
    "The committee will publish its report next Tuesday morning.",
    "Rain is expected across the north for most of the weekend.",
    "Kubernetes schedules pods onto nodes with enough free resources.",
    "He forgot his umbrella, so he waited under the bridge.",
];

struct Row {
    case: String,
    sentences_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn texts(n: usize) -> Vec<String> {
    SENTENCES
        .iter()
        .cycle()
        .take(n)
        .map(|s| s.to_string())
        .collect()
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("LMGRID_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let measure = Duration::from_secs_f64(seconds);
    let dir = models_dir().join(MODEL);
    anyhow::ensure!(
        dir.join("1/model.onnx").is_file(),
        "{} is missing: run `cargo xtask models`",
        dir.display()
    );
    println!(
        "lmgrid embed benchmark: {MODEL}, {} CPUs, {seconds}s per row",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows = Vec::new();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("load tokenizer: {e}"))?;
    let runtime = Runtime::get(&Default::default())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut session, _, _) = runtime.session(
        &dir.join("1/model.onnx"),
        None,
        &ProviderConfig::default(),
        threads,
    )?;
    for batch in [1, 32] {
        rows.push(raw_row(&mut session, &tokenizer, batch, measure)?);
    }
    drop(session);

    let repo = tempfile::tempdir()?;
    std::os::unix::fs::symlink(&dir, repo.path().join(MODEL))?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    tokio.block_on(async {
        let worker = start_worker(repo.path(), &[MODEL], Duration::from_secs(60)).await?;
        let addr = worker.addr;
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        for (concurrency, per_request) in [(1, 1), (32, 1), (1, 32)] {
            rows.push(worker_row(&channel, concurrency, per_request, measure).await?);
        }
        worker.stop().await?;
        anyhow::Ok(())
    })?;

    println!();
    println!("| case | sentences/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.1} | {:.2} | {:.2} |",
            row.case, row.sentences_per_s, row.p50_ms, row.p99_ms
        );
    }
    Ok(())
}

/// Tokenizes `batch` sentences padded to the longest, runs them in a loop.
fn raw_row(
    session: &mut ort::session::Session,
    tokenizer: &tokenizers::Tokenizer,
    batch: usize,
    measure: Duration,
) -> anyhow::Result<Row> {
    let encodings = texts(batch)
        .iter()
        .map(|t| tokenizer.encode(t.as_str(), true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
    let width = encodings
        .iter()
        .map(|e| e.get_ids().len())
        .max()
        .unwrap_or(1);
    let mut ids = vec![0i64; batch * width];
    let mut mask = vec![0i64; batch * width];
    for (r, e) in encodings.iter().enumerate() {
        for (c, &id) in e.get_ids().iter().enumerate() {
            ids[r * width + c] = i64::from(id);
            mask[r * width + c] = 1;
        }
    }
    let wants_types = session
        .inputs()
        .iter()
        .any(|i| i.name() == "token_type_ids");
    let shape = vec![batch as i64, width as i64];
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < measure {
        let t = Instant::now();
        let mut inputs = vec![
            (
                "input_ids".to_string(),
                Tensor::from_array((shape.clone(), ids.clone()))?.into_dyn(),
            ),
            (
                "attention_mask".to_string(),
                Tensor::from_array((shape.clone(), mask.clone()))?.into_dyn(),
            ),
        ];
        if wants_types {
            inputs.push((
                "token_type_ids".to_string(),
                Tensor::from_array((shape.clone(), vec![0i64; batch * width]))?.into_dyn(),
            ));
        }
        session.run(inputs)?;
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    Ok(Row {
        case: format!("raw ONNX Runtime, batch {batch}"),
        sentences_per_s: (latencies.len() * batch) as f64 / elapsed,
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
    })
}

async fn worker_row(
    channel: &Channel,
    concurrency: usize,
    per_request: usize,
    measure: Duration,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let until = started + measure;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let mut client = EmbeddingServiceClient::new(channel.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let request = pb::EmbedRequest {
                    model: Some(pb::ModelRef {
                        name: MODEL.into(),
                        version: String::new(),
                    }),
                    inputs: texts(per_request),
                    ..Default::default()
                };
                let t = Instant::now();
                client.embed(request).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    Ok(Row {
        case: format!("worker Embed, {per_request} per request, concurrency {concurrency}"),
        sentences_per_s: (latencies.len() * per_request) as f64 / elapsed,
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
    })
}
