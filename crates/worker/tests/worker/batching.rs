//! The dynamic batcher: batched results equal unbatched ones, requests of different shapes
//! never share a batch, a full queue refuses instead of growing, and requests whose deadline
//! passes while they wait are answered without being computed.

use std::time::Duration;

use lmgrid_test_support::onnx;
use tokio::task::JoinSet;
use tonic::Code;

use crate::support::{
    PATIENCE, Repo, SLOW_CONFIG, TestWorker, assert_close, assert_status, fp32_output,
    fp32_request, metric, occupy, slow_model, wait_for_load, with_parameter,
};

/// Reference and ONNX Runtime sum in different orders; this bounds the difference for the
/// sizes used here.
const TOLERANCE: f32 = 1e-5;

#[tokio::test(flavor = "multi_thread")]
async fn batched_results_equal_unbatched_results_element_by_element() -> anyhow::Result<()> {
    let mlp = onnx::mlp(64, 256, 2, 32, 11);
    // A delay far above the time the requests take to arrive, so that batches form even on
    // a busy machine; full batches (32 rows) run without waiting for it.
    let batched = "max_batch_size: 32\ndynamic_batching:\n  max_queue_delay: 100ms\n";
    let repo = Repo::new()?
        .model("batched", &[("1", &mlp.model)], batched)?
        .model("single", &[("1", &mlp.model)], "max_batch_size: 32\n")?;
    let worker = TestWorker::start(repo).await?;

    let requests: Vec<(usize, Vec<f32>)> = (0..24)
        .map(|i| {
            let rows = i % 4 + 1;
            (rows, onnx::random_f32(100 + i as u64, rows * 64))
        })
        .collect();
    let mut calls = JoinSet::new();
    for (i, (rows, x)) in requests.iter().cloned().enumerate() {
        let mut client = worker.infer.clone();
        calls.spawn(async move {
            let response = client.model_infer(fp32_request("batched", rows, x)).await;
            (i, response)
        });
    }
    let mut batched_outputs = vec![Vec::new(); requests.len()];
    while let Some(joined) = calls.join_next().await {
        let (i, response) = joined?;
        let response = response?.into_inner();
        let rows = requests[i].0;
        assert_eq!(
            response.outputs[0].shape,
            vec![rows as i64, 32],
            "request {i}"
        );
        batched_outputs[i] = fp32_output(&response, 0);
    }

    // The batcher ran fewer executions than requests, and no batch exceeded 32 rows.
    let executions = metric("lmgrid_worker_executions_total", "batched");
    let rows_total: usize = requests.iter().map(|(rows, _)| rows).sum();
    assert!(
        executions >= 1.0 && executions < requests.len() as f64,
        "{executions} executions for {} requests: nothing was batched",
        requests.len()
    );
    assert_eq!(
        metric("lmgrid_worker_batch_size_sum", "batched"),
        rows_total as f64
    );
    assert_eq!(
        metric("lmgrid_worker_batch_size_count", "batched"),
        executions
    );
    assert!(
        (executions * 32.0) >= rows_total as f64,
        "{rows_total} rows in {executions} batches of at most 32"
    );

    let mut client = worker.infer.clone();
    for (i, (rows, x)) in requests.iter().enumerate() {
        let what = format!("request {i} ({rows} rows)");
        assert_close(&batched_outputs[i], &mlp.reference(x), TOLERANCE, &what);
        let alone = client
            .model_infer(fp32_request("single", *rows, x.clone()))
            .await?
            .into_inner();
        assert_close(
            &batched_outputs[i],
            &fp32_output(&alone, 0),
            TOLERANCE,
            &what,
        );
    }
    assert_eq!(
        metric("lmgrid_worker_executions_total", "single"),
        requests.len() as f64,
        "without dynamic batching every request runs alone"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_with_different_shapes_are_never_batched_together() -> anyhow::Result<()> {
    let config = "max_batch_size: 16\ndynamic_batching:\n  max_queue_delay: 100ms\n";
    let repo = Repo::new()?.model("seq", &[("1", &onnx::variable_seq())], config)?;
    let worker = TestWorker::start(repo).await?;

    let mut calls = JoinSet::new();
    for i in 0..30usize {
        let (rows, seq) = (i % 2 + 1, i % 5 + 1);
        let x: Vec<f32> = (0..rows * seq).map(|k| (i * 100 + k) as f32).collect();
        let mut client = worker.infer.clone();
        calls.spawn(async move {
            let response = client
                .model_infer(fp32_request("seq", rows, x.clone()))
                .await;
            (rows, seq, x, response)
        });
    }
    while let Some(joined) = calls.join_next().await {
        let (rows, seq, x, response) = joined?;
        let response = response?.into_inner();
        assert_eq!(response.outputs[0].shape, vec![rows as i64, seq as i64]);
        let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        assert_eq!(fp32_output(&response, 0), doubled, "{rows}x{seq}");
    }
    let executions = metric("lmgrid_worker_executions_total", "seq");
    assert!(
        (5.0..30.0).contains(&executions),
        "{executions} executions for 30 requests of 5 lengths"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_refuses_requests_and_none_hang() -> anyhow::Result<()> {
    let slow = slow_model();
    let config = "max_batch_size: 2048\ninstance_count: 1\n\
                  dynamic_batching:\n  max_queue_size: 2\n  max_queue_delay: 1ms\n";
    let worker =
        TestWorker::start(Repo::new()?.model("slow", &[("1", &slow.model)], config)?).await?;
    let blocker = occupy(&worker, "slow");
    wait_for_load(&worker, "slow", 1, 0, &blocker).await?;

    let mut calls = JoinSet::new();
    for i in 0..40u64 {
        let mut client = worker.infer.clone();
        let x = onnx::random_f32(i, 64);
        calls.spawn(async move {
            (
                x.clone(),
                client.model_infer(fp32_request("slow", 1, x)).await,
            )
        });
    }
    let (mut ok, mut refused) = (0, 0);
    let all = async {
        while let Some(joined) = calls.join_next().await {
            let (x, result) = joined?;
            match result {
                Ok(response) => {
                    let y = fp32_output(&response.into_inner(), 0);
                    assert_close(&y, &slow.reference(&x), 1e-4, "an admitted request");
                    ok += 1;
                }
                Err(status) => {
                    assert_status::<()>(
                        Err(status),
                        Code::ResourceExhausted,
                        &["queue of 2 requests is full"],
                    );
                    refused += 1;
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(PATIENCE, all).await??;
    assert!(ok >= 1, "no request was admitted");
    assert!(refused >= 1, "the queue of 2 never filled: {ok} admitted");
    tokio::time::timeout(PATIENCE, blocker).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_whose_deadline_passes_in_the_queue_are_not_computed() -> anyhow::Result<()> {
    // No dynamic batching: every request is one execution, which the test counts. The
    // model has a name of its own: the counter is the process's, and other tests run
    // a "slow" model beside this one.
    let slow = slow_model();
    let repo = Repo::new()?.model("expiring", &[("1", &slow.model)], SLOW_CONFIG)?;
    let worker = TestWorker::start(repo).await?;
    let executions = || metric("lmgrid_worker_executions_total", "expiring");

    for case in ["timeout parameter", "grpc-timeout"] {
        let before = executions();
        // One request computing and one waiting: the expiring request queues behind both.
        let first = occupy(&worker, "expiring");
        wait_for_load(&worker, "expiring", 1, 0, &first).await?;
        let second = occupy(&worker, "expiring");
        wait_for_load(&worker, "expiring", 1, 1, &first).await?;

        let request = fp32_request("expiring", 1, onnx::random_f32(9, 64));
        let mut client = worker.infer.clone();
        let result = if case == "timeout parameter" {
            // Microseconds, as Triton's `timeout` parameter.
            client
                .model_infer(with_parameter(request, "timeout", 1_000))
                .await
        } else {
            let mut request = tonic::Request::new(request);
            request.set_timeout(Duration::from_millis(1));
            client.model_infer(request).await
        };
        let status = result.expect_err(case);
        match (case, status.code()) {
            (_, Code::DeadlineExceeded) => {
                assert!(status.message().contains("deadline"), "{case}: {status:?}");
            }
            // tonic's client enforces `grpc-timeout` itself and reports its expiry as
            // CANCELLED, before the worker's own DEADLINE_EXCEEDED can arrive.
            ("grpc-timeout", Code::Cancelled) => {
                assert!(status.message().contains("Timeout expired"), "{status:?}");
            }
            _ => panic!("{case}: {status:?}"),
        }
        first.await??;
        second.await??;
        // Once the queue has moved on, the expired request turns out never to have run.
        client
            .model_infer(fp32_request("expiring", 1, onnx::random_f32(10, 64)))
            .await?;
        assert_eq!(
            executions() - before,
            3.0,
            "{case}: the expired request was computed"
        );
    }
    Ok(())
}
