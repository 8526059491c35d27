//! Public HTTP requests on their way to a worker: routing resolves the
//! model (a version, an alias, or a traffic split) to workers, the message
//! gets the version routing chose, and it goes out with the call's deadline,
//! request id and trace context, retried on another worker when an attempt
//! fails safely. Failures come back as the client's errors.

use lmgrid_proto::lmgrid::v1 as pb;

use super::call::Call;
use super::error::ApiError;
use crate::routing::{Outbound, Plan, Target, Upstream, Versioned};

/// The gRPC methods requests are forwarded to.
pub(crate) mod methods {
    pub(crate) const MODEL_READY: &str = "/inference.GRPCInferenceService/ModelReady";
    pub(crate) const MODEL_METADATA: &str = "/inference.GRPCInferenceService/ModelMetadata";
    pub(crate) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
    pub(crate) const EMBED: &str = "/lmgrid.v1.EmbeddingService/Embed";
    pub(crate) const GENERATE: &str = "/lmgrid.v1.GenerationService/Generate";
    pub(crate) const GENERATE_STREAM: &str = "/lmgrid.v1.GenerationService/GenerateStream";
}

/// Resolves `target` to the workers that may take it. `wanted` says what
/// the endpoint serves (`chat completions`), for the error about a model of
/// another kind.
pub(crate) fn plan(call: &Call, target: Target<'_>, wanted: &str) -> Result<Plan, ApiError> {
    call.state()
        .workers
        .plan(target)
        .map_err(|error| ApiError::from_route(error, wanted))
}

/// Sends `message` to `method` of a worker of `plan` and returns the answer.
pub(crate) async fn unary<M, R>(
    call: &Call,
    plan: &Plan,
    method: &'static str,
    mut message: M,
) -> Result<R, ApiError>
where
    M: Versioned,
    R: prost::Message + Default + Send + Sync + 'static,
{
    if let Some(version) = &plan.version {
        message.set_version(version.clone());
    }
    let out = Outbound::new(
        method,
        call.upstream(message, false)?,
        Some(call.deadline(false)),
    );
    call.unary(call.state().workers.unary(plan, out)).await
}

/// Starts a generation stream at a worker of `plan`, once its first message
/// arrived: a worker's refusal is still an HTTP error then.
pub(crate) async fn generate_stream(
    call: &Call,
    plan: &Plan,
    mut message: pb::GenerateRequest,
) -> Result<Upstream<pb::GenerateStreamResponse>, ApiError> {
    if let Some(version) = &plan.version {
        message.set_version(version.clone());
    }
    let out = Outbound::new(
        methods::GENERATE_STREAM,
        call.upstream(message, true)?,
        Some(call.deadline(true)),
    );
    call.state()
        .workers
        .server_streaming(plan, out)
        .await
        .map_err(|status| ApiError::from_status(&status))
}
