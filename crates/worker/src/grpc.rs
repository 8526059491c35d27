//! The worker's gRPC APIs.

use std::pin::Pin;

use lmgrid_core::error::not_yet_implemented;
use lmgrid_core::health::Readiness;
use lmgrid_core::oip;
use lmgrid_proto::inference as oip_pb;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const WORKER_ISSUE: &str = "the worker issue (ONNX Runtime inference with dynamic batching)";
const LM_ISSUE: &str = "the real language models issue (SmolLM2 generation, MiniLM embeddings)";

#[derive(Debug, Clone)]
pub(crate) struct WorkerApi {
    readiness: Readiness,
}

impl WorkerApi {
    pub(crate) fn new(readiness: Readiness) -> Self {
        WorkerApi { readiness }
    }
}

#[tonic::async_trait]
impl oip_pb::grpc_inference_service_server::GrpcInferenceService for WorkerApi {
    async fn server_live(
        &self,
        _: Request<oip_pb::ServerLiveRequest>,
    ) -> Result<Response<oip_pb::ServerLiveResponse>, Status> {
        Ok(Response::new(oip::server_live()))
    }

    async fn server_ready(
        &self,
        _: Request<oip_pb::ServerReadyRequest>,
    ) -> Result<Response<oip_pb::ServerReadyResponse>, Status> {
        Ok(Response::new(oip::server_ready(&self.readiness)))
    }

    async fn model_ready(
        &self,
        _: Request<oip_pb::ModelReadyRequest>,
    ) -> Result<Response<oip_pb::ModelReadyResponse>, Status> {
        Err(not_yet_implemented("ModelReady", WORKER_ISSUE))
    }

    async fn server_metadata(
        &self,
        _: Request<oip_pb::ServerMetadataRequest>,
    ) -> Result<Response<oip_pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(oip::server_metadata()))
    }

    async fn model_metadata(
        &self,
        _: Request<oip_pb::ModelMetadataRequest>,
    ) -> Result<Response<oip_pb::ModelMetadataResponse>, Status> {
        Err(not_yet_implemented("ModelMetadata", WORKER_ISSUE))
    }

    async fn model_infer(
        &self,
        _: Request<oip_pb::ModelInferRequest>,
    ) -> Result<Response<oip_pb::ModelInferResponse>, Status> {
        Err(not_yet_implemented("ModelInfer", WORKER_ISSUE))
    }
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::generation_service_server::GenerationService for WorkerApi {
    type GenerateStreamStream = GenerateStream;

    async fn generate(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        Err(not_yet_implemented("Generate", LM_ISSUE))
    }

    async fn generate_stream(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        Err(not_yet_implemented("GenerateStream", LM_ISSUE))
    }
}

#[tonic::async_trait]
impl pb::embedding_service_server::EmbeddingService for WorkerApi {
    async fn embed(
        &self,
        _: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        Err(not_yet_implemented("Embed", LM_ISSUE))
    }
}

#[tonic::async_trait]
impl pb::worker_control_service_server::WorkerControlService for WorkerApi {
    async fn load_model(
        &self,
        _: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        Err(not_yet_implemented("LoadModel", WORKER_ISSUE))
    }

    async fn unload_model(
        &self,
        _: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        Err(not_yet_implemented("UnloadModel", WORKER_ISSUE))
    }

    /// No model loader exists yet, so the worker truthfully serves none.
    async fn list_models(
        &self,
        _: Request<pb::ListWorkerModelsRequest>,
    ) -> Result<Response<pb::ListWorkerModelsResponse>, Status> {
        Ok(Response::new(pb::ListWorkerModelsResponse {
            models: Vec::new(),
        }))
    }

    /// Nothing runs yet, so nothing is in flight or queued.
    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::WorkerStats>, Status> {
        Ok(Response::new(pb::WorkerStats {
            accelerator: "cpu".to_string(),
            ..Default::default()
        }))
    }
}
