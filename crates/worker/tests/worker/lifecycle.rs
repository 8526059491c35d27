//! Models come and go at run time: unloads and reloads under traffic lose no request, and a
//! model that fails to load leaves the others serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_test_support::onnx::{self, ElemType};
use tokio::task::JoinSet;
use tonic::Code;

use crate::support::{
    PATIENCE, Repo, SLOW_CONFIG, SLOW_ROWS, TestWorker, assert_close, assert_status, dim, entry,
    fp32_output, fp32_request, model_ready, occupy, slow_model, state, summary, versions,
    wait_for_load,
};

#[tokio::test(flavor = "multi_thread")]
async fn unloading_finishes_in_flight_requests_and_refuses_new_ones() -> anyhow::Result<()> {
    let slow = slow_model();
    let repo = Repo::new()?
        .model("slow", &[("1", &slow.model)], SLOW_CONFIG)?
        .model(
            "other",
            &[("1", &onnx::variable_seq())],
            "max_batch_size: 4\n",
        )?;
    let worker = TestWorker::start(repo).await?;

    // One request computing and six waiting behind it when the unload lands.
    let first = occupy(&worker, "slow");
    wait_for_load(&worker, "slow", 1, 0, &first).await?;
    let mut queued = JoinSet::new();
    for i in 0..6u64 {
        let mut client = worker.infer.clone();
        let x = onnx::random_f32(i, 64);
        queued.spawn(async move {
            (
                x.clone(),
                client.model_infer(fp32_request("slow", 1, x)).await,
            )
        });
    }
    wait_for_load(&worker, "slow", 1, 6, &first).await?;

    // Meanwhile more traffic, racing the unload: each request either is admitted before it
    // lands, and completes, or after, and is told the model is gone.
    let unloaded = Arc::new(AtomicBool::new(false));
    let mut traffic = JoinSet::new();
    for i in 0..4u64 {
        let mut client = worker.infer.clone();
        let unloaded = unloaded.clone();
        traffic.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let after = unloaded.load(Ordering::SeqCst);
                let x = onnx::random_f32(100 + i, 64);
                let result = client.model_infer(fp32_request("slow", 1, x)).await;
                let gone = result.as_ref().is_err_and(|e| e.code() == Code::NotFound);
                outcomes.push(result.map(|_| ()));
                if after && gone {
                    return outcomes;
                }
            }
        });
    }

    worker
        .control
        .clone()
        .unload_model(pb::UnloadModelRequest {
            name: "slow".to_string(),
            version: String::new(),
        })
        .await?;
    unloaded.store(true, Ordering::SeqCst);

    let result = worker
        .infer
        .clone()
        .model_infer(fp32_request("slow", 1, vec![0.0; 64]))
        .await;
    assert_status(result, Code::NotFound, &["'slow'", "not served"]);
    assert_status(
        model_ready(&worker, "slow", "").await,
        Code::NotFound,
        &["'slow'"],
    );
    assert_eq!(
        summary(&worker.list().await?),
        [entry("other", "1", pb::ModelState::Ready)]
    );

    // Everything admitted before the unload completes, with the right answer.
    let response = tokio::time::timeout(PATIENCE, first).await???.into_inner();
    assert_eq!(response.outputs[0].shape, vec![dim(SLOW_ROWS), 64]);
    while let Some(joined) = queued.join_next().await {
        let (x, result) = joined?;
        let y = fp32_output(&result?.into_inner(), 0);
        assert_close(
            &y,
            &slow.reference(&x),
            1e-4,
            "a request queued before the unload",
        );
    }
    // Traffic racing the unload either completed or was told the model is gone.
    while let Some(joined) = tokio::time::timeout(PATIENCE, traffic.join_next()).await? {
        for outcome in joined? {
            match outcome {
                Ok(()) => {}
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => panic!("a request racing the unload failed: {status:?}"),
            }
        }
    }

    worker
        .record_where(|r| !r.models.iter().any(|m| m.name == "slow"))
        .await?;
    let x = vec![1.0, 2.0];
    let other = worker
        .infer
        .clone()
        .model_infer(fp32_request("other", 1, x))
        .await?;
    assert_eq!(fp32_output(&other.into_inner(), 0), [2.0, 4.0]);
    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_load_leaves_the_other_models_serving() -> anyhow::Result<()> {
    let good = onnx::mlp(8, 16, 1, 4, 3);
    let repo = Repo::new()?
        .broken("broken")?
        .model("good", &[("1", &good.model)], "max_batch_size: 8\n")?
        .model("misconfigured", &[("1", &good.model)], "max_batch: 8\n")?
        .model(
            "unbatchable",
            &[("1", &onnx::add_mul())],
            "max_batch_size: 0\n",
        )?;
    std::fs::create_dir_all(repo.path().join("empty"))?;
    let worker = TestWorker::start(repo).await?;

    let listed = worker.list().await?;
    let find = |name: &str| listed.iter().find(|m| m.name == name).cloned();
    let broken = find("broken").expect("broken is listed");
    assert_eq!(
        (broken.version.as_str(), state(&broken)),
        ("1", pb::ModelState::Failed)
    );
    assert!(broken.error.contains("model.onnx"), "{broken:?}");
    let misconfigured = find("misconfigured").expect("misconfigured is listed");
    assert_eq!(state(&misconfigured), pb::ModelState::Failed);
    assert!(
        misconfigured.error.contains("config.yaml") && misconfigured.error.contains("max_batch"),
        "{misconfigured:?}"
    );
    let empty = find("empty").expect("empty is listed");
    assert_eq!(state(&empty), pb::ModelState::Failed);
    assert!(empty.error.contains("no version"), "{empty:?}");
    let ready = find("good").expect("good is listed");
    assert_eq!(
        (
            state(&ready),
            ready.execution_provider.as_str(),
            ready.instances
        ),
        (pb::ModelState::Ready, "cpu", 1)
    );
    assert!(ready.error.is_empty());
    // A model without a batch dimension serves requests as sent.
    let unbatchable = find("unbatchable").expect("unbatchable is listed");
    assert_eq!(state(&unbatchable), pb::ModelState::Ready);

    assert!(!model_ready(&worker, "broken", "").await?);
    assert!(!model_ready(&worker, "misconfigured", "").await?);
    assert!(model_ready(&worker, "good", "").await?);
    assert!(model_ready(&worker, "good", "1").await?);
    assert!(!model_ready(&worker, "good", "2").await?);
    assert_status(
        model_ready(&worker, "nope", "").await,
        Code::NotFound,
        &["'nope'"],
    );
    let result = worker
        .infer
        .clone()
        .model_infer(fp32_request("broken", 1, vec![0.0; 8]))
        .await;
    assert_status(result, Code::NotFound, &["'broken'", "ready: none"]);

    let x = onnx::random_f32(4, 16);
    let response = worker
        .infer
        .clone()
        .model_infer(fp32_request("good", 2, x.clone()))
        .await?;
    assert_close(
        &fp32_output(&response.into_inner(), 0),
        &good.reference(&x),
        1e-5,
        "good",
    );

    // Loading a broken model again reports the failure and still changes nothing else.
    let mut control = worker.control.clone();
    let load = pb::LoadModelRequest {
        name: "broken".to_string(),
        version: String::new(),
    };
    let reloaded = control.load_model(load).await?.into_inner().models;
    assert_eq!(
        summary(&reloaded),
        [entry("broken", "1", pb::ModelState::Failed)]
    );
    assert!(!reloaded[0].error.is_empty());
    let load = pb::LoadModelRequest {
        name: "misconfigured".to_string(),
        version: String::new(),
    };
    let result = control.load_model(load).await;
    assert_status(result, Code::FailedPrecondition, &["max_batch"]);

    let record = worker.record().await?;
    let served: Vec<&str> = record.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(served, ["good", "unbatchable"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_load_and_unload_at_run_time_without_a_gap() -> anyhow::Result<()> {
    let identity = onnx::identity(ElemType::Float, &[4]);
    let repo = Repo::new()?.model("m", &[("1", &identity)], "max_batch_size: 4\n")?;
    let worker = TestWorker::start(repo).await?;
    let x = vec![1.0, -2.0, 3.5, 0.25];
    let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    let response = worker
        .infer
        .clone()
        .model_infer(fp32_request("m", 1, x.clone()))
        .await?;
    assert_eq!(response.into_inner().model_version, "1");

    // Requests keep flowing while version 2 replaces version 1: each is answered by one
    // version or the other, never refused.
    let done = Arc::new(AtomicBool::new(false));
    let mut traffic = JoinSet::new();
    for _ in 0..3 {
        let (mut client, done, x) = (worker.infer.clone(), done.clone(), x.clone());
        traffic.spawn(async move {
            let mut answers = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let result = client.model_infer(fp32_request("m", 1, x.clone())).await;
                answers.push(result.map(|r| {
                    let r = r.into_inner();
                    (r.model_version.clone(), fp32_output(&r, 0))
                }));
            }
            answers
        });
    }
    worker.repo().add_version("m", "2", &onnx::variable_seq());
    let mut control = worker.control.clone();
    let loaded = control
        .load_model(pb::LoadModelRequest {
            name: "m".to_string(),
            version: String::new(),
        })
        .await?
        .into_inner()
        .models;
    assert_eq!(summary(&loaded), [entry("m", "2", pb::ModelState::Ready)]);
    let response = worker
        .infer
        .clone()
        .model_infer(fp32_request("m", 1, x.clone()))
        .await?;
    let response = response.into_inner();
    assert_eq!(
        (response.model_version.as_str(), fp32_output(&response, 0)),
        ("2", doubled.clone())
    );
    done.store(true, Ordering::SeqCst);
    while let Some(answers) = traffic.join_next().await {
        for answer in answers? {
            match answer {
                Ok((version, y)) if version == "1" => assert_eq!(y, x),
                Ok((version, y)) if version == "2" => assert_eq!(y, doubled),
                other => panic!("during the reload: {other:?}"),
            }
        }
    }
    let mut one = fp32_request("m", 1, x.clone());
    one.model_version = "1".to_string();
    let result = worker.infer.clone().model_infer(one.clone()).await;
    assert_status(result, Code::NotFound, &["'1'", "ready: 2"]);

    // An explicit version loads beside the policy's; unloading one version keeps the other.
    let request = |name: &str, version: &str| pb::LoadModelRequest {
        name: name.to_string(),
        version: version.to_string(),
    };
    control.load_model(request("m", "1")).await?;
    assert_eq!(versions(&worker, "m").await?, ["1", "2"]);
    let answer = worker
        .infer
        .clone()
        .model_infer(one.clone())
        .await?
        .into_inner();
    assert_eq!(fp32_output(&answer, 0), x);
    let unload = |name: &str, version: &str| pb::UnloadModelRequest {
        name: name.to_string(),
        version: version.to_string(),
    };
    control.unload_model(unload("m", "1")).await?;
    assert_eq!(versions(&worker, "m").await?, ["2"]);

    let result = control.unload_model(unload("m", "1")).await;
    assert_status(result, Code::NotFound, &["'m'", "version 1"]);
    let result = control.unload_model(unload("nope", "")).await;
    assert_status(result, Code::NotFound, &["'nope'"]);
    let result = control.load_model(request("nope", "")).await;
    assert_status(result, Code::NotFound, &["'nope'"]);
    let result = control.load_model(request("m", "7")).await;
    assert_status(result, Code::NotFound, &["'m'", "version 7"]);
    let result = control.load_model(request("m", "two")).await;
    assert_status(result, Code::InvalidArgument, &["'two'"]);

    // A model added to the repository while the worker runs loads on request.
    let late = onnx::mlp(4, 8, 1, 2, 9);
    onnx::model_repository(worker.repo().path(), "late", &[("3", &late.model)], "")?;
    let loaded = control
        .load_model(request("late", ""))
        .await?
        .into_inner()
        .models;
    assert_eq!(
        summary(&loaded),
        [entry("late", "3", pb::ModelState::Ready)]
    );
    // Without max_batch_size the model's own leading dimension is sent as is.
    let response = worker
        .infer
        .clone()
        .model_infer(fp32_request("late", 1, x.clone()))
        .await?;
    assert_close(
        &fp32_output(&response.into_inner(), 0),
        &late.reference(&x),
        1e-5,
        "late",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reload_keeps_the_loaded_version_serving() -> anyhow::Result<()> {
    let identity = onnx::identity(ElemType::Float, &[4]);
    let repo = Repo::new()?.model("m", &[("1", &identity)], "max_batch_size: 4\n")?;
    let worker = TestWorker::start(repo).await?;
    let x = vec![1.0, 2.0, 3.0, 4.0];

    // The file of the serving version is replaced by garbage, then reloaded.
    std::fs::write(worker.repo().path().join("m/1/model.onnx"), onnx::broken())?;
    let status = worker
        .control
        .clone()
        .load_model(pb::LoadModelRequest {
            name: "m".to_string(),
            version: String::new(),
        })
        .await
        .expect_err("the reload fails");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("keeps serving"), "{status:?}");

    // The loaded version is untouched: listed ready, and answering.
    assert_eq!(
        summary(&worker.list().await?),
        [entry("m", "1", pb::ModelState::Ready)]
    );
    let response = worker
        .infer
        .clone()
        .model_infer(fp32_request("m", 1, x.clone()))
        .await?;
    assert_eq!(fp32_output(&response.into_inner(), 0), x);
    worker.stop().await
}
