//! The gateway's gRPC APIs: the Open Inference Protocol and embeddings, with
//! model RPCs forwarded to a worker serving the model; generation and jobs
//! arrive with their issues.

use std::pin::Pin;
use std::sync::Arc;

use lmgrid_core::error::not_yet_implemented;
use lmgrid_core::health::Readiness;
use lmgrid_core::{deadline, oip};
use lmgrid_proto::inference as oip_pb;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::routing::{Workers, forward};

const ISSUE: &str = "the gateway issue (routing to workers, tenants, admission)";

#[derive(Debug, Clone)]
pub(crate) struct GatewayApi {
    readiness: Readiness,
    workers: Arc<Workers>,
}

impl GatewayApi {
    pub(crate) fn new(readiness: Readiness, workers: Arc<Workers>) -> Self {
        GatewayApi { readiness, workers }
    }
}

#[tonic::async_trait]
impl oip_pb::grpc_inference_service_server::GrpcInferenceService for GatewayApi {
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
        request: Request<oip_pb::ModelReadyRequest>,
    ) -> Result<Response<oip_pb::ModelReadyResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let mut client = self.workers.client_for(&request.name, &request.version)?;
        client.model_ready(forward(request, deadline)?).await
    }

    async fn server_metadata(
        &self,
        _: Request<oip_pb::ServerMetadataRequest>,
    ) -> Result<Response<oip_pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(oip::server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<oip_pb::ModelMetadataRequest>,
    ) -> Result<Response<oip_pb::ModelMetadataResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let mut client = self.workers.client_for(&request.name, &request.version)?;
        client.model_metadata(forward(request, deadline)?).await
    }

    async fn model_infer(
        &self,
        request: Request<oip_pb::ModelInferRequest>,
    ) -> Result<Response<oip_pb::ModelInferResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let mut client = self
            .workers
            .client_for(&request.model_name, &request.model_version)?;
        client.model_infer(forward(request, deadline)?).await
    }
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::generation_service_server::GenerationService for GatewayApi {
    type GenerateStreamStream = GenerateStream;

    async fn generate(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        Err(not_yet_implemented("Generate", ISSUE))
    }

    async fn generate_stream(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        Err(not_yet_implemented("GenerateStream", ISSUE))
    }
}

#[tonic::async_trait]
impl pb::embedding_service_server::EmbeddingService for GatewayApi {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request = request.into_inner();
        let model = request.model.clone().unwrap_or_default();
        let mut client = self
            .workers
            .embedding_client_for(&model.name, &model.version)?;
        client.embed(forward(request, deadline)?).await
    }
}

type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for GatewayApi {
    type WatchJobStream = WatchJobStream;

    async fn submit_job(
        &self,
        _: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("SubmitJob", ISSUE))
    }

    async fn get_job(&self, _: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("GetJob", ISSUE))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(not_yet_implemented("ListJobs", ISSUE))
    }

    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("CancelJob", ISSUE))
    }

    async fn watch_job(
        &self,
        _: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(not_yet_implemented("WatchJob", ISSUE))
    }

    async fn get_job_result(
        &self,
        _: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        Err(not_yet_implemented("GetJobResult", ISSUE))
    }
}
