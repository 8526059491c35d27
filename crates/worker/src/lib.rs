//! The worker: where models run. It serves the Open Inference Protocol,
//! lmgrid's generation and embedding APIs, and worker control, registers in
//! discovery with the models it serves and its load, and (with the worker and
//! language-model issues) runs ONNX Runtime sessions behind dynamic and
//! continuous batchers.
//!
//! Today it serves the server-level protocol truthfully (liveness, readiness,
//! metadata, an empty model list) and answers the model RPCs
//! `UNIMPLEMENTED`, saying which issue brings them.

mod grpc;

use std::net::SocketAddr;

use lmgrid_core::config::{ConfigError, NodeConfig, Validate};
use lmgrid_core::node::Node;
use lmgrid_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use lmgrid_proto::lmgrid::v1::embedding_service_server::EmbeddingServiceServer;
use lmgrid_proto::lmgrid::v1::generation_service_server::GenerationServiceServer;
use lmgrid_proto::lmgrid::v1::worker_control_service_server::WorkerControlServiceServer;
use lmgrid_proto::service_names;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// The service name in discovery, health and metrics.
pub const SERVICE: &str = "worker";

/// Worker configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate_at("node")
    }
}

/// A started worker: ports bound, not serving yet.
#[derive(Debug)]
pub struct Worker {
    node: Node,
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
        Ok(Worker { node })
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
        let api = grpc::WorkerApi::new(self.node.readiness().clone());
        let routes = Routes::new(GrpcInferenceServiceServer::new(api.clone()))
            .add_service(GenerationServiceServer::new(api.clone()))
            .add_service(EmbeddingServiceServer::new(api.clone()))
            .add_service(WorkerControlServiceServer::new(api));
        self.node.run(routes, shutdown).await
    }
}

/// Runs a worker until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
    Worker::start(config).await?.run(shutdown).await
}
