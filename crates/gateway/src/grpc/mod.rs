//! The gateway's public gRPC APIs: the Open Inference Protocol, embeddings
//! and generation, each model RPC forwarded to a worker that routing chose
//! (retried on another when an attempt fails safely) with the caller's
//! deadline, request id and trace context. Batch jobs arrive with the
//! dispatcher issue.
//!
//! A forwarded stream is the upstream stream: when the client goes away,
//! tonic drops it, the upstream call is dropped with it, and the worker
//! cancels the sequence.

mod forward;
mod gate;

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
use crate::routing::{EMBEDDING, GENERATION, Target, Workers};

const JOBS_ISSUE: &str = "the dispatcher issue (durable batch jobs in Redis)";

#[derive(Debug, Clone)]
pub(crate) struct GatewayApi {
    readiness: Readiness,
    workers: Arc<Workers>,
    /// Authentication and admission; model RPCs are refused without it.
    gate: Option<gate::Gate>,
}

impl GatewayApi {
    pub(crate) fn new(readiness: Readiness, workers: Arc<Workers>) -> Self {
        GatewayApi {
            readiness,
            workers,
            gate: None,
        }
    }

    /// Authenticates and admits model RPCs with `tenancy`.
    pub(crate) fn with_tenancy(mut self, tenancy: &crate::tenancy::Tenancy) -> Self {
        self.gate = Some(gate::Gate::new(tenancy));
        self
    }

    /// The gate model RPCs pass.
    fn gate(&self) -> Result<&gate::Gate, Status> {
        self.gate
            .as_ref()
            .ok_or_else(|| Status::internal("the gateway has no authentication configured"))
    }

    /// Admits a call of `caller` for `model`, whose observation has the
    /// model's label.
    async fn admit(
        &self,
        caller: &crate::auth::Identity,
        model: &str,
        observation: &Observation,
        tokens: u64,
        incoming: &Incoming,
    ) -> Result<gate::Admitted, Status> {
        self.gate()?
            .admit(
                caller,
                model,
                observation.model(),
                tokens,
                &incoming.request_id,
                incoming.deadline,
            )
            .await
    }

    /// Starts observing a forwarded call of `route` for `model`.
    fn observe(&self, route: &'static str, model: &str, incoming: &Incoming) -> Observation {
        Observation::start(route, self.workers.label(model), &incoming.request_id)
    }

