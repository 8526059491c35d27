//! Notification: the event log of the platform. Every service publishes
//! events here; operators query and filter them, subscribe to a live stream,
//! and get webhooks (HMAC-signed, retried, dead-lettered) and grouped,
//! deduplicated alerts.
//!
//! Today it serves `lmgrid.v1.NotificationService` with every RPC answering
//! `UNIMPLEMENTED`, naming the issue that brings it, and takes part in
//! discovery, health and shutdown like every service.

mod grpc;

use std::net::SocketAddr;

use lmgrid_core::config::{ConfigError, NodeConfig, Validate};
use lmgrid_core::node::Node;
use lmgrid_proto::lmgrid::v1::notification_service_server::NotificationServiceServer;
use lmgrid_proto::service_names;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// The service name in discovery, health and metrics.
pub const SERVICE: &str = "notification";

/// Notification configuration.
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

/// A started notification: ports bound, not serving yet.
#[derive(Debug)]
pub struct Notification {
    node: Node,
}

impl Notification {
    pub async fn start(config: Config) -> lmgrid_core::Result<Notification> {
        let node = Node::start(&config.node, SERVICE, &[service_names::NOTIFICATION]).await?;
        Ok(Notification { node })
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
        let routes = Routes::new(NotificationServiceServer::new(grpc::Api));
        self.node.run(routes, shutdown).await
    }
}

/// Runs the notification until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
    Notification::start(config).await?.run(shutdown).await
}
