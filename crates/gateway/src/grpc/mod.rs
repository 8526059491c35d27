//! The gateway's public gRPC APIs: the Open Inference Protocol, embeddings
//! and generation, each model RPC forwarded to a worker serving the model
//! with the caller's deadline, request id and trace context. Batch jobs
//! arrive with the dispatcher issue.
//!
//! A forwarded stream is the upstream stream: when the client goes away,
//! tonic drops it, the upstream call is dropped with it, and the worker
//! cancels the sequence.

mod forward;

use std::pin::Pin;
use std::sync::Arc;

use lmgrid_core::error::not_yet_implemented;
use lmgrid_core::health::Readiness;
use lmgrid_core::oip;
use lmgrid_proto::inference as oip_pb;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use self::forward::{Incoming, Observation, Relay};
use crate::metrics;
use crate::routing::Workers;

const JOBS_ISSUE: &str = "the dispatcher issue (durable batch jobs in Redis)";

#[derive(Debug, Clone)]
pub(crate) struct GatewayApi {
    readiness: Readiness,
    workers: Arc<Workers>,
}

impl GatewayApi {
    pub(crate) fn new(readiness: Readiness, workers: Arc<Workers>) -> Self {
        GatewayApi { readiness, workers }
    }

    /// Starts observing a forwarded call of `route` for `model`.
    fn observe(&self, route: &'static str, model: &str, incoming: &Incoming) -> Observation {
        Observation::start(route, self.workers.label(model), &incoming.request_id)
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
        let incoming = Incoming::of(&request);
        let request = request.into_inner();
        let observation = self.observe(routes::MODEL_READY, &request.name, &incoming);
        let result = async {
            let mut client = self.workers.client_for(&request.name, &request.version)?;
            client.model_ready(incoming.forward(request)?).await
        }
        .await;
        observation.finish(&result);
        incoming.answer(result)
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
        let incoming = Incoming::of(&request);
        let request = request.into_inner();
        let observation = self.observe(routes::MODEL_METADATA, &request.name, &incoming);
        let result = async {
            let mut client = self.workers.client_for(&request.name, &request.version)?;
            client.model_metadata(incoming.forward(request)?).await
        }
        .await;
        observation.finish(&result);
        incoming.answer(result)
    }

    async fn model_infer(
        &self,
        request: Request<oip_pb::ModelInferRequest>,
    ) -> Result<Response<oip_pb::ModelInferResponse>, Status> {
        let incoming = Incoming::of(&request);
        let request = request.into_inner();
        let observation = self.observe(routes::MODEL_INFER, &request.model_name, &incoming);
        let result = async {
            let mut client = self
                .workers
                .client_for(&request.model_name, &request.model_version)?;
            client.model_infer(incoming.forward(request)?).await
        }
        .await;
        observation.finish(&result);
        incoming.answer(result)
    }
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::generation_service_server::GenerationService for GatewayApi {
    type GenerateStreamStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let incoming = Incoming::of(&request);
        let mut request = request.into_inner();
        incoming.stamp(&mut request.context);
        let model = request.model.clone().unwrap_or_default();
        let observation = self.observe(routes::GENERATE, &model.name, &incoming);
        let result = async {
            let mut client = self
                .workers
                .generation_client_for(&model.name, &model.version)?;
            client.generate(incoming.forward(request)?).await
        }
        .await;
        if let Ok(response) = &result
            && let Some(usage) = response.get_ref().usage
        {
            metrics::tokens(
                observation.model(),
                usage.prompt_tokens,
                usage.completion_tokens,
            );
        }
        observation.finish(&result);
        incoming.answer(result)
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let incoming = Incoming::of(&request);
        let mut request = request.into_inner();
        incoming.stamp(&mut request.context);
        let model = request.model.clone().unwrap_or_default();
        let observation = self.observe(routes::GENERATE_STREAM, &model.name, &incoming);
        // Usage is always asked for, to meter it; passed on only when the
        // caller asked too.
        let pass_usage = request.include_usage;
        request.include_usage = true;
        let result = async {
            let mut client = self
                .workers
                .generation_client_for(&model.name, &model.version)?;
            client.generate_stream(incoming.forward(request)?).await
        }
        .await;
        let upstream = match result {
            Ok(response) => response.into_inner(),
            Err(status) => {
                observation.finish::<()>(&Err(status.clone()));
                return incoming.answer(Err(status));
            }
        };
        let relay = Relay::new(observation, pass_usage, incoming.deadline);
        let stream =
            futures::stream::unfold((upstream, relay), |(mut upstream, mut relay)| async move {
                let next = relay.next(&mut upstream).await?;
                Some((next, (upstream, relay)))
            });
        incoming.answer(Ok(Response::new(Box::pin(stream) as GenerateStream)))
    }
}

/// Route labels of the forwarded RPCs.
mod routes {
    pub(super) const MODEL_READY: &str = "/inference.GRPCInferenceService/ModelReady";
    pub(super) const MODEL_METADATA: &str = "/inference.GRPCInferenceService/ModelMetadata";
    pub(super) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
    pub(super) const EMBED: &str = "/lmgrid.v1.EmbeddingService/Embed";
    pub(super) const GENERATE: &str = "/lmgrid.v1.GenerationService/Generate";
    pub(super) const GENERATE_STREAM: &str = "/lmgrid.v1.GenerationService/GenerateStream";
}

#[tonic::async_trait]
impl pb::embedding_service_server::EmbeddingService for GatewayApi {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let incoming = Incoming::of(&request);
        let mut request = request.into_inner();
        incoming.stamp(&mut request.context);
        let model = request.model.clone().unwrap_or_default();
        let observation = self.observe(routes::EMBED, &model.name, &incoming);
        let result = async {
            let mut client = self
                .workers
                .embedding_client_for(&model.name, &model.version)?;
            client.embed(incoming.forward(request)?).await
        }
        .await;
        if let Ok(response) = &result
            && let Some(usage) = response.get_ref().usage
        {
            metrics::tokens(
                observation.model(),
                usage.prompt_tokens,
                usage.completion_tokens,
            );
        }
        observation.finish(&result);
        incoming.answer(result)
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
        Err(not_yet_implemented("SubmitJob", JOBS_ISSUE))
    }

    async fn get_job(&self, _: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("GetJob", JOBS_ISSUE))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(not_yet_implemented("ListJobs", JOBS_ISSUE))
    }

    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("CancelJob", JOBS_ISSUE))
    }

    async fn watch_job(
        &self,
        _: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(not_yet_implemented("WatchJob", JOBS_ISSUE))
    }

    async fn get_job_result(
        &self,
        _: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        Err(not_yet_implemented("GetJobResult", JOBS_ISSUE))
    }
}
