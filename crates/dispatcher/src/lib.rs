//! The dispatcher: batch jobs. It owns the durable job queue in Redis —
//! priority lanes with aging, per-tenant fairness, deadlines, idempotency
//! keys, retries with backoff and jitter, dead letters, dependencies,
//! cancellation and results — and feeds jobs to workers.
//!
//! Today it serves `lmgrid.v1.JobService` with every RPC answering
//! `UNIMPLEMENTED`, naming the issue that brings it, and takes part in
//! discovery, health and shutdown like every service.

mod grpc;

use std::net::SocketAddr;

use lmgrid_core::config::{ConfigError, NodeConfig, Validate};
use lmgrid_core::node::Node;
use lmgrid_proto::lmgrid::v1::job_service_server::JobServiceServer;
use lmgrid_proto::service_names;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// The service name in discovery, health and metrics.
pub const SERVICE: &str = "dispatcher";

/// Dispatcher configuration.
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

/// A started dispatcher: ports bound, not serving yet.
#[derive(Debug)]
pub struct Dispatcher {
    node: Node,
}

impl Dispatcher {
    pub async fn start(config: Config) -> lmgrid_core::Result<Dispatcher> {
        let node = Node::start(&config.node, SERVICE, &[service_names::JOBS]).await?;
        Ok(Dispatcher { node })
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
        let routes = Routes::new(JobServiceServer::new(grpc::Api));
        self.node.run(routes, shutdown).await
    }
}

/// Runs the dispatcher until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
    Dispatcher::start(config).await?.run(shutdown).await
}