    /// Forwards a question about a model (ready, metadata) to a worker
    /// serving it, after authentication and the tenant's model check.
    async fn about_model<M, R>(
        &self,
        request: Request<M>,
        route: &'static str,
        name: &str,
        version: &str,
    ) -> Result<Response<R>, Status>
    where
        M: crate::routing::Versioned,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let incoming = Incoming::of(&request);
        let caller = self.gate().and_then(|gate| gate.authenticate(&request));
        let request = request.into_inner();
        let observation = self.observe(route, name, &incoming);
        let result = async {
            self.gate()?.allow(&caller?, name, observation.model())?;
            let plan = self.workers.plan(Target::about(name, version))?;
            incoming.unary(&self.workers, &plan, route, request).await
        }
        .await;
        observation.finish(&result);
        incoming.answer(result)
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
        let (name, version) = (
            request.get_ref().name.clone(),
            request.get_ref().version.clone(),
        );
        self.about_model(request, routes::MODEL_READY, &name, &version)
            .await
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
        let (name, version) = (
            request.get_ref().name.clone(),
            request.get_ref().version.clone(),
        );
        self.about_model(request, routes::MODEL_METADATA, &name, &version)
            .await
    }

    async fn model_infer(
        &self,
        request: Request<oip_pb::ModelInferRequest>,
    ) -> Result<Response<oip_pb::ModelInferResponse>, Status> {
        let incoming = Incoming::of(&request);
        let caller = self.gate().and_then(|gate| gate.authenticate(&request));
        let request = request.into_inner();
        let observation = self.observe(routes::MODEL_INFER, &request.model_name, &incoming);
        let result = async {
            // Tensors have no tokens: requests per minute and concurrency.
            let admitted = self
                .admit(&caller?, &request.model_name, &observation, 0, &incoming)
                .await?;
            let target = Target::work(&request.model_name, &request.model_version, None);
            let plan = self.workers.plan(target)?;
            admitted.started();
            let mut response = incoming
                .unary(&self.workers, &plan, routes::MODEL_INFER, request)
                .await;
            admitted.settle(&mut response, |_| None);
            response
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
        let caller = self.gate().and_then(|gate| gate.authenticate(&request));
        let mut request = request.into_inner();
        incoming.stamp(&mut request.context);
        let model = request.model.clone().unwrap_or_default();
        let observation = self.observe(routes::GENERATE, &model.name, &incoming);
        let result = async {
            let caller = caller?;
            gate::stamp(&caller, &mut request.context);
            let tokens = gate::generation_tokens(&request);
            let admitted = self
                .admit(&caller, &model.name, &observation, tokens, &incoming)
                .await?;
            let target = Target::work(&model.name, &model.version, Some(GENERATION));
            let plan = self.workers.plan(target.prompt(request.input.as_ref()))?;
            admitted.started();
            let mut response = incoming
                .unary::<_, pb::GenerateResponse>(&self.workers, &plan, routes::GENERATE, request)
                .await;
            admitted.settle(&mut response, |r| r.usage.as_ref());
            response
        }
        .await;
        if let Ok(response) = &result {
            count_tokens(&observation, response.get_ref().usage.as_ref());
        }
        observation.finish(&result);
        incoming.answer(result)
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let incoming = Incoming::of(&request);
        let caller = self.gate().and_then(|gate| gate.authenticate(&request));
        let mut request = request.into_inner();
        incoming.stamp(&mut request.context);
        let model = request.model.clone().unwrap_or_default();
        let observation = self.observe(routes::GENERATE_STREAM, &model.name, &incoming);
        // Usage is always asked for, to meter it; passed on only when the
        // caller asked too.
        let pass_usage = request.include_usage;
        request.include_usage = true;
        let result = async {
            let caller = caller?;
            gate::stamp(&caller, &mut request.context);
            let tokens = gate::generation_tokens(&request);
            let admitted = self
                .admit(&caller, &model.name, &observation, tokens, &incoming)
                .await?;
            let target = Target::work(&model.name, &model.version, Some(GENERATION));
            let plan = self.workers.plan(target.prompt(request.input.as_ref()))?;
            admitted.started();
            let upstream = incoming
                .generate_stream(&self.workers, &plan, request)
                .await?;
            Ok::<_, Status>((upstream, admitted))
        }
        .await;
        let (upstream, admitted) = match result {
            Ok(started) => started,
            Err(status) => {
                observation.finish::<()>(&Err(status.clone()));
                return incoming.answer(Err(status));
            }
        };
        let windows = admitted.windows();
        // The relay passes usage on; this stream meters it, then drops it
        // unless the caller asked for it.
        let relay = Relay::new(observation, true, incoming.deadline);
        let state = (upstream, relay, Some(admitted));
        let stream = futures::stream::unfold(
            state,
            move |(mut upstream, mut relay, mut admitted)| async move {
                let Some(next) = relay.next(&mut upstream).await else {
                    if let Some(admitted) = admitted.take() {
                        admitted.finish(false);
                    }
                    return None;
                };
                let next = match next {
                    Ok(mut message) => {
                        if let Some(admitted) = &admitted {
                            admitted.record_usage(message.usage.as_ref());
                        }
                        if !pass_usage {
                            message.usage = None;
                        }
                        Ok(message)
                    }
                    Err(status) => {
                        if let Some(admitted) = admitted.take() {
                            admitted.finish(true);
                        }
                        Err(status)
                    }
                };
                Some((next, (upstream, relay, admitted)))
            },
        );
        let mut response = Response::new(Box::pin(stream) as GenerateStream);
        gate::insert_rate_windows(response.metadata_mut(), &windows);
        incoming.answer(Ok(response))
    }
}

/// The forwarded RPCs: the worker's method of the same name, and the route
/// label of metrics and logs.
mod routes {
    pub(super) use crate::http::forward::methods::{
        EMBED, GENERATE, GENERATE_STREAM, MODEL_INFER, MODEL_METADATA, MODEL_READY,
    };
}

#[tonic::async_trait]
impl pb::embedding_service_server::EmbeddingService for GatewayApi {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let incoming = Incoming::of(&request);
        let caller = self.gate().and_then(|gate| gate.authenticate(&request));
        let mut request = request.into_inner();
        incoming.stamp(&mut request.context);
        let model = request.model.clone().unwrap_or_default();
        let observation = self.observe(routes::EMBED, &model.name, &incoming);
        let result = async {
            let caller = caller?;
            gate::stamp(&caller, &mut request.context);
            let tokens = gate::embedding_tokens(&request);
            let admitted = self
                .admit(&caller, &model.name, &observation, tokens, &incoming)
                .await?;
            let target = Target::work(&model.name, &model.version, Some(EMBEDDING));
            let plan = self.workers.plan(target)?;
            admitted.started();
            let mut response = incoming
                .unary::<_, pb::EmbedResponse>(&self.workers, &plan, routes::EMBED, request)
                .await;
            admitted.settle(&mut response, |r| r.usage.as_ref());
            response
        }
        .await;
        if let Ok(response) = &result {
            count_tokens(&observation, response.get_ref().usage.as_ref());
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

/// Counts a call's tokens, as the worker reported them, in the gateway's metrics.
fn count_tokens(observation: &Observation, usage: Option<&pb::Usage>) {
    if let Some(usage) = usage {
        metrics::tokens(
            observation.model(),
            usage.prompt_tokens,
            usage.completion_tokens,
        );
    }
}
