//! Which models and versions a worker serves and how it reports them: version policies,
//! metadata, execution providers, and the worker's record in discovery.

use lmgrid_proto::inference::ModelMetadataRequest;
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_test_support::onnx::{self, ElemType};
use lmgrid_worker::engine::Runtime;
use tonic::Code;

use crate::support::{
    Repo, TestWorker, assert_close, assert_status, entry, fp32_output, fp32_request, model_ready,
    state, summary, versions,
};

#[tokio::test(flavor = "multi_thread")]
async fn version_policies_choose_the_versions_served() -> anyhow::Result<()> {
    let identity = onnx::identity(ElemType::Float, &[4]);
    let seq = onnx::variable_seq();
    let three = [("1", &identity), ("2", &identity), ("3", &seq)];
    let repo = Repo::new()?
        .model(
            "latest",
            &three,
            "max_batch_size: 4\nversion_policy:\n  latest: 2\n",
        )?
        .model(
            "all",
            &three[..2],
            "max_batch_size: 4\nversion_policy: all\n",
        )?
        .model(
            "specific",
            &three,
            "max_batch_size: 4\nversion_policy:\n  specific: [1, 3]\n",
        )?
        .model("default", &three, "max_batch_size: 4\n")?;
    let worker = TestWorker::start(repo).await?;

    assert_eq!(versions(&worker, "latest").await?, ["2", "3"]);
    assert_eq!(versions(&worker, "all").await?, ["1", "2"]);
    assert_eq!(versions(&worker, "specific").await?, ["1", "3"]);
    assert_eq!(versions(&worker, "default").await?, ["3"]);

    // No version: the newest; a version the policy left out: NOT_FOUND.
    let x = vec![1.0, 2.0, 3.0, 4.0];
    let mut client = worker.infer.clone();
    let newest = client
        .model_infer(fp32_request("latest", 1, x.clone()))
        .await?
        .into_inner();
    assert_eq!(
        (newest.model_version.as_str(), fp32_output(&newest, 0)),
        ("3", vec![2.0, 4.0, 6.0, 8.0])
    );
    let mut second = fp32_request("latest", 1, x.clone());
    second.model_version = "2".to_string();
    let answer = client.model_infer(second.clone()).await?.into_inner();
    assert_eq!(
        (answer.model_version.as_str(), fp32_output(&answer, 0)),
        ("2", x.clone())
    );
    second.model_version = "1".to_string();
    let result = client.model_infer(second).await;
    assert_status(result, Code::NotFound, &["'1'", "ready: 2, 3"]);

    // Metadata describes the version asked for; -1 marks a dynamic dimension.
    let metadata = |version: &str| ModelMetadataRequest {
        name: "latest".to_string(),
        version: version.to_string(),
    };
    let v3 = client.model_metadata(metadata("3")).await?.into_inner();
    assert_eq!(
        (v3.name.as_str(), v3.platform.as_str()),
        ("latest", "onnxruntime_onnx")
    );
    let tensors = |t: &[lmgrid_proto::inference::model_metadata_response::TensorMetadata]| {
        t.iter()
            .map(|t| (t.name.clone(), t.datatype.clone(), t.shape.clone()))
            .collect::<Vec<_>>()
    };
    let fp32 = |name: &str, shape: &[i64]| (name.to_string(), "FP32".to_string(), shape.to_vec());
    assert_eq!(tensors(&v3.inputs), [fp32("x", &[-1, -1])]);
    assert_eq!(tensors(&v3.outputs), [fp32("y", &[-1, -1])]);
    let v2 = client.model_metadata(metadata("2")).await?.into_inner();
    assert_eq!(tensors(&v2.inputs), [fp32("x", &[-1, 4])]);
    let result = client.model_metadata(metadata("1")).await;
    assert_status(result, Code::NotFound, &["'latest'", "'1'"]);

    let listed = summary(&worker.list().await?);
    let ready = pb::ModelState::Ready;
    assert!(listed.contains(&entry("latest", "2", ready)), "{listed:?}");
    assert!(
        !listed.iter().any(|(n, v, _)| n == "latest" && v == "1"),
        "{listed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cuda_without_a_gpu_fails_or_falls_back_as_configured() -> anyhow::Result<()> {
    let mlp = onnx::mlp(8, 16, 1, 4, 21);
    let strict = "max_batch_size: 4\nexecution_provider:\n  kind: cuda\n";
    let lenient =
        "max_batch_size: 4\nexecution_provider:\n  kind: cuda\n  on_unavailable: fallback_to_cpu\n";
    let repo = Repo::new()?
        .model("strict", &[("1", &mlp.model)], strict)?
        .model("lenient", &[("1", &mlp.model)], lenient)?;
    let worker = TestWorker::start(repo).await?;
    let listed = worker.list().await?;
    let find = |name: &str| listed.iter().find(|m| m.name == name).cloned().expect(name);

    // The ONNX Runtime library `cargo xtask deps` installs is the CPU build; with a CUDA
    // build on a GPU machine both models run on the GPU instead.
    let cuda = Runtime::get(&Default::default())?.cuda_available()?;
    let (strict, lenient) = (find("strict"), find("lenient"));
    if cuda {
        assert_eq!(strict.execution_provider, "cuda:0", "{strict:?}");
        assert_eq!(lenient.execution_provider, "cuda:0", "{lenient:?}");
        return Ok(());
    }
    assert_eq!(state(&strict), pb::ModelState::Failed, "{strict:?}");
    assert!(strict.error.contains("CUDA"), "{strict:?}");
    assert!(
        strict.error.contains("fallback_to_cpu"),
        "the error says how to fall back"
    );
    assert!(!model_ready(&worker, "strict", "").await?);

    assert_eq!(
        (state(&lenient), lenient.execution_provider.as_str()),
        (pb::ModelState::Ready, "cpu (cuda unavailable)")
    );
    let x = onnx::random_f32(8, 8);
    let response = worker
        .infer
        .clone()
        .model_infer(fp32_request("lenient", 1, x.clone()))
        .await?;
    assert_close(
        &fp32_output(&response.into_inner(), 0),
        &mlp.reference(&x),
        1e-5,
        "lenient",
    );
    let load = worker
        .record()
        .await?
        .load
        .expect("the record carries the load");
    assert_eq!(load.accelerator, "cpu");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_registers_its_models_versions_and_load() -> anyhow::Result<()> {
    let identity = onnx::identity(ElemType::Int32, &[2]);
    let repo = Repo::new()?
        .model(
            "a",
            &[("1", &identity), ("2", &identity)],
            "version_policy:\n  latest: 2\n",
        )?
        .model("b", &[("5", &identity)], "instance_count: 2\n")?;
    let worker = TestWorker::start(repo).await?;

    let record = worker.record().await?;
    assert_eq!(record.service, "worker");
    assert_eq!(record.address, worker.addr.to_string());
    let served: Vec<(&str, &str)> = record
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.version.as_str()))
        .collect();
    assert_eq!(served, [("a", "1"), ("a", "2"), ("b", "5")]);
    let load = record.load.clone().expect("the record carries the load");
    assert_eq!(
        (load.instances, load.in_flight, load.queue_depth),
        (4, 0, 0)
    );
    assert_eq!(load.accelerator, "cpu");

    // The record follows the model table.
    worker
        .control
        .clone()
        .unload_model(pb::UnloadModelRequest {
            name: "a".to_string(),
            version: "1".to_string(),
        })
        .await?;
    let record = worker.record_where(|r| r.models.len() == 2).await?;
    let served: Vec<String> = record
        .models
        .iter()
        .map(|m| format!("{}/{}", m.name, m.version))
        .collect();
    assert_eq!(served, ["a/2", "b/5"]);
    assert_eq!(record.load.as_ref().map(|l| l.instances), Some(3));
    worker.stop().await
}
