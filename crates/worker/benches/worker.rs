//! `cargo xtask bench worker`: the worker's throughput and latency against
//! the limit set by raw in-process ONNX Runtime, all in one run.
//!
//! Rows of the table:
//! - raw ONNX Runtime, batch 1 and the batcher's max batch (one session,
//!   called in a loop on one thread) — the limit;
//! - the worker over gRPC (loopback, raw tensor contents, as Triton clients
//!   send them) at concurrency 1, 8, 32, 64 with dynamic batching off and on.
//!
//! The model is an MLP fixture built by `lmgrid-test-support`. Sizes and
//! duration can be changed with `LMGRID_BENCH_SECONDS`,
//! `LMGRID_BENCH_MLP=in,hidden,layers,out` and `LMGRID_BENCH_DELAY` (the
//! batcher's `max_queue_delay`, default 200us).

use std::time::{Duration, Instant};

use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};
use lmgrid_test_support::onnx;
use lmgrid_worker::engine::{self, ProviderConfig, Runtime};
use lmgrid_worker::tensor::{DataType, Tensor, TensorData};
use tonic::transport::Channel;

mod support;
use support::{percentile_ms, start_worker};

const MAX_BATCH: usize = 64;

struct Row {
    case: String,
    /// Mean rows per model execution, from the worker's metrics.
    mean_batch: f64,
    concurrency: usize,
    batch: String,
    rows_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("LMGRID_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let measure = Duration::from_secs_f64(seconds);
    let sizes: Vec<usize> = std::env::var("LMGRID_BENCH_MLP")
        .ok()
        .map(|s| s.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| v.len() == 4)
        // The gateway benchmark's MLP (6.3 M parameters, ~0.75 ms a row at batch 1 here):
        // a model whose batch-1 call costs less than a gRPC request's own CPU shows the
        // HTTP/2 stack, not batching (docs/performance.md).
        .unwrap_or_else(|| vec![512, 2048, 2, 512]);
    let (input, hidden, layers, output) = (sizes[0], sizes[1], sizes[2], sizes[3]);
    let mlp = onnx::mlp(input, hidden, layers, output, 7);
    let delay = std::env::var("LMGRID_BENCH_DELAY").unwrap_or_else(|_| "200us".to_string());

    let dir = tempfile::tempdir()?;
    onnx::model_repository(
        dir.path(),
        "mlp-off",
        &[("1", &mlp.model)],
        &format!("max_batch_size: {MAX_BATCH}\n"),
    )?;
    onnx::model_repository(
        dir.path(),
        "mlp-dyn",
        &[("1", &mlp.model)],
        &format!(
            "max_batch_size: {MAX_BATCH}\ndynamic_batching:\n  max_queue_delay: {delay}\n  max_queue_size: 4096\n"
        ),
    )?;
    let model_path = dir.path().join("mlp-off/1/model.onnx");

    println!(
        "lmgrid worker benchmark: MLP {input}→{hidden}×{layers}→{output} (FP32), {seconds}s per row, max_queue_delay {delay}, {} CPUs, 1 intra-op thread per session",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows = Vec::new();

    // The limit: raw ONNX Runtime in this process, no gRPC, no queue.
    let runtime = Runtime::get(&Default::default())?;
    let (mut session, _, _) = runtime.session(&model_path, None, &ProviderConfig::default(), 1)?;
    for batch in [1, MAX_BATCH] {
        rows.push(raw_row(&mut session, batch, input, measure)?);
    }
    drop(session);

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    tokio.block_on(async {
        let worker =
            start_worker(dir.path(), &["mlp-dyn", "mlp-off"], Duration::from_secs(30)).await?;
        let addr = worker.addr;
        let channels: Vec<Channel> = {
            let mut v = Vec::new();
            for _ in 0..8 {
                v.push(
                    Channel::from_shared(format!("http://{addr}"))?
                        .tcp_nodelay(true)
                        .connect()
                        .await?,
                );
            }
            v
        };
        let x = onnx::random_f32(13, input);
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (model, label) in [("mlp-off", OFF), ("mlp-dyn", DYNAMIC)] {
            for concurrency in [1, 8, 32, 64] {
                rows.push(
                    load(&channels, model, label, concurrency, &bytes, input, measure).await?,
                );
            }
        }
        worker.stop().await?;
        anyhow::Ok(())
    })?;

    // The same batch policy: raw ONNX Runtime at the mean batch the dynamic
    // batcher formed at concurrency 64.
    if let Some(achieved) = rows
        .iter()
        .find(|r| r.case == DYNAMIC && r.concurrency == 64)
        .map(|r| r.mean_batch.round().clamp(1.0, MAX_BATCH as f64) as usize)
    {
        let (mut session, _, _) =
            runtime.session(&model_path, None, &ProviderConfig::default(), 1)?;
        let mut row = raw_row(&mut session, achieved, input, measure)?;
        row.case = "raw ONNX Runtime (batch the batcher formed at 64)".into();
        rows.push(row);
    }

    print_table(&rows);
    Ok(())
}

const OFF: &str = "worker, batching off";
const DYNAMIC: &str = "worker, dynamic batching";

/// Raw ONNX Runtime on one session in a loop: the limit for `batch` rows.
fn raw_row(
    session: &mut ort::session::Session,
    batch: usize,
    input: usize,
    measure: Duration,
) -> anyhow::Result<Row> {
    let outputs = vec![("y".to_string(), DataType::Fp32)];
    let tensor = Tensor {
        name: "x".into(),
        shape: vec![batch as i64, input as i64],
        data: TensorData::Fp32(onnx::random_f32(11, batch * input)),
    };
    for _ in 0..20 {
        engine::run(session, vec![tensor.clone()], &outputs)?;
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < measure {
        let t = Instant::now();
        engine::run(session, vec![tensor.clone()], &outputs)?;
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    Ok(Row {
        case: "raw ONNX Runtime".into(),
        mean_batch: batch as f64,
        concurrency: 1,
        batch: batch.to_string(),
        rows_per_s: (latencies.len() * batch) as f64 / elapsed,
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
    })
}

async fn load(
    channels: &[Channel],
    model: &str,
    label: &str,
    concurrency: usize,
    bytes: &[u8],
    input: usize,
    measure: Duration,
) -> anyhow::Result<Row> {
    let request = ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, input as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![bytes.to_vec()],
        ..Default::default()
    };
    let before = executions(model);
    let warmup = Duration::from_millis(300);
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = GrpcInferenceServiceClient::new(channels[i % channels.len()].clone());
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                client.model_infer(request.clone()).await?;
                if t >= start {
                    latencies.push(t.elapsed());
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    latencies.sort();
    let runs = executions(model) - before;
    let total_requests =
        latencies.len() as f64 * (measure + warmup).as_secs_f64() / measure.as_secs_f64();
    Ok(Row {
        case: label.to_string(),
        mean_batch: if runs > 0.0 {
            total_requests / runs
        } else {
            f64::NAN
        },
        concurrency,
        batch: "1/request".into(),
        rows_per_s: latencies.len() as f64 / measure.as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
    })
}

/// `lmgrid_worker_executions_total` of a model so far.
fn executions(model: &str) -> f64 {
    let needle = format!("lmgrid_worker_executions_total{{model=\"{model}\",version=\"1\"}} ");
    lmgrid_core::metrics::encode()
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0.0)
}

fn print_table(rows: &[Row]) {
    let raw_b1 = rows
        .iter()
        .find(|r| r.case.starts_with("raw") && r.batch == "1")
        .map_or(f64::NAN, |r| r.rows_per_s);
    let raw_max = rows
        .iter()
        .find(|r| r.case.starts_with("raw") && r.batch == MAX_BATCH.to_string())
        .map_or(f64::NAN, |r| r.rows_per_s);
    println!();
    println!(
        "| case | concurrency | batch | mean batch | rows/s | p50 ms | p99 ms | vs raw batch 1 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.3} | {:.3} | {:.2}× |",
            r.case,
            r.concurrency,
            r.batch,
            r.mean_batch,
            r.rows_per_s,
            r.p50_ms,
            r.p99_ms,
            r.rows_per_s / raw_b1
        );
    }
    let at = |case: &str, c: usize| {
        rows.iter()
            .find(|r| r.case == case && r.concurrency == c)
            .map_or(f64::NAN, |r| r.rows_per_s)
    };
    let off32 = at(OFF, 32);
    let dyn32 = at(DYNAMIC, 32);
    let off64 = at(OFF, 64);
    let off1 = at(OFF, 1);
    let dyn64 = at(DYNAMIC, 64);
    let same_policy = rows
        .iter()
        .find(|r| r.case.starts_with("raw ONNX Runtime (batch"))
        .map_or(f64::NAN, |r| r.rows_per_s);
    println!();
    println!(
        "dynamic batching vs batching off: {:.2}× at concurrency 32 (target ≥ 3×), {:.2}× at 64",
        dyn32 / off32,
        dyn64 / off64
    );
    println!(
        "worker over gRPC vs raw ONNX Runtime at the same batch policy (target ≥ 0.9×): batch 1 at concurrency 1: {:.2}×; dynamic batching at 64 vs raw at the batch it formed: {:.2}×; vs raw batch {MAX_BATCH}: {:.2}×",
        off1 / raw_b1,
        dyn64 / same_policy,
        dyn64 / raw_max
    );
}
