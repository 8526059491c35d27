//! The gRPC surface: server-level answers are true, a worker without models says so, RPCs
//! that are not there yet say which issue brings them, and reflection lists what is served.

use anyhow::Context as _;
use lmgrid_integration_tests::{Sandbox, connect};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::{
    ModelInferRequest, ModelReadyRequest, ServerLiveRequest, ServerMetadataRequest,
    ServerReadyRequest,
};
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::service_names;
use lmgrid_test_support::EtcdServer;
use tonic::Code;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ListServiceResponse, ServerReflectionRequest};

/// Asserts that `result` is `UNIMPLEMENTED` with a message naming `rpc`.
fn assert_unimplemented<T: std::fmt::Debug>(result: Result<T, tonic::Status>, rpc: &str) {
    let status = result.expect_err(rpc);
    assert_eq!(status.code(), Code::Unimplemented, "{rpc}: {status:?}");
    assert!(status.message().contains(rpc), "{rpc}: {status:?}");
}

/// Asserts that `result` is `code` with a message containing `needle`.
fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err(needle);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_without_models_answers_server_rpcs_and_serves_no_model() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd).worker().build().await?;
    let channel = connect(sandbox.node("worker").grpc_addr()).await?;

    let mut oip = GrpcInferenceServiceClient::new(channel.clone());
    assert!(
        oip.server_live(ServerLiveRequest {})
            .await?
            .into_inner()
            .live
    );
    assert!(
        oip.server_ready(ServerReadyRequest {})
            .await?
            .into_inner()
            .ready
    );
    let metadata = oip
        .server_metadata(ServerMetadataRequest {})
        .await?
        .into_inner();
    assert_eq!(metadata.name, "lmgrid");
    assert_eq!(metadata.version, lmgrid_core::VERSION);
    let infer = ModelInferRequest {
        model_name: "mlp".to_string(),
        ..Default::default()
    };
    assert_code(oip.model_infer(infer).await, Code::NotFound, "'mlp'");
    let ready = ModelReadyRequest {
        name: "mlp".to_string(),
        version: String::new(),
    };
    assert_code(oip.model_ready(ready).await, Code::NotFound, "'mlp'");

    let mut control =
        pb::worker_control_service_client::WorkerControlServiceClient::new(channel.clone());
    let models = control
        .list_models(pb::ListWorkerModelsRequest::default())
        .await?
        .into_inner();
    assert!(models.models.is_empty(), "{models:?}");
    let stats = control
        .get_stats(pb::GetStatsRequest::default())
        .await?
        .into_inner();
    assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
    let load = pb::LoadModelRequest {
        name: "mlp".to_string(),
        version: String::new(),
    };
    let result = control.load_model(load).await;
    assert_code(result, Code::NotFound, "no model repository");

    let mut generation = pb::generation_service_client::GenerationServiceClient::new(channel);
    let result = generation.generate(pb::GenerateRequest::default()).await;
    assert_code(result, Code::InvalidArgument, "model name is empty");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_names_the_rpcs_it_does_not_implement_yet() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .dispatcher()
        .registry()
        .notification()
        .gateway()
        .build()
        .await?;

    let dispatcher = connect(sandbox.node("dispatcher").grpc_addr()).await?;
    let mut jobs = pb::job_service_client::JobServiceClient::new(dispatcher);
    assert_unimplemented(jobs.get_job(pb::GetJobRequest::default()).await, "GetJob");

    let registry = connect(sandbox.node("model-registry").grpc_addr()).await?;
    let mut models = pb::registry_service_client::RegistryServiceClient::new(registry);
    assert_unimplemented(
        models.list_models(pb::ListModelsRequest::default()).await,
        "ListModels",
    );

    let notification = connect(sandbox.node("notification").grpc_addr()).await?;
    let mut events = pb::notification_service_client::NotificationServiceClient::new(notification);
    assert_unimplemented(events.query(pb::QueryRequest::default()).await, "Query");

    let gateway = connect(sandbox.node("gateway").grpc_addr()).await?;
    let mut oip = GrpcInferenceServiceClient::new(gateway.clone());
    assert_eq!(
        oip.server_metadata(ServerMetadataRequest {})
            .await?
            .into_inner()
            .name,
        "lmgrid"
    );
    let result = oip.model_infer(ModelInferRequest::default()).await;
    assert_code(result, Code::InvalidArgument, "model name is empty");
    let mut embeddings = pb::embedding_service_client::EmbeddingServiceClient::new(gateway.clone());
    let result = embeddings.embed(pb::EmbedRequest::default()).await;
    assert_code(result, Code::InvalidArgument, "model name is empty");
    let mut generation =
        pb::generation_service_client::GenerationServiceClient::new(gateway.clone());
    let result = generation.generate(pb::GenerateRequest::default()).await;
    assert_code(result, Code::InvalidArgument, "model name is empty");
    let result = generation
        .generate(pb::GenerateRequest {
            model: Some(pb::ModelRef {
                name: "llm".to_string(),
                version: String::new(),
            }),
            ..Default::default()
        })
        .await;
    assert_code(result, Code::Unavailable, "no worker is ready");
    let mut jobs = pb::job_service_client::JobServiceClient::new(gateway);
    assert_unimplemented(jobs.get_job(pb::GetJobRequest::default()).await, "GetJob");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_served_services() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd).worker().build().await?;
    let channel = connect(sandbox.node("worker").grpc_addr()).await?;

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses
        .message()
        .await?
        .context("reflection sent no response")?;
    let Some(MessageResponse::ListServicesResponse(ListServiceResponse { service })) =
        response.message_response
    else {
        panic!("not a list of services: {response:?}");
    };
    let names: Vec<&str> = service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        service_names::INFERENCE,
        service_names::GENERATION,
        service_names::EMBEDDING,
        service_names::WORKER_CONTROL,
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    Ok(())
}
