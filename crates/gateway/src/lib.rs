//! The gateway: lmgrid's only public entry. It will serve the
//! OpenAI-compatible REST API, the Open Inference Protocol over REST and gRPC,
//! and lmgrid's own gRPC APIs; authenticate tenants, admit work under their
//! limits, route to workers and meter usage (the gateway issue).
//!
//! Today it serves the Open Inference Protocol on its gRPC port — model RPCs
//! forwarded to a worker that serves the model, chosen from discovery by
//! load — with lmgrid's own APIs `UNIMPLEMENTED` (saying which issue brings
//! them), its public HTTP port with JSON errors for unknown
//! routes (and `/livez`, `/readyz`, `/metrics` when `http.serve_admin` is
//! set, as in `lmgrid up`), and reports in `grpc.health.v1` whether each other
//! lmgrid service has a ready instance in discovery.

mod grpc;
mod http_api;
mod peers;
mod routing;

use std::net::SocketAddr;
use std::sync::Arc;

use lmgrid_core::config::{ConfigError, NodeConfig, Validate};
use lmgrid_core::health::admin_router;
use lmgrid_core::node::{Node, bind_http};
use lmgrid_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use lmgrid_proto::lmgrid::v1::embedding_service_server::EmbeddingServiceServer;
use lmgrid_proto::lmgrid::v1::generation_service_server::GenerationServiceServer;
use lmgrid_proto::lmgrid::v1::job_service_server::JobServiceServer;
use lmgrid_proto::service_names;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use peers::PEER_SERVICES;

/// The service name in discovery, health and metrics.
pub const SERVICE: &str = "gateway";

/// Gateway configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub http: HttpConfig,
    /// Services that must each have a ready instance before the gateway
    /// reports ready. Empty in clusters (the gateway answers 503 while no
    /// worker is ready); `lmgrid up` lists every service so that its
    /// `/readyz` means "the whole platform is up".
    pub require_services: Vec<String>,
}

/// The public HTTP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen_addr: SocketAddr,
    /// Also serve `/livez`, `/readyz` and `/metrics` on the public port.
    pub serve_admin: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            serve_admin: false,
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate_at("node")?;
        if self.http.listen_addr == self.node.grpc.listen_addr
            || (self.node.admin.enabled && self.http.listen_addr == self.node.admin.listen_addr)
        {
            return Err(ConfigError::new(
                "http.listen_addr",
                "must differ from node.grpc.listen_addr and node.admin.listen_addr",
            ));
        }
        for service in &self.require_services {
            if !PEER_SERVICES.contains(&service.as_str()) {
                return Err(ConfigError::new(
                    "require_services",
                    format!("unknown service {service:?}; expected one of {PEER_SERVICES:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// A started gateway: ports bound, not serving yet.
#[derive(Debug)]
pub struct Gateway {
    node: Node,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    config: Config,
}

impl Gateway {
    pub async fn start(config: Config) -> lmgrid_core::Result<Gateway> {
        let node = Node::start(
            &config.node,
            SERVICE,
            &[
                service_names::INFERENCE,
                service_names::GENERATION,
                service_names::EMBEDDING,
                service_names::JOBS,
            ],
        )
        .await?;
        let http_listener = bind_http("public HTTP", config.http.listen_addr).await?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| lmgrid_core::Error::Bind {
                what: "public HTTP",
                addr: config.http.listen_addr,
                source,
            })?;
        Ok(Gateway {
            node,
            http_listener,
            http_addr,
            config,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.node.grpc_addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.node.admin_addr()
    }

    pub fn id(&self) -> &str {
        self.node.id()
    }

    /// Serves until `shutdown`, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
        let Gateway {
            mut node,
            http_listener,
            http_addr,
            config,
        } = self;
        let readiness = node.readiness().clone();

        let peers = peers::follow(
            node.discovery(),
            node.health_reporter(),
            &readiness,
            &config.require_services,
        )
        .await?;

        let mut router = http_api::router();
        if config.http.serve_admin {
            router = router.merge(admin_router(readiness.clone()));
        }
        tracing::info!(%http_addr, serve_admin = config.http.serve_admin, "public HTTP server listening");
        node.serve_http(http_listener, router);

        let workers = Arc::new(routing::Workers::new(
            node.discovery().watch("worker").await?,
        ));
        let api = grpc::GatewayApi::new(readiness, workers);
        let routes = Routes::new(GrpcInferenceServiceServer::new(api.clone()))
            .add_service(GenerationServiceServer::new(api.clone()))
            .add_service(EmbeddingServiceServer::new(api.clone()))
            .add_service(JobServiceServer::new(api));
        let result = node.run(routes, shutdown).await;
        peers.stop();
        result
    }
}

/// Runs a gateway until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
    Gateway::start(config).await?.run(shutdown).await
}
