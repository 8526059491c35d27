//! The worker: where models run. It loads ONNX models from a model
//! repository into ONNX Runtime sessions (CPU, or CUDA by config), serves
//! them through the Open Inference Protocol behind a dynamic batcher per
//! model version, takes load/unload/reload through worker control, and
//! registers in discovery with the models it serves and its load.
//!
//! Models of kind `embedding` are also served by `lmgrid.v1.EmbeddingService`
//! (tokenized here, batched across requests of any length). Generation
//! arrives with the language-model issue and answers `UNIMPLEMENTED` until
//! then.

mod batcher;
mod embedding;
pub mod engine;
mod generation;
mod gpu;
mod grpc;
mod metrics;
pub mod models;
pub mod repository;
pub mod tensor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lmgrid_core::config::{ConfigError, NodeConfig, Validate};
use lmgrid_core::discovery::Instance;
use lmgrid_core::node::Node;
use lmgrid_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use lmgrid_proto::lmgrid::v1::embedding_service_server::EmbeddingServiceServer;
use lmgrid_proto::lmgrid::v1::generation_service_server::GenerationServiceServer;
use lmgrid_proto::lmgrid::v1::worker_control_service_server::WorkerControlServiceServer;
use lmgrid_proto::service_names;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::engine::OnnxRuntimeConfig;
use crate::models::ModelManager;
use crate::repository::DirectorySource;

/// The service name in discovery, health and metrics.
pub const SERVICE: &str = "worker";

/// Worker configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    /// A model repository directory (`<model>/config.yaml`,
    /// `<model>/<version>/model.onnx`); every model in it is loaded at start.
    pub model_repository: Option<PathBuf>,
    pub onnxruntime: OnnxRuntimeConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate_at("node")?;
        if let Some(dir) = &self.model_repository
            && !dir.is_dir()
        {
            return Err(ConfigError::new(
                "model_repository",
                format!("{} is not a directory", dir.display()),
            ));
        }
        if let Some(path) = &self.onnxruntime.library_path
            && !path.is_file()
        {
            return Err(ConfigError::new(
                "onnxruntime.library_path",
                format!("{} is not a file", path.display()),
            ));
        }
        Ok(())
    }
}

/// A started worker: ports bound, not serving yet.
#[derive(Debug)]
pub struct Worker {
    node: Node,
    models: Arc<ModelManager>,
}

impl Worker {
    pub async fn start(config: Config) -> lmgrid_core::Result<Worker> {
        let node = Node::start(
            &config.node,
            SERVICE,
            &[
                service_names::INFERENCE,
                service_names::GENERATION,
                service_names::EMBEDDING,
                service_names::WORKER_CONTROL,
            ],
        )
        .await?;
        let source = config
            .model_repository
            .map(|dir| Arc::new(DirectorySource::new(dir)) as Arc<dyn repository::ModelSource>);
        let models = Arc::new(ModelManager::new(source, config.onnxruntime));
        Ok(Worker { node, models })
    }

    /// The model table, for tests and embedders.
    pub fn models(&self) -> Arc<ModelManager> {
        self.models.clone()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.node.grpc_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.node.admin_addr()
    }

    pub fn id(&self) -> &str {
        self.node.id()
    }

    /// Serves until `shutdown`, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
        let Worker { mut node, models } = self;
        // Ready once the repository's models were tried: a model that fails
        // is reported, and the worker serves the others.
        let loaded = node.readiness().latch("models");
        let (updates, records) = tokio::sync::watch::channel(node.instance());
        node.publish_updates(records);
        let base = node.instance();
        let background = tokio::spawn({
            let models = models.clone();
            async move {
                models.load_all().await;
                publish(models, base, updates, loaded).await;
            }
        });
        let gpus = gpu::GpuReadings::default();
        let gpu_monitor = tokio::spawn(gpu::monitor(models.clone(), gpus.clone()));
        let api = grpc::WorkerApi::new(node.readiness().clone(), models, gpus);
        let routes = Routes::new(GrpcInferenceServiceServer::new(api.clone()))
            .add_service(GenerationServiceServer::new(api.clone()))
            .add_service(EmbeddingServiceServer::new(api.clone()))
            .add_service(WorkerControlServiceServer::new(api));
        let result = node.run(routes, shutdown).await;
        background.abort();
        gpu_monitor.abort();
        result
    }
}

/// Runs a worker until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
    Worker::start(config).await?.run(shutdown).await
}

/// Keeps the discovery record current: the ready models whenever the table
/// changes, and the load every 500 ms while it changes.
async fn publish(
    models: Arc<ModelManager>,
    base: Instance,
    updates: tokio::sync::watch::Sender<Instance>,
    loaded: lmgrid_core::health::Latch,
) {
    let mut loaded = Some(loaded);
    let mut changes = models.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let record = Instance {
            models: models.served(),
            load: Some(models.load_report()),
            ..base.clone()
        };
        updates.send_if_modified(|current| {
            if *current == record {
                false
            } else {
                *current = record;
                true
            }
        });
        // The first record carries the models, so the worker registers with them.
        if let Some(latch) = loaded.take() {
            latch.release();
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}
