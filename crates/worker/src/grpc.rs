//! The worker's gRPC APIs: the Open Inference Protocol over the model table
//! and the batchers, embeddings (see `embedding`), and worker control (load,
//! unload, list, stats).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use lmgrid_core::error::ErrorKind;
use lmgrid_core::health::Readiness;
use lmgrid_core::{deadline, oip};
use lmgrid_proto::inference as oip_pb;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::batcher::{BatchError, BatchKey, Job};
use crate::generation::service;
use crate::gpu::GpuReadings;
use crate::models::{LoadedVersion, ManageError, ModelManager, ResolveError, VersionState};
use crate::repository::ModelKind;
use crate::tensor::{DataType, DecodeError, Tensor};

/// The platform name models report in `ModelMetadata`, as Triton names it.
const PLATFORM: &str = "onnxruntime_onnx";

#[derive(Debug, Clone)]
pub(crate) struct WorkerApi {
    readiness: Readiness,
    models: Arc<ModelManager>,
    gpus: GpuReadings,
}

impl WorkerApi {
    pub(crate) fn new(readiness: Readiness, models: Arc<ModelManager>, gpus: GpuReadings) -> Self {
        WorkerApi {
            readiness,
            models,
            gpus,
        }
    }

    fn resolve(&self, name: &str, version: &str) -> Result<Arc<LoadedVersion>, Status> {
        if name.is_empty() {
            return Err(ErrorKind::InvalidArgument.status("model name is empty"));
        }
        self.models.resolve(name, version).map_err(|e| match e {
            ResolveError::UnknownModel(_) | ResolveError::UnknownVersion { .. } => {
                ErrorKind::NotFound.status(e.to_string())
            }
        })
    }
}

fn invalid(message: impl Into<String>) -> Status {
    ErrorKind::InvalidArgument.status(message)
}

fn int_parameter(
    params: &std::collections::HashMap<String, oip_pb::InferParameter>,
    key: &str,
) -> Result<Option<u64>, Status> {
    use oip_pb::infer_parameter::ParameterChoice;
    let Some(parameter) = params.get(key) else {
        return Ok(None);
    };
    match parameter.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) if v >= 0 => Ok(Some(v.unsigned_abs())),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(v)),
        _ => Err(invalid(format!(
            "parameter '{key}' must be a non-negative integer"
        ))),
    }
}

