//! The model registry: models, versions, sha256 content digests, aliases
//! with traffic weights, metadata in etcd, artifact storage with streaming
//! upload and download, and retention. Only the registry writes model
//! metadata.
//!
//! Today it serves `lmgrid.v1.RegistryService` with every RPC answering
//! `UNIMPLEMENTED`, naming the issue that brings it, and takes part in
//! discovery, health and shutdown like every service.

mod grpc;

use std::net::SocketAddr;

use lmgrid_core::config::{ConfigError, NodeConfig, Validate};
use lmgrid_core::node::Node;
use lmgrid_proto::lmgrid::v1::registry_service_server::RegistryServiceServer;
use lmgrid_proto::service_names;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// The service name in discovery, health and metrics.
pub const SERVICE: &str = "model-registry";

/// Registry configuration.
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

/// A started model-registry: ports bound, not serving yet.
#[derive(Debug)]
pub struct Registry {
    node: Node,
}

impl Registry {
    pub async fn start(config: Config) -> lmgrid_core::Result<Registry> {
        let node = Node::start(&config.node, SERVICE, &[service_names::REGISTRY]).await?;
        Ok(Registry { node })
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
        let routes = Routes::new(RegistryServiceServer::new(grpc::Api));
        self.node.run(routes, shutdown).await
    }
}

/// Runs the model-registry until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
    Registry::start(config).await?.run(shutdown).await
}