/// Decodes and checks a request against the model's signature. Returns the
/// inputs in the model's order and the batch size.
fn decode_inputs(
    model: &LoadedVersion,
    request: &mut oip_pb::ModelInferRequest,
) -> Result<(Vec<Tensor>, usize), Status> {
    let inputs = std::mem::take(&mut request.inputs);
    let raw = std::mem::take(&mut request.raw_input_contents);
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(invalid(format!(
            "{} raw_input_contents for {} inputs: send one per input, or none",
            raw.len(),
            inputs.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut by_name = std::collections::HashMap::new();
    for (i, input) in inputs.into_iter().enumerate() {
        if !seen.insert(input.name.clone()) {
            return Err(invalid(format!("input '{}' is given twice", input.name)));
        }
        let Some(spec) = model.signature.inputs.iter().find(|s| s.name == input.name) else {
            let known: Vec<&str> = model
                .signature
                .inputs
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return Err(invalid(format!(
                "model '{}' has no input '{}' (inputs: {})",
                model.name,
                input.name,
                known.join(", ")
            )));
        };
        if !raw.is_empty() && input.contents.is_some() {
            return Err(invalid(format!(
                "input '{}': give contents or raw_input_contents, not both",
                input.name
            )));
        }
        if input.datatype != spec.dtype.as_str() {
            return Err(invalid(format!(
                "input '{}': datatype {} does not match the model's {}",
                input.name, input.datatype, spec.dtype
            )));
        }
        let shape_ok = input.shape.len() == spec.shape.len()
            && input
                .shape
                .iter()
                .zip(&spec.shape)
                .all(|(&got, &want)| want < 0 || got == want);
        if !shape_ok {
            return Err(invalid(format!(
                "input '{}': shape {:?} does not match the model's {:?} (-1 is any size)",
                input.name, input.shape, spec.shape
            )));
        }
        let tensor = Tensor::from_request(
            input,
            raw.get(i).map(|b| b.as_ref()),
            model.config.max_input_elements,
        )
        .map_err(|e| match e {
            DecodeError::Invalid(e) => invalid(e.to_string()),
            DecodeError::TooLarge(m) => ErrorKind::ResourceExhausted.status(m),
        })?;
        by_name.insert(tensor.name.clone(), tensor);
    }
    let mut ordered = Vec::with_capacity(model.signature.inputs.len());
    for spec in &model.signature.inputs {
        let tensor = by_name
            .remove(&spec.name)
            .ok_or_else(|| invalid(format!("input '{}' is missing", spec.name)))?;
        ordered.push(tensor);
    }
    let rows = if model.config.max_batch_size > 0 {
        let rows = ordered[0].batch();
        if let Some(other) = ordered.iter().find(|t| t.batch() != rows) {
            return Err(invalid(format!(
                "input '{}' has batch size {} but '{}' has {rows}",
                other.name,
                other.batch(),
                ordered[0].name
            )));
        }
        if rows == 0 || rows > model.config.max_batch_size {
            return Err(invalid(format!(
                "input '{}': batch size {rows} is outside 1..={} for model '{}'",
                ordered[0].name, model.config.max_batch_size, model.name
            )));
        }
        rows
    } else {
        1
    };
    Ok((ordered, rows))
}

fn batch_status(error: BatchError) -> Status {
    let kind = match &error {
        BatchError::QueueFull { .. } => ErrorKind::ResourceExhausted,
        BatchError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        BatchError::Closed => ErrorKind::Unavailable,
        BatchError::Engine(_) => ErrorKind::Internal,
    };
    kind.status(error.to_string())
}

/// Runs one job on a model version's batcher and waits for its outputs, or
/// the deadline. `priority` counts from 0, the highest.
pub(crate) async fn compute(
    model: &LoadedVersion,
    inputs: Vec<Tensor>,
    key: BatchKey,
    rows: usize,
    priority: usize,
    deadline: Option<Instant>,
) -> Result<Vec<Tensor>, Status> {
    let (reply, receiver) = oneshot::channel();
    let Some(batcher) = &model.batcher else {
        return Err(invalid(format!(
            "model '{}' is a generation model; call lmgrid.v1.GenerationService",
            model.name
        )));
    };
    batcher
        .submit(Job {
            key,
            inputs,
            rows,
            priority,
            deadline,
            enqueued: Instant::now(),
            reply,
        })
        .map_err(batch_status)?;
    let answer = match deadline {
        Some(at) => match tokio::time::timeout_at(at.into(), receiver).await {
            Ok(answer) => answer,
            Err(_) => return Err(batch_status(BatchError::DeadlineExceeded)),
        },
        None => receiver.await,
    };
    answer
        .map_err(|_| ErrorKind::Internal.status("the model instance stopped before answering"))?
        .map_err(batch_status)
}

impl WorkerApi {
    async fn infer(
        &self,
        request: Request<oip_pb::ModelInferRequest>,
    ) -> Result<oip_pb::ModelInferResponse, Status> {
        let started = Instant::now();
        let grpc_deadline = deadline::from_metadata(request.metadata());
        let mut request = request.into_inner();
        let model = self.resolve(&request.model_name, &request.model_version)?;
        let result = self
            .infer_on(&model, &mut request, grpc_deadline, started)
            .await;
        model.metrics.answered(&result, Some(started));
        result
    }

    async fn infer_on(
        &self,
        model: &Arc<LoadedVersion>,
        request: &mut oip_pb::ModelInferRequest,
        grpc_deadline: Option<Instant>,
        started: Instant,
    ) -> Result<oip_pb::ModelInferResponse, Status> {
        // Which outputs, in what order: as requested, else all. Checked before
        // anything is computed.
        let mut named = HashSet::new();
        if let Some(twice) = request.outputs.iter().find(|o| !named.insert(&o.name)) {
            return Err(invalid(format!(
                "output '{}' is requested twice",
                twice.name
            )));
        }
        let wanted: Vec<usize> = if request.outputs.is_empty() {
            (0..model.signature.outputs.len()).collect()
        } else {
            request
                .outputs
                .iter()
                .map(|o| {
                    model
                        .signature
                        .outputs
                        .iter()
                        .position(|s| s.name == o.name)
                        .ok_or_else(|| {
                            let known: Vec<&str> = model
                                .signature
                                .outputs
                                .iter()
                                .map(|s| s.name.as_str())
                                .collect();
                            invalid(format!(
                                "model '{}' has no output '{}' (outputs: {})",
                                model.name,
                                o.name,
                                known.join(", ")
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        };
        // Raw or typed outputs, never a mix: raw when the inputs were raw, or
        // when an output is FP16, which has no typed contents field.
        let raw = !request.raw_input_contents.is_empty()
            || wanted
                .iter()
                .any(|&i| model.signature.outputs[i].dtype == DataType::Fp16);
        let priority = int_parameter(&request.parameters, "priority")?;
        let timeout_us = int_parameter(&request.parameters, "timeout")?;
        let (inputs, rows) = decode_inputs(model, request)?;
        let levels = model
            .config
            .dynamic_batching
            .as_ref()
            .map_or(1, |d| d.priority_levels);
        let default_level = model
            .config
            .dynamic_batching
            .as_ref()
            .map_or(1, |d| d.default_priority_level);
        let level = match priority {
            None | Some(0) => default_level,
            Some(p) => usize::try_from(p)
                .ok()
                .filter(|&p| p <= levels)
                .ok_or_else(|| invalid(format!("priority {p} is outside 1..={levels}")))?,
        };
        let deadline = deadline::earliest(
            grpc_deadline,
            timeout_us.map(|us| started + std::time::Duration::from_micros(us)),
        );
        let key = BatchKey::of(&inputs);
        let mut outputs = compute(model, inputs, key, rows, level - 1, deadline)
            .await?
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>();
        let mut response = oip_pb::ModelInferResponse {
            model_name: model.name.clone(),
            model_version: model.version.to_string(),
            id: std::mem::take(&mut request.id),
            ..Default::default()
        };
        for index in wanted {
            let Some(tensor) = outputs.get_mut(index).and_then(Option::take) else {
                return Err(
                    ErrorKind::Internal.status("the model returned fewer outputs than it declares")
                );
            };
            let (output, bytes) = tensor.into_response(raw);
            response.outputs.push(output);
            if let Some(bytes) = bytes {
                response.raw_output_contents.push(bytes);
            }
        }
        Ok(response)
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
        request: Request<oip_pb::ModelReadyRequest>,
    ) -> Result<Response<oip_pb::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        match self.models.resolve(&request.name, &request.version) {
            Ok(_) => Ok(Response::new(oip_pb::ModelReadyResponse { ready: true })),
            Err(_) if self.models.knows(&request.name) => {
                Ok(Response::new(oip_pb::ModelReadyResponse { ready: false }))
            }
            Err(e) => Err(ErrorKind::NotFound.status(e.to_string())),
        }
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
        use oip_pb::model_metadata_response::TensorMetadata;
        let request = request.into_inner();
        let model = self.resolve(&request.name, &request.version)?;
        let versions = self
            .models
            .ready()
            .iter()
            .filter(|l| l.name == model.name)
            .map(|l| l.version.to_string())
            .collect();
        let meta = |specs: &[crate::engine::TensorSpec]| {
            specs
                .iter()
                .map(|s| TensorMetadata {
                    name: s.name.clone(),
                    datatype: s.dtype.as_str().to_string(),
                    shape: s.shape.clone(),
                })
                .collect()
        };
        Ok(Response::new(oip_pb::ModelMetadataResponse {
            name: model.name.clone(),
            versions,
            platform: PLATFORM.to_string(),
            inputs: meta(&model.signature.inputs),
            outputs: meta(&model.signature.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<oip_pb::ModelInferRequest>,
    ) -> Result<Response<oip_pb::ModelInferResponse>, Status> {
        self.infer(request).await.map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::generation_service_server::GenerationService for WorkerApi {
    type GenerateStreamStream = service::GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline::from_metadata(request.metadata());
        let mut request = request.into_inner();
        let name = request.model.take().unwrap_or_default();
        let model = self.resolve(&name.name, &name.version)?;
        let result = service::generate(&model, request, deadline).await;
        model.metrics.answered(&result, Some(started));
        result.map(Response::new)
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let mut request = request.into_inner();
        let name = request.model.take().unwrap_or_default();
        let model = self.resolve(&name.name, &name.version)?;
        let result = service::generate_stream(&model, request, deadline).await;
        model.metrics.answered(&result, None);
        result.map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::embedding_service_server::EmbeddingService for WorkerApi {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline::from_metadata(request.metadata());
        let mut request = request.into_inner();
        let name = request.model.take().unwrap_or_default();
        let model = self.resolve(&name.name, &name.version)?;
        let result = crate::embedding::embed(&model, request, deadline).await;
        model.metrics.answered(&result, Some(started));
        result.map(Response::new)
    }
}

fn parse_version(version: &str) -> Result<Option<u64>, Status> {
    if version.is_empty() {
        return Ok(None);
    }
    version
        .parse::<u64>()
        .map(Some)
        .map_err(|_| invalid(format!("version '{version}' is not a positive integer")))
}

fn manage_status(error: ManageError) -> Status {
    match error {
        ManageError::NotFound(m) => ErrorKind::NotFound.status(m),
        ManageError::Failed(m) => ErrorKind::FailedPrecondition.status(m),
    }
}

fn to_proto(status: crate::models::ModelStatus) -> pb::WorkerModel {
    pb::WorkerModel {
        name: status.name,
        version: status.version,
        kind: match status.kind {
            ModelKind::Tensor => pb::ModelKind::Tensor,
            ModelKind::Embedding => pb::ModelKind::Embedding,
            ModelKind::Generation => pb::ModelKind::Generative,
        } as i32,
        state: match status.state {
            VersionState::Loading => pb::ModelState::Loading,
            VersionState::Ready => pb::ModelState::Ready,
            VersionState::Failed => pb::ModelState::Failed,
        } as i32,
        error: status.error,
        execution_provider: status.execution_provider,
        instances: status.instances,
    }
}

#[tonic::async_trait]
impl pb::worker_control_service_server::WorkerControlService for WorkerApi {
    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        let request = request.into_inner();
        let version = parse_version(&request.version)?;
        let statuses = self
            .models
            .load(&request.name, version)
            .await
            .map_err(manage_status)?;
        Ok(Response::new(pb::LoadModelResponse {
            models: statuses.into_iter().map(to_proto).collect(),
        }))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let request = request.into_inner();
        let version = parse_version(&request.version)?;
        self.models
            .unload(&request.name, version)
            .await
            .map_err(manage_status)?;
        Ok(Response::new(pb::UnloadModelResponse {}))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListWorkerModelsRequest>,
    ) -> Result<Response<pb::ListWorkerModelsResponse>, Status> {
        let models = self.models.statuses().into_iter().map(to_proto).collect();
        Ok(Response::new(pb::ListWorkerModelsResponse { models }))
    }

    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::WorkerStats>, Status> {
        let load = self.models.load_report();
        let models = self
            .models
            .ready()
            .iter()
            .map(|l| pb::ModelLoad {
                name: l.name.clone(),
                version: l.version.to_string(),
                in_flight: u32::try_from(l.occupancy().1).unwrap_or(u32::MAX),
                queue_depth: u32::try_from(l.occupancy().0).unwrap_or(u32::MAX),
            })
            .collect();
        let gpus = self.gpus.latest();
        let gpu_utilization = if gpus.is_empty() {
            0.0
        } else {
            (gpus.iter().map(|g| g.utilization).sum::<f64>() / gpus.len() as f64 * 100.0) as f32
        };
        Ok(Response::new(pb::WorkerStats {
            in_flight: load.in_flight,
            queue_depth: load.queue_depth,
            models,
            accelerator: load.accelerator,
            gpu_utilization,
            gpu_memory_used_bytes: gpus.iter().map(|g| g.memory_used_bytes).sum(),
        }))
    }
}
